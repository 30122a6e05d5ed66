"""One training runtime for every job: `TrainRunner` owns the loop; a job subclass supplies model, data, step, eval.

    run(): load/resume -> on_start -> loop { next_step -> train_step -> log -> eval -> checkpoint } -> final report

What the base owns (the same for every job):
- context: rank, world size, device (`ray.train`), one seed for the initial weights, autocast from
  `train.precision` (auto = bf16 on GPU, fp32 on CPU; bf16 = autocast on any device);
- optimizer (AdamW, no decay on norms/biases/embeddings) and LR schedule from the shared `train.*` keys;
- the data seam: `open_data(state)` returns a `pipelines.train.data.StepSource`; its `state_dict()` goes into
  every checkpoint and comes back on resume;
- ONE train state format: a checkpoint dir holds `model/` (`neobert.checkpoint.save_model_dir`, written by the
  subclass's `save_model`), `train_state.json` (step, data position, world size, job state, config: what the
  driver reads to check a resume before Ray starts) and `train_state.pt` (optimizer, scheduler, RNG states of
  python / numpy / torch / cuda);
- reporting: every logged window and eval goes to `ray.train.report` (a barrier, all ranks); checkpoints go
  through it too (rank 0 attaches the dir); rank 0 writes the metric sinks (`pipelines.train.sinks`);
- failure injection (`failure.inject_failure_at_step`): the last rank raises at that step on an attempt that
  did not resume;
- metrics window: a subclass's `train_step` adds sums (`self.window.add(...)`), `log_metrics` all-reduces them
  once per window and the subclass turns them into metrics (`window_metrics`); time spent in eval and
  checkpoints does not count against throughput.

Driver side (`prepare_run`, `run_config`, `fit_trainer`): tracker packages checked, incomplete checkpoints
removed, a resume checked against the latest checkpoint, `config.yaml` written, and a worker's `ConfigError`
turned into one non-retried `ConfigError` on the driver (see `pipelines.train.run_dir`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neobert.config_io import from_dict, to_dict
from neobert.training import build_optimizer, build_scheduler
from pipelines.train import run_dir as rd
from pipelines.train.config import ConfigError, TrainJobConfig
from pipelines.train.data import StepSource
from pipelines.train.sinks import METRICS_FILE, MetricSinks, RunFiles, check_tracking_packages

log = logging.getLogger("neobert.train")


@dataclasses.dataclass
class MetricWindow:
    """Sums since the last log (device tensors stay lazy until `log_metrics`) and last-seen values."""

    t0: float = dataclasses.field(default_factory=time.perf_counter)
    sums: dict[str, Any] = dataclasses.field(default_factory=dict)
    last: dict[str, float] = dataclasses.field(default_factory=dict)
    wait_s: float = 0.0

    def add(self, **values: Any) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def set(self, **values: float) -> None:
        self.last.update(values)


class TrainRunner:
    """One worker's training loop (see the module docstring). Subclasses set `job` and implement the hooks."""

    job = "train"  # names the MLflow experiment / W&B project and the log tag

    # -- hooks a job implements ----------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        """The model to train, on the CPU, initialised (seeded by the base)."""
        raise NotImplementedError

    def open_data(self, state: dict[str, Any] | None) -> StepSource:
        """The step source, continuing at `state` (None = from the start)."""
        raise NotImplementedError

    def train_step(self, batches: list[Any]) -> None:
        """One optimizer step on this rank's micro-batches; adds its sums to `self.window`."""
        raise NotImplementedError

    def window_metrics(self, sums: dict[str, float], elapsed: float) -> dict[str, float]:
        """Metrics of a log window from its sums over all ranks."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Eval metrics (every rank calls it); {} = nothing to evaluate."""
        return {}

    def save_model(self, path: Path) -> None:
        raise NotImplementedError

    def load_model(self, path: Path) -> None:
        raise NotImplementedError

    def on_start(self) -> None:
        """After load/resume, before the first step."""

    def job_state(self) -> dict[str, Any]:
        """JSON-able job state saved in `train_state.json` (e.g. contrastive's eval "before")."""
        return {}

    def load_job_state(self, state: dict[str, Any]) -> None:
        pass

    def trace_records(self, batches: list[Any]) -> list[dict[str, Any]]:
        """`logging.trace_data`: one fingerprint record per micro-batch of the completed step."""
        return []

    # -- construction ----------------------------------------------------------------------------------------
    def __init__(self, cfg: TrainJobConfig) -> None:
        import ray.train
        import ray.train.torch

        self.cfg = cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        t = cfg.train
        torch.manual_seed(t.seed)  # identical init on every rank (DDP broadcasts rank 0's weights anyway)
        self.model = self.build_model()
        self.ddp_model = ray.train.torch.prepare_model(self.model)
        self.optimizer = build_optimizer(
            self.model, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), eps=t.eps
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            warmup_steps=t.warmup_steps,
            total_steps=t.num_steps,
            schedule=t.schedule,
            min_lr_ratio=t.min_lr_ratio,
        )
        self.use_bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        dev = self.device.type
        self.autocast: Callable[[], Any] = (
            (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if self.use_bf16 else nullcontext
        )
        self.step = 0
        self.resumed = False
        self.data_state: dict[str, Any] | None = None
        self.files = RunFiles(cfg.run_dir)
        if cfg.logging.trace_data:
            self.files.fetch(self.trace_name)
        self.sinks = MetricSinks(cfg, self.files, f"neobert-{self.job}") if self.rank == 0 else None
        self.window = MetricWindow()

    # -- the table of contents -------------------------------------------------------------------------------
    def run(self) -> None:
        self.load_or_resume()
        self.on_start()
        data = self.open_data(self.data_state)
        try:
            while self.step < self.cfg.train.num_steps:
                t0 = time.perf_counter()
                batches = data.next_step()
                self.window.wait_s += time.perf_counter() - t0
                self.train_step(batches)
                self.step += 1
                self.data_state = data.state_dict()
                if self.cfg.logging.trace_data:
                    # After the step: the trace lists what completed steps trained on.
                    self.trace(batches)
                metrics: dict[str, float] = {}
                if self.due(self.cfg.logging.every_steps):
                    metrics |= self.log_metrics()
                if self.due(self.cfg.logging.eval_every_steps):
                    metrics |= self.timed(self.run_eval)
                if self.due(self.cfg.checkpoint.every_steps):
                    self.timed(self.save_checkpoint, metrics)
                elif metrics:
                    self.report(metrics)
                self.maybe_inject_failure()
        finally:
            data.close()
        self.final_report()

    def due(self, every: int) -> bool:
        """Every `every` steps (0 = never) and always at the last step."""
        return (every > 0 and self.step % every == 0) or self.step == self.cfg.train.num_steps

    def timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` outside the throughput clock of the metrics window."""
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.window.t0 += time.perf_counter() - t0

    # -- resume ------------------------------------------------------------------------------------------------
    def load_or_resume(self) -> None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            if self.sinks:
                self.sinks.truncate_after(0)
            return
        with ckpt.as_directory() as d:
            d = Path(d)
            meta = json.loads((d / rd.TRAIN_STATE_JSON).read_text())
            state = torch.load(d / rd.TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
            self.load_model(d / "model")
        if meta["world_size"] != self.world:
            raise ConfigError(
                f"checkpoint {ckpt.path} was written by {meta['world_size']} workers but this run has {self.world}; "
                f"resume with --scaling.num_workers={meta['world_size']} or start a new run with another "
                "--checkpoint.name"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step, self.data_state = int(meta["step"]), meta["data"]
        # The open metrics window, summed over the ranks when it was saved: rank 0 carries it, the others add zeros,
        # so the first window after a resume logs what an uninterrupted run logs.
        self.window.sums = {k: (v if self.rank == 0 else 0.0) for k, v in meta.get("window", {}).items()}
        self.load_job_state(meta.get("job", {}))
        self.resumed = True
        if self.sinks:
            self.sinks.truncate_after(self.step)
        if self.rank == 0:
            log.info(
                "%s: resumed from %s at step %d, data %s", self.job, ckpt.path, self.step, self.data_state
            )
            if self.step >= self.cfg.train.num_steps:
                log.warning(
                    "this run already finished (step %d of train.num_steps=%d), so nothing is trained; start a "
                    "new run with another --checkpoint.name, or continue it with a larger --train.num_steps",
                    self.step, self.cfg.train.num_steps,
                )  # fmt: skip

    # -- logging -----------------------------------------------------------------------------------------------
    def all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def log_metrics(self) -> dict[str, float]:
        """Aggregate the window since the last log over all ranks; rank 0 writes it out."""
        w = self.window
        keys = sorted(w.sums)
        local = [float(w.sums[k]) for k in keys]  # the one device sync of the window
        elapsed = time.perf_counter() - w.t0
        *sums, wait = self.all_reduce([*local, w.wait_s / elapsed])
        metrics = self.window_metrics(dict(zip(keys, sums, strict=True)), elapsed)
        metrics |= {**{k: float(v) for k, v in w.last.items()}, "data/wait_fraction": wait / self.world}
        self.window = MetricWindow()
        self.emit(metrics)
        return metrics

    def window_sums(self) -> dict[str, float]:
        """The open window's sums over all ranks (every rank calls it: a collective when the window is open)."""
        keys = sorted(self.window.sums)
        if not keys:
            return {}
        return dict(zip(keys, self.all_reduce([float(self.window.sums[k]) for k in keys]), strict=True))

    def run_eval(self) -> dict[str, float]:
        metrics = self.evaluate()
        if metrics:
            self.emit(metrics)
        return metrics

    def emit(self, metrics: dict[str, float]) -> None:
        if self.sinks:
            self.sinks.write(self.step, metrics)
            log.info(
                "%s step %d/%d %s", self.job, self.step, self.cfg.train.num_steps,
                " ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
            )  # fmt: skip

    @property
    def trace_name(self) -> str:
        return f"data_trace.rank{self.rank}.jsonl"

    def trace(self, batches: list[Any]) -> None:
        with self.files.path(self.trace_name).open("a") as f:
            for rec in self.trace_records(batches):
                f.write(json.dumps({"step": self.step, **rec}) + "\n")

    # -- report / checkpoint -----------------------------------------------------------------------------------
    def report(self, metrics: dict[str, float]) -> None:
        """Metrics-only report to Ray Train (every rank calls it: it is a barrier)."""
        import ray.train

        ray.train.report({"step": self.step, **metrics}, checkpoint=None)

    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """All ranks report (a barrier); rank 0 writes `model/` + `train_state.{json,pt}`, the others pass None."""
        import ray.train
        from ray.train import Checkpoint

        report = {"step": self.step, **metrics}
        window = self.window_sums()
        if self.rank != 0:
            ray.train.report(report, checkpoint=None)
            self.files.sync()
            return
        tmp = Path(tempfile.mkdtemp(prefix=f"neobert-{self.job}-ckpt-"))
        try:
            self.save_model(tmp / "model")
            if self.injecting("kill_in_checkpoint"):
                os.kill(os.getpid(), signal.SIGKILL)  # half a checkpoint written: model/ but no train state
            meta = {
                "step": self.step,
                "window": window,
                "data": self.data_state,
                "world_size": self.world,
                "job": self.job_state(),
                "config": to_dict(self.cfg),
            }
            (tmp / rd.TRAIN_STATE_JSON).write_text(json.dumps(meta, indent=1) + "\n")
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": {
                    "python": random.getstate(),
                    "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                },
            }
            torch.save(state, tmp / rd.TRAIN_STATE_FILE)
            ray.train.report(report, checkpoint=Checkpoint.from_directory(str(tmp)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.sinks.flush()
        self.files.sync()

    def injecting(self, mode: str) -> bool:
        """Whether the failure of `failure.inject_failure_mode=mode` is due now on this rank: an attempt that did
        not resume, at the step; the last rank, or rank 0 (the writer) for a kill during the checkpoint write."""
        f = self.cfg.failure
        rank = 0 if mode == "kill_in_checkpoint" else self.world - 1
        due = f.inject_failure_at_step == self.step and f.inject_failure_mode == mode
        if not (due and not self.resumed and self.rank == rank):
            return False
        # Ray registers a reported checkpoint when its controller polls the workers; a worker that dies first takes
        # the report with it. Fail only once a checkpoint is registered, so the restart resumes (as the rule says).
        deadline = time.monotonic() + 60
        while not rd.complete_checkpoints(self.cfg.run_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        return True

    def maybe_inject_failure(self) -> None:
        if self.injecting("raise"):
            raise RuntimeError(
                f"injected worker failure at step {self.step} "
                f"(failure.inject_failure_at_step={self.cfg.failure.inject_failure_at_step})"
            )
        if self.injecting("kill"):
            os.kill(os.getpid(), signal.SIGKILL)

    def final_report(self) -> None:
        if self.sinks:
            self.sinks.close()
        self.files.sync()
        if self.sinks:
            log.info(
                "%s done: %d steps; metrics in %s", self.job, self.step, f"{self.cfg.run_dir}/{METRICS_FILE}"
            )


# --------------------------------------------------------------------------------------------------------------
# Worker entry
# --------------------------------------------------------------------------------------------------------------
def run_worker(runner_cls: type[TrainRunner], config_cls: type, config: dict[str, Any]) -> None:
    """The body of `train_loop_per_worker`: build the runner and run it; a `ConfigError` is recorded in the run
    dir before it propagates, and an attempt that finds such a record ends at once (no retry of a config error)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = from_dict(config_cls, config)
    if rd.recorded_config_error(cfg.run_dir) is not None:
        return
    try:
        runner_cls(cfg).run()
    except ConfigError as e:
        rd.record_config_error(cfg.run_dir, str(e))
        raise


# --------------------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------------------
def prepare_run(cfg: TrainJobConfig, check_resume: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Everything the driver checks and writes before Ray Train starts (see the module docstring)."""
    check_tracking_packages(cfg)
    run = cfg.run_dir
    rd.clear_config_error(run)
    removed = rd.clean_incomplete_checkpoints(run)
    if removed:
        log.warning("removed incomplete checkpoint dirs of a killed write in %s: %s", run, removed)
    latest = rd.latest_checkpoint(run)
    if latest is not None and check_resume is not None:
        saved = rd.read_train_state(latest)
        if saved is not None:
            if saved["world_size"] != cfg.scaling.num_workers:
                raise ConfigError(
                    f"{run} resumes from {latest}, written by {saved['world_size']} workers, but "
                    f"scaling.num_workers={cfg.scaling.num_workers}: resume with "
                    f"--scaling.num_workers={saved['world_size']} or start a new run with another --checkpoint.name"
                )
            check_resume(saved)
    path = rd.write_config(run, cfg)
    log.info("run dir %s (config: %s)", run, path)


def run_config(cfg: TrainJobConfig):
    """Ray Train's `RunConfig` for the run dir, checkpoints and failure handling of `cfg`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=cfg.checkpoint.name,
        storage_path=cfg.checkpoint.storage_path,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
    )


def fit_trainer(trainer: Any, cfg: TrainJobConfig):
    """`trainer.fit()`, then: a recorded worker `ConfigError` is raised here (once, not retried), and the
    checkpoint dirs of killed writes are removed."""
    try:
        result = trainer.fit()
    except Exception:
        rd.raise_recorded_config_error(cfg.run_dir)
        raise
    finally:
        rd.clean_incomplete_checkpoints(cfg.run_dir)
    rd.raise_recorded_config_error(cfg.run_dir)
    return result
