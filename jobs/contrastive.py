"""Contrastive fine-tuning of a pretrained NeoBERT into a sentence embedder (Ray Train), with retrieval eval.

  python jobs/contrastive.py                                  # embedded sources + embedded tiny checkpoint, 2 CPU workers
  python jobs/contrastive.py --config configs/contrastive_1gpu.yaml
  python jobs/contrastive.py --init outputs/pretrain/neobert-tiny --data.input_dir outputs/contrastive_valid \
      --train.num_steps 500 --checkpoint.name my_embedder
  ray job submit --working-dir . -- python jobs/contrastive.py --init /shared/ckpt --data.input_dir /shared/val

--init: a pretraining run dir, checkpoint or model dir (jobs/pretrain.py), an HF export dir, or random:<preset>.
--data.input_dir: a dir written by `jobs/validate_contrastive.py --output DIR` (unvalidated input is refused);
empty = the embedded sources, validated on first use. Writes RUN_DIR/{config.yaml, metrics.jsonl, checkpoint_*,
eval.json, model/} (RUN_DIR = checkpoint.storage_path/checkpoint.name) and prints RUN_DIR at the end. Re-running
with the same run dir resumes from its latest checkpoint.
Under `ray job submit` (RAY_ADDRESS set) it joins that cluster, otherwise it starts Ray in-process.
Exit codes: 0 ok, 2 bad config / input, 1 training failed. See docs/contrastive.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere / ray job submit

from pipelines.train import contrastive as ct  # noqa: E402

DEFAULT_CONFIG = ct.DEFAULT_CONFIG


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="YAML config (default configs/contrastive.yaml)"
    )
    p.add_argument(
        "--init", help="= --model.init: pretraining checkpoint / model dir / HF export / random:<preset>"
    )
    p.add_argument(
        "--address", default=None, help="Ray address; default: $RAY_ADDRESS, else start Ray locally"
    )
    args, overrides = p.parse_known_args(argv)
    if args.init:
        overrides += [f"--model.init={args.init}"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = ct.load_contrastive_config(args.config, overrides)
        # user-given paths are checked before Ray starts: a wrong path fails in a second, not after start-up
        if cfg.data.input_dir:
            cfg.data.input_dir = str(ct.ensure_validated(cfg.data.input_dir).resolve())
        if cfg.model.init and not cfg.model.init.startswith(ct.RANDOM_INIT_PREFIX):
            cfg.model.init = str(ct.resolve_init(cfg.model.init).resolve())  # workers may run elsewhere
    except (ValueError, FileNotFoundError) as e:
        print(f"contrastive: error: {e}", file=sys.stderr)
        return 2

    from pipelines.ray_session import init_ray

    # >= 4 logical CPUs locally so Train workers and Ray Data tasks fit together; dashboard on (Train's state API)
    init_ray(args.address, REPO, local_num_cpus=max(4, os.cpu_count() or 1))
    try:
        if not cfg.data.input_dir:  # the embedded sources, validated on first use
            cfg.data.input_dir = str(ct.ensure_validated("").resolve())
        rows = ct.load_rows(cfg.data.input_dir)
        if not cfg.model.init:  # the embedded tiny checkpoint, pretrained on first use
            cfg.model.init = str(ct.default_init(cfg))
        evals = ct.fit(cfg, rows)
    except (ValueError, FileNotFoundError) as e:  # ConfigError included
        print(f"contrastive: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"before": evals["before"], "after": evals["after"]}, indent=2))
    print(f"contrastive: run dir {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
