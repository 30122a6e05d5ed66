"""MLM pretraining: the job's config sections, its step, its eval and its driver (`fit`). The loop, checkpoints,
resume, metrics and failure handling are `pipelines.train.runner.TrainRunner`'s.

    jobs/pretrain.py --config configs/pretrain.yaml --train.num_steps 100
      -> load_pretrain_config -> fit(cfg): prepare_run -> build_trainer(cfg).fit()
         each worker: train_loop_per_worker(config) -> PretrainRunner(cfg).run()

Data: one Ray Dataset per train source (`data.sources`: packed dirs of jobs/preprocess.py mixed by token weight;
none listed = one source "train" from `data.packed_dir`, or built on the fly from raw text by
`pipelines.mlm.preprocess.build_packed_datasets`) plus "eval". The train sources reach the runner through
`pipelines.train.data.GlobalStepSource`: a global row order that depends on (seed, sources, shuffle window) only,
`train.global_batch_tokens` per step whatever the world size and micro-batch size (or, with a batch-size warmup
`train.batch_warmup_*`, the budget `BatchRamp.tokens(s)` of step s; the accumulation is derived per step), so a
run resumes on another worker count or micro-batch size at the next unseen row (see docs/data_order.md). "eval" is not split: rank r evaluates micro-batches r, r+W, ... of the (unshuffled) eval set,
and the sums are all-reduced.

Masking runs on the CPU row by row: the generator of a packed row is seeded by `row_mask_seed(train.seed,
row_key)`, so a row's mask depends on the row, not on the rank, micro-batch or step that carries it; a resumed run
masks exactly like an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from neobert.config_io import to_dict
from neobert.model import NeoBERTConfig
from neobert.training import MicroBatch, mask_seed, mask_tokens, model_flops_for, peak_flops, train_step
from pipelines.tokenizer import MASK_ID, SPECIAL_IDS
from pipelines.train import run_dir as rd
from pipelines.train.collate import PackedBatch, PackedCollateFn
from pipelines.train.config import (
    ConfigError,
    LoggingSection,
    TrainJobConfig,
    TrainSection,
    load_job_config,
)
from pipelines.train.data import (
    BatchRamp,
    DataExhausted,
    GlobalStepSource,
    MixtureSection,
    SourceSection,
    check_sources,
    check_state,
    dataset_name,
    plan_accumulation,
    source_data_config,
    source_datasets,
    step_source_from_shards,
)
from pipelines.train.runner import (
    TrainRunner,
    check_world_sizes,
    fit_trainer,
    prepare_run,
    run_config,
    run_worker,
)
from pipelines.train.validation import ValidationSection, Validator, validation_config
from pipelines.train.validation import check_config as check_validation_config
from pipelines.train.validation import check_resources as check_validation_resources

log = logging.getLogger("neobert.pretrain")

REPO_ROOT = Path(__file__).resolve().parents[2]
SINGLE_SOURCE = (
    "train"  # the source name when `data.sources` is empty (one packed dir or the on-the-fly build)
)
DEFAULT_CONFIG = REPO_ROOT / "configs" / "pretrain.yaml"


# ----------------------------------------------------------------------------------------------------------------
# Config: the job's own sections
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DataSection:
    packed_dir: str = ""  # output dir of jobs/preprocess.py (train/ and eval/ Parquet); "" = build on the fly
    preprocess: dict[str, Any] = field(
        default_factory=dict
    )  # PreprocessConfig fields for the on-the-fly build
    # The train mixture: [{name, path, weight, repeat}] packed dirs mixed by token weight. Empty = one source named
    # "train" from packed_dir (or the on-the-fly build); with sources, packed_dir only supplies the eval split.
    sources: list[SourceSection] = field(default_factory=list)
    on_exhausted: Literal["stop", "renormalize"] = "stop"  # when a repeat=false source runs out
    shuffle_window_rows: int = 1024  # rows permuted together per source and epoch (0 = file order)
    prefetch_steps: int = 2  # global steps assembled ahead by a background thread per worker (0 = inline)
    prefetch_batches: int = 2  # Arrow blocks Ray reads ahead per source iterator
    pack_tokens: int = 512  # max tokens of one packed row (must match the data; checked on the driver)
    num_train_rows: int = 0  # cap on every train source, i.e. its epoch length (0 = all of it)
    num_eval_rows: int = 0  # cap on the eval set (0 = all of it)

    def __post_init__(self) -> None:
        if self.pack_tokens < 8:
            raise ValueError(f"data.pack_tokens must be >= 8, got {self.pack_tokens}")
        for name in (
            "shuffle_window_rows",
            "prefetch_steps",
            "prefetch_batches",
            "num_train_rows",
            "num_eval_rows",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.preprocess and self.packed_dir:
            raise ValueError(
                "set either data.packed_dir (preprocessed) or data.preprocess (on the fly), not both"
            )
        if self.sources and self.preprocess:
            raise ValueError(
                "data.preprocess (the on-the-fly build) has no effect with data.sources; drop one of them"
            )
        # Validates names, duplicates and on_exhausted (global_batch_tokens is the train section's).
        MixtureSection(sources=self.sources, on_exhausted=self.on_exhausted)


@dataclass
class PretrainTrainSection(TrainSection):
    tokens_per_micro_batch: int = 2048  # static token budget T of one micro-batch per worker (multiple rows)
    # Tokens of one optimizer step over all workers and micro-batches (a multiple of data.pack_tokens). 0 = resolved
    # on the driver to tokens_per_micro_batch x num_workers (one micro-batch each; elastic: x the lcm of the range),
    # or, on a resume, to the checkpoint's value (a resume cannot change it); the resolved value is what config.yaml
    # holds. Accumulation is derived from it and must be whole on every world size of the run.
    global_batch_tokens: int = 0
    # Batch-size warmup (both 0 = off; pipelines.train.data.BatchRamp): step 0 holds batch_warmup_start_tokens, each
    # level adds as many, up to global_batch_tokens, every level lasting the same number of steps so that the warmup
    # spans about batch_warmup_tokens. A function of the step only, never of the world size; the start (a multiple
    # of data.pack_tokens that divides global_batch_tokens) must split over every world size x rows per micro-batch.
    batch_warmup_start_tokens: int = 0
    batch_warmup_tokens: int = 0
    mask_prob: float = 0.2  # NeoBERT: 20% of the non-special tokens
    mask_strategy: Literal["mask", "80_10_10"] = "mask"
    loss_chunk_size: int = 2048  # rows of the chunked MLM cross-entropy (bench/loss.py: <= 0.5 GiB extra)
    # Warm start of a new run (pipelines.train.warm_start): a run, checkpoint, model or HF export dir of ours, or the
    # published NeoBERT weights. "" = random init. A run that has a checkpoint of its own resumes from it instead.
    init_from: str = ""
    init_optimizer: bool = (
        False  # also carry init_from's optimizer state (a checkpoint of the same train.optimizer)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_optimizer and not self.init_from:
            raise ValueError(
                "train.init_optimizer=true needs train.init_from (the checkpoint to carry it from)"
            )
        for name in ("tokens_per_micro_batch", "loss_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_tokens < 0:
            raise ValueError(
                f"train.global_batch_tokens must be >= 0 (0 = derived), got {self.global_batch_tokens}"
            )
        if self.batch_warmup_start_tokens < 0 or self.batch_warmup_tokens < 0:
            raise ValueError(
                f"train.batch_warmup_start_tokens and train.batch_warmup_tokens must be >= 0, got "
                f"{self.batch_warmup_start_tokens} and {self.batch_warmup_tokens}"
            )
        if (self.batch_warmup_start_tokens > 0) != (self.batch_warmup_tokens > 0):
            raise ValueError(
                f"train.batch_warmup_start_tokens={self.batch_warmup_start_tokens} and train.batch_warmup_tokens="
                f"{self.batch_warmup_tokens}: set both (> 0) for a batch-size warmup, or neither"
            )
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"train.mask_prob must lie in (0, 1), got {self.mask_prob} (NeoBERT: 0.2)")


@dataclass
class PretrainLoggingSection(LoggingSection):
    num_eval_batches: int = 4  # eval micro-batches in total (spread over the workers)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_eval_batches < 0:
            raise ValueError(f"logging.num_eval_batches must be >= 0, got {self.num_eval_batches}")


@dataclass
class PretrainConfig(TrainJobConfig):
    model: NeoBERTConfig = field(default_factory=lambda: NeoBERTConfig.preset("tiny"))
    data: DataSection = field(default_factory=DataSection)
    train: PretrainTrainSection = field(default_factory=PretrainTrainSection)
    logging: PretrainLoggingSection = field(default_factory=PretrainLoggingSection)
    # in-training evaluation of checkpoints (pipelines.eval tasks, in a Ray task; docs/evaluation.md)
    validation: ValidationSection = field(default_factory=ValidationSection)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_validation_config(self.validation, self.checkpoint.every_steps)
        t, d = self.train, self.data
        if t.tokens_per_micro_batch < d.pack_tokens:
            raise ValueError(
                f"train.tokens_per_micro_batch={t.tokens_per_micro_batch} < data.pack_tokens={d.pack_tokens}: "
                f"a micro-batch must hold at least one packed row; raise it to a multiple of {d.pack_tokens}"
            )
        if d.pack_tokens > self.model.max_position_embeddings:
            raise ValueError(
                f"data.pack_tokens={d.pack_tokens} > model.max_position_embeddings="
                f"{self.model.max_position_embeddings}; lower data.pack_tokens or raise the model field"
            )
        if t.batch_warmup_start_tokens % d.pack_tokens:
            raise ValueError(
                f"train.batch_warmup_start_tokens={t.batch_warmup_start_tokens} is not a multiple of data.pack_tokens="
                f"{d.pack_tokens}; set it to e.g. {max(1, round(t.batch_warmup_start_tokens / d.pack_tokens)) * d.pack_tokens}"
            )
        if t.global_batch_tokens:
            self.check_world_sizes()

    def ramp(self) -> BatchRamp:
        """The rows of every global step (`train.global_batch_tokens` resolved): flat, or the batch warmup."""
        t = self.train
        return BatchRamp.from_tokens(
            t.global_batch_tokens, self.data.pack_tokens, t.batch_warmup_start_tokens, t.batch_warmup_tokens
        )

    def plan(self, world_size: int) -> int:
        """Micro-batches per worker and step at the full global batch on `world_size` workers: global_batch_tokens /
        (pack_tokens x rows per micro-batch x world_size); ValueError naming the keys unless it is whole. With a batch
        warmup, the start batch must split (every level is a multiple of it); the accumulation of step s is then
        `ramp().accumulation(s, ...)`."""
        t, d = self.train, self.data
        if not t.global_batch_tokens:
            raise AssertionError("train.global_batch_tokens is resolved on the driver (resolve_config)")
        unit = d.pack_tokens * world_size * self.rows_per_micro_batch
        if t.batch_warmup_start_tokens or t.batch_warmup_tokens:
            ramp = self.ramp()  # ValueError naming the warmup keys when start / global batch do not fit
            start = t.batch_warmup_start_tokens
            if start % unit:
                good = [
                    k * unit
                    for k in range(1, t.global_batch_tokens // unit)
                    if t.global_batch_tokens % (k * unit) == 0
                ]
                hint = (
                    f"set train.batch_warmup_start_tokens to e.g. {min(good, key=lambda v: abs(v - start))}"
                    if good
                    else f"raise train.global_batch_tokens to a multiple of {unit} with room for a smaller start"
                )
                raise ValueError(
                    f"train.batch_warmup_start_tokens={start} (the first batch and the increment of the batch warmup) "
                    f"must be a multiple of data.pack_tokens={d.pack_tokens} x scaling.num_workers={world_size} x rows "
                    f"per micro-batch={self.rows_per_micro_batch} (train.tokens_per_micro_batch // data.pack_tokens) = "
                    f"{unit} tokens: {hint}, or change scaling.num_workers / train.tokens_per_micro_batch"
                )
            return ramp.accumulation(ramp.warmup_steps, world_size, self.rows_per_micro_batch)
        if t.global_batch_tokens % unit:
            raise ValueError(
                f"train.global_batch_tokens={t.global_batch_tokens} must be a multiple of data.pack_tokens="
                f"{d.pack_tokens} x scaling.num_workers={world_size} x rows per micro-batch="
                f"{self.rows_per_micro_batch} (train.tokens_per_micro_batch // data.pack_tokens) = {unit} tokens: "
                f"set train.global_batch_tokens to e.g. {max(1, round(t.global_batch_tokens / unit)) * unit}, or "
                "change scaling.num_workers / train.tokens_per_micro_batch"
            )
        return plan_accumulation(t.global_batch_tokens, d.pack_tokens, world_size, self.rows_per_micro_batch)

    def check_world_sizes(self) -> None:
        """Every world size the run may train on (each of an elastic `scaling.num_workers: [min, max]`) must split
        the global batch (with a batch warmup: its start) into whole micro-batches; else one `ConfigError` naming
        the sizes that do not."""
        if self.train.batch_warmup_start_tokens or self.train.batch_warmup_tokens:
            try:
                self.ramp()  # start / global batch of the warmup, whatever the world size
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if not self.scaling.elastic:  # one size: its own message names the keys and a value that works
            try:
                self.plan(self.scaling.max_workers)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            return
        try:
            check_world_sizes(self, self.plan)
        except ConfigError as e:
            unit = self.data.pack_tokens * self.rows_per_micro_batch * math.lcm(*self.scaling.world_sizes)
            key = (
                "batch_warmup_start_tokens" if self.train.batch_warmup_start_tokens else "global_batch_tokens"
            )
            raise ConfigError(
                f"{e}; e.g. train.{key}={unit} (or a multiple: data.pack_tokens x rows per "
                f"micro-batch x the lcm of {list(self.scaling.world_sizes)}) splits over every size of the range"
            ) from None

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per worker and step on `scaling.max_workers` workers (derived; see `plan`)."""
        return self.plan(self.scaling.max_workers)

    def mixture(self) -> MixtureSection:
        """The `MixtureSection` of the train data (`train.global_batch_tokens` must be resolved)."""
        d = self.data
        sources = d.sources or [SourceSection(SINGLE_SOURCE, d.packed_dir or "(built on the fly)")]
        return MixtureSection(
            sources=sources, global_batch_tokens=self.train.global_batch_tokens, on_exhausted=d.on_exhausted,
            shuffle_window_rows=d.shuffle_window_rows, seed=self.train.seed, prefetch_steps=d.prefetch_steps,
            batch_warmup_start_tokens=self.train.batch_warmup_start_tokens,
            batch_warmup_tokens=self.train.batch_warmup_tokens,
        )  # fmt: skip

    @property
    def rows_per_micro_batch(self) -> int:
        """Packed rows per micro-batch: each row holds <= pack_tokens tokens, so they always fit the budget."""
        return self.train.tokens_per_micro_batch // self.data.pack_tokens


