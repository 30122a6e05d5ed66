"""Evaluate encoders side by side: STS-B (zero-shot and fine-tuned), polarity, TREC, retrieval, held-out MLM.

  python jobs/evaluate.py --model reference --model outputs/pretrain/neobert-tiny --output outputs/eval
  python jobs/evaluate.py --model reference --model random:tiny --tasks stsb,polarity --max-examples 256
  ray job submit --working-dir . -- python jobs/evaluate.py --model /shared/runs/x --output /shared/eval/x

--model: reference (all-MiniLM-L6-v2), random:<preset>, or a run / checkpoint / model / HF export /
sentence-transformers dir (repeatable). Writes OUTPUT/results.json ({model: {task: {metric, metric_std,
num_seeds}}}), results.md, results.html and run.json; OUTPUT is replaced only when the run succeeds. Units
(model x task x seed) run as Ray tasks (one GPU each when the cluster has GPUs); `--engine local` runs the same
units in this process. See docs/evaluation.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout / `--working-dir .`

from pipelines import cli  # noqa: E402
from pipelines.eval.runner import EvalConfig, evaluate  # noqa: E402

F = cli.Flag
FLAGS = (
    F(("--model",), "models", "reference | random:<preset> | a model dir (repeatable)", "append", "MODEL"),
    F(("--tasks",), "tasks", "comma-separated tasks (stsb,stsb_ft,polarity,trec,retrieval,mlm)", metavar="T,..."),
    F(("--output",), "output", "results dir", metavar="DIR"),
    F(("--engine",), "engine", "ray | local (in this process)", metavar="ENGINE"),
    F(("--max-examples",), "max_examples", "cap every task's examples (0 = full tasks)", metavar="N"),
    F(("--seeds",), "seeds", "comma-separated fine-tuning seeds (default: the recipes file's)", metavar="S,..."),
    F(("--recipes",), "recipes", "recipes YAML (default: pipelines/eval/recipes.yaml)", metavar="PATH"),
    F(("--num-gpus-per-task",), "num_gpus_per_task", "-1 = 1 when the cluster has GPUs", metavar="G"),
)  # fmt: skip


def run(cfg: EvalConfig, ctx: cli.Context) -> int:
    if cfg.engine == "ray":
        ctx.init_ray(local_num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False)
    out = evaluate(cfg)
    print((Path(out["output"]) / "results.md").read_text())
    print(f"results: {out['output']}/results.json")
    if out["skipped"]:
        print(f"skipped: {json.dumps(out['skipped'])}")
    return 0


SPEC = cli.JobSpec(
    name="evaluate",
    doc=__doc__,
    config_cls=EvalConfig,
    flags=FLAGS,
    output_keys=("output",),
)


def main(argv: list[str] | None = None) -> int:
    return cli.main(SPEC, run, argv)


if __name__ == "__main__":
    sys.exit(main())
