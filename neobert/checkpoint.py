"""Model directories: the one on-disk format shared by pretraining, contrastive training and the HF export.

    DIR/model.safetensors     state dict; keys as in `NeoBERTForMLM` (`encoder.*`, `decoder.*`); an "encoder"
                              dir (contrastive) holds only the `encoder.*` keys
    DIR/neobert_config.json   {"format": 1, "kind": "mlm"|"encoder", "pooling": str|null,
                               "model": {NeoBERTConfig fields}, "extra": {...}}

A Ray Train checkpoint of a training job holds such a dir under `model/` next to its training state
(`train_state.pt`); Ray names checkpoints `checkpoint_<YYYY-MM-DD_HH-MM-SS.micro>` inside the run dir.
`resolve_model_dir` finds the model dir behind any of these paths:

    run dir          its latest complete checkpoint (`latest_checkpoint`: newest by NAME, never by file time,
                     which a copy or a sync of the run dir rewrites), then `model/` inside
    checkpoint dir   `model/` inside
    model dir        itself
    HF export dir    itself (config.json + model.safetensors; read by `neobert.hf.export.load_hf_encoder`)

A checkpoint counts as complete when `model/` holds both files, its safetensors file is as long as its own header
says, and the training state is present: a dir cut off mid-write (a killed job, a partial copy) is skipped by
`latest_checkpoint` and named with the fix by `resolve_model_dir` / `load_model_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from neobert.config import NeoBERTConfig
from neobert.config_io import from_dict, to_dict
from neobert.model import NeoBERT, NeoBERTForMLM

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "neobert_config.json"
MODEL_SUBDIR = "model"  # a training checkpoint's model dir
TRAIN_STATE_FILE = (
    "train_state.pt"  # a training checkpoint's optimizer / scheduler / data position / RNG state
)
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train: checkpoint_<YYYY-MM-DD_HH-MM-SS.micro>
HF_CONFIG_FILE = "config.json"
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
    cfg: NeoBERTConfig
    state_dict: dict[str, torch.Tensor]
    kind: Kind
    pooling: str | None
    extra: dict[str, Any]
    path: Path


def safetensors_problem(f: Path) -> str | None:
    """Why `f` is not a complete safetensors file (missing, truncated, bad header), or None when it is. Reads the
    header only: the file must be exactly 8 + header length + the end of the last tensor's data."""
    try:
        size = f.stat().st_size
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size:
                return f"header length {n} exceeds the file size {size} (truncated)"
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        return "missing"
    except (OSError, struct.error, ValueError) as e:
        return f"unreadable header ({type(e).__name__}: {e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{size} bytes, its header describes {8 + n + end} (truncated or corrupt)"
    return None


def model_dir_problem(d: Path) -> str | None:
    """What makes `d` not a complete model dir, or None."""
    missing = [name for name in (CONFIG_FILE, MODEL_FILE) if not (d / name).is_file()]
    if missing:
        return f"{d} lacks {' and '.join(missing)}"
    bad = safetensors_problem(d / MODEL_FILE)
    return f"{d / MODEL_FILE}: {bad}" if bad else None


def checkpoint_problem(ckpt: Path) -> str | None:
    """What makes a training checkpoint dir incomplete (model dir or training state), or None."""
    problem = model_dir_problem(ckpt / MODEL_SUBDIR)
    if problem is None and not (ckpt / TRAIN_STATE_FILE).is_file():
        problem = f"{ckpt} lacks {TRAIN_STATE_FILE}"
    return problem