def _expand_model_preset(data: dict[str, Any]) -> dict[str, Any]:
    """`model: {preset: base, num_layers: 4}` -> every NeoBERTConfig field of the preset, then the overrides."""
    model = dict(data.get("model") or {})
    preset = model.pop("preset", None)
    if preset is not None:
        model = {**to_dict(NeoBERTConfig.preset(str(preset))), **model}
    return {**data, "model": model}


def load_pretrain_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> PretrainConfig:
    """YAML (default: configs/pretrain.yaml; `base:` inheritance) + dotted overrides -> validated config."""
    return load_job_config(PretrainConfig, DEFAULT_CONFIG, path, overrides, expand=_expand_model_preset)


# ----------------------------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------------------------
def row_mask_seed(seed: int, row_key: int) -> int:
    """The seed of one packed row's mask generator: a function of (train.seed, row key) only."""
    return mask_seed(seed, row_key, 0, 0)


class PretrainRunner(TrainRunner):
    """The MLM step (CPU masking row by row, exact token-mean accumulation), MLM eval and the MLM model dir."""

    job = "pretrain"
    cfg: PretrainConfig

    def build_model(self) -> torch.nn.Module:
        import ray.train

        from neobert.model import NeoBERTForMLM

        cfg = self.cfg
        model = NeoBERTForMLM(cfg.model, loss_chunk_size=cfg.train.loss_chunk_size)
        self.warm_start = None
        if cfg.train.init_from and ray.train.get_checkpoint() is None:  # a resume loads its own checkpoint
            from pipelines.train import warm_start

            t = cfg.train
            self.warm_start = warm_start.check_warm_start(
                t.init_from, cfg.model, with_optimizer=t.init_optimizer, optimizer=t.optimizer
            )
            warm_start.load_weights(self.warm_start, model)  # before wrap_model: DDP / FSDP2 start from it
            if self.rank == 0:
                log.info("pretrain: warm start from %s (%s)", self.warm_start.path, self.warm_start.kind)
        if cfg.train.compile:
            model.encoder.compile_layers()
        self._data: GlobalStepSource | None = None
        try:  # no "eval" dataset when the preprocessing has eval_fraction=0
            self.eval_shard = ray.train.get_dataset_shard("eval")
        except (KeyError, ValueError, RuntimeError):
            self.eval_shard = None
        self._eval_batches: list | None = None
        self._last_micro_batches: list[MicroBatch] = []
        return model

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__(cfg)
        t = cfg.train
        self.collate = PackedCollateFn(
            t.tokens_per_micro_batch,
            max_pad_segment=cfg.data.pack_tokens,
            pack_tokens=cfg.data.pack_tokens,
            pin_memory=self.device.type == "cuda",
        )
        self.peak = peak_flops(self.device)
        self.ramp = cfg.ramp()  # the rows of every global step (batch warmup or flat)
        if self.rank == 0:
            log.info(
                "pretrain: %d workers on %s, attention=%s, precision=%s, %d rows x %d tokens per micro-batch, "
                "train.global_batch_tokens=%d; %s",
                self.world, self.device, self.model.attn_backend, "bf16" if self.use_bf16 else "fp32",
                cfg.rows_per_micro_batch, t.tokens_per_micro_batch, t.global_batch_tokens,
                self.ramp.describe(self.world, cfg.rows_per_micro_batch),
            )  # fmt: skip

    # -- data ----------------------------------------------------------------------------------------------------
    def open_data(self, state: dict[str, Any] | None) -> GlobalStepSource:
        """This rank's part of the global order, at the saved global position (any world or micro-batch size)."""
        cfg = self.cfg
        self._data = step_source_from_shards(
            cfg.mixture(),
            pack_tokens=cfg.data.pack_tokens,
            rows_per_micro_batch=cfg.rows_per_micro_batch,
            state=state,
            max_steps=cfg.train.num_steps - self.step,
            prefetch_batches=cfg.data.prefetch_batches,
            pin_memory=self.device.type == "cuda",
        )
        return self._data

    def progress_state(self) -> dict[str, Any]:
        """`tokens_planned`: the planned token budget of the steps done (the batch warmup's, or steps x the global
        batch), read by the model card."""
        return {"tokens_planned": self.ramp.tokens_through(self.step)}

    def load_or_resume(self) -> None:
        """The base's resume; a warm start with `train.init_optimizer` then loads the source's optimizer state."""
        super().load_or_resume()
        if self.warm_start is not None and self.cfg.train.init_optimizer:
            from pipelines.train.warm_start import load_optimizer_state

            load_optimizer_state(self.warm_start, self.ddp_model, self.optimizer)

    def on_start(self) -> None:
        """A warm start logs its eval at step 0: the loss of the loaded weights before any update."""
        if self.warm_start is not None and self.cfg.logging.num_eval_batches:
            self.timed(self.run_eval)

    def run(self) -> None:
        """The base loop; a source that runs out (`DataExhausted`) ends the run early with a final checkpoint."""
        try:
            super().run()
        except DataExhausted as e:
            if self.step == 0:
                raise ConfigError(f"no full global step of train data: {e}") from None
            if self.rank == 0:
                log.warning(
                    "pretrain: the train data ran out after step %d of train.num_steps=%d: %s; the run ends here "
                    "with a final checkpoint", self.step, self.cfg.train.num_steps, e,
                )  # fmt: skip
            metrics = self.log_metrics() if self.window.sums else {}
            every = self.cfg.checkpoint.every_steps
            if not (every > 0 and self.step % every == 0):  # else the step's checkpoint is written already
                self.save_checkpoint(metrics)
            elif metrics:
                self.report(metrics)
            self.final_report()

    def mask(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input_ids (T,), labels (T,)) on the CPU, each packed row masked by its own generator."""
        if bool((batch.row_keys < 0).any()):
            raise AssertionError("the data source left row_keys unset")  # an internal invariant
        t = self.cfg.train
        ids, labels = batch.input_ids.clone(), torch.full_like(batch.input_ids, -100)
        offsets = batch.row_offsets.tolist()
        for r, key in enumerate(batch.row_keys.tolist()):
            lo, hi = offsets[r], offsets[r + 1]
            gen = torch.Generator().manual_seed(row_mask_seed(t.seed, key))
            ids[lo:hi], labels[lo:hi] = mask_tokens(
                batch.input_ids[lo:hi],
                generator=gen,
                mask_prob=t.mask_prob,
                mask_id=MASK_ID,
                special_ids=SPECIAL_IDS,
                vocab_size=self.cfg.model.vocab_size,
                strategy=t.mask_strategy,
            )
        return ids, labels

    def to_micro_batch(self, batch: PackedBatch) -> MicroBatch:
        """Mask on the CPU, then copy to the device."""
        from neobert.packing import PackedMeta

        ids, labels = self.mask(batch)
        masked = self.model.masked_rows(labels)  # on the CPU: the model's step then has no host sync
        dev, nb = self.device, self.device.type == "cuda"
        if nb:
            ids, labels = ids.pin_memory(), labels.pin_memory()
        # Compiled blocks: one static max_seqlen (the pack bound, always >= every segment) and a symbolic number
        # of documents, so batches do not trigger recompiles.
        compiled = self.cfg.train.compile
        max_seqlen = self.cfg.data.pack_tokens if compiled else batch.max_seqlen
        meta = PackedMeta(batch.cu_seqlens, max_seqlen, batch.position_ids).to(dev, non_blocking=nb)
        if compiled:
            torch._dynamo.mark_dynamic(meta.cu_seqlens, 0)
        return MicroBatch(
            input_ids=ids.to(dev, non_blocking=nb),
            labels=labels.to(dev, non_blocking=nb),
            meta=meta,
            num_masked=masked.count,
            num_tokens=batch.num_tokens,
            masked=masked.to(dev, non_blocking=nb),
        )

    # -- step ----------------------------------------------------------------------------------------------------
    def train_step(self, batches: list[PackedBatch]) -> None:
        mbs = [self.to_micro_batch(b) for b in batches]
        lr = self.optimizer.param_groups[0]["lr"]
        stats = train_step(
            self.ddp_model, self.optimizer, self.scheduler, mbs,
            max_grad_norm=self.cfg.train.max_grad_norm, autocast=self.autocast,
        )  # fmt: skip
        flops = sum(
            model_flops_for(
                self.cfg.model,
                num_tokens=b.num_tokens,
                sum_sq_seqlens=b.sum_sq_seqlens,
                num_masked=mb.num_masked,
            )
            for b, mb in zip(batches, mbs, strict=True)
        )
        self._last_micro_batches = mbs
        self.window.add(
            loss_sum=stats.loss_sum, num_correct=stats.num_correct, num_masked=stats.num_masked_local,
            num_tokens=stats.num_tokens_local, flops=flops,
        )  # fmt: skip
        self.window.set(**{
            "train/lr": lr, "train/grad_norm": stats.grad_norm,
            # the step's token budget (it follows the batch warmup) and the planned budget of the steps so far
            "train/global_batch_tokens": float(self.ramp.tokens(self.step)),
            "train/tokens_planned": float(self.ramp.tokens_through(self.step + 1)),
        })  # fmt: skip
        if self._data is not None:  # global stats (the same on every rank): rank 0 adds the window's tokens
            data = self._data.step_stats()
            self.window.add(
                **{k: (v if self.rank == 0 else 0.0) for k, v in data.items() if k.startswith("data/tokens/")}
            )
            self.window.set(**{k: v for k, v in data.items() if not k.startswith("data/tokens/")})

    def window_metrics(self, sums: dict[str, float], elapsed: float) -> dict[str, float]:
        masked = max(sums["num_masked"], 1)
        metrics = {
            "train/loss": sums["loss_sum"] / masked,
            "train/mlm_accuracy": sums["num_correct"] / masked,
            "train/tokens_per_s": sums["num_tokens"] / elapsed,
            "train/masked_tokens": sums["num_masked"],
            **{k: v for k, v in sums.items() if k.startswith("data/tokens/")},
        }
        if self.peak:
            metrics["train/mfu"] = sums["flops"] / elapsed / (self.peak * self.world)
        return metrics

    def trace_records(self, batches: list[PackedBatch]) -> list[dict[str, Any]]:
        """Per micro-batch its rows' keys (`row_keys`: which rows of the global order it trained on), per row a
        fingerprint of tokens + mask (`row_shas`), and of the whole micro-batch (`rows_sha`: the unmasked token
        stream; `sha`: rows + masks), and its longest document segment (`max_doc_tokens`, padding left out). Syncs
        on GPU: debug and tests only."""
        out = []
        for i, (b, mb) in enumerate(zip(batches, self._last_micro_batches, strict=True)):
            ids, labels = b.input_ids.numpy(), mb.labels.cpu().numpy()
            offsets = b.row_offsets.tolist()
            row_shas = [
                hashlib.sha256(ids[lo:hi].tobytes() + labels[lo:hi].tobytes()).hexdigest()[:12]
                for lo, hi in itertools.pairwise(offsets)
            ]
            cu = b.cu_seqlens.tolist()
            real = [hi - lo for lo, hi in itertools.pairwise(cu) if hi <= offsets[-1]]
            out.append({
                "micro": i,
                "rows": b.num_rows,
                "max_doc_tokens": max(real, default=0),
                "row_keys": b.row_keys.tolist(),
                "row_shas": row_shas,
                "rows_sha": hashlib.sha256(ids.tobytes()).hexdigest()[:16],
                "sha": hashlib.sha256(ids.tobytes() + labels.tobytes()).hexdigest()[:16],
            })  # fmt: skip
        return out

    # -- eval ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Fixed eval micro-batches (same rows and masks every time), split round-robin over the ranks."""
        n = self.cfg.logging.num_eval_batches
        loss_sum, correct, masked = 0.0, 0.0, 0.0
        if n and self.eval_shard is not None:
            if self._eval_batches is None:  # the same rows every eval: read (and tokenize) once
                it = self.eval_shard.iter_torch_batches(
                    batch_size=self.cfg.rows_per_micro_batch, collate_fn=self.collate, drop_last=False,
                    device="cpu",
                )  # fmt: skip
                self._eval_batches = []
                total, spare = 0, None
                for i, b in enumerate(itertools.islice(it, n)):
                    if i % self.world == self.rank or i == 0:
                        # Eval rows are keyed by their eval position, far from any train key: same masks every eval.
                        first = (1 << 62) + i * self.cfg.rows_per_micro_batch
                        b = b.with_row_keys(torch.arange(first, first + b.num_rows))
                        if i % self.world == self.rank:
                            self._eval_batches.append((b, True))
                        spare = spare or b
                    total = i + 1
                # Under FSDP2 every forward is a collective: every rank runs ceil(total / W) of them; a rank with
                # fewer batches runs the first one again and drops its result.
                while len(self._eval_batches) < -(-total // self.world):
                    self._eval_batches.append((spare, False))
            self.model.eval()
            for batch, counted in self._eval_batches:
                mb = self.to_micro_batch(batch)
                with self.autocast():  # the model itself: no DDP collectives (FSDP2's are balanced above)
                    out = self.model(mb.input_ids, mb.meta, mb.labels, masked=mb.masked)
                if counted:
                    loss_sum += float(out.loss_sum)
                    correct += float(out.num_correct)
                    masked += mb.num_masked
            self.model.train()
        loss_sum, correct, masked = self.all_reduce([loss_sum, correct, masked])
        if masked == 0:
            if self.rank == 0 and n:
                log.warning("eval produced no masked tokens (empty eval split?); eval metrics skipped")
            return {}
        return {"eval/loss": loss_sum / masked, "eval/mlm_accuracy": correct / masked}

    # -- model dir -----------------------------------------------------------------------------------------------
    def save_model(self, path: Path, state: dict[str, torch.Tensor]) -> None:
        from neobert.checkpoint import save_model_dir

        save_model_dir(path, self.model, self.cfg.model, kind="mlm", extra={"step": self.step}, state=state)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    run_worker(PretrainRunner, PretrainConfig, config["config"])


# ----------------------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------------------
def check_packed_dir(cfg: PretrainConfig) -> None:
    """The packed dir's contract, before any worker starts: train shards exist, rows packed to data.pack_tokens."""
    from pipelines import contracts

    contracts.check_packed_dir(cfg.data.packed_dir)
    contracts.packed_pack_tokens(cfg.data.packed_dir, cfg.data.pack_tokens, user_set=True)


def check_data(cfg: PretrainConfig) -> None:
    """Driver-side data checks before Ray starts: the mixture, every packed dir and its pack size."""
    from pipelines import contracts

    if cfg.data.packed_dir and not cfg.data.sources:
        check_packed_dir(cfg)
    mix = cfg.mixture()
    if cfg.data.sources:
        check_sources(mix, cfg.data.pack_tokens)
        for s in mix.sources:
            contracts.packed_pack_tokens(s.path, cfg.data.pack_tokens, user_set=True)
    else:
        mix.check(cfg.data.pack_tokens)


def build_datasets(cfg: PretrainConfig) -> dict[str, Any]:
    """{dataset_name(source) for every train source, "eval"} Ray Datasets of packed rows (lazy)."""
    from neobert.config_io import from_dict
    from pipelines.mlm import packed_io, preprocess

    d = cfg.data
    ds: dict[str, Any] = {}
    if d.sources:
        check_data(cfg)
        ds = source_datasets(cfg.mixture())
        if d.packed_dir and packed_io.has_packed_split(d.packed_dir, "eval"):
            ds["eval"] = packed_io.read_packed(d.packed_dir, split="eval")
    elif d.packed_dir:
        # A string, not a Path: Path("s3://b/k") collapses to "s3:/b/k". Listed through pyarrow filesystems,
        # so local dirs and s3:// / gs:// / file:// URIs take the same code path.
        check_packed_dir(cfg)
        ds[dataset_name(SINGLE_SOURCE)] = packed_io.read_packed(d.packed_dir, split="train")
        if packed_io.has_packed_split(d.packed_dir, "eval"):  # absent when preprocessed with eval_fraction=0
            ds["eval"] = packed_io.read_packed(d.packed_dir, split="eval")
    else:
        # pack_tokens follows data.pack_tokens, and segments must fit a pack: max_seq_len <= pack_tokens.
        pre = {"pack_tokens": d.pack_tokens, **d.preprocess}
        if "max_seq_len" not in pre:
            pre["max_seq_len"] = min(pre["pack_tokens"], preprocess.PreprocessConfig.max_seq_len)
        pcfg = from_dict(preprocess.PreprocessConfig, pre)
        if pcfg.pack_tokens != d.pack_tokens:
            raise ConfigError(
                f"data.preprocess.pack_tokens={pcfg.pack_tokens} != data.pack_tokens={d.pack_tokens}; "
                "set them equal (or drop data.preprocess.pack_tokens: it defaults to data.pack_tokens)"
            )
        built = preprocess.build_packed_datasets(pcfg)  # the on-the-fly build is the one source
        ds[dataset_name(SINGLE_SOURCE)] = built.pop("train")
        ds.update(built)
    if d.num_train_rows:
        for name in [k for k in ds if k != "eval"]:
            ds[name] = ds[name].limit(d.num_train_rows)
    if d.num_eval_rows and "eval" in ds:
        ds["eval"] = ds["eval"].limit(d.num_eval_rows)
    return ds


def build_trainer(
    cfg: PretrainConfig, datasets: dict[str, Any] | None = None, validator: Validator | None = None
):
    """The `TorchTrainer` for `cfg` (datasets built from `cfg.data` unless given; `cfg` resolved; `validator`
    scores the checkpoints when `validation.every_steps` > 0)."""
    from ray.train.torch import TorchTrainer

    datasets = datasets if datasets is not None else build_datasets(cfg)
    sc = cfg.scaling
    return TorchTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg)},
        scaling_config=sc.ray_scaling_config(),
        datasets=datasets,
        # Nothing split: every worker reads every train source in full, in the same order (the global order
        # does not depend on the world size); eval is not split either (each rank takes its micro-batches).
        dataset_config=source_data_config(),
        run_config=run_config(cfg),
        validation_config=validation_config(cfg, validator),  # None when validation.every_steps = 0
    )


