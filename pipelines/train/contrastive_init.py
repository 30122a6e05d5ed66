"""The encoder contrastive training starts from (`model.init`): a NeoBERT model dir, a training checkpoint or
run dir (its latest checkpoint), an HF export dir, or `random:<preset>` (tests and benchmarks)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("neobert.contrastive")

RANDOM_INIT_PREFIX = "random:"


def resolve_init(path: str | Path) -> Path:
    """A model dir from a model dir, a training checkpoint (`model/` inside), a pretraining output dir (its
    `model/` or latest checkpoint) or an HF export dir (`config.json` + safetensors). Raises ValueError."""
    from neobert.checkpoint import CONFIG_FILE

    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(
            f"--init {p} does not exist; pass a checkpoint of jobs/pretrain.py or an HF export dir"
        )
    for cand in (p, p / "model"):
        if (cand / CONFIG_FILE).exists():
            return cand
    if (p / "config.json").exists():
        return p  # HF export dir: converted by load_init_encoder
    # The newest complete checkpoint, by name (Ray's names order by time; file times do not survive a copy):
    # of `p` as a run dir, else of the run dirs below it (a storage path).
    from pipelines.train.run_dir import latest_checkpoint

    latest = [c for c in [latest_checkpoint(p), *(latest_checkpoint(d) for d in sorted(p.iterdir()) if d.is_dir())]
              if c is not None and (Path(c) / "model" / CONFIG_FILE).exists()]  # fmt: skip
    if latest:
        best = max(latest, key=lambda c: Path(c).name)
        log.info("--init %s: using its newest checkpoint %s", p, best)
        return Path(best) / "model"
    raise ValueError(
        f"--init {p} holds neither a NeoBERT model dir ({CONFIG_FILE}), a checkpoint with model/, nor an HF export "
        "(config.json); pass the output of jobs/pretrain.py or jobs/export_hf.py"
    )


def load_init_encoder(path: str | Path) -> tuple[torch.nn.Module, Any, str | None]:
    """(NeoBERT encoder, NeoBERTConfig, pooling stored in the dir or None). `random:<preset>` (e.g.
    `random:tiny`) builds a freshly initialised preset instead: for tests and throughput benchmarks."""
    from neobert.checkpoint import CONFIG_FILE, load_encoder

    if str(path).startswith(RANDOM_INIT_PREFIX):
        from neobert.model import NeoBERT, NeoBERTConfig

        cfg = NeoBERTConfig.preset(str(path).removeprefix(RANDOM_INIT_PREFIX))
        log.warning(
            "model.init=%s: a freshly initialised encoder, NOT a pretrained one (tests/benchmarks)", path
        )
        return NeoBERT(cfg), cfg, None
    d = resolve_init(path)
    if (d / CONFIG_FILE).exists():
        encoder = load_encoder(d)  # reads the weights once; pooling comes from the small config JSON
        return encoder, encoder.config, json.loads((d / CONFIG_FILE).read_text()).get("pooling")
    return load_encoder_from_hf(d)


def load_encoder_from_hf(d: Path) -> tuple[torch.nn.Module, Any, str | None]:
    """A `NeoBERT` from a `jobs/export_hf.py` dir: config.json -> NeoBERTConfig, weights through the inverse
    of the export key map (`neobert.hf.keymap.hf_to_training`, vocab rows zero-padded back)."""
    from safetensors.torch import load_file

    from neobert.hf.keymap import hf_to_training
    from neobert.model import NeoBERT, NeoBERTConfig

    hf = json.loads((d / "config.json").read_text())
    if hf.get("model_type") != "neobert" or not (d / "model.safetensors").exists():
        raise ValueError(
            f"{d}: config.json has model_type={hf.get('model_type')!r} or model.safetensors is missing; --init "
            "takes an HF dir written by jobs/export_hf.py (model_type 'neobert')"
        )
    ffn = int(
        hf["intermediate_size"]
    )  # the SwiGLU width F; the training config stores 3F/2 (see ffn_hidden_size)
    cfg = NeoBERTConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(hf["num_attention_heads"]),
        intermediate_size=3 * ffn // 2,
        rms_norm_eps=float(hf["rms_norm_eps"]),
        rope_theta=float(hf["rope_theta"]),
        max_position_embeddings=int(hf["max_position_embeddings"]),
        pad_token_id=int(hf.get("pad_token_id", 0)),
    )
    if cfg.ffn_hidden_size != ffn:
        raise ValueError(f"{d}: SwiGLU width {ffn} cannot be expressed by NeoBERTConfig.intermediate_size")
    state = hf_to_training(
        load_file(str(d / "model.safetensors")),
        num_layers=cfg.num_layers,
        padded_vocab_size=cfg.padded_vocab_size,
    )
    encoder = NeoBERT(cfg)
    encoder.load_state_dict(
        {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    )
    pooling = hf.get("classifier_pooling") if (d / "modules.json").exists() else None
    return encoder, cfg, pooling
