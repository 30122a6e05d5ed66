"""Pretraining recipes: an ordered list of phases in one YAML, expanded into one pretraining config per phase.

    configs/recipes/<name>.yaml
      name: neobert
      storage_path: outputs/recipes          # phase i runs as <storage_path>/<name>/phase-<i>-<phase name>
      init_from: ""                          # optional warm start of the first phase (any model dir, HF export)
      data_root: ""                          # `{data_root}` in source paths is replaced by this
      pretrain_config: ../pretrain.yaml      # base pretraining config, then `pretrain:` merged over it
      pretrain: {model: ..., train: ..., ...}
      phases:
        - name: seq1024
          num_steps: 1000                    # or num_tokens: ... (steps derived from the batch schedule)
          max_seq_len: 1024                  # pack size (data.pack_tokens) and model.max_position_embeddings
          rope_theta: 10000.0
          mask_prob: 0.2
          global_batch_tokens: 65536         # train.global_batch_tokens: tokens of one optimizer step
          batch_warmup: {start_tokens: 16384, tokens: 1.0e9}   # optional batch-size warmup (train.batch_warmup_*)
          lr: {peak: 6.0e-4, schedule: cosine, warmup_steps: 20, min_lr_ratio: 0.1}
          sources: [{name: all, path: data/packed, weight: 1.0}]   # data.sources: token-weighted mixture
          eval_dir: ""                       # packed dir whose eval split is evaluated ("" = the first source's)
          carry_optimizer: false             # phase > 0: load the previous phase's optimizer state too
          overrides: {}                      # any other pretraining config key for this phase only

A recipe may start with `base: other.yaml`: its keys are merged over the base recipe's, and its `phases` are
merged into the base's BY NAME (a tiny variant lists only what it changes). Dotted CLI overrides reach a phase
by name: `--phases.seq1024.num_steps 5`.

Expansion (`expand_recipe`) fixes, per phase: the run name, `train.init_from` (phase 0: the recipe's; phase i > 0:
the run dir of phase i - 1, whose latest checkpoint the runner loads), the global step offset (sum of the previous
phases' steps) and the phase's `LRSegment`, so the LR at global step g is `RecipeLR.lr_at(g)`. `to_pretrain_config`
maps a phase onto the pretraining job's keys: `data.sources` (the mixture, `pipelines.train.data`),
`train.global_batch_tokens`, `train.batch_warmup_*` (the ramp restarts at the phase's first step; `num_tokens`
phases count their steps through it, `BatchRamp.steps_for_tokens`), `data.pack_tokens` = `model.max_position_embeddings` = max_seq_len,
`model.rope_theta`, `train.mask_prob`, the `train.*` LR keys. A single source with an empty path is the embedded
corpus, tokenized and packed on the fly at the phase's pack size (source name "train").

Orchestration (`run_recipe`): phases run in order through an injected `fit_phase(plan)`; a finished phase leaves
`<recipe dir>/phases/<i>-<name>.json` (written aside, renamed into place once the phase returned) and is skipped
on the next run (its config is compared with the marker's, locations aside, so a recipe dir moved to another
storage_path continues). A phase that crashed has no marker, so re-running the command calls `fit_phase` again
with the same run name and storage path, and Ray Train resumes inside the phase from its latest checkpoint (step,
global data position, RNG); a run dir with a checkpoint never warm-starts again.

Report (`write_recipe_report`): the phases' metrics merged into `<recipe dir>/metrics.jsonl` with global steps,
`phases.json` (per phase: steps, tokens, LR, loss, the realized mixture from the summed `data/tokens/<source>`
window metrics, and why a share misses its weight by more than 1%) and `recipe.png`.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from neobert.config_io import deep_merge, from_dict, load_yaml_dict, parse_overrides, to_dict
from pipelines.train.data import BatchRamp
from pipelines.train.pretrain import SINGLE_SOURCE, PretrainConfig, _expand_model_preset
from pipelines.train.schedule import DECAY_SHAPES, SCHEDULES, LRSegment, RecipeLR

log = logging.getLogger("neobert.recipe")

WARMUP_TRAIN_KEYS = ("batch_warmup_start_tokens", "batch_warmup_tokens")  # set from each phase's batch_warmup
MARKER_DIR = "phases"
SUMMARY_FILE = "phases.json"
RECIPE_FILE = "recipe.yaml"


# ----------------------------------------------------------------------------------------------------------------
# Spec
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SourceSpec:
    name: str  # metric key: data/tokens/<name>
    path: str = ""  # a jobs/preprocess.py output dir (or a length view of one); "" = the embedded corpus
    weight: float = 1.0  # share of the phase's tokens
    repeat: bool = (
        True  # when it runs out: start another epoch (True) or stop / renormalize (data.on_exhausted)
    )

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"source name must be non-empty without '/', got {self.name!r}")
        if self.weight <= 0:
            raise ValueError(f"source {self.name!r}: weight must be > 0, got {self.weight}")

    @property
    def metric(self) -> str:
        """The key of this source's tokens in metrics.jsonl (the on-the-fly embedded corpus is source "train")."""
        return f"data/tokens/{self.name if self.path else SINGLE_SOURCE}"


