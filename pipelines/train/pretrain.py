"""MLM pretraining: the job's config sections, its step, its eval and its driver (`fit`). The loop, checkpoints,
resume, metrics and failure handling are `pipelines.train.runner.TrainRunner`'s.

    jobs/pretrain.py --config configs/pretrain.yaml --train.num_steps 100
      -> load_pretrain_config -> fit(cfg): prepare_run -> build_trainer(cfg).fit()
         each worker: train_loop_per_worker(config) -> PretrainRunner(cfg).run()

Data: `datasets={"train", "eval"}` (packed rows from a preprocessed dir, or built on the fly from raw text by
`pipelines.mlm.preprocess.build_packed_datasets`). "train" reaches the runner through a `StepSource`
(`pipelines.train.shard_stream.ShardStepSource`: a `streaming_split` shard read ahead across epochs). "eval" is
not split: rank r evaluates micro-batches r, r+W, ... of the (unshuffled) eval set, and the sums are all-reduced.

Masking runs on the CPU row by row: the generator of a packed row is seeded by `row_mask_seed(train.seed,
row_key)`, so a row's mask depends on the row, not on the rank, micro-batch or step that carries it; a resumed run
masks exactly like an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from neobert.config_io import to_dict
from neobert.model import NeoBERTConfig
from neobert.training import MicroBatch, mask_seed, mask_tokens, model_flops_for, peak_flops, train_step
from pipelines.tokenizer import MASK_ID, SPECIAL_IDS
from pipelines.train.collate import PackedBatch, PackedCollateFn
from pipelines.train.config import (
    ConfigError,
    LoggingSection,
    TrainJobConfig,
    TrainSection,
    load_job_config,
)
from pipelines.train.runner import TrainRunner, fit_trainer, prepare_run, run_config, run_worker
from pipelines.train.shard_stream import ShardStepSource, check_resume

log = logging.getLogger("neobert.pretrain")

REPO_ROOT = Path(__file__).resolve().parents[2]
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
    pack_tokens: int = 512  # max tokens of one packed row (must match the data; checked on the driver)
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
        if self.preprocess and self.packed_dir:
            raise ValueError(
                "set either data.packed_dir (preprocessed) or data.preprocess (on the fly), not both"
            )


@dataclass
class PretrainTrainSection(TrainSection):
    tokens_per_micro_batch: int = 2048  # static token budget T of one micro-batch per worker (multiple rows)
    num_micro_batches: int = 1  # gradient-accumulation micro-batches per optimizer step
    mask_prob: float = 0.2  # NeoBERT: 20% of the non-special tokens
    mask_strategy: Literal["mask", "80_10_10"] = "mask"
    loss_chunk_size: int = 2048  # rows of the chunked MLM cross-entropy (bench/loss.py: <= 0.5 GiB extra)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("tokens_per_micro_batch", "num_micro_batches", "loss_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
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

    def __post_init__(self) -> None:
        super().__post_init__()
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
        if cfg.train.compile:
            model.encoder.compile_layers()
        self.train_shard = ray.train.get_dataset_shard("train")
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
        if self.rank == 0:
            log.info(
                "pretrain: %d workers on %s, attention=%s, precision=%s, %d rows x %d tokens per micro-batch",
                self.world, self.device, self.model.attn_backend, "bf16" if self.use_bf16 else "fp32",
                cfg.rows_per_micro_batch, t.tokens_per_micro_batch,
            )  # fmt: skip

    # -- data ----------------------------------------------------------------------------------------------------
    def open_data(self, state: dict[str, Any] | None) -> ShardStepSource:
        cfg = self.cfg
        return ShardStepSource(
            self.train_shard,
            collate=self.collate,
            rows_per_micro_batch=cfg.rows_per_micro_batch,
            num_micro_batches=cfg.train.num_micro_batches,
            shuffle_buffer_rows=cfg.data.shuffle_buffer_rows,
            prefetch_batches=cfg.data.prefetch_batches,
            read_ahead_batches=cfg.data.read_ahead_batches,
            seed=cfg.train.seed,
            rank=self.rank,
            world_size=self.world,
            start_step=self.step,
            num_steps=cfg.train.num_steps,
            state=state,
        )

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
        self.window.set(**{"train/lr": lr, "train/grad_norm": stats.grad_norm, "train/epoch": self._epoch()})

    def _epoch(self) -> float:
        return float((self.data_state or {}).get("epoch", 0))

    def window_metrics(self, sums: dict[str, float], elapsed: float) -> dict[str, float]:
        masked = max(sums["num_masked"], 1)
        metrics = {
            "train/loss": sums["loss_sum"] / masked,
            "train/mlm_accuracy": sums["num_correct"] / masked,
            "train/tokens_per_s": sums["num_tokens"] / elapsed,
            "train/masked_tokens": sums["num_masked"],
        }
        if self.peak:
            metrics["train/mfu"] = sums["flops"] / elapsed / (self.peak * self.world)
        return metrics

    def trace_records(self, batches: list[PackedBatch]) -> list[dict[str, Any]]:
        """Per micro-batch a fingerprint of its rows (`rows_sha`: the unmasked token stream) and of rows + masks
        (`sha`), plus the data position after the step (syncs on GPU: debug and tests only)."""
        out = []
        for i, (b, mb) in enumerate(zip(batches, self._last_micro_batches, strict=True)):
            rows = b.input_ids.numpy().tobytes()
            out.append({
                "micro": i,
                "epoch": self.data_state["epoch"],
                "rows": b.num_rows,
                "rows_sha": hashlib.sha256(rows).hexdigest()[:16],
                "sha": hashlib.sha256(rows + mb.labels.cpu().numpy().tobytes()).hexdigest()[:16],
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


def build_datasets(cfg: PretrainConfig) -> dict[str, Any]:
    """{"train", "eval"} Ray Datasets of packed rows (lazy)."""
    from neobert.config_io import from_dict
    from pipelines.mlm import packed_io, preprocess

    if cfg.data.packed_dir:
        # A string, not a Path: Path("s3://b/k") collapses to "s3:/b/k". Listed through pyarrow filesystems,
        # so local dirs and s3:// / gs:// / file:// URIs take the same code path.
        root = cfg.data.packed_dir
        check_packed_dir(cfg)
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
            raise ConfigError(
                f"data.preprocess.pack_tokens={pcfg.pack_tokens} != data.pack_tokens={cfg.data.pack_tokens}; "
                "set them equal (or drop data.preprocess.pack_tokens: it defaults to data.pack_tokens)"
            )
        ds = preprocess.build_packed_datasets(pcfg)
    if cfg.data.num_train_rows:
        ds["train"] = ds["train"].limit(cfg.data.num_train_rows)
    if cfg.data.num_eval_rows and "eval" in ds:
        ds["eval"] = ds["eval"].limit(cfg.data.num_eval_rows)
    return ds


def build_trainer(cfg: PretrainConfig, datasets: dict[str, Any] | None = None):
    """The `TorchTrainer` for `cfg` (datasets built from `cfg.data` unless given)."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer

    datasets = datasets if datasets is not None else build_datasets(cfg)
    sc = cfg.scaling
    return TorchTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg)},
        scaling_config=sc.ray_scaling_config(),
        datasets=datasets,
        # preserve_order: deterministic row -> worker assignment and order (resume + reproducibility).
        dataset_config=DataConfig(
            datasets_to_split=["train"], execution_options=ExecutionOptions(preserve_order=True)
        ),
        run_config=run_config(cfg),
    )


def check_pretrain_resume(cfg: PretrainConfig):
    """The resume check the driver runs against the latest checkpoint's train state."""

    def check(saved: dict[str, Any]) -> None:
        check_resume(saved.get("data"), world_size=cfg.scaling.num_workers,
                     rows_per_micro_batch=cfg.rows_per_micro_batch)  # fmt: skip

    return check


def fit(cfg: PretrainConfig, datasets: dict[str, Any] | None = None):
    """Run (or resume) the pretraining job `cfg`; returns Ray Train's `Result`. Checks the config, the packed data
    and a resume on the driver before any worker starts; writes `config.yaml` into the run dir."""
    if cfg.data.packed_dir and datasets is None:
        check_packed_dir(cfg)
    prepare_run(cfg, check_pretrain_resume(cfg))
    return fit_trainer(build_trainer(cfg, datasets), cfg)
