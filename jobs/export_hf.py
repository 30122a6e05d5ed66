"""Export a NeoBERT model dir (or a training checkpoint holding one under model/) to a Hugging Face directory.

    python jobs/export_hf.py CHECKPOINT OUTDIR [--tokenizer DIR] [--parity false] [--overwrite true]
    python jobs/export_hf.py --config EXPORT.yaml --checkpoint CKPT --output OUTDIR

The export is checked numerically against the training model before the job succeeds (see neobert/hf/export.py).
With no CHECKPOINT, the newest checkpoint of `jobs/pretrain.py` under its default storage path
(`outputs/{pretrain,demo}/*/checkpoint_*/model`) is exported to `outputs/hf_export`; if there is none, a freshly
initialised "tiny" model is exported to `outputs/hf_export_demo` (a smoke run of the whole path, parity check
included; its weights are random and say nothing about quality).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or under `ray job submit`

from neobert.checkpoint import MODEL_SUBDIR, latest_checkpoint  # noqa: E402
from neobert.config_io import load_config  # noqa: E402
from neobert.hf.export import ExportConfig, export_hf  # noqa: E402

log = logging.getLogger("export_hf")
DEMO_OUTPUT = "outputs/hf_export_demo"
# Default checkpoint.storage_path of configs/pretrain.yaml, and where `make demo` trains.
PRETRAIN_STORAGES = (Path("outputs/pretrain"), Path("outputs/demo"))


def newest_pretrain_checkpoint(storages: tuple[Path, ...] = PRETRAIN_STORAGES) -> Path | None:
    """The model dir of the newest complete checkpoint under the storages (by checkpoint name, see
    neobert.checkpoint.latest_checkpoint)."""
    found = [c for c in (latest_checkpoint(s) for s in storages) if c is not None]
    return max(found, key=lambda c: c.name) / MODEL_SUBDIR if found else None


def parse_args(argv: list[str]) -> ExportConfig:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", nargs="?", default=None, help="model dir or training checkpoint dir")
    parser.add_argument("output", nargs="?", default=None, help="HF directory to write")
    parser.add_argument("--config", default=None, help="YAML with ExportConfig fields")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(ExportConfig, args.config, overrides)
    if args.checkpoint is not None:
        cfg = dataclasses.replace(cfg, checkpoint=args.checkpoint)
    if args.output is not None:
        cfg = dataclasses.replace(cfg, output=args.output)
    return cfg


def write_demo_checkpoint(path: Path) -> None:
    import torch

    from neobert.checkpoint import save_model_dir
    from neobert.model import NeoBERTConfig, NeoBERTForMLM

    torch.manual_seed(0)
    cfg = NeoBERTConfig.preset("tiny")
    save_model_dir(
        path, NeoBERTForMLM(cfg), cfg, kind="mlm", extra={"demo": "random init, jobs/export_hf.py"}
    )


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 ok, 2 bad arguments / checkpoint / output dir, 3 the parity check failed (the export dir is
    left in place for inspection). The reason goes to stderr."""
    from neobert.hf.export import ParityError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except ParityError as e:
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 3
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError of a missing checkpoint / tokenizer
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 2


def run(argv: list[str]) -> int:
    cfg = parse_args(argv)
    if not cfg.tokenizer:
        from pipelines.tokenizer import default_tokenizer_dir

        cfg = dataclasses.replace(cfg, tokenizer=str(default_tokenizer_dir()))
    with tempfile.TemporaryDirectory(prefix="neobert-export-demo-") as tmp:
        if not cfg.checkpoint:
            newest = newest_pretrain_checkpoint()
            if newest is not None:
                log.info("no CHECKPOINT given: exporting the newest pretraining checkpoint %s", newest)
                cfg = dataclasses.replace(cfg, checkpoint=str(newest), overwrite=True)
            else:
                log.warning(
                    "no CHECKPOINT given and none under %s: exporting a randomly initialised tiny model to %s "
                    "(demo of the export path; run jobs/pretrain.py first for real weights)",
                    " or ".join(map(str, PRETRAIN_STORAGES)),
                    DEMO_OUTPUT,
                )
                write_demo_checkpoint(Path(tmp) / "model")
                out = cfg.output if cfg.output != ExportConfig.output else DEMO_OUTPUT
                cfg = dataclasses.replace(
                    cfg, checkpoint=str(Path(tmp) / "model"), output=out, overwrite=True
                )
        report = export_hf(
            cfg.checkpoint,
            cfg.output,
            tokenizer_dir=cfg.tokenizer,
            parity=cfg.parity,
            atol=cfg.atol,
            logits_atol=cfg.logits_atol,
            overwrite=cfg.overwrite,
        )
    print(json.dumps(dataclasses.asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
