"""How every job joins or starts Ray (one place, so `jobs/*.py` behave the same under every launcher).

    init_ray(args.address, REPO)

* `ray job submit ...` (RAY_ADDRESS set, no `--address`): `ray.init()` joins the job's cluster; the job's own
  runtime env (`--working-dir .`) already ships the code to the workers.
* `--address ADDR` (a remote `ray://` / `host:port` cluster, or `auto` for a `ray start` on this machine):
  `ray.init(address, runtime_env={"working_dir": repo})`, so remote workers import this checkout, not whatever
  the nodes have installed. Local-only folders (virtualenv, outputs, caches, device carry folders) are excluded;
  Ray also skips what .gitignore lists.
* neither: a local instance whose workers inherit PYTHONPATH with the repository root, so the checkout is
  importable even when the package is not installed.

Every mode turns on Ray Train's state tracking where it can (the dashboard's Train tab is empty without
`RAY_TRAIN_ENABLE_STATE_TRACKING=1`; a `ray start` cluster gets it from ray_cluster.yaml), and keeps the
output readable in logs: Ray Data's progress bars are drawn only when stderr is a terminal (`quiet_output`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

# Never uploaded as part of the working dir: big, machine-local, or secret-prone.
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv",
    ".cache",
    "outputs",
    ".device",
    ".whl",
    ".fa4a",
    ".fa4b",
    "*.egg-info",
]


STATE_TRACKING_ENV = "RAY_TRAIN_ENABLE_STATE_TRACKING"
PROGRESS_BARS_ENV = "RAY_DATA_DISABLE_PROGRESS_BARS"


def quiet_output(tty: bool | None = None) -> bool:
    """Ray's progress output only where a person watches: returns whether progress bars stay on.

    Not a terminal (a log file, CI, `ray job submit` output): Ray Data's progress bars are off (they print a
    frame with cursor codes per update, thousands of lines in a log) and so is its per-execution plan print;
    the training progress lines of rank 0 remain. An explicit `RAY_DATA_DISABLE_PROGRESS_BARS` wins. Set in
    the environment (inherited by a local instance's workers) and in the driver's `DataContext` (which every
    dataset built afterwards carries to the actors and Train workers that execute it).
    """
    tty = sys.stderr.isatty() if tty is None else tty
    if not tty:
        os.environ.setdefault(PROGRESS_BARS_ENV, "1")
    bars = os.environ.get(PROGRESS_BARS_ENV, "0") in ("", "0")
    try:
        from ray.data import DataContext
    except ImportError:  # Ray without its data extra: nothing to quiet
        return bars
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = bars
    if not tty:
        ctx.print_on_execution_start = False
    return bars


def init_ray(
    address: str | None,
    repo: Path,
    *,
    local_num_cpus: int | None = None,
    include_dashboard: bool | None = None,
) -> str:
    """Join or start Ray as described in the module docstring; returns the mode used ("job", "address",
    "local"). `local_num_cpus` / `include_dashboard` apply to a local instance only (a cluster refuses
    resource arguments)."""
    import ray

    mode = _init(ray, address, repo, local_num_cpus=local_num_cpus, include_dashboard=include_dashboard)
    quiet_output()
    return mode


def _init(
    ray: Any, address: str | None, repo: Path, *, local_num_cpus: int | None, include_dashboard: bool | None
) -> str:
    if address is None and os.environ.get("RAY_ADDRESS"):
        ray.init()
        return "job"
    if address is not None:
        ray.init(
            address=address,
            runtime_env={
                "working_dir": str(repo),
                "excludes": list(WORKING_DIR_EXCLUDES),
                "env_vars": {STATE_TRACKING_ENV: os.environ.get(STATE_TRACKING_ENV, "1")},
            },
        )
        return "address"
    # before ray.init: the local instance's processes (Train controller included) inherit the environment
    os.environ.setdefault(STATE_TRACKING_ENV, "1")
    if not sys.stderr.isatty():
        os.environ.setdefault(PROGRESS_BARS_ENV, "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)
    kwargs: dict[str, Any] = {"address": "local"}
    if local_num_cpus is not None:
        kwargs["num_cpus"] = local_num_cpus
    if include_dashboard is not None:
        kwargs["include_dashboard"] = include_dashboard
    ray.init(**kwargs)
    return "local"