def latest_train_state(cfg: PretrainConfig) -> dict[str, Any] | None:
    """The JSON train state of the run dir's latest complete checkpoint (what a fit resumes from), or None."""
    latest = rd.latest_checkpoint(cfg.run_dir)
    return None if latest is None else rd.read_train_state(latest)


def resolve_config(cfg: PretrainConfig, saved: dict[str, Any] | None = None) -> PretrainConfig:
    """Driver side: `train.global_batch_tokens` = 0 becomes the checkpoint's value on a resume (`saved`: its train
    state), else tokens_per_micro_batch x num_workers (elastic [min, max]: x the lcm of min..max, so that every
    size of the range splits it); checked against every world size of the run."""
    t = cfg.train
    if t.global_batch_tokens:
        value = t.global_batch_tokens
    else:
        prev = ((saved or {}).get("config") or {}).get("train", {}).get("global_batch_tokens") or 0
        value = prev or t.tokens_per_micro_batch * math.lcm(*cfg.scaling.world_sizes)
    return dataclasses.replace(cfg, train=dataclasses.replace(t, global_batch_tokens=value))


def check_pretrain_resume(cfg: PretrainConfig, saved: dict[str, Any]) -> None:
    """A resume the data order cannot continue is refused before Ray starts; any world size and micro-batch size
    is accepted (the position is global: the run continues at the next unseen row)."""
    try:
        check_state(cfg.mixture(), saved.get("data"), cfg.data.pack_tokens)
    except ValueError as e:
        raise ConfigError(f"{cfg.run_dir} cannot resume: {e}") from None
    if saved["world_size"] not in cfg.scaling.world_sizes or (
        saved.get("config", {}).get("train", {}).get("tokens_per_micro_batch")
        != cfg.train.tokens_per_micro_batch
    ):
        log.info(
            "resuming a run written by %d workers at train.tokens_per_micro_batch=%s on %s workers at %d: the "
            "global order continues at the next unseen row",
            saved["world_size"], saved.get("config", {}).get("train", {}).get("tokens_per_micro_batch"),
            cfg.scaling.num_workers, cfg.train.tokens_per_micro_batch,
        )  # fmt: skip


