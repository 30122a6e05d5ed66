"""Import the published NeoBERT checkpoint (chandar-lab/NeoBERT) into the training model, to continue
pretraining or fine-tune it here.

    python -m neobert.hf.convert_original SRC OUTDIR       # SRC: dir with config.json + model.safetensors / .bin

The original layout, from the published remote code (huggingface.co/chandar-lab/NeoBERT `model.py`:
`NeoBERTLMHead` = `model: NeoBERT` + `decoder`; `NeoBERT` = `encoder` embedding, `transformer_encoder` list of
`EncoderBlock`, `layer_norm`) and its state dict (172 fp32 tensors = 6 per layer x 28 + 4), L = layer index,
with the base model's keys under `model.` (an `AutoModel`-saved checkpoint has them bare and no decoder):

    model.encoder.weight                              (V, D)      token embedding
    model.transformer_encoder.L.attention_norm.weight (D)         RMSNorm (nn.RMSNorm, eps = norm_eps)
    model.transformer_encoder.L.qkv.weight            (3D, D)     fused qkv, see below
    model.transformer_encoder.L.wo.weight             (D, D)      attention output projection
    model.transformer_encoder.L.ffn_norm.weight       (D)
    model.transformer_encoder.L.ffn.w12.weight        (2F, D)     xformers SwiGLU, packed [w1; w2]
    model.transformer_encoder.L.ffn.w3.weight         (D, F)
    model.layer_norm.weight                           (D)         final RMSNorm
    decoder.weight (V, D), decoder.bias (V)                       MLM head (untied, with bias)

config.json: hidden_size, num_hidden_layers, num_attention_heads, intermediate_size (nominal; the SwiGLU width
is F = int(2 * intermediate_size / 3) rounded up to 8, 3072 -> 2048, the same rule as ours), norm_eps,
vocab_size, max_length, pad_token_id. The published base model: 28 layers x 768, 12 heads, F = 2048,
V = 30522, max_length 4096, norm_eps 1e-5, RoPE theta 10000.

What the mapping has to undo:
1. qkv: the original views the projection output as (B, S, heads, 3 * head_dim) and chunks the last dim into
   q, k, v, so its rows are interleaved per head: [q_0; k_0; v_0; q_1; k_1; v_1; ...], each block H rows.
   Ours is [Wq; Wk; Wv], each (N*H, D) head-major. Reshape (N, 3, H, D) -> (3, N, H, D).
2. RoPE: the original rotates adjacent pairs (2i, 2i+1) with frequency i (complex multiply, LLaMA style); ours
   rotates (i, i + H/2) with frequency i (half-split). Permuting the rows of every q and k head by
   [0, 2, 4, ..., H-2, 1, 3, ..., H-1] turns one into the other; q.k is unchanged because q and k get the same
   permutation, and v (not rotated) keeps its order, so `wo` maps unchanged.
3. SwiGLU: xformers computes x1, x2 = w12(x).chunk(2); silu(x1) * x2; w3 -- so w12 = [W_gate; W_up], which is
   exactly our `w_in`; `w3` is our `w_out`.
4. Vocabulary rows are zero-padded to our `padded_vocab_size` (embedding, decoder weight and bias).
The config.json translation is `neobert.hf.config_map.from_original_config`.
The parity test (tests/unit/neobert/hf/test_hf_export.py) builds a random model in the original layout from these
semantics and checks that the converted training model gives the same hidden states and logits.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from neobert.checkpoint import encoder_state_dict, save_model_dir
from neobert.hf.config_map import from_original_config
from neobert.model import NeoBERT, NeoBERTForMLM

log = logging.getLogger(__name__)

ORIG_BASE_PREFIX = "model."
# original per-layer key suffix -> our per-layer key suffix (qkv gets a row permutation, see module docstring)
ORIG_LAYER_KEYS = {
    "attention_norm.weight": "attn_norm.weight",
    "qkv.weight": "qkv.weight",
    "wo.weight": "out_proj.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn.w12.weight": "w_in.weight",
    "ffn.w3.weight": "w_out.weight",
}
ORIG_GLOBAL_KEYS = {
    "encoder.weight": "encoder.embeddings.weight",  # under the base prefix
    "layer_norm.weight": "encoder.final_norm.weight",  # under the base prefix
}
ORIG_DECODER_KEYS = {"decoder.weight": "decoder.weight", "decoder.bias": "decoder.bias"}


def rope_pair_to_half_permutation(head_dim: int) -> torch.Tensor:
    """Row order that turns adjacent-pair (complex) RoPE into half-split RoPE: new row j < H/2 = old row 2j,
    new row H/2 + j = old row 2j + 1."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def convert_qkv(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Original interleaved qkv (3D, D) with pair RoPE -> ours [Wq; Wk; Wv] with half-split RoPE."""
    three_d, d = w.shape
    head_dim = three_d // (3 * num_heads)
    if three_d != 3 * num_heads * head_dim:
        raise ValueError(
            f"qkv weight {tuple(w.shape)} is not (3 * num_heads * head_dim, D) for {num_heads} heads"
        )
    per_head = w.reshape(num_heads, 3, head_dim, d)  # (N, {q,k,v}, H, D)
    q, k, v = per_head.unbind(1)  # (N, H, D) each
    perm = rope_pair_to_half_permutation(head_dim)
    q, k = q[:, perm], k[:, perm]
    return torch.cat([q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d)], dim=0)  # (3D, D)