@dataclass
class LRSpec:
    peak: float = 1e-3
    schedule: str = "cosine"  # cosine | linear | constant (warmup then decay over the phase) | wsd
    warmup_steps: int = 0
    stable_steps: int = -1  # wsd: -1 = the rest of the phase
    decay_steps: int = 0  # wsd: -1 = the rest of the phase
    decay_shape: str = "cosine"  # wsd: linear | cosine | 1-sqrt
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"lr.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"lr.decay_shape must be one of {DECAY_SHAPES}, got {self.decay_shape!r}")
        if self.stable_steps == -1 and self.decay_steps == -1:
            raise ValueError("lr: only one of stable_steps / decay_steps may be -1 (the rest of the phase)")


@dataclass
class BatchWarmupSpec:
    """A phase's batch-size warmup (`pipelines.train.data.BatchRamp`; both 0 = off): the phase's first step holds
    `start_tokens`, each level adds as many up to the phase's global batch, the levels together span about
    `tokens`. Maps onto `train.batch_warmup_start_tokens` / `train.batch_warmup_tokens`; the ramp starts again at
    the phase's first step."""

    start_tokens: int = 0
    tokens: int = 0


@dataclass
class PhaseSpec:
    name: str
    max_seq_len: int
    global_batch_tokens: int
    num_steps: int = 0  # exactly one of num_steps / num_tokens
    num_tokens: int = 0
    rope_theta: float = 10000.0
    mask_prob: float = 0.2
    lr: LRSpec = field(default_factory=LRSpec)
    batch_warmup: BatchWarmupSpec = field(default_factory=BatchWarmupSpec)
    sources: list[SourceSpec] = field(default_factory=lambda: [SourceSpec(name="all")])
    eval_dir: str = ""  # a packed dir whose eval split the phase evaluates; "" = the first source's path
    carry_optimizer: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"phase {self.name!r}"
        if not self.name or "/" in self.name:
            raise ValueError(f"phase name must be non-empty without '/', got {self.name!r}")
        if (self.num_steps > 0) == (self.num_tokens > 0):
            raise ValueError(f"{where}: set exactly one of num_steps / num_tokens (> 0)")
        if self.max_seq_len < 8 or self.global_batch_tokens < self.max_seq_len:
            raise ValueError(
                f"{where}: need max_seq_len >= 8 and global_batch_tokens >= max_seq_len, got "
                f"{self.max_seq_len} / {self.global_batch_tokens}"
            )
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"{where}: mask_prob must lie in (0, 1), got {self.mask_prob}")
        try:  # a flat phase's global batch is checked with the world size (check_recipe)
            if self.batch_warmup.start_tokens or self.batch_warmup.tokens:
                self.ramp()
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        names = [s.name for s in self.sources]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"{where}: sources need unique names, got {names}")
        if len(self.sources) > 1 and not all(s.path for s in self.sources):
            raise ValueError(
                f"{where}: a mixture needs a packed dir (jobs/preprocess.py) for every source; only a phase with a "
                "single source may leave its path empty (the embedded corpus, packed on the fly)"
            )

    def ramp(self) -> BatchRamp:
        """The phase's batch schedule (flat unless `batch_warmup` is set); ValueError naming the phase's keys."""
        return BatchRamp.from_tokens(
            self.global_batch_tokens, self.max_seq_len, self.batch_warmup.start_tokens, self.batch_warmup.tokens,
            keys=("batch_warmup.start_tokens", "batch_warmup.tokens", "global_batch_tokens"),
        )  # fmt: skip


