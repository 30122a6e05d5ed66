"""One training runtime for every job: `TrainRunner` owns the loop; a job subclass supplies model, data, step, eval.

    run(): load/resume -> on_start -> loop { next_step -> train_step -> log -> eval -> checkpoint } -> final report

What the base owns (the same for every job):
- context: rank, world size, device (`ray.train`), one seed for the initial weights, autocast from
  `train.precision` (auto = bf16 on GPU, fp32 on CPU; bf16 = autocast on any device);
- optimizer (`train.optimizer`: AdamW or StableAdamW, no decay on norms/biases/embeddings) and LR schedule
  (`train.schedule`: cosine / linear / constant, or WSD with a linear / cosine / 1-sqrt decay) from the shared
  `train.*` keys, both through `pipelines.train.schedule`;
- the data seam: `open_data(state)` returns a `pipelines.train.data.StepSource`; its `state_dict()` goes into
  every checkpoint and comes back on resume;
- the data-parallel strategy (`scaling.strategy`: DDP or FSDP2, `pipelines.train.parallel.wrap_model`): the
  model is built (and its blocks compiled), wrapped, and only then given its optimizer (FSDP2's parameters are
  the sharded ones);
- ONE checkpoint format for both strategies: a checkpoint dir holds `dcp/` (model + optimizer, sharded, written
  by every rank through `parallel.save_sharded`; Ray Train merges the ranks' dirs into one), `model/` (the whole
  model, `neobert.checkpoint.save_model_dir`, written by rank 0 through the subclass's `save_model`: what export,
  eval and warm starts read), `train_state.json` (step, the job's `progress_state` such as the planned tokens, data
  position, world size, strategy, job state, config:
  what the driver reads to check a resume before Ray starts) and `train_state.pt` (scheduler, RNG states of
  python / numpy / torch / cuda). A resume loads `dcp/` on every rank (`parallel.load_sharded` reshards), so a
  checkpoint of W workers under one strategy resumes on W' under either; whether the data position allows it
  is the job's `check_resume` rule;
- preemption: every logging window (a barrier) asks `ray.train.get_preemption_info()`; on a notice it writes a
  checkpoint at once (once per notice), so losing the node costs at most the steps since the notice;
- reporting: every logged window and eval goes to `ray.train.report` (a barrier, all ranks); checkpoints go
  through it too (every rank attaches its dir; `checkpoint.async_upload` uploads in the background); rank 0
  writes the metric sinks (`pipelines.train.sinks`) and one progress line per window;
- in-training validation (a job config with a `validation:` section, `pipelines.train.validation`): a checkpoint
  report at a due step carries `validation=True` (Ray Train scores it in a Ray task while training goes on); rank
  0 routes the scores into the sinks at their step once per logging window and waits for the last ones at the end;
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
from pipelines.progress import progress_line
from pipelines.train import parallel
from pipelines.train import run_dir as rd
from pipelines.train.config import ConfigError, TrainJobConfig
from pipelines.train.data import StepSource
from pipelines.train.schedule import build_lr_scheduler, build_optimizer, segment_from_train
from pipelines.train.sinks import METRICS_FILE, MetricSinks, RunFiles, check_tracking_packages
from pipelines.train.validation import ValidationTracker, wait_for_ray_validations

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

    def save_model(self, path: Path, state: dict[str, torch.Tensor]) -> None:
        """Rank 0: write the model dir from `state`, the whole model's state dict on the CPU."""
        raise NotImplementedError

    def on_start(self) -> None:
        """After load/resume, before the first step."""

    def job_state(self) -> dict[str, Any]:
        """JSON-able job state saved in `train_state.json` (e.g. contrastive's eval "before")."""
        return {}

    def load_job_state(self, state: dict[str, Any]) -> None:
        pass

    def progress_state(self) -> dict[str, Any]:
        """JSON-able keys written at the top of `train_state.json` beside `step` (e.g. pretraining's
        `tokens_planned`); derived from the step, so nothing is loaded back."""
        return {}

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
        self.use_bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.model = self.build_model()  # compiled blocks are compiled here, before sharding
        # The module the step calls: DDP's wrapper, or under FSDP2 `self.model` itself (sharded in place: every
        # forward of it is then a collective that all ranks must run).
        self.ddp_model = parallel.wrap_model(
            self.model,
            strategy=cfg.scaling.strategy,
            device=self.device,
            param_dtype=torch.bfloat16 if self.use_bf16 and self.device.type == "cuda" else None,
        )
        self.optimizer = build_optimizer(
            self.model, t.optimizer, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), eps=t.eps
        )
        self.scheduler = build_lr_scheduler(self.optimizer, segment_from_train(t))
        dev = self.device.type
        self.autocast: Callable[[], Any] = (
            (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if self.use_bf16 else nullcontext
        )
        self.step = 0
        self.start_step = 0  # where this attempt started (progress ETA)
        self.t_start = time.perf_counter()
        self.preemption_notice: Any = None  # the notice a checkpoint was already written for
        self.preemption_checkpoints = 0
        self.resumed = False
        self.data_state: dict[str, Any] | None = None
        self.files = RunFiles(cfg.run_dir)
        if cfg.logging.trace_data:
            self.files.fetch(self.trace_name)
        self.sinks = MetricSinks(cfg, self.files, f"neobert-{self.job}") if self.rank == 0 else None
        # In-training validation (a job config with a `validation:` section): every rank asks for it in its
        # checkpoint report; rank 0 routes the scores into the sinks (`pipelines.train.validation`).
        self.val_cfg = getattr(cfg, "validation", None)
        self.validation = (
            ValidationTracker(self.val_cfg, cfg.run_dir, self.sinks.path)
            if self.sinks and self.val_cfg is not None and self.val_cfg.every_steps
            else None
        )
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
                preempted = False
                if self.due(self.cfg.logging.every_steps):
                    metrics |= self.log_metrics()
                    preempted = self.preemption_due()
                    if self.validation:  # scores of finished validations, at the steps they belong to
                        self.validation.poll(self.sinks)
                if self.due(self.cfg.logging.eval_every_steps):
                    metrics |= self.timed(self.run_eval)
                if self.due(self.cfg.checkpoint.every_steps) or preempted:
                    if preempted:
                        self.preemption_checkpoints += 1
                        metrics["train/preemption_checkpoints"] = float(self.preemption_checkpoints)
                        if self.sinks:
                            self.sinks.write(
                                self.step,
                                {"train/preemption_checkpoints": metrics["train/preemption_checkpoints"]},
                            )
                    self.timed(self.save_checkpoint, metrics)
                elif metrics:
                    self.report(metrics)
                self.maybe_inject_failure()
        finally:
            data.close()
        self.final_report()

    def preemption_due(self) -> bool:
        """Whether a preemption notice calls for a checkpoint now: asked once per logging window (the call is a
        barrier across the workers), True once per notice. `failure.inject_preemption_at_step` stands in for a
        notice from that step on (tests)."""
        import ray.train

        info = ray.train.get_preemption_info()
        inject = self.cfg.failure.inject_preemption_at_step
        if info is None and inject and self.step >= inject and not self.resumed:
            info = ray.train.PreemptionInfo(deadline_ms=None, preempted_node_to_ranks={"injected": [0]})
        if info is None or info == self.preemption_notice:
            return False
        self.preemption_notice = info
        if self.rank == 0:
            log.warning(
                "%s: preemption notice at step %d (deadline_ms=%s, node -> ranks %s): writing a checkpoint now",
                self.job, self.step, info.deadline_ms, info.preempted_node_to_ranks,
            )  # fmt: skip
        return True

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
            if self.validation:
                self.validation.start(0, [])
            return
        with ckpt.as_directory() as d:
            d = Path(d)
            meta = json.loads((d / rd.TRAIN_STATE_JSON).read_text())
            state = torch.load(d / rd.TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
            if not (d / parallel.DCP_DIR).is_dir():
                raise ConfigError(
                    f"checkpoint {ckpt.path} has no {parallel.DCP_DIR}/ (sharded model + optimizer): it was written "
                    "by an older version; start a new run with another --checkpoint.name"
                )
            # Every rank reads the slices it holds: any world size and strategy of the writer (DCP reshards).
            parallel.load_sharded(d / parallel.DCP_DIR, self.ddp_model, self.optimizer)
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
        self.start_step = self.step
        if self.sinks:
            self.sinks.truncate_after(self.step)
        if self.validation:
            self.validation.start(self.step, meta.get("validation", []))
        if self.rank == 0:
            log.info(
                "%s: resumed from %s at step %d (written by %d %s workers; now %d %s), data %s", self.job,
                ckpt.path, self.step, meta["world_size"], meta.get("strategy", "ddp"), self.world,
                self.cfg.scaling.strategy, self.data_state,
            )  # fmt: skip
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
        """Rank 0: every metric to the sinks (metrics.jsonl keeps them all), one progress line to the log."""
        if self.sinks:
            self.sinks.write(self.step, metrics)
            line = progress_line(
                self.step, self.cfg.train.num_steps, metrics, time.perf_counter() - self.t_start,
                start_step=self.start_step,
            )  # fmt: skip
            log.info("%s %s", self.job, line)

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
        """Every rank writes its part of `dcp/` and reports its dir (a barrier; Ray Train merges the dirs); rank 0
        also writes `model/` and `train_state.{json,pt}` (see the module docstring)."""
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        report = {"step": self.step, **metrics}
        window = self.window_sums()
        last = self.step == self.cfg.train.num_steps
        validate = bool(self.val_cfg is not None and self.val_cfg.due(self.step, last=last))
        if validate and self.validation:
            self.validation.request(self.step)
        tmp = Path(tempfile.mkdtemp(prefix=f"neobert-{self.job}-ckpt-"))
        async_upload = self.cfg.checkpoint.async_upload
        try:
            parallel.save_sharded(tmp / parallel.DCP_DIR, self.ddp_model, self.optimizer)  # collective
            # the whole model for model/: a collective under FSDP2; under DDP rank 0 holds it all
            fsdp = self.cfg.scaling.strategy == "fsdp2"
            full = parallel.full_model_state(self.ddp_model) if fsdp or self.rank == 0 else {}
            if self.rank == 0:
                self.save_model(tmp / "model", full)
                if self.injecting("kill_in_checkpoint"):
                    os.kill(
                        os.getpid(), signal.SIGKILL
                    )  # half a checkpoint written: model/ but no train state
                self.write_train_state(tmp, window)
            del full
            upload = dict(
                checkpoint_upload_mode=CheckpointUploadMode.ASYNC, delete_local_checkpoint_after_upload=True
            ) if async_upload else {}  # fmt: skip
            ray.train.report(
                report, checkpoint=Checkpoint.from_directory(str(tmp)), validation=validate, **upload
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if not async_upload:  # uploaded by now; in async mode Ray deletes the dir once it is uploaded
            shutil.rmtree(tmp, ignore_errors=True)
        if self.sinks:
            self.sinks.flush()
        self.files.sync()

    def write_train_state(self, path: Path, window: dict[str, float]) -> None:
        """`train_state.json` (what the driver checks a resume against) and `train_state.pt` (scheduler, RNG)."""
        meta = {
            "step": self.step,
            **self.progress_state(),
            "window": window,
            "data": self.data_state,
            "world_size": self.world,
            "strategy": self.cfg.scaling.strategy,
            "job": self.job_state(),
            "validation": self.validation.state() if self.validation else [],  # steps that asked for it
            "config": to_dict(self.cfg),
        }
        (path / rd.TRAIN_STATE_JSON).write_text(json.dumps(meta, indent=1) + "\n")
        state = {
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            },
        }
        torch.save(state, path / rd.TRAIN_STATE_FILE)

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
        if self.validation:  # waits for Ray to finish the outstanding validations (training is over)
            self.validation.finish(self.sinks, self.step, wait_for_ray_validations)
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
    # The project's loggers at INFO, every other one at WARNING: among them Ray Train's worker-side line per
    # `ray.train.report` (its logger is named after its file, so RunConfig's LoggingConfig does not reach it).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)  # also when Ray configured the root logger first
    for name in ("neobert", "pipelines"):
        logging.getLogger(name).setLevel(logging.INFO)
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
            check_resume(saved)  # the job's rule: may its data position continue on this run's world sizes?
    path = rd.write_config(run, cfg)
    log.info("run dir %s (config: %s)", run, path)


def run_config(cfg: TrainJobConfig):
    """Ray Train's `RunConfig` for the run dir, checkpoints and failure handling of `cfg`."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    return RunConfig(
        name=cfg.checkpoint.name,
        storage_path=cfg.checkpoint.storage_path,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
        # Ray Train's own INFO lines (one per report) would drown the progress lines; warnings still show
        logging_config=LoggingConfig(log_level="WARNING"),
    )


def check_world_sizes(cfg: TrainJobConfig, plan: Callable[[int], Any]) -> None:
    """Driver: `plan(world_size)` (e.g. `pipelines.train.data.plan_accumulation` with the job's global batch)
    must accept every world size an (elastic) run may train on, so that losing a worker keeps the global batch;
    one `ConfigError` naming the sizes that do not divide it."""
    bad = {}
    for w in cfg.scaling.world_sizes:
        try:
            plan(w)
        except ValueError as e:
            bad[w] = str(e)
    if bad:
        first = next(iter(bad.values()))
        raise ConfigError(
            f"scaling.num_workers={cfg.scaling.num_workers}: the global batch does not split over "
            f"{sorted(bad)} workers ({first}); pick a worker range whose every size divides it"
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
