"""Declarative state-dict key map: training layout (`neobert/model.py`) <-> HF export (`modeling_neobert.py`).

Every rule names one training key, one HF key (both with `{L}` for the layer index) and whether the tensor's
rows are vocabulary rows. Vocabulary rows are the one non-identity transform: training pads the embedding and
decoder to `padded_vocab_size` (a multiple of 128, for tensor cores); the export keeps only the first
`vocab_size` rows (the real tokenizer vocabulary; the padded rows are never indexed by a real token and their
logits are sliced off in training too), and the import pads them back with zeros.

HF keys are given relative to `NeoBERTModel`; the MLM export stores them under `model.` (the HF
`base_model_prefix`) next to `decoder.*`, the encoder export stores them bare. `transformers` strips or adds
that prefix itself when loading `AutoModel` from an MLM export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HF_BASE_PREFIX = "model."


@dataclass(frozen=True)
class KeyRule:
    train: str  # training key; `{L}` = layer index
    hf: str  # HF key relative to NeoBERTModel (or the MLM head for decoder.*); `{L}` = layer index
    vocab_rows: bool = (
        False  # rows indexed by token id: sliced to vocab_size on export, zero-padded on import
    )
    per_layer: bool = False
    decoder: bool = False  # lives on the MLM head (not under the `model.` prefix)


KEY_MAP: tuple[KeyRule, ...] = (
    KeyRule("encoder.embeddings.weight", "embeddings.weight", vocab_rows=True),
    KeyRule("encoder.layers.{L}.attn_norm.weight", "layers.{L}.attn_norm.weight", per_layer=True),
    KeyRule("encoder.layers.{L}.qkv.weight", "layers.{L}.attention.qkv.weight", per_layer=True),
    KeyRule("encoder.layers.{L}.out_proj.weight", "layers.{L}.attention.out_proj.weight", per_layer=True),
    KeyRule("encoder.layers.{L}.ffn_norm.weight", "layers.{L}.ffn_norm.weight", per_layer=True),
    KeyRule("encoder.layers.{L}.w_in.weight", "layers.{L}.mlp.w_in.weight", per_layer=True),
    KeyRule("encoder.layers.{L}.w_out.weight", "layers.{L}.mlp.w_out.weight", per_layer=True),
    KeyRule("encoder.final_norm.weight", "final_norm.weight"),
    KeyRule("decoder.weight", "decoder.weight", vocab_rows=True, decoder=True),
    KeyRule("decoder.bias", "decoder.bias", vocab_rows=True, decoder=True),
)


def expand(num_layers: int, *, with_decoder: bool, hf_prefix: str) -> list[tuple[str, str, KeyRule]]:
    """(training key, HF key, rule) for every tensor of a model with `num_layers` blocks."""
    out = []
    for rule in KEY_MAP:
        if rule.decoder and not with_decoder:
            continue
        prefix = "" if rule.decoder else hf_prefix
        layers = range(num_layers) if rule.per_layer else [None]
        for L in layers:
            out.append((rule.train.format(L=L), prefix + rule.hf.format(L=L), rule))
    return out


def _check_keys(have: set[str], want: set[str], what: str, fix: str) -> None:
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise ValueError(
            f"{what}: {len(missing)} missing key(s) {missing[:6]}, {len(unexpected)} unexpected key(s) "
            f"{unexpected[:6]}; {fix}"
        )


def training_to_hf(
    state_dict: dict[str, torch.Tensor], *, num_layers: int, vocab_size: int, with_decoder: bool
) -> dict[str, torch.Tensor]:
    """Training state dict -> HF state dict (contiguous CPU tensors). Strict: every training key must be mapped
    and every rule must find its key, so a layout change fails loudly here instead of loading random weights.
    `with_decoder=False` exports the encoder alone (bare keys); `True` the MLM model (`model.` + `decoder.*`)."""
    hf_prefix = HF_BASE_PREFIX if with_decoder else ""
    pairs = expand(num_layers, with_decoder=with_decoder, hf_prefix=hf_prefix)
    _check_keys(
        set(state_dict),
        {t for t, _, _ in pairs},
        "training state dict does not match the export key map",
        "export a model dir written by neobert.checkpoint.save_model_dir for the current neobert/model.py",
    )
    out = {}
    for train_key, hf_key, rule in pairs:
        t = state_dict[train_key]
        if rule.vocab_rows:
            if t.shape[0] < vocab_size:
                raise ValueError(f"{train_key} has {t.shape[0]} rows, fewer than vocab_size={vocab_size}")
            t = t[:vocab_size]
        out[hf_key] = t.detach().to("cpu").contiguous().clone()
    return out


def hf_to_training(
    state_dict: dict[str, torch.Tensor], *, num_layers: int, padded_vocab_size: int
) -> dict[str, torch.Tensor]:
    """HF state dict (either layout: MLM with `model.` prefix + decoder, or bare encoder) -> training state dict,
    vocabulary rows zero-padded to `padded_vocab_size`."""
    with_decoder = any(k.startswith("decoder.") for k in state_dict)
    hf_prefix = HF_BASE_PREFIX if any(k.startswith(HF_BASE_PREFIX) for k in state_dict) else ""
    pairs = expand(num_layers, with_decoder=with_decoder, hf_prefix=hf_prefix)
    _check_keys(
        set(state_dict),
        {h for _, h, _ in pairs},
        "HF state dict does not match the export key map",
        "import a directory written by jobs/export_hf.py",
    )
    out = {}
    for train_key, hf_key, rule in pairs:
        t = state_dict[hf_key]
        if rule.vocab_rows and t.shape[0] < padded_vocab_size:
            pad = t.new_zeros((padded_vocab_size - t.shape[0], *t.shape[1:]))
            t = torch.cat([t, pad], dim=0)
        out[train_key] = t.contiguous()
    return out