@dataclass
class Recipe:
    name: str
    phases: list[PhaseSpec]
    pretrain: dict[str, Any] = field(
        default_factory=dict
    )  # base pretraining config (dict, validated per phase)
    storage_path: str = "outputs/recipes"
    init_from: str = ""  # warm start of phase 0: run dir, checkpoint dir, model dir or HF export dir
    data_root: str = ""  # replaces `{data_root}` in source paths (one flag moves all of a recipe's data)
    pretrain_config: str = (
        ""  # a pretraining YAML (configs/...) under `pretrain`; relative to the recipe file
    )

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"recipe name must be non-empty without '/', got {self.name!r}")
        if not self.phases:
            raise ValueError(f"recipe {self.name!r} has no phases")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"recipe {self.name!r}: phase names must be unique, got {names}")
        if self.phases[0].carry_optimizer and not self.init_from:
            raise ValueError(
                f"recipe {self.name!r}: phase {names[0]!r} has carry_optimizer=true but nothing to carry it from"
            )

    @property
    def dir(self) -> str:
        return os.path.join(self.storage_path, self.name)


def _merge_phases(base: list[dict], update: Any, where: str) -> list[dict]:
    """Merge `update` (list of phase dicts, or {name: dict}) into `base` by phase name; new names append."""
    items = update.items() if isinstance(update, dict) else [(p.get("name"), p) for p in update]
    out = [copy.deepcopy(p) for p in base]
    index = {p["name"]: i for i, p in enumerate(out)}
    for name, p in items:
        if name is None:
            raise ValueError(f"{where}: every phase needs a name")
        if name in index:
            out[index[name]] = deep_merge(out[index[name]], {**p, "name": name})
        elif base and isinstance(update, dict):
            raise ValueError(f"{where}: no phase named {name!r} to override; phases are {list(index)}")
        else:
            out.append({**p, "name": name})
    return out


def load_recipe_dict(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"recipe file {path} does not exist; pick one from configs/recipes/")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe file {path} must hold a mapping at top level")
    if data.get("pretrain_config"):
        data["pretrain_config"] = str((path.parent / data["pretrain_config"]).resolve())
    base = data.pop("base", None)
    if base:
        parent = load_recipe_dict(path.parent / base)
        if "phases" in parent or "phases" in data:  # else a plain pretraining config: no `phases` key added
            phases = _merge_phases(parent.get("phases", []), data.pop("phases", []), str(path))
            data = {**deep_merge(parent, data), "phases": phases}
        else:
            data = deep_merge(parent, data)
    return data


def is_recipe(path: str | Path) -> bool:
    """True when the YAML at `path` is a recipe (has `phases`, here or in a `base:` chain)."""
    try:
        return "phases" in load_recipe_dict(path)
    except (ValueError, yaml.YAMLError):
        return False


