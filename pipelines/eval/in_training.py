"""Evaluation during training, off the training loop: Ray Train's `ValidationConfig` runs `validate_checkpoint`
as a Ray task on each checkpoint reported with `ray.train.report(..., checkpoint=ckpt, validation=True)`; the
returned scores are merged into that checkpoint's metrics (`Result.best_checkpoints`), so they belong to the step
the checkpoint was saved at. Training never waits for them (up to Ray's in-flight cap of validation tasks).

Wiring in a training job (driver, then worker):

    cfg = InTrainingEvalConfig(tasks=["stsb", "mlm"], every_steps=100, max_examples=256)
    TorchTrainer(..., validation_config=build_validation_config(cfg))
    ray.train.report(metrics, checkpoint=ckpt, validation=cfg.due(step))   # a checkpoint report only

`validate_checkpoint` runs the same task code as jobs/evaluate.py (one seed, `max_examples` examples per task) on
the checkpoint's `model/` dir and returns flat, slash-namespaced scores: `val/<task>/<metric>` plus `val/step` (the
step stored in the model dir), ready for metrics.jsonl / TensorBoard / MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from pipelines.eval.tasks import ALL_TASKS

log = logging.getLogger("neobert.eval")

PREFIX = "val"


@dataclasses.dataclass
class InTrainingEvalConfig:
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["stsb", "retrieval", "mlm"])
    every_steps: int = 0  # validate the checkpoint of every N-th step (0 = off); rides on checkpoint reports
    max_examples: int = (
        256  # per task (a stable subset): small, so a validation ends before the next one is due
    )
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])  # fine-tuned tasks: one run per seed
    num_cpus: float = 1.0  # resources of the validation Ray task
    num_gpus: float = 0.0
    timeout_s: float = 0.0  # cancel a validation running longer (0 = no limit)

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in ALL_TASKS]
        if bad or not self.tasks:
            raise ValueError(f"eval.tasks={self.tasks}: unknown {bad}; choose from {list(ALL_TASKS)}")
        if self.every_steps < 0 or self.max_examples < 0 or self.timeout_s < 0:
            raise ValueError(
                f"eval.every_steps={self.every_steps}, eval.max_examples={self.max_examples} and "
                f"eval.timeout_s={self.timeout_s} must be >= 0"
            )
        if not self.seeds:
            raise ValueError("eval.seeds must name at least one seed")

    def due(self, step: int) -> bool:
        """Whether the checkpoint reported at `step` should be validated (pass as `report(validation=...)`)."""
        return self.every_steps > 0 and step % self.every_steps == 0

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
    meta = Path(ref.path) / "neobert_config.json"
    if meta.is_file():
        step = json.loads(meta.read_text()).get("extra", {}).get("step")
        if step is not None:
            out[f"{PREFIX}/step"] = int(step)
    out[f"{PREFIX}/seconds"] = time.perf_counter() - t0
    return out


def validate_checkpoint(
    checkpoint, *, tasks: list[str], max_examples: int, seeds: list[int]
) -> dict[str, float]:
    """The `ValidationConfig.fn`: a `ray.train.Checkpoint` (holding `model/`) -> scores dict."""
    with checkpoint.as_directory() as d:
        return score_model_dir(d, tasks=tasks, max_examples=max_examples, seeds=seeds)


def build_validation_config(cfg: InTrainingEvalConfig):
    """A `ray.train.ValidationConfig` running `validate_checkpoint` with `cfg`'s tasks; None when off."""
    if cfg.every_steps == 0:
        return None
    from ray.train import ValidationConfig, ValidationTaskConfig

    return ValidationConfig(
        fn=validate_checkpoint,
        task_config=ValidationTaskConfig(fn_kwargs=cfg.fn_kwargs(), timeout_s=cfg.timeout_s or None),
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