def is_hf_export_dir(d: Path) -> bool:
    """A Hugging Face model dir (config.json + model.safetensors), e.g. written by jobs/export_hf.py."""
    return (d / HF_CONFIG_FILE).is_file() and (d / MODEL_FILE).is_file() and not (d / CONFIG_FILE).exists()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete `checkpoint_*` dir under `run_dir` (any depth: a run dir, or a storage dir holding
    several runs), or None. Ordered by the dir NAME (Ray's timestamp), never by file time. Incomplete dirs
    (see `checkpoint_problem`) are skipped with a warning."""
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        return None
    found = [p for p in root.rglob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()]
    for ckpt in sorted(found, key=lambda p: (p.name, str(p)), reverse=True):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping incomplete checkpoint %s: %s", ckpt, problem)
    return None


def resolve_model_dir(path: str | Path) -> Path:
    """The model dir behind `path`: a run dir (its latest complete checkpoint's `model/`), a checkpoint dir
    (`model/`), a model dir, or an HF export dir (returned as is). Raises ValueError naming what was found and
    the fix."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(
            f"{p} is not a NeoBERT model dir: it does not exist; pass a model dir, a checkpoint or run dir of "
            "jobs/pretrain.py, or an HF export dir"
        )
    for cand in (p, p / MODEL_SUBDIR):
        if (cand / CONFIG_FILE).exists():
            problem = model_dir_problem(cand)
            if problem:
                raise ValueError(
                    f"{problem}: the model dir is incomplete (a checkpoint cut off mid-write, or a partial copy); "
                    "pass an earlier checkpoint, or the run dir to take its latest complete one"
                )
            return cand
    if is_hf_export_dir(p):
        return p
    ckpt = latest_checkpoint(p)
    if ckpt is not None:
        log.info("%s: using its latest checkpoint %s", p, ckpt.name)
        return ckpt / MODEL_SUBDIR
    found = sorted(c.name for c in p.iterdir())[:8] if p.is_dir() else [p.name]
    incomplete = [c for c in p.rglob(f"{CHECKPOINT_PREFIX}*") if c.is_dir()] if p.is_dir() else []
    why = (
        f"its {len(incomplete)} checkpoint dir(s) are all incomplete (e.g. {checkpoint_problem(incomplete[0])})"
        if incomplete
        else f"found {found}"
    )
    raise ValueError(
        f"{p} is not a NeoBERT model dir ({CONFIG_FILE} + {MODEL_FILE}), a checkpoint holding {MODEL_SUBDIR}/, a "
        f"run dir with a complete {CHECKPOINT_PREFIX}* dir, or an HF export ({HF_CONFIG_FILE} + {MODEL_FILE}): "
        f"{why}; pass a dir written by neobert.checkpoint.save_model_dir, jobs/pretrain.py or jobs/export_hf.py"
    )


def save_model_dir(
    path: str | Path,
    model: torch.nn.Module,
    cfg: Any,
    *,
    kind: Kind = "mlm",
    pooling: str | None = None,
    extra: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` (any wrapper: DDP, compiled) as a model dir. `kind="encoder"` keeps only `encoder.*` keys;
    a bare `NeoBERT` encoder gets its keys prefixed with `encoder.` so both kinds share one key layout.
    `state`: the state dict to write instead of `model.state_dict()` (a sharded model's gathered full state)."""
    if kind not in ("mlm", "encoder"):
        raise ValueError(f"kind must be 'mlm' or 'encoder', got {kind!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = clean_state_dict(state if state is not None else unwrap_model(model).state_dict())
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
    """The model dir behind `path` (see `resolve_model_dir`), read. ValueError for an HF export dir (use
    `neobert.hf.export.load_hf_encoder`) or unreadable files."""
    d = resolve_model_dir(path)
    if not (d / CONFIG_FILE).exists():
        raise ValueError(
            f"{d} is a Hugging Face export dir, not a training model dir; load its encoder with "
            "neobert.hf.export.load_hf_encoder, or pass the model dir / checkpoint it was exported from"
        )
    try:
        meta = json.loads((d / CONFIG_FILE).read_text())
    except ValueError as e:
        raise ValueError(f"{d / CONFIG_FILE} is not valid JSON ({e}); the model dir is corrupt") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{d / CONFIG_FILE}: format {meta.get('format')!r}, this code reads {FORMAT_VERSION}"
        )
    # ffn_autotune is a setting of the pretraining run (a static token budget per micro-batch); what loads a model
    # dir next (contrastive fine-tuning, evaluation, export) feeds varying token counts, for which quack would
    # autotune again at every new count. config.json keeps the run's value; the loaded config has it off.
    cfg = dataclasses.replace(from_dict(NeoBERTConfig, meta["model"]), ffn_autotune=False)
    try:
        state_dict = load_file(str(d / MODEL_FILE))
    except Exception as e:  # safetensors' SafetensorError (not an OSError), or an OSError of the read
        raise ValueError(
            f"{d / MODEL_FILE} cannot be read ({type(e).__name__}: {e}); the model dir is incomplete or corrupt: "
            "pass an earlier checkpoint, or re-run the job that wrote it"
        ) from None
    return ModelDir(
        cfg=cfg,
        state_dict=state_dict,
        kind=meta["kind"],
        pooling=meta.get("pooling"),
        extra=meta.get("extra", {}),
        path=d,
    )


def load_mlm(path: str | Path, **model_kwargs: Any) -> torch.nn.Module:
    """A `NeoBERTForMLM` with the weights of a "mlm" model dir."""
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
    md = load_model_dir(path)
    model = NeoBERT(md.cfg)
    model.load_state_dict(encoder_state_dict(md.state_dict), strict=True)
    return model
