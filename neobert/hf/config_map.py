"""Translation between the training config (`neobert.config.NeoBERTConfig`) and Hugging Face `config.json` files,
in both directions, in one place.

    to_hf_config(cfg, kind=, pooling=)   training -> kwargs of our HF `NeoBERTConfig` (configuration_neobert.py)
    from_hf_config(d)                    an exported config.json (model_type "neobert") -> training config
    from_original_config(d)              the published chandar-lab/NeoBERT config.json -> training config

What differs between the two sides:
- HF names: `num_hidden_layers`, `num_attention_heads` vs `num_layers`, `num_heads`.
- `intermediate_size`: the exported HF config holds the SwiGLU width F the weights have (`w_in` is (2F, D)); the
  training config holds the nominal 4D width and derives F = int(2/3 of it) rounded up to 8 (3072 -> 2048).
  Going back, 3F/2 is stored, which gives F again (checked). The original checkpoint's config.json holds the
  nominal width, like ours.
- `vocab_size` is the real vocabulary on both sides; the padding of the training rows (`pad_vocab_to_multiple`)
  is a training-side setting that the exported weights do not carry (the key map slices it off).
- `tie_word_embeddings` is exported only for a model with an MLM decoder; `classifier_pooling` carries the
  pooling of a contrastive encoder (HF side only).
Training-only fields (attention / FFN backend, `fp32_residual`, `ffn_autotune`) keep their defaults on import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neobert.config import NeoBERTConfig

HF_MODEL_TYPE = "neobert"
HF_POOLING = ("cls", "mean")  # the pooling modes our HF classifier head knows


def to_hf_config(cfg: NeoBERTConfig, *, kind: str = "mlm", pooling: str | None = None) -> dict[str, Any]:
    """The kwargs of `neobert.hf.configuration_neobert.NeoBERTConfig` for a training config. `kind` is the model
    dir's kind ("mlm" | "encoder"), `pooling` its pooling (contrastive encoders) or None."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_hidden_size,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        classifier_pooling=pooling if pooling in HF_POOLING else "cls",
        pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=bool(cfg.tie_word_embeddings and kind == "mlm"),
    )


def from_hf_config(hf: Mapping[str, Any], *, source: str = "config.json", **overrides: Any) -> NeoBERTConfig:
    """The training config of an exported HF config.json (a dict, or `PretrainedConfig.to_dict()`). `source` names
    the file in errors; `overrides` set training-only fields (e.g. attn_backend="sdpa")."""
    if hf.get("model_type") != HF_MODEL_TYPE:
        raise ValueError(
            f"{source}: model_type={hf.get('model_type')!r}, expected {HF_MODEL_TYPE!r}; pass a dir written by "
            "jobs/export_hf.py (for the published chandar-lab/NeoBERT checkpoint use neobert.hf.convert_original)"
        )
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size") if k not in hf]  # fmt: skip
    if missing:
        raise ValueError(f"{source}: missing {missing}; re-export the model with jobs/export_hf.py")
    ffn = int(
        hf["intermediate_size"]
    )  # the SwiGLU width F; the training config stores 3F/2 (see ffn_hidden_size)
    fields = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(hf["num_attention_heads"]),
        intermediate_size=3 * ffn // 2,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        pad_token_id=int(hf.get("pad_token_id") or 0),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    cfg = NeoBERTConfig(**{**fields, **overrides})
    if cfg.ffn_hidden_size != ffn:
        raise ValueError(
            f"{source}: SwiGLU width intermediate_size={ffn} cannot be expressed by NeoBERTConfig.intermediate_size "
            "(the training config needs a multiple of 8)"
        )
    return cfg


def from_original_config(orig: Mapping[str, Any], **overrides: Any) -> NeoBERTConfig:
    """Our `NeoBERTConfig` for the published chandar-lab/NeoBERT config.json (missing fields take the published
    values; `overrides` set any field)."""
    hidden = int(orig.get("hidden_size", 768))
    heads = int(orig.get("num_attention_heads", 12))
    dim_head = int(orig.get("dim_head", hidden // heads))
    if dim_head * heads != hidden:
        raise ValueError(f"original config: dim_head={dim_head} x heads={heads} != hidden_size={hidden}")
    if (
        orig.get("rope") is False
        or orig.get("ngpt") is True
        or orig.get("hidden_act", "swiglu").lower() != "swiglu"
    ):
        raise ValueError(
            "only the published NeoBERT variant (RoPE, SwiGLU, RMSNorm, no nGPT) can be imported; got "
            f"rope={orig.get('rope')}, ngpt={orig.get('ngpt')}, hidden_act={orig.get('hidden_act')}"
        )
    fields = dict(
        vocab_size=int(orig.get("vocab_size", 30522)),
        hidden_size=hidden,
        num_layers=int(orig.get("num_hidden_layers", 28)),
        num_heads=heads,
        intermediate_size=int(orig.get("intermediate_size", 3072)),
        rms_norm_eps=float(orig.get("norm_eps", 1e-5)),
        max_position_embeddings=int(orig.get("max_length", 4096)),
        pad_token_id=int(orig.get("pad_token_id", 0)),
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return NeoBERTConfig(**fields)