def prepare_pretrain_run(cfg: PretrainConfig, *, check_inputs: bool = True) -> PretrainConfig:
    """Everything the driver does before Ray Train starts; returns the resolved config (the one to train with):
    `train.global_batch_tokens` resolved, the data checked (`check_inputs`), a resume checked against the latest
    checkpoint, then `runner.prepare_run` (incomplete checkpoints removed, the resolved `config.yaml` written)."""
    saved = latest_train_state(cfg)
    cfg = resolve_config(cfg, saved)
    cfg.check_world_sizes()  # also on load; again here for the resolved global batch (never reaches a worker)
    if check_inputs:
        check_data(cfg)
    else:
        cfg.mixture().check(cfg.data.pack_tokens)
    if saved is not None:
        check_pretrain_resume(cfg, saved)
    elif cfg.train.init_from:
        from pipelines.train.warm_start import check_warm_start

        t = cfg.train
        try:
            check_warm_start(t.init_from, cfg.model, with_optimizer=t.init_optimizer, optimizer=t.optimizer)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    # No resume hook for prepare_run: its check refuses another world size, which the global order allows.
    prepare_run(cfg)
    return cfg


def fit(
    cfg: PretrainConfig,
    datasets: dict[str, Any] | None = None,
    validator: Validator | None = None,
    *,
    prepared: bool = False,
):
    """Run (or resume) the pretraining job `cfg`; returns Ray Train's `Result`. The driver resolves and checks
    everything first (`prepare_pretrain_run`; `prepared=True`: the caller did, and `cfg` is its result): config
    and data errors never reach a worker. `validator` (e.g. `pipelines.eval.in_training.VALIDATOR`) scores
    checkpoints in the background when `validation.every_steps` > 0 (`pipelines.train.validation`)."""
    if cfg.validation.every_steps and validator is not None:
        validator.check(cfg.validation)
    if not prepared:
        cfg = prepare_pretrain_run(cfg, check_inputs=datasets is None)
    check_validation_resources(cfg.validation, use_gpu=cfg.scaling.use_gpu)
    return fit_trainer(build_trainer(cfg, datasets, validator), cfg)
