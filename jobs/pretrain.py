"""Pretrain NeoBERT with masked LM on Ray Train.

    python jobs/pretrain.py                                   # tiny preset, embedded corpus, 2 CPU workers
    python jobs/pretrain.py --config configs/pretrain_base_1gpu.yaml --train.num_steps 200
    ray job submit --working-dir . -- python jobs/pretrain.py --checkpoint.storage_path /shared/runs

Any config field can be overridden with a dotted flag (`--model.num_layers 2`, `--train.lr=3e-4`).
Re-running with the same `--checkpoint.name` and storage path resumes from the latest checkpoint.
Under `ray job submit` (RAY_ADDRESS set) it joins that cluster; otherwise it starts Ray in-process
(`--address auto` joins a cluster started with `ray start` on this machine instead).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout / `--working-dir .`

from pipelines.train.config import ConfigError  # noqa: E402
from pipelines.train.pretrain import DEFAULT_CONFIG, fit, load_pretrain_config  # noqa: E402
from pipelines.train.sinks import METRICS_FILE  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument(
        "--address", default=None, help="Ray address; default: $RAY_ADDRESS, else start locally"
    )
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_pretrain_config(args.config, overrides)
    except ValueError as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2

    from pipelines.ray_session import init_ray

    # >= 4 logical CPUs locally so Train workers and Ray Data tasks fit on small boxes; the dashboard (if
    # installed) stays on: Train uses its state API.
    init_ray(args.address, REPO, local_num_cpus=max(4, os.cpu_count() or 1))

    try:
        result = fit(cfg)  # Ray Train V2 raises when the run fails for good
    except ConfigError as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    except BaseException:
        print(f"run dir: {cfg.run_dir}\nmetrics: {os.path.join(cfg.run_dir, METRICS_FILE)}", file=sys.stderr)
        print("training failed; the latest checkpoint (if any) is under the run dir", file=sys.stderr)
        raise
    print(f"run dir: {cfg.run_dir}")
    print(f"metrics: {os.path.join(cfg.run_dir, METRICS_FILE)}")
    print(f"final checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    if result.error:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