def convert_original_state_dict(state_dict: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Original state dict (with or without the `model.` prefix) -> our `NeoBERTForMLM` state dict (or the
    encoder-only `encoder.*` dict when the original has no decoder). Strict: unknown or missing keys raise."""
    sd = dict(state_dict)
    sd.pop("model.freqs_cis", None)  # non-persistent in the published code, but older dumps may carry it
    sd.pop("freqs_cis", None)
    prefix = ORIG_BASE_PREFIX if any(k.startswith(ORIG_BASE_PREFIX) for k in sd) else ""
    has_decoder = "decoder.weight" in sd
    mapping: dict[str, str] = {}  # original key -> our key
    for o, ours in ORIG_GLOBAL_KEYS.items():
        mapping[prefix + o] = ours
    for L in range(cfg.num_layers):
        for o, ours in ORIG_LAYER_KEYS.items():
            mapping[f"{prefix}transformer_encoder.{L}.{o}"] = f"encoder.layers.{L}.{ours}"
    if has_decoder:
        mapping.update(ORIG_DECODER_KEYS)
    missing, unexpected = sorted(set(mapping) - set(sd)), sorted(set(sd) - set(mapping))
    if missing or unexpected:
        raise ValueError(
            f"not the original NeoBERT layout for {cfg.num_layers} layers: missing {missing[:6]}, unexpected "
            f"{unexpected[:6]}; pass the chandar-lab/NeoBERT checkpoint dir and its own config.json"
        )
    F_ = cfg.ffn_hidden_size
    w3 = sd[f"{prefix}transformer_encoder.0.ffn.w3.weight"]
    if tuple(w3.shape) != (cfg.hidden_size, F_):
        raise ValueError(
            f"ffn.w3 is {tuple(w3.shape)}, expected (hidden_size, F) = ({cfg.hidden_size}, {F_}) from "
            f"intermediate_size={cfg.intermediate_size}; fix intermediate_size in the original config.json"
        )
    out: dict[str, torch.Tensor] = {}
    V, V_pad = cfg.vocab_size, cfg.padded_vocab_size
    for o, ours in mapping.items():
        t = sd[o].float()
        if o.endswith("qkv.weight"):
            t = convert_qkv(t, cfg.num_heads)
        if ours in ("encoder.embeddings.weight", "decoder.weight", "decoder.bias"):
            if t.shape[0] != V:
                raise ValueError(f"{o} has {t.shape[0]} rows, the config says vocab_size={V}")
            t = torch.cat([t, t.new_zeros((V_pad - V, *t.shape[1:]))], dim=0)
        out[ours] = t.contiguous()
    return out


def load_original(src: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config dict) from a checkpoint dir (config.json + model.safetensors or pytorch_model.bin)."""
    src = Path(src)
    cfg_file = src / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(
            f"{cfg_file} not found; pass the directory of the original NeoBERT checkpoint"
        )
    orig_cfg = json.loads(cfg_file.read_text())
    if (src / "model.safetensors").exists():
        from safetensors.torch import load_file

        sd = load_file(str(src / "model.safetensors"))
    elif (src / "pytorch_model.bin").exists():
        sd = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {src}")
    return sd, orig_cfg


def convert_original(src: str | Path, outdir: str | Path, **config_overrides: Any) -> Path:
    """Convert the original checkpoint in `src` into a model dir (`neobert.checkpoint`) in `outdir`, loading
    it into our model with strict key checking on the way."""
    sd, orig_cfg = load_original(src)
    cfg = from_original_config(orig_cfg, **config_overrides)
    ours = convert_original_state_dict(sd, cfg)
    if "decoder.weight" in ours:
        model = NeoBERTForMLM(cfg)
        model.load_state_dict(ours, strict=True)
        kind = "mlm"
    else:
        model = NeoBERT(cfg)
        model.load_state_dict(encoder_state_dict(ours), strict=True)
        kind = "encoder"
    path = save_model_dir(outdir, model, cfg, kind=kind, extra={"converted_from": str(src)})
    log.info("[convert] %s -> %s (%s, %d layers)", src, path, kind, cfg.num_layers)
    return path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(
        description="Import the original NeoBERT checkpoint into a NeoBERT-on-Ray model dir"
    )
    p.add_argument("src", help="dir with the original config.json and model.safetensors / pytorch_model.bin")
    p.add_argument("outdir", help="model dir to write (loadable with neobert.checkpoint.load_mlm)")
    args = p.parse_args(argv)
    try:
        convert_original(args.src, args.outdir)
    except (ValueError, OSError) as e:  # not the original layout / missing files: the message names the fix
        print(f"convert_original: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
