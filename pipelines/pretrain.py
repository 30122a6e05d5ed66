"""MLM pretraining on Ray Train: the typed config, the `TorchTrainer` builder and the per-worker runner.

    jobs/pretrain.py --config configs/pretrain.yaml --train.num_steps 100
      -> load_pretrain_config -> build_trainer(cfg) -> trainer.fit()
         each worker: train_loop_per_worker(config) -> PretrainRunner(cfg).run()

Data flow: `datasets={"train", "eval"}` (packed rows from a preprocessed dir, or built on the fly from raw
text by `pipelines.mlm.preprocess.build_packed_datasets`). "train" is split across workers with
`streaming_split(equal=True)` (Ray Train's `DataConfig`) under `preserve_order=True`, which makes the split
deterministic: the splitter hands each bundle to the output with the fewest rows, so for a fixed input order
and worker count every worker sees the same rows in every run, and every worker gets the same number of rows
per epoch (equal=True), hence the same number of micro-batches (drop_last=True) -- the workers stay in
lockstep. Each worker shuffles locally with a buffer seeded by (seed, epoch, rank), so the order is
reproducible and each epoch reshuffles. A daemon thread per worker (`EpochPrefetcher`) reads the shard epoch
after epoch into a bounded queue, so the next epoch's (slow) start overlaps the current epoch's last steps
instead of stalling the loop at every epoch end. "eval" is not split: rank r evaluates micro-batches r, r+W, ...
of the (unshuffled) eval set, and the sums are all-reduced.

Resume: Ray restarts a dataset shard from its beginning, so the checkpoint stores the data position (epoch,
micro-batches consumed in that epoch, counted from what the loop dequeued, not from what the thread read
ahead); a resumed worker re-creates the epoch's iterator with the same shuffle seed and skips the consumed
micro-batches, continuing at the next unseen row. Masking is keyed by (seed, step, rank, micro-batch), so a
resumed run also masks identically.

A checkpoint directory holds `model/` (`neobert.checkpoint.save_model_dir`) and `train_state.pt` (optimizer,
scheduler, step, data position, RNG states, config).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import queue
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import torch

from neobert.config_io import deep_merge, from_dict, load_yaml_dict, parse_overrides, to_dict
from neobert.model import NeoBERTConfig
from neobert.training import (
    MicroBatch,
    build_optimizer,
    build_scheduler,
    mask_seed,
    mask_tokens,
    model_flops,
    peak_flops,
    train_step,
)
from pipelines.tokenizer import MASK_ID, SPECIAL_IDS

log = logging.getLogger("neobert.pretrain")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "pretrain.yaml"
TRAIN_STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DataSection:
    packed_dir: str = ""  # output dir of jobs/preprocess.py (train/ and eval/ Parquet); "" = build on the fly
    preprocess: dict[str, Any] = field(
        default_factory=dict
    )  # PreprocessConfig fields for the on-the-fly build
    pack_tokens: int = 512  # max tokens of one packed row (must match the data; checked by the collate)
    shuffle_buffer_rows: int = 64  # local shuffle buffer per worker (rows); 0 = no shuffle
    prefetch_batches: int = 4  # micro-batches collated ahead in Ray's prefetch threads (within an epoch)
    read_ahead_batches: int = 16  # collated micro-batches a reader thread keeps queued, across epoch ends
    num_train_rows: int = 0  # cap on the train set, i.e. the epoch length (0 = all of it)
    num_eval_rows: int = 0  # cap on the eval set (0 = all of it)

    def __post_init__(self) -> None:
        if self.pack_tokens < 8:
            raise ValueError(f"data.pack_tokens must be >= 8, got {self.pack_tokens}")
        for name in ("shuffle_buffer_rows", "prefetch_batches", "num_train_rows", "num_eval_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.read_ahead_batches < 1:
            raise ValueError(
                f"data.read_ahead_batches must be >= 1, got {self.read_ahead_batches}; it is how many micro-batches "
                "are queued ahead of the steps, which hides an epoch's start-up that takes fewer steps than that"
            )


@dataclass
class TrainSection:
    num_steps: int = 60  # optimizer steps in total (a resumed run continues up to this)
    tokens_per_micro_batch: int = 2048  # static token budget T of one micro-batch per worker (multiple rows)
    num_micro_batches: int = 1  # gradient-accumulation micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final LR = lr * min_lr_ratio
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.01  # not applied to norms, biases, embeddings
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    max_grad_norm: float = 1.0  # 0 = no clipping
    mask_prob: float = 0.2  # NeoBERT: 20% of the non-special tokens
    mask_strategy: Literal["mask", "80_10_10"] = "mask"
    seed: int = 0
    compile: bool = False  # torch.compile each encoder block
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU
    loss_chunk_size: int = 2048  # rows of the chunked MLM cross-entropy (bench/loss.py: <= 0.5 GiB extra)

    def __post_init__(self) -> None:
        for name in ("num_steps", "tokens_per_micro_batch", "num_micro_batches", "loss_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_steps <= self.num_steps:
            raise ValueError(
                f"train.warmup_steps={self.warmup_steps} must lie in [0, num_steps={self.num_steps}]"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"train.mask_prob must lie in (0, 1), got {self.mask_prob} (NeoBERT: 0.2)")
        if self.max_grad_norm < 0:
            raise ValueError(f"train.max_grad_norm must be >= 0 (0 = off), got {self.max_grad_norm}")


@dataclass
class CheckpointSection:
    every_steps: int = 20  # also always at the last step
    num_to_keep: int = 2
    storage_path: str = "outputs/pretrain"  # local dir (made absolute) or a URI every node can reach
    name: str = "neobert-pretrain"  # re-using a name with the same storage_path resumes that run

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.num_to_keep < 1:
            raise ValueError("checkpoint.every_steps and checkpoint.num_to_keep must be >= 1")
        if not self.name or "/" in self.name:
            raise ValueError(f"checkpoint.name must be a non-empty name without '/', got {self.name!r}")


@dataclass
class ScalingSection:
    num_workers: int = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(
        default_factory=dict
    )  # e.g. {"CPU": 0.5}: leave room for Data

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"scaling.num_workers must be >= 1, got {self.num_workers}")


@dataclass
class FailureSection:
    max_failures: int = 0  # worker-group restarts from the latest checkpoint (-1 = unlimited)
    inject_failure_at_step: int = (
        0  # tests: the last rank raises at this step of an attempt that did not resume
    )

    def __post_init__(self) -> None:
        if self.inject_failure_at_step < 0:
            raise ValueError(
                f"failure.inject_failure_at_step must be >= 0 (0 = off), got {self.inject_failure_at_step}"
            )


@dataclass
class LoggingSection:
    every_steps: int = 5
    eval_every_steps: int = 20  # 0 = only at the end
    num_eval_batches: int = 4  # eval micro-batches in total (spread over the workers)
    tensorboard: bool = False  # rank 0 writes TensorBoard events under <run dir>/tensorboard
    mlflow_tracking_uri: str = ""  # "" = off; else rank 0 logs metrics to this MLflow server/dir
    trace_data: bool = (
        False  # each rank appends a fingerprint of every micro-batch to data_trace.rank<r>.jsonl
    )

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.eval_every_steps < 0 or self.num_eval_batches < 0:
            raise ValueError("logging.every_steps must be >= 1; eval_every_steps and num_eval_batches >= 0")


@dataclass
class PretrainConfig:
    model: NeoBERTConfig = field(default_factory=lambda: NeoBERTConfig.preset("tiny"))
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    failure: FailureSection = field(default_factory=FailureSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self) -> None:
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
        f = self.failure
        if f.inject_failure_at_step and f.inject_failure_at_step <= self.checkpoint.every_steps:
            raise ValueError(
                f"failure.inject_failure_at_step={f.inject_failure_at_step} must come after the first checkpoint "
                f"(checkpoint.every_steps={self.checkpoint.every_steps}), else the restarted attempt starts from "
                f"scratch and crashes again"
            )
        if f.inject_failure_at_step > t.num_steps:
            raise ValueError(
                f"failure.inject_failure_at_step={f.inject_failure_at_step} > train.num_steps={t.num_steps}"
            )
        if d.preprocess and d.packed_dir:
            raise ValueError(
                "set either data.packed_dir (preprocessed) or data.preprocess (on the fly), not both"
            )

    @property
    def rows_per_micro_batch(self) -> int:
        """Packed rows per micro-batch: each row holds <= pack_tokens tokens, so they always fit the budget."""
        return self.train.tokens_per_micro_batch // self.data.pack_tokens

    @property
    def run_dir(self) -> str:
        return os.path.join(self.checkpoint.storage_path, self.checkpoint.name)


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
    data = load_yaml_dict(path or DEFAULT_CONFIG)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    cfg = from_dict(PretrainConfig, _expand_model_preset(data))
    storage = cfg.checkpoint.storage_path
    if "://" not in storage:  # relative paths are relative to where the job runs; make them absolute
        cfg.checkpoint.storage_path = str(Path(storage).expanduser().resolve())
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Driver side: datasets + TorchTrainer
# ----------------------------------------------------------------------------------------------------------------
def build_datasets(cfg: PretrainConfig) -> dict[str, Any]:
    """{"train", "eval"} Ray Datasets of packed rows (lazy)."""
    from pipelines.mlm import packed_io, preprocess

    if cfg.data.packed_dir:
        # A string, not a Path: Path("s3://b/k") collapses to "s3:/b/k". Listed through pyarrow filesystems,
        # so local dirs and s3:// / gs:// / file:// URIs take the same code path.
        root = cfg.data.packed_dir
        if not packed_io.has_packed_split(root, "train"):
            raise ValueError(
                f"data.packed_dir={root} has no train/*.parquet shards; run `python jobs/preprocess.py --output "
                f"{root}` first or leave data.packed_dir empty to preprocess on the fly"
            )
        ds = {"train": packed_io.read_packed(root, split="train")}
        if packed_io.has_packed_split(root, "eval"):  # absent when preprocessed with eval_fraction=0
            ds["eval"] = packed_io.read_packed(root, split="eval")
    else:
        # pack_tokens follows data.pack_tokens, and segments must fit a pack: max_seq_len <= pack_tokens.
        pre = {"pack_tokens": cfg.data.pack_tokens, **cfg.data.preprocess}
        if "max_seq_len" not in pre:
            pre["max_seq_len"] = min(pre["pack_tokens"], preprocess.PreprocessConfig.max_seq_len)
        pcfg = from_dict(preprocess.PreprocessConfig, pre)
        if pcfg.pack_tokens != cfg.data.pack_tokens:
            raise ValueError(
                f"data.preprocess.pack_tokens={pcfg.pack_tokens} != data.pack_tokens={cfg.data.pack_tokens}; "
                "set them equal (or drop data.preprocess.pack_tokens: it defaults to data.pack_tokens)"
            )
        ds = preprocess.build_packed_datasets(pcfg)
    if cfg.data.num_train_rows:
        ds["train"] = ds["train"].limit(cfg.data.num_train_rows)
    if cfg.data.num_eval_rows and "eval" in ds:
        ds["eval"] = ds["eval"].limit(cfg.data.num_eval_rows)
    return ds


def check_optional_packages(cfg: PretrainConfig) -> None:
    """Fail on the driver, before any worker starts, when an enabled logger's package is missing."""
    import importlib.util

    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("logging.tensorboard=true needs `pip install tensorboard` (or set it to false)")
    if cfg.logging.mlflow_tracking_uri and importlib.util.find_spec("mlflow") is None:
        raise ValueError(
            f"logging.mlflow_tracking_uri={cfg.logging.mlflow_tracking_uri!r} needs `pip install mlflow` "
            "(or set it to an empty string)"
        )


