"""In-training validation of a training job: which checkpoints ask for it, and where their scores land.

The evaluation itself is Ray Train's built-in checkpoint validation (`ray.train.ValidationConfig`): a checkpoint
reported with `validation=True` is scored by `pipelines.eval.in_training.validate_checkpoint` in a Ray task while
training goes on. This module adds what a training job needs around it:

- the `validation:` config section (`ValidationSection`) and the `Validator` seam: what scores a checkpoint is
  given to the job by its caller (`pipelines.eval.in_training.VALIDATOR`, passed by jobs/pretrain.py), so the
  training runtime never imports the evaluation harness (which builds on training's data code);
- driver: `validation_config(cfg, validator)` builds the `ValidationConfig` whose task writes one result file per
  step into `<run dir>/validation/` (`write_result`), and `check_resources(cfg)` refuses a task no node of the
  cluster can ever run (it would wait forever, and Ray's fit with it);
- rank 0 of the workers: `ValidationTracker` remembers the steps that asked (`request`, saved in the train state so
  a resumed run still knows them), routes every new result file into the metric sinks at the step it belongs to
  (`poll`, once per logging window: one directory listing), and at the end waits for Ray to finish the
  outstanding validations, warns about every requested step without scores and writes the count (`finish`).

Why result files and not Ray's checkpoint metrics: Ray merges the scores into the metrics of their checkpoint
only, and `checkpoint.num_to_keep` deletes that checkpoint, metrics included, as soon as its validation is done
and newer checkpoints exist; the files stay, and they reach a resumed attempt too.

Metric names: `val/<task>/<metric>`, `val/step` and `val/seconds` (per validation, at the step of its checkpoint),
and in the run's last record `val/num_requested` / `val/num_missing`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs

log = logging.getLogger("neobert.train")

PREFIX = "val"  # metric names: val/<task>/<metric>
RESULTS_DIR = "validation"  # inside the run dir


@dataclasses.dataclass
class ValidationSection:
    """The `validation:` section of a training config (keys `validation.<field>`). Which task names exist is the
    validator's business (`Validator.check`: the evaluation harness checks them against its tasks)."""

    tasks: list[str] = dataclasses.field(default_factory=lambda: ["stsb", "retrieval", "mlm"])
    every_steps: int = 0  # validate the checkpoint of every N-th step and the last one (0 = off)
    max_examples: int = (
        256  # per task (a stable subset): small, so a validation ends before the next one is due
    )
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])  # fine-tuned tasks: one run per seed
    num_cpus: float = 1.0  # resources of the validation Ray task
    num_gpus: float = 0.0
    timeout_s: float = (
        1800.0  # Ray cancels a validation running longer (counted from its launch; 0 = no limit)
    )

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("validation.tasks must name at least one task")
        for name in ("every_steps", "max_examples", "timeout_s", "num_gpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"validation.{name} must be >= 0, got {getattr(self, name)}")
        if self.num_cpus <= 0:
            raise ValueError(f"validation.num_cpus must be > 0, got {self.num_cpus}")
        if not self.seeds:
            raise ValueError("validation.seeds must name at least one seed")

    def due(self, step: int, last: bool = False) -> bool:
        """Whether the checkpoint reported at `step` (`last`: the run's last step) should be validated (pass as
        `report(validation=...)`)."""
        return self.every_steps > 0 and (step % self.every_steps == 0 or last)

    def fn_kwargs(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "max_examples": self.max_examples, "seeds": list(self.seeds)}


@dataclasses.dataclass(frozen=True)
class Validator:
    """What scores a checkpoint: `fn(checkpoint, *, tasks, max_examples, seeds, results_dir)` -> {metric: value}
    (run by Ray in a task; it writes its result file with `write_result`), and `check(section)`, run on the driver
    before Ray starts (unknown task names -> ValueError). The evaluation harness provides one
    (`pipelines.eval.in_training.VALIDATOR`); training code never imports the harness."""

    fn: Callable[..., dict[str, float]]
    check: Callable[[ValidationSection], None]


def results_dir(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/{RESULTS_DIR}"


def result_name(step: int) -> str:
    """The result file of the validation of the checkpoint of `step` inside the results dir."""
    return f"step_{step:09d}.json"


def write_result(results_dir: str, record: dict[str, Any]) -> None:
    """Write one result record (`{"step", "checkpoint", "metrics"}` or `{"step", "checkpoint", "error"}`) as
    `results_dir/step_<N>.json`: aside first, then renamed into place, so a reader never sees half a file (local
    dirs and URIs alike, through pyarrow filesystems)."""
    from pipelines.io import filesystem_for

    fs, root = filesystem_for(results_dir)
    fs.create_dir(root, recursive=True)
    final = posixpath.join(root, result_name(int(record["step"])))
    tmp = f"{final}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write((json.dumps(record) + "\n").encode("utf-8"))
    fs.move(tmp, final)


def build_validation_config(
    section: ValidationSection, fn: Callable[..., Any], results_dir: str | None = None
):
    """A `ray.train.ValidationConfig` running `fn` with the section's tasks and sizes (and `results_dir` when
    given) as a Ray task with the section's resources and timeout; None when validation is off."""
    if section.every_steps == 0:
        return None
    from ray.train import ValidationConfig, ValidationTaskConfig

    kwargs = section.fn_kwargs() | ({"results_dir": results_dir} if results_dir is not None else {})
    return ValidationConfig(
        fn=fn,
        task_config=ValidationTaskConfig(fn_kwargs=kwargs, timeout_s=section.timeout_s or None),
        ray_remote_kwargs={"num_cpus": section.num_cpus, "num_gpus": section.num_gpus, "max_retries": 0},
    )


def validation_config(cfg: Any, validator: Validator | None):
    """Driver: the `ray.train.ValidationConfig` of a job config with a `validation` section (None when off)."""
    section = cfg.validation
    if not section.every_steps:
        return None
    if validator is None:
        from pipelines.train.config import ConfigError

        raise ConfigError(
            f"validation.every_steps={section.every_steps} but no validator was given: pass "
            "validator=pipelines.eval.in_training.VALIDATOR (jobs/pretrain.py does), or set validation.every_steps=0"
        )
    validator.check(section)
    return build_validation_config(section, validator.fn, results_dir(cfg.run_dir))


def check_config(cfg: ValidationSection, checkpoint_every: int) -> None:
    """A validation scores the checkpoint saved at its step, so its steps must be checkpoint steps."""
    n = cfg.every_steps
    if not n:
        return
    if not checkpoint_every:
        raise ValueError(
            f"validation.every_steps={n} needs checkpoints to score, but checkpoint.every_steps=0 writes only the "
            f"last one; set checkpoint.every_steps to {n} (or a divisor of it)"
        )
    if n % checkpoint_every:
        lo = max(checkpoint_every, n // checkpoint_every * checkpoint_every)
        raise ValueError(
            f"validation.every_steps={n} must be a multiple of checkpoint.every_steps={checkpoint_every} (a "
            f"validation scores the checkpoint saved at its step); set it to e.g. {lo} or {lo + checkpoint_every}"
        )


def check_resources(cfg: ValidationSection, use_gpu: bool = False) -> None:
    """Driver, with Ray initialised: the validation task must fit on some node, else it never starts (and Ray
    waits for it before `fit()` returns). A GPU task next to GPU training only runs when a GPU is free: warned."""
    import ray

    if not cfg.every_steps or not ray.is_initialized():
        return
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus = max((r.get("CPU", 0.0) for r in nodes), default=0.0)
    gpus = max((r.get("GPU", 0.0) for r in nodes), default=0.0)
    if cfg.num_cpus > cpus or cfg.num_gpus > gpus:
        raise ValueError(
            f"validation.num_cpus={cfg.num_cpus} / validation.num_gpus={cfg.num_gpus}: no node of the cluster has "
            f"that much (largest: {cpus:g} CPUs, {gpus:g} GPUs), so no validation would ever start; lower them"
        )
    if cfg.num_gpus and use_gpu:
        log.warning(
            "validation.num_gpus=%s next to GPU training: a validation starts only when a GPU is free (Ray queues "
            "it); give the training fewer GPUs than the cluster has, or validate on CPUs (validation.num_gpus=0)",
            cfg.num_gpus,
        )


class ValidationTracker:
    """Rank 0's bookkeeping of in-training validation (see the module docstring)."""

    def __init__(self, cfg: ValidationSection, run_dir: str, metrics_path: Any) -> None:
        from pipelines.io import filesystem_for

        self.cfg = cfg
        self.fs, self.root = filesystem_for(results_dir(run_dir))
        self.metrics_path = metrics_path  # the local metrics.jsonl (what was routed already)
        self.requested: list[int] = []  # steps whose checkpoint asked for validation
        self.done: dict[int, str] = {}  # step -> "scored" or the error a failed validation reported
        self.behind_warned = False

    # -- start / resume -----------------------------------------------------------------------------------------
    def start(self, step: int, requested: list[int]) -> None:
        """After load/resume at `step` (metrics.jsonl already cut back to it): the steps requested up to then,
        result files of later steps removed (they are re-run), and the steps whose scores are in metrics.jsonl
        already marked done."""
        self.requested = sorted(s for s in requested if s <= step)
        for s, path in self._listing().items():
            if s > step:
                self.fs.delete_file(path)
        self.done = {}
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                rec = json.loads(line) if line.strip() else {}
                if any(k.startswith(f"{PREFIX}/") and k.count("/") == 2 for k in rec):
                    self.done[int(rec["step"])] = "scored"

    def state(self) -> list[int]:
        """What the train state saves: the requested steps."""
        return list(self.requested)

    # -- during the run -------------------------------------------------------------------------------------------
    def request(self, step: int) -> None:
        """The checkpoint of `step` is reported with `validation=True`."""
        pending = [s for s in self.requested if s not in self.done]
        if len(pending) >= 2 and not self.behind_warned:
            self.behind_warned = True
            log.warning(
                "validation falls behind: the checkpoints of steps %s still wait for their scores when step %d "
                "asks for one (Ray runs one validation at a time); raise validation.every_steps or lower "
                "validation.max_examples / the task list", pending, step,
            )  # fmt: skip
        self.requested.append(step)

    def poll(self, sinks: Any) -> int:
        """Route the result files that arrived since the last poll into `sinks`; returns how many."""
        n = 0
        for step, path in sorted(self._listing().items()):
            if step in self.done:
                continue
            with self.fs.open_input_stream(path) as f:
                rec = json.loads(f.read().decode("utf-8"))
            if "error" in rec:
                self.done[step] = rec["error"]
                log.warning(
                    "validation of the step-%d checkpoint (%s) failed: %s; no %s/* scores for this step",
                    step, rec.get("checkpoint"), rec["error"], PREFIX,
                )  # fmt: skip
            else:
                metrics = {k: float(v) for k, v in rec["metrics"].items()}
                sinks.write(step, metrics)
                self.done[step] = "scored"
                scores = " ".join(
                    f"{k.removeprefix(PREFIX + '/')}={v:.4g}" for k, v in sorted(metrics.items()) if k.count("/") == 2
                )  # fmt: skip
                log.info(
                    "validation of step %d (%.0f s): %s", step, metrics.get(f"{PREFIX}/seconds", 0.0), scores
                )
            n += 1
        return n

    def finish(self, sinks: Any, final_step: int, wait: Callable[[float | None], None] | None = None) -> dict:
        """End of the run: `wait(timeout_s)` until Ray has finished every outstanding validation (or the bound),
        route what arrived, warn once per requested step without scores, and write `val/num_requested` /
        `val/num_missing` at `final_step`. Returns {"requested", "scored", "missing": {step: reason}}."""
        self.poll(sinks)
        outstanding = [s for s in self.requested if s not in self.done]
        if outstanding and wait is not None:
            # Ray cancels each validation timeout_s after its launch, and launches them one after another.
            bound = (len(outstanding) * self.cfg.timeout_s + 60.0) if self.cfg.timeout_s else None
            wait(bound)
            self.poll(sinks)
        missing: dict[int, str] = {}
        for s in self.requested:
            reason = self.done.get(s)
            if reason == "scored":
                continue
            if reason is None:  # a failure that wrote its error was warned about when it arrived
                reason = (
                    f"no result: it timed out (validation.timeout_s={self.cfg.timeout_s:g}) or its Ray task died; "
                    "see the Ray logs of the run"
                )
                log.warning(
                    "validation of the step-%d checkpoint reported no %s/* metrics: %s", s, PREFIX, reason
                )
            missing[s] = reason
        if missing:
            log.warning(
                "validation: %d of %d requested checkpoints have no %s/* metrics (steps %s); see the warnings above",
                len(missing), len(self.requested), PREFIX, sorted(missing),
            )  # fmt: skip
        summary = {
            f"{PREFIX}/num_requested": float(len(self.requested)),
            f"{PREFIX}/num_missing": float(len(missing)),
        }
        sinks.write(final_step, summary)
        return {
            "requested": list(self.requested),
            "scored": len(self.requested) - len(missing),
            "missing": missing,
        }

    def _listing(self) -> dict[int, str]:
        """{step: path} of the result files present."""
        if self.fs.get_file_info(self.root).type != pafs.FileType.Directory:
            return {}
        out = {}
        for info in self.fs.get_file_info(pafs.FileSelector(self.root)):
            name = info.base_name
            if info.type == pafs.FileType.File and name.startswith("step_") and name.endswith(".json"):
                out[int(name[len("step_") : -len(".json")])] = posixpath.join(self.root, name)
        return out


def wait_for_ray_validations(timeout_s: float | None) -> None:
    """Worker side: block until Ray Train has finished every validation of this run (or `timeout_s`)."""
    import ray.train
    from ray.train import CheckpointConsistencyMode

    ray.train.get_all_reported_checkpoints(
        consistency_mode=CheckpointConsistencyMode.VALIDATED, timeout_s=timeout_s
    )
