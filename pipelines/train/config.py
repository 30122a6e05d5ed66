"""Config sections shared by every training job (pretraining, contrastive training), with one set of key names.

A job config is a dataclass that derives from `TrainJobConfig` and adds its own sections (`data`, `model`) and,
where a job needs more keys in a shared section, a subclass of that section (`PretrainTrainSection(TrainSection)`
adds the masking keys). The same setting therefore has the same key in every job: `train.num_steps`,
`train.max_grad_norm`, `checkpoint.every_steps`, `scaling.num_workers`, `failure.max_failures`,
`logging.every_steps`, ...

Validation happens in `__post_init__`, so a bad value fails on the driver while the config is loaded, before Ray
starts: `ValueError` naming the dotted key, the value and the accepted range.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from neobert.config_io import deep_merge, from_dict, load_yaml_dict, parse_overrides

log = logging.getLogger("neobert.train")

Schedule = Literal["cosine", "linear", "constant", "wsd"]
DecayShape = Literal["linear", "cosine", "1-sqrt"]
Optimizer = Literal["adamw", "stable_adamw"]
Precision = Literal["auto", "bf16", "fp32"]


class ConfigError(ValueError):
    """A configuration or input error: retrying cannot fix it, so a run that raises it is never retried."""


@dataclass
class TrainSection:
    num_steps: int = 60  # optimizer steps in total (a resumed run continues up to this)
    lr: float = 1e-3
    warmup_steps: int = 10
    # cosine | linear | constant: warmup, then decay over the rest of the run; wsd: warmup (from min_lr_ratio),
    # stable_steps at the peak, decay_steps of decay_shape down to min_lr_ratio, held after (pipelines.train.schedule)
    schedule: Schedule = "cosine"
    stable_steps: int = 0  # wsd only
    decay_steps: int = 0  # wsd only; warmup_steps + stable_steps + decay_steps <= num_steps
    decay_shape: DecayShape = "cosine"  # wsd only: linear | cosine | 1-sqrt
    min_lr_ratio: float = 0.1  # final LR = lr * min_lr_ratio
    optimizer: Optimizer = "adamw"  # adamw (torch) | stable_adamw (torch-optimi: per-tensor update clipping)
    weight_decay: float = 0.01  # not applied to norms, biases, embeddings
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    max_grad_norm: float = 1.0  # 0 = no clipping
    seed: int = 0
    precision: Precision = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU; bf16 = autocast on any device
    compile: bool = False  # torch.compile each encoder block

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"train.num_steps must be >= 1, got {self.num_steps}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_steps <= self.num_steps:
            raise ValueError(
                f"train.warmup_steps={self.warmup_steps} must lie in [0, train.num_steps={self.num_steps}]"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if min(self.stable_steps, self.decay_steps) < 0:
            raise ValueError(
                f"train.stable_steps / train.decay_steps must be >= 0, got {self.stable_steps} / {self.decay_steps}"
            )
        if self.schedule == "wsd":
            total = self.warmup_steps + self.stable_steps + self.decay_steps
            if total > self.num_steps:
                raise ValueError(
                    f"train.warmup_steps={self.warmup_steps} + train.stable_steps={self.stable_steps} + "
                    f"train.decay_steps={self.decay_steps} = {total} exceeds train.num_steps={self.num_steps}; "
                    "shorten a segment or raise train.num_steps"
                )
        elif self.stable_steps or self.decay_steps:
            log.warning(
                "train.stable_steps / train.decay_steps have no effect with train.schedule=%s (only with wsd)",
                self.schedule,
            )
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"train.{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"train.eps must be > 0, got {self.eps}")
        if self.max_grad_norm < 0:
            raise ValueError(f"train.max_grad_norm must be >= 0 (0 = off), got {self.max_grad_norm}")


@dataclass
class CheckpointSection:
    every_steps: int = 20  # 0 = only at the last step (there is always one at the last step)
    num_to_keep: int = 2
    storage_path: str = (
        "outputs/pretrain"  # local dir (made absolute on the driver) or a URI every node reaches
    )
    name: str = "neobert-pretrain"  # the run dir is storage_path/name; re-using it resumes that run
    # upload a checkpoint in the background (Ray's CheckpointUploadMode.ASYNC); training goes on meanwhile
    async_upload: bool = False

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(
                f"checkpoint.every_steps must be >= 0 (0 = only at the end), got {self.every_steps}"
            )
        if self.num_to_keep < 1:
            raise ValueError(f"checkpoint.num_to_keep must be >= 1, got {self.num_to_keep}")
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"checkpoint.name must be a non-empty name without '/', got {self.name!r}")
        if not self.storage_path:
            raise ValueError("checkpoint.storage_path must not be empty; give a directory or a URI")


@dataclass
class ScalingSection:
    # an int = a fixed number of workers; [min, max] = an elastic run (Ray Train keeps between min and max workers
    # and restarts on fewer from the last checkpoint when one is lost; the global batch stays the same)
    num_workers: int | list[int] = 2
    strategy: str = (
        "ddp"  # ddp = replicate the model; fsdp2 = shard parameters/gradients/optimizer (docs/scaling.md)
    )
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # e.g. {"CPU": 0.5}: room for Data

    def __post_init__(self) -> None:
        from pipelines.train.parallel import check_strategy

        n = self.num_workers
        if isinstance(n, (list, tuple)):
            if len(n) != 2 or not n[0] <= n[1]:
                raise ValueError(
                    f"scaling.num_workers must be an int or [min, max] with min <= max (an elastic run), got {list(n)}"
                )
            self.num_workers = [int(n[0]), int(n[1])]
        if self.min_workers < 1:
            raise ValueError(f"scaling.num_workers must be >= 1, got {self.num_workers}")
        check_strategy(self.strategy)
        for k, v in self.resources_per_worker.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"scaling.resources_per_worker.{k} must be a number > 0, got {v!r}")

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list) and self.num_workers[0] != self.num_workers[1]

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def world_sizes(self) -> range:
        """Every world size the run may train on."""
        return range(self.min_workers, self.max_workers + 1)

    def ray_scaling_config(self):
        """Ray Train's `ScalingConfig`: `num_workers=(min, max)` for an elastic run, else the int."""
        from ray.train import ScalingConfig

        return ScalingConfig(
            num_workers=(self.min_workers, self.max_workers) if self.elastic else self.max_workers,
            use_gpu=self.use_gpu,
            resources_per_worker=self.resources_per_worker or None,
        )