def load_recipe(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    data = load_recipe_dict(path)
    if overrides:
        upd = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        if "phases" in upd:
            data["phases"] = _merge_phases(data.get("phases", []), upd.pop("phases"), "overrides")
        data = deep_merge(data, upd)
    for i, phase in enumerate(data.get("phases") or [], start=1):
        missing = [k for k in ("name", "max_seq_len", "global_batch_tokens") if k not in phase]
        if missing:
            raise ValueError(
                f"{path}: phase {i} ({phase.get('name', '?')!r}) lacks {missing}; every phase sets them"
            )
    recipe = from_dict(Recipe, data)
    if recipe.pretrain_config:
        recipe.pretrain = deep_merge(load_yaml_dict(recipe.pretrain_config), recipe.pretrain)
        recipe.pretrain_config = ""  # folded in: the recipe now holds the whole config
    # Workers run in another working directory: local paths are made absolute on the driver.
    recipe.storage_path = _absolute(recipe.storage_path)
    recipe.init_from = _absolute(recipe.init_from)
    recipe.data_root = _absolute(recipe.data_root)
    return recipe


def _absolute(path: str) -> str:
    if not path or "://" in path or "{data_root}" in path:
        return path
    return str(Path(path).expanduser().resolve())


# ----------------------------------------------------------------------------------------------------------------
# Expansion
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PhasePlan:
    """One phase, ready to run: what `fit_phase` receives."""

    index: int
    name: str
    run_name: str  # <recipe>/phase-<i>-<name>
    run_dir: str  # <storage_path>/<run_name>
    step_offset: int  # global step of the phase's first step
    num_steps: int
    segment: LRSegment
    sources: list[SourceSpec]
    init_from: str
    carry_optimizer: bool
    config: dict[
        str, Any
    ]  # the phase's pretraining config (PretrainConfig keys, model preset not yet expanded)

    @property
    def global_batch_tokens(self) -> int:
        """Tokens of a step at the full global batch (after any batch warmup)."""
        return int(self.config["train"]["global_batch_tokens"])

    @property
    def ramp(self) -> BatchRamp:
        """The rows of every step of the phase (phase-local steps)."""
        t = self.config["train"]
        return BatchRamp.from_tokens(
            self.global_batch_tokens, int(self.config["data"]["pack_tokens"]),
            int(t.get("batch_warmup_start_tokens", 0)), int(t.get("batch_warmup_tokens", 0)),
        )  # fmt: skip


def _segment(spec: PhaseSpec, num_steps: int) -> LRSegment:
    lr = spec.lr
    stable, decay = lr.stable_steps, lr.decay_steps
    if lr.schedule == "wsd":
        if stable == -1:
            stable = num_steps - lr.warmup_steps - decay
        if decay == -1:
            decay = num_steps - lr.warmup_steps - stable
    else:
        stable = decay = 0
    try:
        return LRSegment(
            lr=lr.peak,
            num_steps=num_steps,
            kind=lr.schedule,
            warmup_steps=lr.warmup_steps,
            stable_steps=stable,
            decay_steps=decay,
            decay_shape=lr.decay_shape,
            min_lr_ratio=lr.min_lr_ratio,
        )
    except ValueError as e:
        raise ValueError(f"phase {spec.name!r}: lr: {e}") from None


def _with_root(src: SourceSpec, data_root: str, phase: str) -> SourceSpec:
    if "{data_root}" not in src.path:
        return SourceSpec(src.name, _absolute(src.path), src.weight, src.repeat)
    if not data_root:
        raise ValueError(
            f"phase {phase!r}, source {src.name!r}: path {src.path!r} uses {{data_root}} but the recipe sets no "
            "data_root; pass --data_root DIR (the directory jobs/preprocess.py wrote)"
        )
    return SourceSpec(
        src.name, src.path.replace("{data_root}", data_root.rstrip("/")), src.weight, src.repeat
    )


def _phase_num_steps(spec: PhaseSpec) -> int:
    """num_steps, or the steps num_tokens takes through the phase's batch schedule (its batch warmup, then the full
    global batch; the last step may overshoot)."""
    return spec.num_steps or spec.ramp().steps_for_tokens(spec.num_tokens)


def expand_recipe(recipe: Recipe) -> list[PhasePlan]:
    """One `PhasePlan` per phase (see the module docstring for what each fixes)."""
    plans: list[PhasePlan] = []
    offset = 0
    for i, spec in enumerate(recipe.phases):
        run_name = f"{recipe.name}/phase-{i}-{spec.name}"
        cfg = copy.deepcopy(recipe.pretrain)
        model = cfg.setdefault("model", {})
        model["rope_theta"] = spec.rope_theta
        model["max_position_embeddings"] = spec.max_seq_len
        sources = [_with_root(s, recipe.data_root, spec.name) for s in spec.sources]
        data = cfg.setdefault("data", {})
        data["pack_tokens"] = spec.max_seq_len
        if len(sources) == 1 and not sources[0].path:  # the embedded corpus, packed on the fly
            data["sources"], data["packed_dir"] = [], ""
        else:
            data["sources"] = [to_dict(s) for s in sources]
            eval_dir = spec.eval_dir.replace("{data_root}", recipe.data_root.rstrip("/")) or sources[0].path
            data["packed_dir"] = eval_dir  # with data.sources, packed_dir supplies the eval split only
            data.pop("preprocess", None)
        num_steps = _phase_num_steps(spec)
        seg = _segment(spec, num_steps)
        init_from = recipe.init_from if i == 0 else plans[-1].run_dir
        pre = {k: cfg.get("train", {}).get(k) for k in WARMUP_TRAIN_KEYS}
        if any(pre.values()):
            raise ValueError(
                f"recipe {recipe.name!r}: pretrain.train sets {pre}; the batch warmup is a phase setting (it fixes "
                f"the phase's steps): set batch_warmup: {{start_tokens, tokens}} on the phases that want it"
            )
        cfg["train"] = {
            **cfg.get("train", {}),
            "num_steps": num_steps,
            "global_batch_tokens": spec.global_batch_tokens,
            "batch_warmup_start_tokens": spec.batch_warmup.start_tokens,
            "batch_warmup_tokens": spec.batch_warmup.tokens,
            "mask_prob": spec.mask_prob,
            "lr": seg.lr,
            "schedule": seg.kind,
            "warmup_steps": seg.warmup_steps,
            "stable_steps": seg.stable_steps,
            "decay_steps": seg.decay_steps,
            "decay_shape": seg.decay_shape,
            "min_lr_ratio": seg.min_lr_ratio,
            "init_from": init_from,
            "init_optimizer": bool(spec.carry_optimizer and init_from),
        }
        cfg["checkpoint"] = {
            **cfg.get("checkpoint", {}),
            "storage_path": recipe.dir,
            "name": f"phase-{i}-{spec.name}",
        }
        over = {k: v for k, v in (spec.overrides.get("train") or {}).items() if k in WARMUP_TRAIN_KEYS}
        if over:
            raise ValueError(
                f"phase {spec.name!r}: overrides.train sets {over}; set the phase's batch_warmup: {{start_tokens, "
                "tokens}} instead (it fixes the phase's steps)"
            )
        cfg = deep_merge(cfg, spec.overrides)
        plans.append(
            PhasePlan(
                index=i,
                name=spec.name,
                run_name=run_name,
                run_dir=os.path.join(recipe.storage_path, run_name),
                step_offset=offset,
                num_steps=num_steps,
                segment=seg,
                sources=sources,
                init_from=init_from,
                carry_optimizer=spec.carry_optimizer,
                config=cfg,
            )
        )
        offset += num_steps
    return plans


def recipe_lr(plans: list[PhasePlan]) -> RecipeLR:
    return RecipeLR(tuple(p.segment for p in plans))


def to_pretrain_config(plan: PhasePlan) -> PretrainConfig:
    """The phase as a validated `PretrainConfig` (model preset expanded); a bad value names the phase."""
    try:
        return from_dict(PretrainConfig, _expand_model_preset(copy.deepcopy(plan.config)))
    except ValueError as e:
        raise ValueError(f"phase {plan.index} ({plan.name!r}): {e}") from None


def check_recipe(recipe: Recipe) -> list[PhasePlan]:
    """Driver-side checks of every phase before Ray starts: each phase's config is valid (global batch a multiple
    of pack x workers x rows per micro-batch, ...) and every source / eval dir that exists already is a packed dir
    of the phase's pack size; the recipe's warm start (phase 0) matches the model. Phases i > 0 warm-start from a
    run that does not exist yet: the pretraining driver checks them when they start."""
    from pipelines.train.pretrain import check_data, resolve_config
    from pipelines.train.warm_start import check_warm_start

    plans = expand_recipe(recipe)
    for plan in plans:
        cfg = resolve_config(to_pretrain_config(plan))
        where = f"phase {plan.index} ({plan.name!r})"
        try:
            if cfg.data.sources or cfg.data.packed_dir:
                check_data(cfg)
            if plan.index == 0 and cfg.train.init_from and not Path(plan.run_dir).exists():
                t = cfg.train
                check_warm_start(
                    t.init_from, cfg.model, with_optimizer=t.init_optimizer, optimizer=t.optimizer
                )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return plans


# ----------------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------------
FitPhase = Callable[[PhasePlan], dict[str, Any]]
# Keys that say WHERE a phase runs, not what it trains: a recipe dir moved to another storage_path continues.
LOCATION_KEYS = (("checkpoint", "storage_path"), ("train", "init_from"))


def marker_path(recipe: Recipe, plan: PhasePlan) -> Path:
    return Path(recipe.dir) / MARKER_DIR / f"{plan.index}-{plan.name}.json"


def _without_location(config: dict[str, Any], index: int) -> dict[str, Any]:
    out = copy.deepcopy(config)
    for section, key in LOCATION_KEYS:
        if section == "train" and index == 0:
            continue  # phase 0's init_from is the user's choice, part of what it trains
        out.get(section, {}).pop(key, None)
    return out


def _write_aside(path: Path, text: str) -> None:
    """Write to <path>.tmp, then rename over `path` (atomic on one filesystem): readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_recipe(recipe: Recipe, fit_phase: FitPhase) -> list[dict[str, Any]]:
    """Run the phases in order (finished ones are skipped); returns one record per phase.

    `fit_phase(plan)` trains one phase to its last step (resuming inside it if its run dir has a checkpoint) and
    returns a JSON-able dict (e.g. the final checkpoint); an exception leaves no marker, so the next run of the
    recipe calls it again for the same phase.
    """
    if "://" in recipe.storage_path:
        raise ValueError(
            f"recipe storage_path={recipe.storage_path!r}: phase markers are local files; use a shared local "
            "(NFS) path for recipes"
        )
    plans = expand_recipe(recipe)
    Path(recipe.dir).mkdir(parents=True, exist_ok=True)
    _write_aside(Path(recipe.dir) / RECIPE_FILE, yaml.safe_dump(to_dict(recipe), sort_keys=False))
    records = []
    for plan in plans:
        marker = marker_path(recipe, plan)
        if marker.exists():
            done = json.loads(marker.read_text())
            if _without_location(done["config"], plan.index) != _without_location(plan.config, plan.index):
                raise ValueError(
                    f"phase {plan.index} ({plan.name!r}) of recipe {recipe.name!r} finished with another config "
                    f"({marker}); start a new recipe name, or delete {recipe.dir} to retrain from scratch"
                )
            log.info("recipe %s: phase %d (%s) already finished, skipped", recipe.name, plan.index, plan.name)
            records.append(done)
            continue
        log.info(
            "recipe %s: phase %d (%s): %d steps from global step %d, run dir %s",
            recipe.name, plan.index, plan.name, plan.num_steps, plan.step_offset, plan.run_dir,
        )  # fmt: skip
        result = fit_phase(plan)
        record = {
            "index": plan.index,
            "name": plan.name,
            "run_dir": plan.run_dir,
            "step_offset": plan.step_offset,
            "num_steps": plan.num_steps,
            "result": result,
            "config": plan.config,
        }
        _write_aside(marker, json.dumps(record, indent=2, sort_keys=True) + "\n")
        records.append(record)
    return records


def fit_phase_ray(plan: PhasePlan, validator: Any = None) -> dict[str, Any]:
    """The real `fit_phase`: the pretraining job's `fit` for the phase (Ray initialised by the caller); the driver
    checks data and the warm start first (`prepare_pretrain_run`). `validator`: what scores the phase's
    checkpoints when its `validation.every_steps` > 0 (`pipelines.train.validation.Validator`)."""
    from pipelines.train.pretrain import fit

    result = fit(to_pretrain_config(plan), validator=validator)
    if result.error:
        raise RuntimeError(f"phase {plan.index} ({plan.name!r}) failed: {result.error}")
    ckpt = result.checkpoint.path if result.checkpoint else None
    return {"checkpoint": ckpt, "final_step": (result.metrics or {}).get("step")}


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


MIXTURE_TOLERANCE = 0.01  # realized token share vs weight, absolute


def realized_mixture(
    records: list[dict[str, Any]], sources: list[SourceSpec], *, pack_tokens: int
) -> dict[str, Any]:
    """The phase's realized mixture from its metrics: per source the tokens (the sum of its `data/tokens/<source>`
    window metrics), the realized share, the target weight (normalized) and the epochs started; `max_error` (the
    largest |share - weight|) and `why`: None when every share is within `MIXTURE_TOLERANCE` of its weight, else
    the reason. The interleaving keeps each share within one packed row of its weight, so a miss means a source
    ran out (repeat: false) or the phase is too short for one row to be under 1% of its tokens. {} when the run
    logged no token counts."""
    seen = [r for r in records if any(s.metric in r for s in sources)]
    if not seen:
        return {}
    totals = {s.name: sum(float(r.get(s.metric, 0.0)) for r in seen) for s in sources}
    all_tokens, all_weight = max(sum(totals.values()), 1.0), sum(s.weight for s in sources)
    out: dict[str, Any] = {"sources": {}}
    for s in sources:
        tag = s.metric.removeprefix("data/tokens/")
        epochs = [r[f"data/epoch/{tag}"] for r in seen if f"data/epoch/{tag}" in r]
        out["sources"][s.name] = {
            "tokens": totals[s.name],
            "share": totals[s.name] / all_tokens,
            "weight": s.weight / all_weight,
            "epochs": int(epochs[-1]) + 1 if epochs else None,
        }
    errors = {n: abs(m["share"] - m["weight"]) for n, m in out["sources"].items()}
    out["max_error"] = max(errors.values())
    out["why"] = None
    if out["max_error"] > MIXTURE_TOLERANCE:
        worst = max(errors, key=errors.__getitem__)
        gone = [
            s.name for s in sources if not s.repeat and totals[s.name] / all_tokens < s.weight / all_weight
        ]
        if gone:
            out["why"] = (
                f"source(s) {gone} (repeat: false) ran out before the phase ended; data.on_exhausted decided what "
                "followed (stop: the phase ended early; renormalize: the other sources took their share)"
            )
        else:
            out["why"] = (
                f"source {worst!r} is {errors[worst]:.2%} off its weight: the phase trained {int(all_tokens)} tokens "
                f"and the interleaving is exact to one packed row ({pack_tokens} tokens, "
                f"{pack_tokens / all_tokens:.2%} of the phase); a longer phase brings it within "
                f"{MIXTURE_TOLERANCE:.0%}"
            )
    return out


def _tokens_seen(records: list[dict[str, Any]], sources: list[SourceSpec], pack_tokens: int) -> float | None:
    """Real tokens the phase trained on: the sum of its `data/tokens/<source>` window metrics (None if none)."""
    mix = realized_mixture(records, sources, pack_tokens=pack_tokens)
    return sum(m["tokens"] for m in mix["sources"].values()) if mix else None


def write_recipe_report(recipe: Recipe, plans: list[PhasePlan] | None = None) -> dict[str, Path]:
    """Gather the phases' metrics into the recipe dir: `metrics.jsonl` (every record with `phase`, `phase_index`
    and `global_step` = step offset + step), `phases.json` (per phase: steps, tokens, first/last LR, last train
    and eval loss, realized mixture) and `recipe.png` (loss, LR and global batch over global steps, phase
    boundaries marked).
    Phases that have not run yet are left out."""
    plans = plans or expand_recipe(recipe)
    root = Path(recipe.dir)
    merged: list[dict[str, Any]] = []
    summary = []
    for plan in plans:
        recs = _read_jsonl(Path(plan.run_dir) / "metrics.jsonl")
        if not recs:
            continue
        for r in recs:
            merged.append({"phase": plan.name, "phase_index": plan.index, "global_step": plan.step_offset + r["step"],
                           **r})  # fmt: skip
        train = [r for r in recs if "train/loss" in r]
        evals = [r for r in recs if "eval/loss" in r]
        last_step = max(r["step"] for r in recs)
        pack = int(plan.config["data"]["pack_tokens"])
        summary.append(
            {
                "phase": plan.name,
                "index": plan.index,
                "run_dir": plan.run_dir,
                "step_offset": plan.step_offset,
                "num_steps": plan.num_steps,
                "steps_done": last_step,
                "tokens_planned": plan.ramp.tokens_through(plan.num_steps),
                "tokens": _tokens_seen(recs, plan.sources, pack),
                "lr_first": train[0]["train/lr"] if train else None,
                "lr_last": train[-1]["train/lr"] if train else None,
                "train_loss_last": train[-1]["train/loss"] if train else None,
                "eval_loss_last": evals[-1]["eval/loss"] if evals else None,
                "rope_theta": plan.config["model"]["rope_theta"],
                "max_seq_len": plan.config["data"]["pack_tokens"],
                "mask_prob": plan.config["train"]["mask_prob"],
                "mixture": realized_mixture(recs, plan.sources, pack_tokens=pack),
            }
        )
    root.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": root / "metrics.jsonl", "phases": root / SUMMARY_FILE, "plot": root / "recipe.png"}
    _write_aside(paths["metrics"], "".join(json.dumps(r) + "\n" for r in merged))
    _write_aside(paths["phases"], json.dumps(summary, indent=2) + "\n")
    plot_recipe(merged, [p for p in plans if any(s["index"] == p.index for s in summary)], paths["plot"])
    return paths


def plot_recipe(records: list[dict[str, Any]], plans: list[PhasePlan], out: Path) -> None:
    """Train / eval loss (top), LR (middle) and the global batch in tokens (bottom: phase sizes and any batch-size
    warmup) over global steps, one colour band per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr, ax_batch) = plt.subplots(3, 1, sharex=True, figsize=(9, 8))
    panels = (("train/loss", ax_loss), ("eval/loss", ax_loss), ("train/lr", ax_lr),
              ("train/global_batch_tokens", ax_batch))  # fmt: skip
    for key, ax in panels:
        pts = [(r["global_step"], r[key]) for r in records if key in r]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="." if key == "eval/loss" else None, label=key)
    for i, plan in enumerate(plans):
        for ax in (ax_loss, ax_lr, ax_batch):
            ax.axvspan(plan.step_offset, plan.step_offset + plan.num_steps, alpha=0.08, color=f"C{i % 10}")
        ax_loss.text(plan.step_offset, 1.0, f" {plan.name}", transform=ax_loss.get_xaxis_transform(), va="top",
                     fontsize=8)  # fmt: skip
    ax_loss.set_ylabel("MLM loss")
    ax_loss.legend(loc="upper right")
    ax_lr.set_ylabel("learning rate")
    ax_batch.set_ylabel("global batch (tokens)")
    ax_batch.set_xlabel("global step")
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)


