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
"""

from __future__ import annotations

import os
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

    if address is None and os.environ.get("RAY_ADDRESS"):
        ray.init()
        return "job"
    if address is not None:
        ray.init(
            address=address,
            runtime_env={"working_dir": str(repo), "excludes": list(WORKING_DIR_EXCLUDES)},
        )
        return "address"
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)
    kwargs: dict[str, Any] = {"address": "local"}
    if local_num_cpus is not None:
        kwargs["num_cpus"] = local_num_cpus
    if include_dashboard is not None:
        kwargs["include_dashboard"] = include_dashboard
    ray.init(**kwargs)
    return "local"