@dataclass
class FailureSection:
    max_failures: int = 0  # worker-group restarts from the latest checkpoint (-1 = unlimited)
    inject_failure_at_step: int = 0  # tests: a worker fails at this step of an attempt that did not resume
    # tests: "raise" = the last rank raises after the step; "kill" = it SIGKILLs itself there;
    # "kill_in_checkpoint" = rank 0 SIGKILLs itself while it writes that step's checkpoint
    inject_failure_mode: Literal["raise", "kill", "kill_in_checkpoint"] = "raise"
    # tests: from this step on, the runner acts as if Ray Train reported a preemption notice (0 = off)
    inject_preemption_at_step: int = 0

    def __post_init__(self) -> None:
        if self.max_failures < -1:
            raise ValueError(
                f"failure.max_failures must be >= -1 (-1 = unlimited, 0 = no restart), got {self.max_failures}"
            )
        if self.inject_preemption_at_step < 0:
            raise ValueError(
                f"failure.inject_preemption_at_step must be >= 0 (0 = off), got {self.inject_preemption_at_step}"
            )
        if self.inject_failure_at_step < 0:
            raise ValueError(
                f"failure.inject_failure_at_step must be >= 0 (0 = off), got {self.inject_failure_at_step}"
            )


@dataclass
class LoggingSection:
    every_steps: int = 5  # metrics window: aggregated over the steps since the last log
    eval_every_steps: int = 20  # 0 = only at the last step
    tensorboard: bool = False  # rank 0 writes TensorBoard events under <run dir>/tensorboard
    mlflow_tracking_uri: str = (
        ""  # "" = off; else rank 0 logs to this MLflow server / dir (run named after the run)
    )
    wandb: bool = (
        False  # rank 0 logs to Weights & Biases (project = checkpoint.name; WANDB_MODE=offline works)
    )
    trace_data: bool = (
        False  # each rank appends a fingerprint of every micro-batch to data_trace.rank<r>.jsonl
    )

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"logging.every_steps must be >= 1, got {self.every_steps}")
        if self.eval_every_steps < 0:
            raise ValueError(
                f"logging.eval_every_steps must be >= 0 (0 = at the end), got {self.eval_every_steps}"
            )


@dataclass
class TrainJobConfig:
    """The sections every training job has. Jobs subclass it and add `data` / `model` (and section subclasses)."""

    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    failure: FailureSection = field(default_factory=FailureSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self) -> None:
        f, ck, t = self.failure, self.checkpoint, self.train
        if f.inject_failure_at_step:
            if not ck.every_steps or f.inject_failure_at_step <= ck.every_steps:
                raise ValueError(
                    f"failure.inject_failure_at_step={f.inject_failure_at_step} must come after the first "
                    f"checkpoint (checkpoint.every_steps={ck.every_steps}), else the restarted attempt starts "
                    "from scratch and fails again"
                )
            if f.inject_failure_at_step > t.num_steps:
                raise ValueError(
                    f"failure.inject_failure_at_step={f.inject_failure_at_step} > train.num_steps={t.num_steps}"
                )
            step = f.inject_failure_at_step
            if (
                f.inject_failure_mode == "kill_in_checkpoint"
                and step % ck.every_steps
                and step != t.num_steps
            ):
                raise ValueError(
                    f"failure.inject_failure_mode=kill_in_checkpoint needs a checkpoint step, but "
                    f"failure.inject_failure_at_step={step} is not a multiple of checkpoint.every_steps={ck.every_steps}"
                )

    @property
    def run_dir(self) -> str:
        """`checkpoint.storage_path/checkpoint.name`: checkpoints, metrics.jsonl, config.yaml (a path or URI)."""
        return join_uri(self.checkpoint.storage_path, self.checkpoint.name)


def join_uri(root: str, name: str) -> str:
    """`os.path.join` that keeps a URI a URI (`Path("s3://b/k")` would collapse it to `s3:/b/k`)."""
    return f"{root.rstrip('/')}/{name}" if "://" in root else os.path.join(root, name)


def resolve_storage_path(path: str) -> str:
    """A storage path as every process must see it: URIs unchanged, local paths absolute (on the driver).

    Ray Train workers run in another working directory, so a relative path must be resolved before the config
    leaves the driver.
    """
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def load_job_config(
    cls: type,
    default_path: str | Path,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    expand: Any = None,
) -> Any:
    """YAML (`base:` inheritance) + dotted overrides -> the validated job config, storage path made absolute.

    `expand(dict) -> dict` may rewrite the merged dict before it is typed (e.g. a model preset)."""
    data = load_yaml_dict(path or default_path)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    if expand is not None:
        data = expand(data)
    cfg = from_dict(cls, data)
    cfg.checkpoint.storage_path = resolve_storage_path(cfg.checkpoint.storage_path)
    return cfg