def build_trainer(cfg: PretrainConfig, datasets: dict[str, Any] | None = None):
    """The `TorchTrainer` for `cfg` (datasets built from `cfg.data` unless given)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_optional_packages(cfg)
    datasets = datasets if datasets is not None else build_datasets(cfg)
    sc = cfg.scaling
    return TorchTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg)},
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=sc.resources_per_worker or None,
        ),
        datasets=datasets,
        # preserve_order: deterministic row -> worker assignment and order (resume + reproducibility).
        dataset_config=DataConfig(
            datasets_to_split=["train"], execution_options=ExecutionOptions(preserve_order=True)
        ),
        run_config=RunConfig(
            name=cfg.checkpoint.name,
            storage_path=cfg.checkpoint.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
        ),
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = from_dict(PretrainConfig, config["config"])
    PretrainRunner(cfg).run()


# ----------------------------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------------------------
def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**31 - 1)


T = TypeVar("T")


@dataclass(frozen=True)
class EpochEnd:
    """Stream marker: epoch `epoch` was read to its end and held `num_batches` batches (skipped ones included)."""

    epoch: int
    num_batches: int


@dataclass(frozen=True)
class _ProducerError:
    exc: BaseException


_PRODUCER_DONE = object()


class EpochPrefetcher(Generic[T]):
    """Reads a dataset shard epoch after epoch in a daemon thread, into a bounded queue, across epoch ends.

    Why: opening an epoch's iterator restarts the shard's streaming execution (for `streaming_split`, after a
    barrier that polls every 0.1 s until all workers arrive) and refills the local shuffle buffer; Ray's
    prefetching only starts with the new iterator, so the first batch of every epoch used to stall the training
    loop (H100, base preset: `data/wait_fraction` 0.1% inside epochs, 6.5-7.9% in windows with an epoch end).
    Here the thread opens epoch e+1 as soon as it has read epoch e's last batch, while the training loop still
    has up to `queue_size` batches of epoch e queued.

    Items, in order: `(epoch, index, batch)` per batch (`index` counts from 0 within the epoch; the first `skip`
    batches of `start_epoch` are read and dropped, for a resume), and `EpochEnd(epoch, num_batches)` after an
    epoch's last batch. `open_epoch(e)` must return epoch e's iterable (each worker's own seeded shuffle).
    The stream ends
    - after `max_batches` batches (None = endless), without opening another epoch: an epoch nobody reads would
      leave the other workers' `streaming_split` barrier waiting, and its iterator would hold resources;
    - after an epoch that held no batch, or fewer than `skip` (its `EpochEnd` still comes, so the consumer can
      say why).
    An exception in the thread is re-raised by the consumer's `next()`, the same object with the thread's
    traceback. `close()` (also on `with` exit) stops the thread and closes the open epoch's iterator; the thread
    is a daemon, so one blocked inside the shard (e.g. at a barrier) never holds up the process.
    """

    def __init__(
        self,
        open_epoch: Callable[[int], Iterable[T]],
        *,
        start_epoch: int = 0,
        skip: int = 0,
        max_batches: int | None = None,
        queue_size: int = 2,
        name: str = "epoch-prefetch",
    ) -> None:
        if queue_size < 1 or skip < 0 or start_epoch < 0 or (max_batches is not None and max_batches < 0):
            raise ValueError(
                f"EpochPrefetcher needs queue_size >= 1 and skip, start_epoch, max_batches >= 0; got "
                f"queue_size={queue_size}, skip={skip}, start_epoch={start_epoch}, max_batches={max_batches}"
            )
        self._open_epoch = open_epoch
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._produce, args=(start_epoch, skip, max_batches), name=name, daemon=True
        )
        self._thread.start()

    # -- producer (background thread) -------------------------------------------------------------------------
    def _put(self, item: Any) -> bool:
        """Blocking put that gives up once `close()` was called (False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, epoch: int, skip: int, max_batches: int | None) -> None:
        produced = 0
        try:
            while max_batches is None or produced < max_batches:
                it = iter(self._open_epoch(epoch))
                index = 0
                try:
                    # Check the budget before every next(): never request a batch nobody will consume.
                    while not self._stop.is_set() and (max_batches is None or produced < max_batches):
                        try:
                            batch = next(it)
                        except StopIteration:
                            break
                        if index >= skip:
                            if not self._put((epoch, index, batch)):
                                return
                            produced += 1
                        index += 1
                    else:
                        return  # stopped, or the budget is spent mid-epoch: no EpochEnd, no new epoch
                finally:
                    close = getattr(it, "close", None)
                    if close is not None:
                        close()  # Ray: ends the epoch's iteration now (notifies the split coordinator)
                if not self._put(EpochEnd(epoch, index)) or index == 0 or index < skip:
                    return
                epoch, skip = epoch + 1, 0
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(_ProducerError(exc))
        finally:
            self._put(_PRODUCER_DONE)

    # -- consumer -------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[int, int, T] | EpochEnd]:
        return self

    def __next__(self) -> tuple[int, int, T] | EpochEnd:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _PRODUCER_DONE:
            self._done = True
            raise StopIteration
        if isinstance(item, _ProducerError):
            self._done = True
            self.close()
            raise item.exc  # the thread's traceback stays attached (exc.__traceback__)
        return item

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and wait up to `timeout_s` for it (it may be blocked inside the shard: a daemon)."""
        self._stop.set()
        self._done = True
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.debug("%s still blocked in the data source after close(); left to exit with the process",
                      self._thread.name)  # fmt: skip

    def __enter__(self) -> EpochPrefetcher[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PretrainRunner:
    """One worker's training loop. `run()`: resume -> loop {step -> log -> eval -> checkpoint} -> final report.

    Eval runs before the checkpoint of the same step so that the checkpoint's reported metrics include it.
    """

    def __init__(self, cfg: PretrainConfig) -> None:
        import ray.train
        import ray.train.torch

        from neobert.model import NeoBERTForMLM

        self.cfg = cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        # Identical init on every rank (DDP broadcasts rank 0's weights anyway).
        torch.manual_seed(cfg.train.seed)
        model = NeoBERTForMLM(cfg.model, loss_chunk_size=cfg.train.loss_chunk_size)
        self.attn_backend = model.attn_backend
        if cfg.train.compile:
            model.encoder.compile_layers()
        self.model = ray.train.torch.prepare_model(model)
        self.raw_model = model
        t = cfg.train
        self.optimizer = build_optimizer(
            model, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), eps=t.eps
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            warmup_steps=t.warmup_steps,
            total_steps=t.num_steps,
            schedule=t.schedule,
            min_lr_ratio=t.min_lr_ratio,
        )
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
        )
        self.train_shard = ray.train.get_dataset_shard("train")
        try:  # no "eval" dataset when the preprocessing has eval_fraction=0
            self.eval_shard = ray.train.get_dataset_shard("eval")
        except (KeyError, ValueError, RuntimeError):
            self.eval_shard = None
        from pipelines.collate import PackedCollateFn

        self.collate = PackedCollateFn(
            t.tokens_per_micro_batch,
            max_pad_segment=cfg.data.pack_tokens,
            pack_tokens=cfg.data.pack_tokens,
            pin_memory=self.device.type == "cuda",
        )
        self.peak = peak_flops(self.device)
        # State that a checkpoint restores.
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches of `epoch` consumed by completed steps
        self.resumed = False
        # metrics.jsonl / tensorboard/ (rank 0) and data_trace.rank<r>.jsonl, staged locally for a URI run dir.
        self.files = RunFiles(cfg.run_dir)
        if cfg.logging.trace_data:
            self.files.fetch(self.trace_name)
        self.sinks = _MetricSinks(cfg, self.files) if self.rank == 0 else None
        self._window = _Window()
        self._eval_batches: list | None = None
        if self.rank == 0:
            log.info(
                "pretrain: %d workers on %s, attention=%s, precision=%s, %d rows x %d tokens per micro-batch",
                self.world, self.device, self.attn_backend, "bf16" if use_bf16 else "fp32",
                cfg.rows_per_micro_batch, t.tokens_per_micro_batch,
            )  # fmt: skip

    # -- the table of contents --------------------------------------------------------------------------------
    def run(self) -> None:
        self.load_or_resume()
        with self.open_train_stream() as stream:  # closed on the way out, also on an exception
            batches = self.micro_batches(stream)
            while self.step < self.cfg.train.num_steps:
                stats = self.train_one_step(batches)
                self.step += 1
                metrics: dict[str, float] = {}
                if self.due(self.cfg.logging.every_steps):
                    metrics |= self.log_metrics(stats)
                if self.due(self.cfg.logging.eval_every_steps):
                    metrics |= self.evaluate()
                if self.due(self.cfg.checkpoint.every_steps):
                    self.save_checkpoint(metrics)
                elif metrics:
                    self.report(metrics)
                self.maybe_inject_failure()
        self.final_report()

    def due(self, every: int) -> bool:
        """Every `every` steps (0 = never) and always at the last step."""
        return (every > 0 and self.step % every == 0) or self.step == self.cfg.train.num_steps

    # -- resume ---------------------------------------------------------------------------------------------
    def load_or_resume(self) -> None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            if self.sinks:
                self.sinks.truncate_after(0)
            return
        with ckpt.as_directory() as d:
            from safetensors.torch import load_file

            state = torch.load(Path(d) / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
            weights = load_file(str(Path(d) / "model" / "model.safetensors"))
        if state["world_size"] != self.world:
            raise ValueError(
                f"checkpoint {ckpt.path} was written by {state['world_size']} workers but this run has {self.world}; "
                f"the data position is per worker, so resume with scaling.num_workers={state['world_size']}"
            )
        self.raw_model.load_state_dict(weights, strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batches_in_epoch = (
            state["step"],
            state["epoch"],
            state["batches_in_epoch"],
        )
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.resumed = True
        if self.sinks:
            self.sinks.truncate_after(self.step)
        if self.rank == 0:
            log.info("resumed from %s at step %d (epoch %d, micro-batch %d)", ckpt.path, self.step, self.epoch,
                     self.batches_in_epoch)  # fmt: skip
            if self.step >= self.cfg.train.num_steps:
                log.warning(
                    "this run already finished (step %d of train.num_steps=%d), so nothing is trained; start a "
                    "new run with another --checkpoint.name, or continue it with a larger --train.num_steps",
                    self.step, self.cfg.train.num_steps,
                )  # fmt: skip

    # -- data -----------------------------------------------------------------------------------------------
    def open_train_stream(self) -> EpochPrefetcher:
        """The train shard, epoch after epoch, read ahead by a background thread (`EpochPrefetcher`).

        It starts at the resumed position and reads exactly the micro-batches the remaining steps consume, so
        every worker opens the same epochs (`streaming_split` needs all of them at each epoch's start) and none
        is opened past the last step.
        """
        cfg = self.cfg
        shuffle = cfg.data.shuffle_buffer_rows

        def open_epoch(epoch: int):
            return self.train_shard.iter_torch_batches(
                batch_size=cfg.rows_per_micro_batch,
                collate_fn=self.collate,
                drop_last=True,
                prefetch_batches=cfg.data.prefetch_batches,
                local_shuffle_buffer_size=shuffle or None,
                local_shuffle_seed=shuffle_seed(cfg.train.seed, epoch, self.rank) if shuffle else None,
                device="cpu",
            )

        return EpochPrefetcher(
            open_epoch,
            start_epoch=self.epoch,
            skip=self.batches_in_epoch,  # consumed before the checkpoint we resumed from
            max_batches=(cfg.train.num_steps - self.step) * cfg.train.num_micro_batches,
            queue_size=cfg.data.read_ahead_batches,
            name=f"train-data-rank{self.rank}",
        )

    def micro_batches(self, stream: EpochPrefetcher):
        """Collated micro-batches in order; (epoch, batches_in_epoch) track the position the steps consumed
        (what a checkpoint stores), not how far the prefetch thread has read."""
        cfg, skip = self.cfg, self.batches_in_epoch
        for item in stream:
            if isinstance(item, EpochEnd):
                self.check_epoch_end(item, skip)
                self.epoch, self.batches_in_epoch, skip = item.epoch + 1, 0, 0
                continue
            self.epoch, index, batch = item
            self.batches_in_epoch = index + 1
            yield batch
        raise RuntimeError(
            f"rank {self.rank}: the train stream ended at epoch {self.epoch}, micro-batch {self.batches_in_epoch} "
            f"before step {cfg.train.num_steps} (its budget is the remaining steps x train.num_micro_batches)"
        )

    def check_epoch_end(self, end: EpochEnd, skip: int) -> None:
        cfg = self.cfg
        if end.num_batches == 0:
            raise ValueError(
                f"rank {self.rank}: the train shard yielded no full micro-batch of {cfg.rows_per_micro_batch} "
                f"rows in epoch {end.epoch}; use more data, fewer workers or a smaller train.tokens_per_micro_batch"
            )
        if end.num_batches < skip:
            raise ValueError(
                f"rank {self.rank}: resume position {skip} micro-batches is past the end of epoch {end.epoch} "
                f"({end.num_batches} micro-batches); the dataset or the batch size changed since the checkpoint"
            )
        if self.rank == 0 and end.epoch == 0:
            log.info(
                "epoch 0: %d micro-batches of %d rows per worker; each epoch leaves out a tail of < %d rows "
                "per worker (drop_last) and up to %d rows trimmed by streaming_split(equal=True)",
                end.num_batches, cfg.rows_per_micro_batch, cfg.rows_per_micro_batch, self.world - 1,
            )  # fmt: skip

    def to_micro_batch(self, batch, seed_key: tuple[int, int, int]) -> MicroBatch:
        """Mask on the CPU (seeded by step/rank/micro-batch), then copy to the device."""
        from neobert.packing import PackedMeta

        gen = torch.Generator().manual_seed(mask_seed(self.cfg.train.seed, *seed_key))
        ids, labels = mask_tokens(
            batch.input_ids,
            generator=gen,
            mask_prob=self.cfg.train.mask_prob,
            mask_id=MASK_ID,
            special_ids=SPECIAL_IDS,
            vocab_size=self.cfg.model.vocab_size,
            strategy=self.cfg.train.mask_strategy,
        )
        masked = self.raw_model.masked_rows(labels)  # on the CPU: the model's step then has no host sync
        num_masked = masked.count
        dev, nb = self.device, self.device.type == "cuda"
        if nb:
            ids, labels = ids.pin_memory(), labels.pin_memory()
        # Compiled blocks: one static max_seqlen (the pack bound, always >= every segment, as bench/train_step.py
        # does) and a symbolic number of documents, so batches do not trigger recompiles.
        compiled = self.cfg.train.compile
        max_seqlen = self.cfg.data.pack_tokens if compiled else batch.max_seqlen
        meta = PackedMeta(batch.cu_seqlens, max_seqlen, batch.position_ids).to(dev, non_blocking=nb)
        if compiled:
            torch._dynamo.mark_dynamic(meta.cu_seqlens, 0)
        return MicroBatch(
            input_ids=ids.to(dev, non_blocking=nb),
            labels=labels.to(dev, non_blocking=nb),
            meta=meta,
            num_masked=num_masked,
            num_tokens=batch.num_tokens,
            masked=masked.to(dev, non_blocking=nb),
        )

    @property
    def trace_name(self) -> str:
        return f"data_trace.rank{self.rank}.jsonl"

    def trace(self, raw, mbs) -> None:
        """Reproducibility trace (debug/tests; syncs on GPU): per micro-batch of a completed step a fingerprint
        of its rows (`rows_sha`: the unmasked token stream) and of rows + masks (`sha`)."""
        import hashlib

        with self.files.path(self.trace_name).open("a") as f:
            for i, (b, mb) in enumerate(zip(raw, mbs, strict=True)):
                rows = b.input_ids.numpy().tobytes()
                rec = {
                    "step": self.step + 1,
                    "micro": i,
                    "epoch": self.epoch,
                    "rows": b.num_rows,
                    "rows_sha": hashlib.sha256(rows).hexdigest()[:16],
                    "sha": hashlib.sha256(rows + mb.labels.cpu().numpy().tobytes()).hexdigest()[:16],
                }
                f.write(json.dumps(rec) + "\n")

    # -- step -----------------------------------------------------------------------------------------------
    def train_one_step(self, batches):
        t0 = time.perf_counter()
        raw = [next(batches) for _ in range(self.cfg.train.num_micro_batches)]
        t1 = time.perf_counter()
        mbs = [self.to_micro_batch(b, (self.step, self.rank, i)) for i, b in enumerate(raw)]
        lr = self.optimizer.param_groups[0]["lr"]
        stats = train_step(
            self.model,
            self.optimizer,
            self.scheduler,
            mbs,
            max_grad_norm=self.cfg.train.max_grad_norm,
            autocast=self.autocast,
        )
        if self.cfg.logging.trace_data:
            # After the step: the trace lists what completed steps trained on. A step whose batch was read but
            # which never finished (a peer crashed; DDP's all-reduce never returns) is not in it.
            self.trace(raw, mbs)
        m = self.cfg.model
        flops = sum(
            model_flops(
                num_layers=m.num_layers,
                hidden_size=m.hidden_size,
                ffn_hidden_size=m.ffn_hidden_size,
                vocab_size=m.padded_vocab_size,
                num_tokens=b.num_tokens,
                sum_sq_seqlens=b.sum_sq_seqlens,
                num_masked=mb.num_masked,
            )
            for b, mb in zip(raw, mbs, strict=True)
        )
        self._window.add(stats, wait_s=t1 - t0, flops=flops, lr=lr)
        return stats

    # -- logging --------------------------------------------------------------------------------------------
    def _all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def log_metrics(self, stats) -> dict[str, float]:
        """Aggregate the window since the last log over all ranks; rank 0 writes it out."""
        w = self._window
        loss_sum, correct = float(w.loss_sum), float(w.num_correct)  # the one device sync of the window
        elapsed = time.perf_counter() - w.t0
        loss_sum, correct, masked, tokens, wait_frac, flops = self._all_reduce(
            [loss_sum, correct, w.num_masked, w.num_tokens, w.wait_s / elapsed, w.flops]
        )
        metrics = {
            "train/loss": loss_sum / max(masked, 1),
            "train/mlm_accuracy": correct / max(masked, 1),
            "train/tokens_per_s": tokens / elapsed,
            "data/wait_fraction": wait_frac / self.world,
            "train/lr": w.lr,
            "train/grad_norm": float(stats.grad_norm),
            "train/masked_tokens": masked,
            "train/epoch": self.epoch,
        }
        if self.peak:
            metrics["train/mfu"] = flops / elapsed / (self.peak * self.world)
        self._window = _Window()
        self.emit(metrics)
        return metrics

    def emit(self, metrics: dict[str, float]) -> None:
        if self.sinks:
            self.sinks.write(self.step, metrics)
            log.info("step %d %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    # -- eval -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Fixed eval micro-batches (same rows and masks every time), split round-robin over the ranks."""
        t0 = time.perf_counter()
        n = self.cfg.logging.num_eval_batches
        loss_sum, correct, masked = 0.0, 0.0, 0.0
        if n and self.eval_shard is not None:
            # The same rows every eval: read (and tokenize, if on the fly) once.
            if self._eval_batches is None:
                it = self.eval_shard.iter_torch_batches(
                    batch_size=self.cfg.rows_per_micro_batch,
                    collate_fn=self.collate,
                    drop_last=False,
                    device="cpu",
                )
                self._eval_batches = [
                    (i, b) for i, b in enumerate(itertools.islice(it, n)) if i % self.world == self.rank
                ]
            self.raw_model.eval()
            for i, batch in self._eval_batches:
                mb = self.to_micro_batch(batch, (-1, 0, i))  # step -1: eval masks are the same at every eval
                with self.autocast():
                    # unwrapped: no DDP collectives
                    out = self.raw_model(mb.input_ids, mb.meta, mb.labels, masked=mb.masked)
                loss_sum += float(out.loss_sum)
                correct += float(out.num_correct)
                masked += mb.num_masked
            self.raw_model.train()
        loss_sum, correct, masked = self._all_reduce([loss_sum, correct, masked])
        self._window.t0 += time.perf_counter() - t0  # eval time does not count against throughput
        if masked == 0:
            if self.rank == 0 and n:
                log.warning("eval produced no masked tokens (empty eval split?); eval metrics skipped")
            return {}
        metrics = {"eval/loss": loss_sum / masked, "eval/mlm_accuracy": correct / masked}
        self.emit(metrics)
        return metrics

    # -- checkpoint -----------------------------------------------------------------------------------------
    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """All ranks report (a barrier); rank 0 writes `model/` + `train_state.pt`, the others pass None."""
        import ray.train
        from ray.train import Checkpoint

        from neobert.checkpoint import save_model_dir

        t0 = time.perf_counter()
        report = {"step": self.step, "epoch": self.epoch, **metrics}
        if self.rank != 0:
            ray.train.report(report, checkpoint=None)
            self.files.sync()
            self._window.t0 += time.perf_counter() - t0
            return
        tmp = tempfile.mkdtemp(prefix="neobert-ckpt-")
        try:
            save_model_dir(
                Path(tmp) / "model", self.model, self.cfg.model, kind="mlm", extra={"step": self.step}
            )
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "batches_in_epoch": self.batches_in_epoch,
                "rows_consumed_in_epoch": self.batches_in_epoch * self.cfg.rows_per_micro_batch,
                "world_size": self.world,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": {
                    "python": random.getstate(),
                    "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                },
                "config": to_dict(self.cfg),
            }
            torch.save(state, Path(tmp) / TRAIN_STATE_FILE)
            ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.sinks.flush()
        self.files.sync()
        self._window.t0 += time.perf_counter() - t0

    def report(self, metrics: dict[str, float]) -> None:
        """Metrics-only report to Ray Train (every rank calls it: it is a barrier)."""
        import ray.train

        ray.train.report({"step": self.step, "epoch": self.epoch, **metrics}, checkpoint=None)

    def maybe_inject_failure(self) -> None:
        f = self.cfg.failure.inject_failure_at_step
        if f and self.step == f and not self.resumed and self.rank == self.world - 1:
            raise RuntimeError(
                f"injected worker failure at step {self.step} (failure.inject_failure_at_step={f})"
            )

    def final_report(self) -> None:
        if self.sinks:
            self.sinks.close()
        self.files.sync()
        if self.sinks:
            log.info("done: %d steps; metrics in %s", self.step, os.path.join(self.cfg.run_dir, METRICS_FILE))


@dataclass
class _Window:
    """Sums since the last log (device tensors stay lazy until `log_metrics`)."""

    t0: float = dataclasses.field(default_factory=time.perf_counter)
    loss_sum: Any = 0.0
    num_correct: Any = 0
    num_masked: int = 0
    num_tokens: int = 0
    wait_s: float = 0.0
    flops: float = 0.0
    lr: float = 0.0

    def add(self, stats, *, wait_s: float, flops: float, lr: float) -> None:
        self.loss_sum = self.loss_sum + stats.loss_sum
        self.num_correct = self.num_correct + stats.num_correct
        self.num_masked += stats.num_masked_local
        self.num_tokens += stats.num_tokens_local
        self.wait_s += wait_s
        self.flops += flops
        self.lr = lr


class RunFiles:
    """The files one rank writes into the run dir (`metrics.jsonl`, `tensorboard/`, `data_trace.rank<r>.jsonl`).

    A local run dir is written in place. A URI run dir (s3://, gs://, file://, ...) cannot go through `Path`/`open`
    (`Path("s3://b/k")` is the local dir `s3:/b/k`): the files are written to a local staging dir and copied to
    the run dir through pyarrow filesystems by `sync()`, which the runner calls at every checkpoint and at the
    end, so the remote copy lags by at most one checkpoint interval. `fetch()` brings a file back into an empty
    staging dir (a worker restarted on another node continues the same metrics.jsonl).
    """

    def __init__(self, run_dir: str, staging_root: str | None = None) -> None:
        import hashlib

        self.run_dir = run_dir
        self.remote = "://" in run_dir
        if self.remote:
            key = hashlib.sha256(run_dir.encode()).hexdigest()[:12]
            self.local = Path(staging_root or tempfile.gettempdir()) / f"neobert-run-{key}"
        else:
            self.local = Path(run_dir)
        self.local.mkdir(parents=True, exist_ok=True)
        self._names: set[str] = set()

    def path(self, name: str) -> Path:
        """Local path to write `name` (relative to the run dir); `sync()` uploads it."""
        self._names.add(name)
        return self.local / name

    def _remote(self, name: str):
        from pipelines.io import filesystem_for

        fs, root = filesystem_for(self.run_dir)
        return fs, f"{root.rstrip('/')}/{name}"

    def fetch(self, name: str) -> None:
        """URI run dir: copy the file `name` from it into staging unless staging already has it."""
        import pyarrow.fs as pafs

        self._names.add(name)
        if not self.remote or (self.local / name).exists():
            return
        fs, src = self._remote(name)
        if fs.get_file_info(src).type == pafs.FileType.File:
            pafs.copy_files(src, str(self.local / name), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())  # fmt: skip

    def sync(self) -> None:
        """URI run dir: upload every file/dir handed out by `path()` that exists (no-op for a local run dir)."""
        import pyarrow.fs as pafs

        if not self.remote:
            return
        for name in sorted(self._names):
            src = self.local / name
            if not src.exists():
                continue
            fs, dst = self._remote(name)
            fs.create_dir(dst if src.is_dir() else dst.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(
                str(src), dst, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
            )


class _MetricSinks:
    """Rank 0's outputs: `metrics.jsonl` in the run dir (+ optional TensorBoard / MLflow)."""

    def __init__(self, cfg: PretrainConfig, files: RunFiles) -> None:
        files.fetch(METRICS_FILE)
        self.path = files.path(METRICS_FILE)
        self.tb = self.mlflow = None
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("logging.tensorboard=true needs `pip install tensorboard`") from None
            self.tb = SummaryWriter(str(files.path("tensorboard")))
        if cfg.logging.mlflow_tracking_uri:
            try:
                import mlflow
            except ImportError:
                raise ValueError(
                    "logging.mlflow_tracking_uri is set but mlflow is not installed: pip install mlflow"
                ) from None
            mlflow.set_tracking_uri(cfg.logging.mlflow_tracking_uri)
            mlflow.set_experiment(cfg.checkpoint.name)
            mlflow.start_run()
            mlflow.log_params({k: v for k, v in _flatten(to_dict(cfg)).items()})
            self.mlflow = mlflow

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > `step` (a resumed attempt re-runs them)."""
        if not self.path.exists():
            return
        lines = [
            ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step
        ]
        self.path.write_text("".join(ln + "\n" for ln in lines))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in metrics.items()}, step=step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
