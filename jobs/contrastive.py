"""Contrastive fine-tuning of a pretrained NeoBERT into a sentence embedder (Ray Train), with retrieval eval.

  python jobs/contrastive.py                                  # embedded sources + embedded tiny checkpoint, 2 CPU workers
  python jobs/contrastive.py --config configs/contrastive_1gpu.yaml
  python jobs/contrastive.py --init outputs/pretrain/neobert-tiny --data.input_dir outputs/contrastive \\
      --train.num_steps 500 --checkpoint.name my_embedder
  ray job submit --working-dir . -- python jobs/contrastive.py --init /shared/ckpt --data.input_dir /shared/val

--init: a pretraining run dir, checkpoint or model dir (jobs/pretrain.py), an HF export dir, or random:<preset>.
--data.input_dir: a dir written by `jobs/validate_contrastive.py --output DIR` (unvalidated input is refused);
empty = the embedded sources, validated on first use. Writes the run dir checkpoint.storage_path/checkpoint.name
(config.yaml, metrics.jsonl, checkpoints, eval.json, model/) and prints it at the end. Re-running with the same
run dir resumes from its latest checkpoint.
Under `ray job submit` (RAY_ADDRESS set) it joins that cluster, otherwise it starts Ray in-process.
See docs/contrastive.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout / `--working-dir .`

from neobert.checkpoint import resolve_model_dir  # noqa: E402
from pipelines import cli, contracts  # noqa: E402
from pipelines.contrastive.validate import MARKER_NAME  # noqa: E402
from pipelines.train import contrastive as ct  # noqa: E402

FLAGS = (
    cli.Flag(("--init",), "model.init", "pretraining checkpoint / model dir / HF export / random:<preset>",
             metavar="PATH"),
)  # fmt: skip


def prepare(cfg: ct.ContrastiveConfig, ctx: cli.Context) -> list[str]:
    """User-given paths are checked before Ray starts: a wrong path fails in a second, not after start-up."""
    more = []
    if cfg.data.input_dir:
        contracts.check_validated_dir(cfg.data.input_dir, MARKER_NAME)
    if cfg.model.init and not cfg.model.init.startswith(ct.RANDOM_INIT_PREFIX):
        init = str(resolve_model_dir(cfg.model.init).resolve())  # workers may run elsewhere
        more.append(f"--model.init={json.dumps(init)}")
    return more


def run(cfg: ct.ContrastiveConfig, ctx: cli.Context) -> int:
    # >= 4 logical CPUs locally so Train workers and Ray Data tasks fit together
    ctx.init_ray(local_num_cpus=max(4, os.cpu_count() or 1))
    if not cfg.data.input_dir:  # the embedded sources, validated on first use
        cfg.data.input_dir = str(ct.ensure_validated("").resolve())
    if not cfg.model.init:  # the embedded tiny checkpoint, pretrained on first use
        cfg.model.init = str(ct.default_init(cfg))
    evals = ct.fit(cfg)  # the rows stream from data.input_dir to the workers
    print(json.dumps({"before": evals["before"], "after": evals["after"]}, indent=2))
    print(f"contrastive: run dir {cfg.run_dir}")
    return 0


SPEC = cli.JobSpec(
    name="contrastive",
    doc=__doc__,
    config_cls=ct.ContrastiveConfig,
    default_config=ct.DEFAULT_CONFIG,
    load=ct.load_contrastive_config,
    flags=FLAGS,
    prepare=prepare,
    output_keys=("checkpoint.storage_path",),
    input_keys=("data.input_dir", "data.tokenizer", "model.init"),
)


def main(argv: list[str] | None = None) -> int:
    return cli.main(SPEC, run, argv)


if __name__ == "__main__":
    sys.exit(main())
