"""Model directories: the one on-disk format shared by pretraining, contrastive training and the HF export.

    DIR/model.safetensors     state dict; keys as in `NeoBERTForMLM` (`encoder.*`, `decoder.*`); an "encoder"
                              dir (contrastive) holds only the `encoder.*` keys
    DIR/neobert_config.json   {"format": 1, "kind": "mlm"|"encoder", "pooling": str|null,
                               "model": {NeoBERTConfig fields}, "extra": {...}}

A Ray Train checkpoint of a training job holds such a dir under `model/` next to its training state; every loader
here accepts either the model dir itself or a checkpoint dir containing `model/`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from neobert.config_io import from_dict, to_dict

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "neobert_config.json"
FORMAT_VERSION = 1
Kind = Literal["mlm", "encoder"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes, wherever they appear in a key."""
    out = {}
    for key, value in state_dict.items():
        parts = [p for p in key.split(".") if p not in ("module", "_orig_mod")]
        out[".".join(parts)] = value
    return out


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP (or any `.module` wrapper)
            model = model.module
        else:
            return model


def encoder_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `encoder.*` entries of a model-dir state dict without the prefix: the keys of a bare `NeoBERT`."""
    return {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}


@dataclasses.dataclass
class ModelDir:
    cfg: Any  # neobert.model.NeoBERTConfig
    state_dict: dict[str, torch.Tensor]
    kind: Kind
    pooling: str | None
    extra: dict[str, Any]
    path: Path


def resolve_model_dir(path: str | Path) -> Path:
    """`path` itself if it holds a model dir, else `path/model` (a training checkpoint)."""
    p = Path(path)
    for candidate in (p, p / "model"):
        if (candidate / CONFIG_FILE).exists() and (candidate / MODEL_FILE).exists():
            return candidate
    raise FileNotFoundError(
        f"{p} is not a NeoBERT model dir: expected {CONFIG_FILE} and {MODEL_FILE} in it or in {p / 'model'}; "
        "pass a dir written by neobert.checkpoint.save_model_dir or a checkpoint of jobs/pretrain.py"
    )


def save_model_dir(
    path: str | Path,
    model: torch.nn.Module,
    cfg: Any,
    *,
    kind: Kind = "mlm",
    pooling: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (any wrapper: DDP, compiled) as a model dir. `kind="encoder"` keeps only `encoder.*` keys;
    a bare `NeoBERT` encoder gets its keys prefixed with `encoder.` so both kinds share one key layout."""
    if kind not in ("mlm", "encoder"):
        raise ValueError(f"kind must be 'mlm' or 'encoder', got {kind!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = clean_state_dict(unwrap_model(model).state_dict())
    if not any(k.startswith("encoder.") for k in state):
        state = {f"encoder.{k}": v for k, v in state.items()}  # a bare NeoBERT encoder
    if kind == "encoder":
        state = {k: v for k, v in state.items() if k.startswith("encoder.")}
    elif not any(k.startswith("decoder.") for k in state):
        raise ValueError(
            "kind='mlm' needs a model with a decoder (NeoBERTForMLM); use kind='encoder' for an encoder"
        )
    # safetensors refuses shared storage (tied embeddings): store contiguous copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(path / MODEL_FILE), metadata={"format": "pt"})
    meta = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "pooling": pooling,
        "model": to_dict(cfg),
        "extra": extra or {},
    }
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def load_model_dir(path: str | Path) -> ModelDir:
    from neobert.model import NeoBERTConfig

    d = resolve_model_dir(path)
    meta = json.loads((d / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{d / CONFIG_FILE}: format {meta.get('format')!r}, this code reads {FORMAT_VERSION}"
        )
    # ffn_autotune is a setting of the pretraining run (a static token budget per micro-batch); what loads a model
    # dir next (contrastive fine-tuning, evaluation, export) feeds varying token counts, for which quack would
    # autotune again at every new count. config.json keeps the run's value; the loaded config has it off.
    cfg = dataclasses.replace(from_dict(NeoBERTConfig, meta["model"]), ffn_autotune=False)
    return ModelDir(
        cfg=cfg,
        state_dict=load_file(str(d / MODEL_FILE)),
        kind=meta["kind"],
        pooling=meta.get("pooling"),
        extra=meta.get("extra", {}),
        path=d,
    )


def load_mlm(path: str | Path, **model_kwargs: Any) -> torch.nn.Module:
    """A `NeoBERTForMLM` with the weights of a "mlm" model dir."""
    from neobert.model import NeoBERTForMLM

    md = load_model_dir(path)
    if md.kind != "mlm":
        raise ValueError(
            f"{md.path} holds an {md.kind!r} model without an MLM decoder; use load_encoder instead"
        )
    model = NeoBERTForMLM(md.cfg, **model_kwargs)
    model.load_state_dict(md.state_dict, strict=True)
    return model


def load_encoder(path: str | Path) -> torch.nn.Module:
    """A `NeoBERT` encoder from either kind of model dir."""
    from neobert.model import NeoBERT

    md = load_model_dir(path)
    model = NeoBERT(md.cfg)
    model.load_state_dict(encoder_state_dict(md.state_dict), strict=True)
    return model
