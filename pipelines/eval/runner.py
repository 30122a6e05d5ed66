"""Run (model x task x seed) units, aggregate over seeds, publish results.json + tables.

    plan(models, tasks, recipes, seeds)      -> [Unit]  (fine-tuned tasks: one unit per seed; zero-shot: one)
    run_units(units, engine="ray"|"local")   -> [UnitResult]  the SAME `run_unit` function either way: Ray tasks
                                                (`num_gpus` per task when the cluster has GPUs) or a plain loop
    aggregate(results)                       -> {model: {task: {metric: mean, metric_std: std}}} + skipped
    evaluate(EvalConfig)                     -> the whole run, written aside and published on success

results.json shape (flat "_std" entries, so a consumer reads `r[model][task]["spearman"]` directly):
    {model: {task: {metric: mean over seeds, metric + "_std": population std over seeds (0 for one run),
                    "num_seeds": n}}}      (counts such as num_pairs carry no _std)
A task that does not apply to a model (MLM without an MLM head) is absent there and listed in run.json
`skipped` with the reason. run.json also records tasks, seeds, max_examples, the resolved model paths, the
data manifest (sha256 of every source file) and per-unit wall times.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipelines.eval.encoders import ModelRef, resolve_model
from pipelines.eval.tasks import ALL_TASKS, Recipes, load_recipes

log = logging.getLogger("neobert.eval")

RESULTS_FILE = "results.json"
RUN_FILE = "run.json"
Engine = Literal["ray", "local"]


@dataclasses.dataclass
class EvalConfig:
    models: list[str] = dataclasses.field(
        default_factory=list
    )  # `reference`, `random:<preset>` or paths (see pipelines.eval.encoders.resolve_model)
    tasks: list[str] = dataclasses.field(default_factory=lambda: list(ALL_TASKS))
    output: str = "outputs/eval"  # results dir; replaced only when the whole run succeeded
    engine: Engine = "ray"  # ray: units as Ray tasks in parallel; local: in this process, one after another
    max_examples: int = 0  # > 0: cap every task's examples (a stable subset): CI-sized runs
    seeds: list[int] = dataclasses.field(default_factory=list)  # [] = the seeds of the recipes file
    recipes: str = ""  # recipes YAML; "" = pipelines/eval/recipes.yaml
    num_gpus_per_task: float = -1.0  # -1 = 1 when the Ray cluster has GPUs, else 0
    num_cpus_per_task: float = 1.0

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in ALL_TASKS]
        if bad or not self.tasks:
            raise ValueError(
                f"--tasks {','.join(self.tasks)}: unknown {bad}; choose from {','.join(ALL_TASKS)}"
            )
        if self.engine not in ("ray", "local"):
            raise ValueError(f"--engine must be 'ray' or 'local', got {self.engine!r}")
        if self.max_examples < 0:
            raise ValueError(f"--max-examples must be >= 0 (0 = full tasks), got {self.max_examples}")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"--model given twice: {self.models}")
        from pipelines.eval.tasks import FINETUNED

        if self.seeds and not any(t in FINETUNED for t in self.tasks):
            log.warning("--seeds has no effect: %s are zero-shot tasks (run once)", ",".join(self.tasks))
        if self.engine == "local" and self.num_gpus_per_task >= 0:
            log.warning(
                "--num-gpus-per-task has no effect with --engine local (the process uses CUDA if present)"
            )


@dataclasses.dataclass(frozen=True)
class Unit:
    model: ModelRef
    task: str
    seed: int
    max_examples: int
    recipes_path: str


@dataclasses.dataclass
class UnitResult:
    unit: Unit
    metrics: dict[str, float] | None  # None when skipped
    skipped: str = ""
    seconds: float = 0.0


def plan(models: list[ModelRef], tasks: list[str], recipes: Recipes, cfg: EvalConfig) -> list[Unit]:
    seeds = tuple(cfg.seeds) or None
    return [
        Unit(m, t, s, cfg.max_examples, cfg.recipes)
        for m in models
        for t in tasks
        for s in recipes.task_seeds(t, seeds)
    ]


_ENCODER_CACHE: dict[ModelRef, Any] = {}


def run_unit(unit: Unit) -> UnitResult:
    """Load (or reuse) the model, copy it for fine-tuning, run one task with one seed. Runs in a Ray task or
    in-process; a `SkipTask` becomes a skipped result, any other error propagates (the run fails)."""
    import torch

    from pipelines.eval.encoders import fresh_copy, load_encoder
    from pipelines.eval.tasks import FINETUNED, SkipTask, run_task

    t0 = time.perf_counter()
    recipes = load_recipes(unit.recipes_path or None)
    base = _ENCODER_CACHE.get(unit.model)
    if base is None:
        base = _ENCODER_CACHE[unit.model] = load_encoder(unit.model)
    enc = fresh_copy(base) if unit.task in FINETUNED else base
    torch.manual_seed(unit.seed)
    try:
        metrics = run_task(unit.task, enc, recipes, seed=unit.seed, max_examples=unit.max_examples)
        return UnitResult(unit, metrics, seconds=time.perf_counter() - t0)
    except SkipTask as e:
        return UnitResult(unit, None, skipped=str(e), seconds=time.perf_counter() - t0)


def run_units(units: list[Unit], cfg: EvalConfig) -> list[UnitResult]:
    if cfg.engine == "local":
        out = []
        for u in units:
            out.append(run_unit(u))
            log.info("%s / %s / seed %d: %s (%.1f s)", u.model.name, u.task, u.seed,
                     out[-1].metrics or out[-1].skipped, out[-1].seconds)  # fmt: skip
        return out
    import ray

    if not ray.is_initialized():
        ray.init()
    gpus = cfg.num_gpus_per_task
    if gpus < 0:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    remote = ray.remote(num_cpus=cfg.num_cpus_per_task, num_gpus=gpus, max_retries=0)(run_unit)
    return ray.get([remote.remote(u) for u in units])


def aggregate(results: list[UnitResult]) -> tuple[dict, dict]:
    """-> (results.json content, {model: {task: reason}} of skipped tasks). Metrics: mean and population std."""
    by: dict[str, dict[str, list[dict[str, float]]]] = {}
    skipped: dict[str, dict[str, str]] = {}
    for r in results:
        if r.metrics is None:
            skipped.setdefault(r.unit.model.name, {})[r.unit.task] = r.skipped
            continue
        by.setdefault(r.unit.model.name, {}).setdefault(r.unit.task, []).append(r.metrics)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for model, tasks in by.items():
        for task, runs in tasks.items():
            entry: dict[str, float] = {}
            for metric in runs[0]:
                vals = np.array([run[metric] for run in runs], dtype=np.float64)
                entry[metric] = float(vals.mean())
                if not metric.startswith("num_"):  # counts (num_pairs, ...) are the same for every seed
                    entry[f"{metric}_std"] = float(vals.std())
            entry["num_seeds"] = len(runs)
            out.setdefault(model, {})[task] = entry
    return out, skipped


def publish(output: str | Path, write) -> Path:
    """Write into a staging dir next to `output` (`write(staging_dir)`), then swap it in: a failed run leaves a
    previous `output` untouched, a finished one replaces it whole."""
    out = Path(output).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        write(staging)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(staging, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """The whole run; returns {"output", "results", "skipped"}. Every model is resolved (and every data source
    located) before any unit runs, so a typo fails in a second, not after an hour."""
    from pipelines.eval import data as D
    from pipelines.eval.report import write_tables

    if not cfg.models:
        raise ValueError("pass at least one --model (e.g. --model reference)")
    recipes = load_recipes(cfg.recipes or None)
    models = [resolve_model(m) for m in cfg.models]
    needs = {"stsb": ["stsb_test"], "stsb_ft": ["stsb_train", "stsb_test"], "polarity": ["rotten_tomatoes", "movie_snippets"],
             "trec": ["question_labels"]}  # fmt: skip
    manifest = {}
    for task in cfg.tasks:
        for name in needs.get(task, []):
            D.source_path(name)  # raises `error: ... pip install ...` when a package is missing
            src = D.MANIFEST[name]
            manifest[name] = {
                "package": f"{src.package}=={src.version}",
                "path": src.path,
                "sha256": src.sha256,
            }
    units = plan(models, cfg.tasks, recipes, cfg)
    t0 = time.perf_counter()
    results = run_units(units, cfg)
    table, skipped = aggregate(results)
    run_info = {
        "tasks": cfg.tasks,
        "seeds": list(cfg.seeds or recipes.seeds),
        "max_examples": cfg.max_examples,
        "engine": cfg.engine,
        "models": {m.name: {"kind": m.kind, "path": m.path} for m in models},
        "skipped": skipped,
        "data": manifest,
        "recipes": {
            "finetune": {k: dataclasses.asdict(v) for k, v in recipes.finetune.items()},
            "zero_shot": recipes.zero_shot,
        },  # fmt: skip
        "units": [
            {
                "model": r.unit.model.name,
                "task": r.unit.task,
                "seed": r.unit.seed,
                "seconds": round(r.seconds, 2),
                "skipped": r.skipped or None,
            }
            for r in results
        ],  # fmt: skip
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }

    def write(d: Path) -> None:
        (d / RESULTS_FILE).write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
        (d / RUN_FILE).write_text(json.dumps(run_info, indent=2, sort_keys=True) + "\n")
        write_tables(d, table, order=[m.name for m in models], skipped=skipped)

    out = publish(cfg.output, write)
    return {"output": str(out), "results": table, "skipped": skipped}
