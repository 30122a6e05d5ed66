"""Export a NeoBERT model dir (or a training checkpoint holding one under model/) to a Hugging Face directory.

  python jobs/export_hf.py CHECKPOINT OUTDIR [--tokenizer DIR] [--parity false] [--overwrite]
                           [--eval-results results.json] [--license cc-by-sa-3.0]
  python jobs/export_hf.py --checkpoint outputs/pretrain/neobert-tiny --output outputs/hf

CHECKPOINT is a run dir of jobs/pretrain.py or jobs/contrastive.py (its newest complete checkpoint), a checkpoint
dir, a model dir or an HF export dir. The export is checked numerically against the training model before the
job succeeds (neobert/hf/export.py). With no CHECKPOINT, the newest checkpoint of `jobs/pretrain.py` under its
default storage paths
(`outputs/{pretrain,demo}/*/checkpoint_*/model`) is exported to `outputs/hf_export`; if there is none, a freshly
initialised "tiny" model is exported to `outputs/hf_export_demo` (a smoke run of the whole path, parity check
included; its weights are random and say nothing about quality). No Ray is started.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout / `--working-dir .`

from neobert.checkpoint import MODEL_SUBDIR, latest_checkpoint  # noqa: E402
from neobert.hf.export import ExportConfig, ParityError, export_hf  # noqa: E402
from pipelines import cli  # noqa: E402

log = logging.getLogger("export_hf")
DEMO_OUTPUT = "outputs/hf_export_demo"
# Default checkpoint.storage_path of configs/pretrain.yaml, and where `make demo` trains.
PRETRAIN_STORAGES = (Path("outputs/pretrain"), Path("outputs/demo"))


def newest_pretrain_checkpoint(storages: tuple[Path, ...] = PRETRAIN_STORAGES) -> Path | None:
    """The model dir of the newest complete checkpoint under the storages (by checkpoint name, see
    neobert.checkpoint.latest_checkpoint)."""
    found = [c for c in (latest_checkpoint(s) for s in storages) if c is not None]
    return max(found, key=lambda c: c.name) / MODEL_SUBDIR if found else None


def write_demo_checkpoint(path: Path) -> None:
    import torch

    from neobert.checkpoint import save_model_dir
    from neobert.model import NeoBERTConfig, NeoBERTForMLM

    torch.manual_seed(0)
    cfg = NeoBERTConfig.preset("tiny")
    save_model_dir(
        path, NeoBERTForMLM(cfg), cfg, kind="mlm", extra={"demo": "random init, jobs/export_hf.py"}
    )


def run(cfg: ExportConfig, ctx: cli.Context) -> int:
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
                out = cfg.output if ctx.user_set("output") else cli.resolve_output_path(DEMO_OUTPUT)
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
            eval_results=cfg.eval_results or None,
            license=cfg.license,
        )
    print(json.dumps(dataclasses.asdict(report), indent=2))
    return 0


SPEC = cli.JobSpec(
    name="export_hf",
    doc=__doc__,
    config_cls=ExportConfig,
    positionals=(("CHECKPOINT", "checkpoint"), ("OUTDIR", "output")),
    output_keys=("output",),
    input_keys=("checkpoint", "tokenizer"),
    error_codes=((ParityError, 3),),
    exit_codes_doc="3 the parity check failed (the export dir is left in place for inspection)",
    uses_ray=False,
)


def main(argv: list[str] | None = None) -> int:
    return cli.main(SPEC, run, argv)


if __name__ == "__main__":
    sys.exit(main())
