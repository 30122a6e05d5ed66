"""Warm starts: begin a pretraining run (or a recipe phase) from weights trained elsewhere (`train.init_from`).

`resolve_warm_start(path)` accepts, and tells apart by what the directory holds:
- a run dir of ours: its latest complete checkpoint (`neobert.checkpoint.latest_checkpoint`, via
  `resolve_model_dir`), then `model/` inside;
- a training checkpoint dir (`model/` + train state) or a model dir (`neobert_config.json`), read by
  `neobert.checkpoint.load_model_dir`;
- an HF export dir (`jobs/export_hf.py`): config.json through `neobert.hf.config_map.from_hf_config`, weights
  through the inverse key map `neobert.hf.keymap.hf_to_training` (the MLM decoder included when the export has
  it; `neobert.hf.export.load_hf_encoder` does the same for the encoder alone);
- the published NeoBERT weights (chandar-lab/NeoBERT layout: `transformer_encoder.*` keys), through
  `neobert.hf.convert_original`.

`check_compatible(source, target)`: the architecture must match field by field; the fields a phase changes
(`rope_theta`, `max_position_embeddings`: context extension) and runtime choices (attention / FFN backend,
initializer range) may differ.

`train.init_optimizer` also carries the optimizer state (moments, step counts; the LR stays the new run's): only
a training checkpoint has it (its sharded `dcp/`, loaded by `pipelines.train.parallel.load_sharded` on every rank
of the new run, whatever world size or strategy wrote it), and only for the same `train.optimizer`.

Everything `load_warm_start` can refuse, `check_warm_start` refuses on the driver before Ray starts (Ray Train
would retry a worker's configuration error).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from neobert.checkpoint import (
    CONFIG_FILE,
    HF_CONFIG_FILE,
    MODEL_FILE,
    MODEL_SUBDIR,
    is_hf_export_dir,
    load_model_dir,
    resolve_model_dir,
)
from neobert.config import NeoBERTConfig
from pipelines.train.parallel import DCP_DIR
from pipelines.train.run_dir import TRAIN_STATE_JSON

log = logging.getLogger("neobert.warm_start")

# NeoBERTConfig fields that may differ between the source and the run it starts (everything else must match).
PHASE_FIELDS = ("rope_theta", "max_position_embeddings")
RUNTIME_FIELDS = ("attn_backend", "ffn_backend", "ffn_autotune", "initializer_range")
# Compared through what they determine: the SwiGLU width and the padded vocabulary rows (an HF export stores the
# width, so the nominal intermediate_size read back can differ while the weights have the same shapes).
DERIVED = {"intermediate_size": "ffn_hidden_size", "pad_vocab_to_multiple": "padded_vocab_size"}


@dataclass
class WarmStartSource:
    path: (
        Path  # the directory the weights came from (a run dir resolves to its latest checkpoint's model dir)
    )
    kind: str  # "checkpoint" | "model_dir" | "hf_export" | "original"
    state_dict: dict[str, torch.Tensor]  # training layout (`encoder.*`, `decoder.*` when present)
    cfg: NeoBERTConfig
    checkpoint: Path | None  # the training checkpoint dir (optimizer state in dcp/), else None

    @property
    def optimizer(self) -> str | None:
        """`train.optimizer` of the run that wrote the checkpoint (None without one)."""
        if self.checkpoint is None:
            return None
        meta = json.loads((self.checkpoint / TRAIN_STATE_JSON).read_text())
        return meta.get("config", {}).get("train", {}).get("optimizer", "adamw")


def _weight_keys(d: Path) -> set[str]:
    if (d / MODEL_FILE).is_file():
        from safetensors import safe_open

        with safe_open(str(d / MODEL_FILE), "pt") as f:
            return set(f.keys())
    if (d / "pytorch_model.bin").is_file():
        return set(torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True))
    return set()


def _is_original(d: Path) -> bool:
    """The published NeoBERT layout: config.json (no neobert_config.json) and `transformer_encoder.*` keys."""
    if not (d / HF_CONFIG_FILE).is_file() or (d / CONFIG_FILE).exists():
        return False
    return any(".transformer_encoder." in f".{k}" for k in _weight_keys(d))


def resolve_warm_start(path: str | Path) -> WarmStartSource:
    """Read the weights and config behind `path` (see the module docstring); ValueError naming what was found."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(
            f"train.init_from={str(path)!r} is not a directory; pass a run, checkpoint, model or HF export dir"
        )
    if _is_original(p):
        from neobert.hf import convert_original
        from neobert.hf.config_map import from_original_config

        sd, orig = convert_original.load_original(p)
        cfg = from_original_config(orig)
        return WarmStartSource(
            p, "original", convert_original.convert_original_state_dict(sd, cfg), cfg, None
        )
    try:
        d = resolve_model_dir(p)
    except ValueError as e:
        raise ValueError(f"train.init_from: {e}") from None
    if is_hf_export_dir(d):
        from safetensors.torch import load_file

        from neobert.hf.config_map import from_hf_config
        from neobert.hf.keymap import hf_to_training

        cfg = from_hf_config(json.loads((d / HF_CONFIG_FILE).read_text()), source=str(d / HF_CONFIG_FILE))
        state = hf_to_training(
            load_file(str(d / MODEL_FILE)), num_layers=cfg.num_layers, padded_vocab_size=cfg.padded_vocab_size
        )
        return WarmStartSource(d, "hf_export", state, cfg, None)
    md = load_model_dir(d)
    ckpt = md.path.parent if md.path.name == MODEL_SUBDIR else None
    if ckpt is not None and not ((ckpt / DCP_DIR).is_dir() and (ckpt / TRAIN_STATE_JSON).is_file()):
        ckpt = None
    return WarmStartSource(md.path, "checkpoint" if ckpt else "model_dir", md.state_dict, md.cfg, ckpt)


