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

With `results_dir` set, the task also writes one result file per step there
(`pipelines.train.validation.write_result`; the error instead when the validation raised): what the training job's
rank 0 routes into its metric sinks. A training job gets this harness as `VALIDATOR` (the function plus the
driver-side task-name check), e.g. `pipelines.train.pretrain.fit(cfg, validator=VALIDATOR)` as jobs/pretrain.py
does; the training runtime itself never imports `pipelines.eval`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from pipelines.eval.tasks import ALL_TASKS
from pipelines.train.validation import PREFIX, ValidationSection, Validator, write_result
from pipelines.train.validation import build_validation_config as _build_validation_config

log = logging.getLogger("neobert.eval")


def check_tasks(section: ValidationSection) -> None:
    """The section's task names must be tasks of this harness (driver side, before Ray starts)."""
    bad = [t for t in section.tasks if t not in ALL_TASKS]
    if bad or not section.tasks:
        raise ValueError(f"validation.tasks={section.tasks}: unknown {bad}; choose from {list(ALL_TASKS)}")


@dataclasses.dataclass
class InTrainingEvalConfig(ValidationSection):
    """A `validation:` section whose tasks are checked against this harness's tasks when it is built."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_tasks(self)


def score_model_dir(
    path: str | Path, *, tasks: list[str], max_examples: int, seeds: list[int], device=None
) -> dict[str, float]:
    """{`val/<task>/<metric>`: mean over seeds} for a model dir / checkpoint dir; `val/seconds` the wall time."""
    import numpy as np

    from pipelines.eval.encoders import fresh_copy, load_encoder, resolve_model
    from pipelines.eval.tasks import FINETUNED, SkipTask, load_recipes, run_task

    t0 = time.perf_counter()
    ref = resolve_model(str(path))
    recipes = load_recipes()
    base = load_encoder(ref, device)
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


def task_device():
    """The device of a validation task: CUDA only when Ray gave the task a GPU (`validation.num_gpus` > 0); a task
    without one still sees the node's GPUs, which belong to the training workers. Outside Ray: CUDA when present."""
    import ray
    import torch

    from pipelines.eval.encoders import default_device

    if (
        ray.is_initialized()
        and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
        and not ray.get_gpu_ids()
    ):
        return torch.device("cpu")
    return default_device()


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
            scores = score_model_dir(
                d, tasks=tasks, max_examples=max_examples, seeds=seeds, device=task_device()
            )
        except Exception as e:
            if results_dir is not None and step is not None:
                write_result(
                    results_dir, {"step": step, "checkpoint": name, "error": f"{type(e).__name__}: {e}"}
                )
            raise
    if results_dir is not None and step is not None:
        write_result(results_dir, {"step": step, "checkpoint": name, "metrics": scores})
    return scores


def build_validation_config(cfg: ValidationSection, results_dir: str | None = None):
    """A `ray.train.ValidationConfig` running `validate_checkpoint` with `cfg`'s tasks (result files into
    `results_dir` when given); None when off."""
    return _build_validation_config(cfg, validate_checkpoint, results_dir)


# What a training job is given to validate its checkpoints with this harness (`pipelines.train.pretrain.fit`).
VALIDATOR = Validator(fn=validate_checkpoint, check=check_tasks)


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