# ----------------------------------------------------------------------------------------------------------------
# Command line: `jobs/pretrain.py --config <recipe>.yaml` (the pretraining job's entrypoint dispatches here)
# ----------------------------------------------------------------------------------------------------------------
def recipe_config_in(argv: list[str]) -> str | None:
    """The `--config` path of `argv` when it names a recipe (a YAML with `phases`), else None."""
    for i, tok in enumerate(argv):
        path = tok.split("=", 1)[1] if tok.startswith("--config=") else None
        if tok == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        if path and Path(path).is_file() and is_recipe(path):
            return path
    return None


def run_job(recipe: Recipe, ctx: Any, validator: Any = None) -> int:
    """Check every phase on the driver, start / join Ray, run the phases in order, then write the report (also
    after a failed phase: what ran so far). `validator` scores checkpoints of phases with a `validation` section
    (its task names are checked here, before Ray starts)."""
    plans = check_recipe(recipe)
    if validator is not None:
        for plan in plans:
            validator.check(to_pretrain_config(plan).validation)
    ctx.init_ray(local_num_cpus=max(4, os.cpu_count() or 1))
    print(f"recipe dir: {recipe.dir}", flush=True)
    try:
        run_recipe(recipe, functools.partial(fit_phase_ray, validator=validator))
    finally:
        paths = write_recipe_report(recipe)
        for what, path in paths.items():
            print(f"{what}: {path}")
    return 0


def job_spec(doc: str) -> Any:
    """The `pipelines.cli.JobSpec` of a recipe run (`doc`: the entrypoint's docstring, for --help)."""
    from pipelines import cli

    return cli.JobSpec(
        name="pretrain",
        doc=doc,
        config_cls=Recipe,
        load=load_recipe,
        output_keys=("storage_path",),
        input_keys=("init_from", "data_root"),
    )