def check_compatible(source: NeoBERTConfig, target: NeoBERTConfig, where: str = "train.init_from") -> None:
    """Raise naming the first architecture field that differs; phase and runtime fields may differ."""
    for f in fields(NeoBERTConfig):
        if f.name in PHASE_FIELDS or f.name in RUNTIME_FIELDS:
            continue
        name = DERIVED.get(f.name, f.name)
        a, b = getattr(source, name), getattr(target, name)
        if a != b:
            raise ValueError(
                f"{where}: model.{name}={b!r} but the warm-start source has {a!r}; the architecture must match "
                f"(only {', '.join(PHASE_FIELDS)} may change): set model.{f.name}: {getattr(source, f.name)!r}"
            )


def check_warm_start(
    path: str | Path, cfg: NeoBERTConfig, *, with_optimizer: bool, optimizer: str = "adamw"
) -> WarmStartSource:
    """What `load_warm_start` checks, without a model: run on the driver before any worker starts."""
    src = resolve_warm_start(path)
    check_compatible(src.cfg, cfg)
    if with_optimizer:
        if src.checkpoint is None:
            raise ValueError(
                f"train.init_optimizer=true but {src.path} ({src.kind}) holds no optimizer state; pass a run or "
                "checkpoint dir of jobs/pretrain.py, or set train.init_optimizer: false"
            )
        if src.optimizer != optimizer:
            raise ValueError(
                f"train.init_optimizer=true: {src.checkpoint} was trained with train.optimizer={src.optimizer}, "
                f"this run uses train.optimizer={optimizer}; use the same optimizer or set train.init_optimizer: "
                "false"
            )
    return src


def load_weights(src: WarmStartSource, model: torch.nn.Module) -> None:
    """The source's weights into `model` (a `NeoBERTForMLM`, unwrapped); an encoder-only source leaves the MLM
    decoder at its init (warned)."""
    if any(k.startswith("decoder.") for k in src.state_dict):
        model.load_state_dict(src.state_dict, strict=True)
        return
    missing = model.load_state_dict(src.state_dict, strict=False).missing_keys
    if any(not k.startswith("decoder.") for k in missing):
        raise ValueError(f"train.init_from: {src.path} has incomplete encoder weights, missing {missing[:6]}")
    log.warning("warm start from %s: encoder only, the MLM decoder starts from its init", src.path)


def load_optimizer_state(
    src: WarmStartSource, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """The source checkpoint's optimizer state (moments, step counts) into `optimizer`; its groups keep this run's
    `lr` / `initial_lr` (the new schedule's). Collective (every rank calls it); reloads the same weights too."""
    from pipelines.train import parallel

    assert src.checkpoint is not None  # check_warm_start refused it otherwise
    lrs = [(g["lr"], g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
    parallel.load_sharded(src.checkpoint / DCP_DIR, model, optimizer)
    for g, (lr, initial) in zip(optimizer.param_groups, lrs, strict=True):
        g["lr"], g["initial_lr"] = lr, initial
