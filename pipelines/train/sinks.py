"""Where a run's outputs go: `RunFiles` (local or URI run dir) and `MetricSinks` (metrics.jsonl + trackers).

Sinks, all written by rank 0 only:
- `metrics.jsonl` in the run dir, always: one JSON record per log/eval event, `{"step", "time", <metrics>}`;
  a resumed attempt first drops the records of steps after its checkpoint (they are re-run).
- TensorBoard (`logging.tensorboard`): event files under `<run dir>/tensorboard`.
- MLflow (`logging.mlflow_tracking_uri`): experiment = the job (`neobert-pretrain`, ...), run name =
  `checkpoint.name`, metric names as logged (`train/loss`), the flattened config as params.
- Weights & Biases (`logging.wandb`): project = the job, run name = `checkpoint.name`, files under
  `<run dir>/wandb`; `WANDB_MODE=offline` runs without an account or network.
The tracker packages are optional (`pip install -e .[tracking]`); `check_tracking_packages` runs on the driver,
so a missing one fails before any worker starts.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from neobert.config_io import to_dict

METRICS_FILE = "metrics.jsonl"


class RunFiles:
    """The files one rank writes into the run dir (`metrics.jsonl`, `tensorboard/`, `data_trace.rank<r>.jsonl`).

    A local run dir is written in place. A URI run dir (s3://, gs://, file://, ...) cannot go through `Path`/`open`
    (`Path("s3://b/k")` is the local dir `s3:/b/k`): the files are written to a local staging dir and copied to
    the run dir through pyarrow filesystems by `sync()`, which the runner calls at every checkpoint and at the
    end, so the remote copy lags by at most one checkpoint interval. `fetch()` brings a file back into an empty
    staging dir (a worker restarted on another node continues the same metrics.jsonl).
    """

    def __init__(self, run_dir: str, staging_root: str | None = None) -> None:
        import hashlib

        self.run_dir = run_dir
        self.remote = "://" in run_dir
        if self.remote:
            key = hashlib.sha256(run_dir.encode()).hexdigest()[:12]
            self.local = Path(staging_root or tempfile.gettempdir()) / f"neobert-run-{key}"
        else:
            self.local = Path(run_dir)
        self.local.mkdir(parents=True, exist_ok=True)
        self._names: set[str] = set()

    def path(self, name: str) -> Path:
        """Local path to write `name` (relative to the run dir); `sync()` uploads it."""
        self._names.add(name)
        return self.local / name

    def _remote(self, name: str):
        from pipelines.io import filesystem_for

        fs, root = filesystem_for(self.run_dir)
        return fs, f"{root.rstrip('/')}/{name}"

    def fetch(self, name: str) -> None:
        """URI run dir: copy the file `name` from it into staging unless staging already has it."""
        import pyarrow.fs as pafs

        self._names.add(name)
        if not self.remote or (self.local / name).exists():
            return
        fs, src = self._remote(name)
        if fs.get_file_info(src).type == pafs.FileType.File:
            pafs.copy_files(src, str(self.local / name), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())  # fmt: skip

    def sync(self) -> None:
        """URI run dir: upload every file/dir handed out by `path()` that exists (no-op for a local run dir)."""
        import pyarrow.fs as pafs

        if not self.remote:
            return
        for name in sorted(self._names):
            src = self.local / name
            if not src.exists():
                continue
            fs, dst = self._remote(name)
            fs.create_dir(dst if src.is_dir() else dst.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(
                str(src), dst, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
            )


def check_tracking_packages(cfg: Any) -> None:
    """Fail on the driver, before any worker starts, when an enabled tracker's package is missing."""
    lg = cfg.logging
    wanted = [
        (lg.tensorboard, "tensorboard", "logging.tensorboard=true", "set it to false"),
        (bool(lg.mlflow_tracking_uri), "mlflow", f"logging.mlflow_tracking_uri={lg.mlflow_tracking_uri!r}",
         "set it to an empty string"),
        (lg.wandb, "wandb", "logging.wandb=true", "set it to false"),
    ]  # fmt: skip
    for enabled, package, setting, off in wanted:
        if enabled and importlib.util.find_spec(package) is None:
            raise ValueError(
                f"{setting} needs the {package} package: `pip install -e .[tracking]` (or `pip install {package}`), "
                f"or {off}"
            )
    check_mlflow_store(lg.mlflow_tracking_uri)


def check_mlflow_store(uri: str) -> None:
    """MLflow 3 refuses a plain directory (file store) as tracking URI unless MLFLOW_ALLOW_FILE_STORE=true: say so
    on the driver, with the fixes, instead of failing on every worker after Ray has started."""
    import os

    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if (
        not uri
        or scheme not in ("", "file")
        or os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() == "true"
    ):
        return
    import mlflow

    if int(mlflow.__version__.split(".")[0]) >= 3:
        raise ValueError(
            f"logging.mlflow_tracking_uri={uri!r} is a directory (MLflow's file store), which MLflow "
            f"{mlflow.__version__} refuses: use a database, e.g. 'sqlite:///{uri.removeprefix('file://')}/mlflow.db', "
            "a tracking server (http://...), or set MLFLOW_ALLOW_FILE_STORE=true on the driver and the workers"
        )


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class MetricSinks:
    """Rank 0's metric outputs (see the module docstring). `job` names the MLflow experiment / W&B project."""

    def __init__(self, cfg: Any, files: RunFiles, job: str) -> None:
        files.fetch(METRICS_FILE)
        self.path = files.path(METRICS_FILE)
        self.tb = self.mlflow = self.wandb = None
        run_name = cfg.checkpoint.name
        params = flatten(to_dict(cfg))
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(files.path("tensorboard")))
        if cfg.logging.mlflow_tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(cfg.logging.mlflow_tracking_uri)
            mlflow.set_experiment(job)
            mlflow.start_run(run_name=run_name)
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            self.mlflow = mlflow
        if cfg.logging.wandb:
            import wandb

            wandb_dir = files.path("wandb")
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(project=job, name=run_name, dir=str(wandb_dir), config=params)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > `step` (a resumed attempt re-runs them)."""
        if not self.path.exists():
            return
        lines = [
            ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step
        ]
        self.path.write_text("".join(ln + "\n" for ln in lines))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(dict(metrics), step=step)
        if self.wandb is not None:
            self.wandb.log(dict(metrics), step=step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()
