"""Evaluate encoders side by side: STS-B (zero-shot and fine-tuned), polarity, TREC, retrieval, held-out MLM.

    python jobs/evaluate.py --model reference --model outputs/pretrain/neobert-tiny --output outputs/eval
    python jobs/evaluate.py --model reference --model random:tiny --tasks stsb,polarity --max-examples 256
    ray job submit --working-dir . -- python jobs/evaluate.py --model /shared/runs/x --output /shared/eval/x

Writes OUTPUT/results.json ({model: {task: {metric, metric_std, num_seeds}}}), results.md, results.html and
run.json; OUTPUT is replaced only when the run succeeds. Units (model x task x seed) run as Ray tasks (one GPU
each when the cluster has GPUs); `--engine local` runs the same units in this process. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout / `--working-dir .`

from pipelines.eval.runner import EvalConfig, evaluate  # noqa: E402
from pipelines.eval.tasks import ALL_TASKS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="reference | random:<preset> | run / checkpoint / model / HF export / sentence-transformers dir",
    )
    p.add_argument("--tasks", default=",".join(ALL_TASKS), help="comma-separated (default: %(default)s)")
    p.add_argument("--output", default="outputs/eval", help="results dir (default: %(default)s)")
    p.add_argument("--engine", choices=("ray", "local"), default="ray")
    p.add_argument("--max-examples", type=int, default=0, help="cap every task's examples (0 = full tasks)")
    p.add_argument(
        "--seeds", default="", help="comma-separated fine-tuning seeds (default: the recipes file's)"
    )
    p.add_argument("--recipes", default="", help="recipes YAML (default: pipelines/eval/recipes.yaml)")
    p.add_argument("--num-gpus-per-task", type=float, default=-1.0, help="-1 = 1 when the cluster has GPUs")
    p.add_argument("--address", default=None, help="Ray address; default: $RAY_ADDRESS, else start locally")
    args = p.parse_args(argv)  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = EvalConfig(
            models=args.model,
            tasks=[t for t in args.tasks.split(",") if t],
            output=str(Path(args.output).expanduser().resolve()),  # absolute: `ray job submit` runs elsewhere
            engine=args.engine,
            max_examples=args.max_examples,
            seeds=[int(s) for s in args.seeds.split(",") if s],
            recipes=args.recipes,
            num_gpus_per_task=args.num_gpus_per_task,
        )
        if cfg.engine == "ray":
            from pipelines.ray_session import init_ray

            init_ray(args.address, REPO, local_num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False)
        out = evaluate(cfg)
    except (ValueError, FileNotFoundError) as e:
        msg = str(e)
        print(msg if msg.startswith("error:") else f"error: {msg}", file=sys.stderr)
        return 2
    print((Path(out["output"]) / "results.md").read_text())
    print(f"results: {out['output']}/results.json")
    if out["skipped"]:
        print(f"skipped: {json.dumps(out['skipped'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
