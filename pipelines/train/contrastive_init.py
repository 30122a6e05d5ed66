"""The encoder contrastive training starts from (`model.init`): a NeoBERT model dir, a training checkpoint or
run dir (its newest complete checkpoint), an HF export dir (`neobert.checkpoint.resolve_model_dir` accepts all
of them), or `random:<preset>` (tests and benchmarks)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("neobert.contrastive")

RANDOM_INIT_PREFIX = "random:"


def load_init_encoder(path: str | Path) -> tuple[torch.nn.Module, Any, str | None]:
    """(NeoBERT encoder, NeoBERTConfig, pooling stored in the dir or None). `random:<preset>` (e.g.
    `random:tiny`) builds a freshly initialised preset instead: for tests and throughput benchmarks."""
    from neobert.checkpoint import CONFIG_FILE, load_encoder, resolve_model_dir
    from neobert.hf.export import load_hf_encoder

    if str(path).startswith(RANDOM_INIT_PREFIX):
        from neobert.model import NeoBERT, NeoBERTConfig

        cfg = NeoBERTConfig.preset(str(path).removeprefix(RANDOM_INIT_PREFIX))
        log.warning(
            "model.init=%s: a freshly initialised encoder, NOT a pretrained one (tests/benchmarks)", path
        )
        return NeoBERT(cfg), cfg, None
    try:
        d = resolve_model_dir(path)
    except ValueError as e:
        raise ValueError(f"model.init: {e}") from None
    if (d / CONFIG_FILE).exists():
        encoder = load_encoder(d)  # reads the weights once; pooling comes from the small config JSON
        return encoder, encoder.config, json.loads((d / CONFIG_FILE).read_text()).get("pooling")
    return load_hf_encoder(d)
