"""Evaluation during training, off the training loop: Ray Train's `ValidationConfig` runs `validate_checkpoint`
as a Ray task on each checkpoint reported with `ray.train.report(..., checkpoint=ckpt, validation=True)`; the
returned scores are merged into that checkpoint's metrics (`Result.best_checkpoints`), so they belong to the step
the checkpoint was saved at. Training never waits for them (Ray runs one validation at a time and queues the rest).

Wiring in a training job (driver, then worker):

    cfg = InTrainingEvalConfig(tasks=["stsb", "mlm"], every_steps=100, max_examples=256)
    TorchTrainer(..., validation_config=build_validation_config(cfg, results_dir=f"{run_dir}/validation"))
    ray.train.report(metrics, checkpoint=ckpt, validation=cfg.due(step))   # a checkpoint report only

`validate_checkpoint` runs the same task code as jobs/evaluate.py (one seed, `max_examples` examples per task) on
the checkpoint's `model/` dir and returns flat, slash-namespaced scores: `val/<task>/<metric>` plus `val/step` (the
step stored in the model dir), ready for metrics.jsonl / TensorBoard / MLflow.

Ray keeps the scores only with the checkpoint they belong to, and `checkpoint.num_to_keep` deletes a checkpoint
(and its metrics) as soon as its validation is done and newer checkpoints exist. With `results_dir` set, the task
therefore also writes one result file per step there (`step_<N>.json`: `{"step", "checkpoint", "metrics"}`, or
`{"step", "checkpoint", "error"}` when the validation raised), written aside and renamed into place: what the
training job's rank 0 reads to route the scores into its metric sinks (`pipelines.train.validation`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pipelines.eval.tasks import ALL_TASKS

log = logging.getLogger("neobert.eval")

PREFIX = "val"


@dataclasses.dataclass
class InTrainingEvalConfig:
    """The `validation:` section of a training config (the keys below are `validation.<field>`)."""

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
        bad = [t for t in self.tasks if t not in ALL_TASKS]
        if bad or not self.tasks:
            raise ValueError(f"validation.tasks={self.tasks}: unknown {bad}; choose from {list(ALL_TASKS)}")
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


def score_model_dir(
    path: str | Path, *, tasks: list[str], max_examples: int, seeds: list[int]
) -> dict[str, float]:
    """{`val/<task>/<metric>`: mean over seeds} for a model dir / checkpoint dir; `val/seconds` the wall time."""
    import numpy as np

    from pipelines.eval.encoders import fresh_copy, load_encoder, resolve_model
    from pipelines.eval.tasks import FINETUNED, SkipTask, load_recipes, run_task

    t0 = time.perf_counter()
    ref = resolve_model(str(path))
    recipes = load_recipes()
    base = load_encoder(ref)
    out: dict[str, float] = {}
    for task in tasks:
        runs = []
        for seed in recipes.task_seeds(task, tuple(seeds)):
            enc = fresh_copy(base) if task in FINETUNED else base
            try:
                runs.append(run_task(task, enc, recipes, seed=seed, max_examples=max_examples))
            except SkipTask as e:
                log.warning("validation of %s: %s skipped (%s)", path, task, e)
                break
        for metric in runs[0] if runs else []:
            if not metric.startswith("num_"):
                out[f"{PREFIX}/{task}/{metric}"] = float(np.mean([r[metric] for r in runs]))
    step = checkpoint_step(ref.path)
    if step is not None:
        out[f"{PREFIX}/step"] = step
    out[f"{PREFIX}/seconds"] = time.perf_counter() - t0
    return out


def result_name(step: int) -> str:
    """The result file of the validation of the checkpoint of `step` inside `results_dir`."""
    return f"step_{step:09d}.json"


def write_result(results_dir: str, record: dict[str, Any]) -> None:
    """Write one result record as `results_dir/step_<N>.json`: aside first, then renamed into place, so a reader
    never sees half a file (local dirs and URIs alike, through pyarrow filesystems)."""
    import posixpath

    from pipelines.io import filesystem_for

    fs, root = filesystem_for(results_dir)
    fs.create_dir(root, recursive=True)
    final = posixpath.join(root, result_name(int(record["step"])))
    tmp = f"{final}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write((json.dumps(record) + "\n").encode("utf-8"))
    fs.move(tmp, final)


def checkpoint_step(checkpoint_dir: str | Path) -> int | None:
    """The training step stored in a checkpoint's `model/` dir (`neobert_config.json` extra.step), or None."""
    for meta in (
        Path(checkpoint_dir) / "model" / "neobert_config.json",
        Path(checkpoint_dir) / "neobert_config.json",
    ):
        if meta.is_file():
            step = json.loads(meta.read_text()).get("extra", {}).get("step")
            return None if step is None else int(step)
    return None


def validate_checkpoint(
    checkpoint,
    *,
    tasks: list[str],
    max_examples: int,
    seeds: list[int],
    results_dir: str | None = None,
) -> dict[str, float]:
    """The `ValidationConfig.fn`: a `ray.train.Checkpoint` (holding `model/`) -> scores dict. With `results_dir`,
    the scores (or the error, which is then raised again for Ray to record) also go to a result file there."""
    name = Path(str(checkpoint.path)).name
    with checkpoint.as_directory() as d:
        step = checkpoint_step(d)
        try:
            scores = score_model_dir(d, tasks=tasks, max_examples=max_examples, seeds=seeds)
        except Exception as e:
            if results_dir is not None and step is not None:
                write_result(
                    results_dir, {"step": step, "checkpoint": name, "error": f"{type(e).__name__}: {e}"}
                )
            raise
    if results_dir is not None and step is not None:
        write_result(results_dir, {"step": step, "checkpoint": name, "metrics": scores})
    return scores


def build_validation_config(cfg: InTrainingEvalConfig, results_dir: str | None = None):
    """A `ray.train.ValidationConfig` running `validate_checkpoint` with `cfg`'s tasks (result files into
    `results_dir` when given); None when off."""
    if cfg.every_steps == 0:
        return None
    from ray.train import ValidationConfig, ValidationTaskConfig

    kwargs = cfg.fn_kwargs() | ({"results_dir": results_dir} if results_dir is not None else {})
    return ValidationConfig(
        fn=validate_checkpoint,
        task_config=ValidationTaskConfig(fn_kwargs=kwargs, timeout_s=cfg.timeout_s or None),
        ray_remote_kwargs={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "max_retries": 0},
    )


def smoke_train_loop(config: dict[str, Any]) -> None:
    """A minimal Ray Train loop that exercises the validation wiring end to end (tests, docs): it reports a
    freshly initialised tiny NeoBERT checkpoint at steps every_steps, 2*every_steps, ... up to `num_steps`,
    asking for validation where `InTrainingEvalConfig.due` says so."""
    import tempfile

    import ray.train
    import torch
    from ray.train import Checkpoint

    from neobert.checkpoint import save_model_dir
    from neobert.model import NeoBERTConfig, NeoBERTForMLM

    cfg = InTrainingEvalConfig(**config["eval"])
    torch.manual_seed(0)
    model = NeoBERTForMLM(NeoBERTConfig.preset("tiny"))
    for step in range(1, int(config["num_steps"]) + 1):
        if step % int(config["checkpoint_every"]):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            save_model_dir(Path(tmp) / "model", model, model.config, kind="mlm", extra={"step": step})
            ray.train.report(
                {"step": step}, checkpoint=Checkpoint.from_directory(tmp), validation=cfg.due(step)
            )
