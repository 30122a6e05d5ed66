"""Contrastive fine-tuning of a pretrained NeoBERT into a sentence embedder: the job's config sections, its step
(InfoNCE over the global batch), its eval (held-out retrieval before and after) and its driver (`fit`). The loop,
checkpoints, resume, metrics and failure handling are `pipelines.train.runner.TrainRunner`'s; the data side
(split, global pair order, collate) is `pipelines.train.contrastive_data`.

    driver: validated dir -(Ray Data, lazy)-> split by query hash -> one train dataset per source + "eval";
            train pairs counted per source (the source weights) -> TorchTrainer (nothing split)
    run(): load/resume -> eval "before" -> loop { this rank's pairs of the global step -> encode -> InfoNCE ->
           step -> log -> checkpoint } -> eval "after" (at the last step) -> final checkpoint;
    driver: eval.json + model/ in the run dir

The driver never holds the rows: they stream from the validated files to the workers (`data.max_driver_bytes`
bounds what the driver may read into memory, e.g. `load_rows`). The pair order depends on (seed, sources,
weights, shuffle window) only, so a run resumes on any number of workers (and elastic runs keep the global batch).

The run dir (`checkpoint.storage_path/checkpoint.name`) holds config.yaml, metrics.jsonl, the checkpoints, and
after a finished run eval.json ({"before", "after", "step"}) and `model/` (the final encoder model dir).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import torch

from neobert.config_io import from_dict, to_dict
from neobert.contrastive import (
    POOLING_MODES,
    ContrastiveEncoder,
    cosine_scores,
    info_nce_loss,
    retrieval_metrics,
)
from pipelines.train import run_dir as rd
from pipelines.train.config import (
    CheckpointSection,
    ConfigError,
    LoggingSection,
    Precision,
    Schedule,
    TrainJobConfig,
    TrainSection,
    load_job_config,
)
from pipelines.train.contrastive_data import (
    ROW_COLUMNS,
    STATE_KIND,
    ContrastiveBatch,
    ContrastiveCollate,
    ContrastiveStepSource,
    SplitRows,
    build_eval_set,
    eval_fingerprint,
    pack_token_lists,
    pair_mixture,
    pair_source_from_shards,
    rank_batch_size,
    sort_rows,
    source_dataset_name,
)
from pipelines.train.contrastive_init import RANDOM_INIT_PREFIX, load_init_encoder
from pipelines.train.data import MixtureSection, check_state, source_data_config
from pipelines.train.runner import (
    TrainRunner,
    check_world_sizes,
    fit_trainer,
    prepare_run,
    run_config,
    run_worker,
)

log = logging.getLogger("neobert.contrastive")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "contrastive.yaml"
EVAL_FILE = "eval.json"
EVAL_DATASET = "eval"


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class ContrastiveDataSection:
    input_dir: str = (
        ""  # validated dir (jobs/validate_contrastive.py --output DIR); "" = the embedded sources
    )
    eval_fraction: float = 0.1  # held-out share of the rows (stable hash of the query text)
    num_eval_rows: int = 512  # cap on held-out queries evaluated (0 = all)
    max_seq_len: int = 128  # tokens per text incl. [CLS] and [SEP]
    num_negatives: int = 1  # hard negatives per query taken from the row (0 = in-batch negatives only)
    source_alpha: float = 0.5  # share of pairs per source ∝ its train rows**alpha
    one_source_per_batch: bool = False  # every global batch from a single source
    shuffle_window_rows: int = 4096  # pairs shuffled together per source (0 = file order); docs/data_order.md
    max_driver_bytes: int = (
        256 << 20
    )  # rows the driver may read into memory (load_rows); training streams (0 = no cap)
    tokenizer: str = ""  # tokenizer.json or dir; "" = the default bert-base-uncased vocabulary

    def __post_init__(self) -> None:
        # Relative local paths are resolved on the driver: Ray Train workers run in another directory.
        for name in ("input_dir", "tokenizer"):
            value = getattr(self, name)
            if value and "://" not in value:
                setattr(self, name, str(Path(value).expanduser().resolve()))
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.num_eval_rows < 0:
            raise ValueError(f"data.num_eval_rows must be >= 0 (0 = all), got {self.num_eval_rows}")
        if self.max_seq_len < 3:
            raise ValueError(f"data.max_seq_len must be >= 3 ([CLS] text [SEP]), got {self.max_seq_len}")
        if self.num_negatives < 0:
            raise ValueError(f"data.num_negatives must be >= 0, got {self.num_negatives}")
        for name in ("shuffle_window_rows", "max_driver_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.source_alpha < 0:
            raise ValueError(
                f"data.source_alpha must be >= 0 (0 = uniform over sources), got {self.source_alpha}"
            )


@dataclass
class ContrastiveModelSection:
    init: str = (
        ""  # pretraining run dir / checkpoint / model dir / HF export dir / random:<preset>; "" = embedded
    )
    pooling: Literal["mean", "cls"] = "mean"

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"model.pooling must be one of {POOLING_MODES}, got {self.pooling!r}")


@dataclass
class ContrastiveTrainSection(TrainSection):
    num_steps: int = 200
    lr: float = 5e-5
    warmup_steps: int = 20
    schedule: Schedule = "linear"
    min_lr_ratio: float = 0.0
    precision: Precision = "auto"
    batch_size: int = 32  # queries per worker per step when global_batch_size is 0
    global_batch_size: int = (
        0  # pairs per step over all workers; 0 = batch_size x num_workers (max of a range),
    )
    # or on a resume the checkpoint's value; fixed for the whole run, whatever the number of workers
    temperature: float = 0.05
    mask_duplicate_positives: bool = True  # a batch text equal to the query's positive is not a negative
    eval_batch_size: int = 256  # sequences per encoder call during evaluation

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size < 0:
            raise ValueError(
                f"train.global_batch_size must be >= 0 (0 = derived), got {self.global_batch_size}"
            )
        if self.temperature <= 0:
            raise ValueError(f"train.temperature must be > 0 (default 0.05), got {self.temperature}")
        if self.compile:
            raise ValueError(
                "train.compile=true applies to pretraining; contrastive training runs eager: set it false"
            )


@dataclass
class ContrastiveConfig(TrainJobConfig):
    data: ContrastiveDataSection = field(default_factory=ContrastiveDataSection)
    model: ContrastiveModelSection = field(default_factory=ContrastiveModelSection)
    train: ContrastiveTrainSection = field(default_factory=ContrastiveTrainSection)
    checkpoint: CheckpointSection = field(
        default_factory=lambda: CheckpointSection(
            every_steps=100, storage_path="outputs/contrastive", name="contrastive"
        )
    )
    logging: LoggingSection = field(
        default_factory=lambda: LoggingSection(every_steps=10, eval_every_steps=0)
    )


def load_contrastive_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> ContrastiveConfig:
    """YAML (default: configs/contrastive.yaml; `base:` inheritance) + dotted overrides -> validated config."""
    return load_job_config(ContrastiveConfig, DEFAULT_CONFIG, path, overrides)


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def embed_texts(
    model: ContrastiveEncoder, collate: ContrastiveCollate, texts: list[str], *, batch_size: int,
    device: torch.device, autocast,
) -> torch.Tensor:  # fmt: skip
    """(N, D) pooled embeddings in fp32, `batch_size` sequences per packed encoder call."""
    from neobert.packing import PackedMeta

    out = []
    for i in range(0, len(texts), batch_size):
        flat, lengths, _ = pack_token_lists(collate.tokenize(texts[i : i + batch_size]), collate.max_seq_len)
        meta = PackedMeta.from_lengths(lengths, device=device)
        with autocast():
            out.append(model(torch.from_numpy(flat).to(device), meta).float())
    return torch.cat(out)


def evaluate_retrieval(
    model: ContrastiveEncoder, collate: ContrastiveCollate, eval_set, *, batch_size: int, device, autocast
) -> dict[str, float]:
    queries, corpus, pos_idx = eval_set
    was_training = model.training
    model.eval()
    try:
        q = embed_texts(model, collate, queries, batch_size=batch_size, device=device, autocast=autocast)
        c = embed_texts(model, collate, corpus, batch_size=batch_size, device=device, autocast=autocast)
    finally:
        model.train(was_training)
    return retrieval_metrics(cosine_scores(q, c), torch.from_numpy(pos_idx))


# ----------------------------------------------------------------------------------------------- worker loop
def _read_eval_table() -> pa.Table:
    """Rank 0: the held-out rows (a small share, capped by `data.num_eval_rows`), in `sort_rows` order."""
    import ray.train

    shard = ray.train.get_dataset_shard(EVAL_DATASET)
    tables = list(shard.iter_batches(batch_size=None, batch_format="pyarrow"))
    if not tables or not sum(t.num_rows for t in tables):
        raise ConfigError("the held-out split reached the worker empty: raise data.eval_fraction or add rows")
    return sort_rows(pa.concat_tables(tables))


class ContrastiveRunner(TrainRunner):
    """InfoNCE over the global batch (cross-worker gather), retrieval eval before/after, the encoder model dir."""

    job = "contrastive"
    cfg: ContrastiveConfig

    def build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        encoder, self.model_cfg, _ = load_init_encoder(cfg.model.init)
        self.attn_backend = getattr(encoder, "attn_backend", "?")
        return ContrastiveEncoder(encoder, cfg.model.pooling)

    def __init__(self, cfg: ContrastiveConfig, pairs: MixtureSection) -> None:
        super().__init__(cfg)
        self.pairs = pairs  # the pair order (sources and their weights), built on the driver
        self.collate = ContrastiveCollate(
            max_seq_len=cfg.data.max_seq_len, num_negatives=cfg.data.num_negatives,
            tokenizer_path=cfg.data.tokenizer, seed=cfg.train.seed,
        )  # fmt: skip
        # Under FSDP2 every forward is a collective, so every rank runs the retrieval eval in step (rank 0 reports
        # it); under DDP rank 0 alone evaluates its full model copy.
        self.eval_here = self.rank == 0 or cfg.scaling.strategy == "fsdp2"
        self.eval_set = build_eval_set(_read_eval_table(), cfg.data.num_eval_rows) if self.eval_here else None
        self.eval_before: dict[str, float] | None = None
        self.eval_before_fingerprint: str | None = None
        if self.rank == 0:
            log.info(
                "contrastive: %d workers on %s, attention backend %s, precision %s, %d pairs per step (%d per "
                "worker), source shares %s", self.world, self.device, self.attn_backend,
                "bf16" if self.use_bf16 else "fp32", cfg.train.global_batch_size,
                rank_batch_size(cfg.train.global_batch_size, self.world),
                {s.name: round(s.weight, 3) for s in pairs.sources},
            )  # fmt: skip

    # -- data ----------------------------------------------------------------------------------------------------
    def open_data(self, state: dict[str, Any] | None) -> ContrastiveStepSource:
        """This rank's pairs of the global order, at the saved global position (any world size)."""
        if state is not None and state.get("global_step") != self.step:
            raise ConfigError(f"the checkpoint's data position {state} does not match its step {self.step}")
        return pair_source_from_shards(
            self.pairs, self.collate, one_source_per_batch=self.cfg.data.one_source_per_batch, state=state,
            max_steps=self.cfg.train.num_steps - self.step, pin_memory=self.device.type == "cuda",
        )  # fmt: skip

    # -- eval "before" -------------------------------------------------------------------------------------------
    def on_start(self) -> None:
        fingerprint = eval_fingerprint(self.eval_set) if self.eval_here else None
        stale = (
            self.eval_here and self.eval_before is not None and self.eval_before_fingerprint != fingerprint
        )
        if stale and self.rank == 0:
            log.warning(
                "the held-out set changed since the checkpoint: re-running eval 'before' on the init model"
            )
        # A stale "before" scores a fresh, unsharded init model: rank 0 alone; the trained model on every eval rank.
        if self.eval_here and (self.eval_before is None or stale) and (self.rank == 0 or not stale):
            self.eval_before = self.retrieval(init_model=stale)
            if self.rank == 0:
                self.emit({f"eval/before/{k}": v for k, v in self.eval_before.items()})
        self.eval_before_fingerprint = fingerprint

    def job_state(self) -> dict[str, Any]:
        return {"eval_before": self.eval_before, "eval_fingerprint": self.eval_before_fingerprint}

    def load_job_state(self, state: dict[str, Any]) -> None:
        self.eval_before, self.eval_before_fingerprint = (
            state.get("eval_before"),
            state.get("eval_fingerprint"),
        )

    # -- step ----------------------------------------------------------------------------------------------------
    def train_step(self, batches: list[ContrastiveBatch]) -> None:
        from neobert.packing import PackedMeta

        (batch,) = batches
        meta = PackedMeta.from_lengths(batch.lengths, device=self.device)
        input_ids = batch.input_ids.to(self.device, non_blocking=True)
        b, m = batch.num_queries, batch.num_negatives
        with self.autocast():
            emb_SD = self.ddp_model(input_ids, meta)  # (2B+M, D)
        keys = self.cfg.train.mask_duplicate_positives
        out = info_nce_loss(
            emb_SD[:b], emb_SD[b : 2 * b], emb_SD[2 * b : 2 * b + m],
            temperature=self.cfg.train.temperature,
            pos_keys_B=batch.pos_keys.to(self.device) if keys else None,
            neg_keys_M=batch.neg_keys.to(self.device) if keys else None,
        )  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        clip = self.cfg.train.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), clip if clip > 0 else float("inf")
        )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.window.add(
            loss_sum=out.loss_sum.detach().float(), num_correct=out.num_correct, num_queries=out.num_queries,
            num_tokens=batch.num_tokens, truncated=batch.num_truncated, sequences=b + b + m,
        )  # fmt: skip
        self.window.set(
            **{"train/lr": lr, "train/grad_norm": grad_norm.detach(), "train/candidates": out.num_candidates}
        )

    def trace_records(self, batches: list[ContrastiveBatch]) -> list[dict[str, Any]]:
        """Per step a fingerprint of the packed token stream this rank trained on and the keys of its pairs."""
        import hashlib

        return [{"micro": i, "sha": hashlib.sha256(b.input_ids.numpy().tobytes()).hexdigest()[:16],
                 "keys": [] if b.row_keys is None else b.row_keys.tolist()}
                for i, b in enumerate(batches)]  # fmt: skip

    def window_metrics(self, sums: dict[str, float], elapsed: float) -> dict[str, float]:
        queries = max(sums["num_queries"], 1)
        loss = sums["loss_sum"] / queries
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"train/loss is {loss} at step {self.step}; lower train.lr or check the model.init checkpoint"
            )
        return {
            "train/loss": loss,
            "train/accuracy": sums["num_correct"] / queries,
            "train/tokens_per_s": sums["num_tokens"] / elapsed,
            "train/sequences_per_s": sums["sequences"] / elapsed,
            "data/truncated_texts": sums["truncated"],
        }

    # -- eval ----------------------------------------------------------------------------------------------------
    def retrieval(self, *, init_model: bool = False) -> dict[str, float]:
        """Retrieval metrics on rank 0; `init_model` scores a fresh copy of `model.init`."""
        model = self.model
        if init_model:
            torch.manual_seed(
                self.cfg.train.seed
            )  # as at construction, so random:<preset> rebuilds the same model
            encoder, _, _ = load_init_encoder(self.cfg.model.init)
            model = ContrastiveEncoder(encoder, self.cfg.model.pooling).to(self.device)
        return evaluate_retrieval(
            model, self.collate, self.eval_set, batch_size=self.cfg.train.eval_batch_size, device=self.device,
            autocast=self.autocast,
        )  # fmt: skip

    def evaluate(self) -> dict[str, float]:
        """Held-out retrieval reported by rank 0 ({} elsewhere; under FSDP2 every rank computes it with rank 0);
        at the last step it is eval "after", reported with "before" so the final checkpoint's metrics hold both."""
        if not self.eval_here:
            return {}
        scores = self.retrieval()
        if self.rank != 0:
            return {}
        metrics = {f"eval/{k}": v for k, v in scores.items()}
        if self.step == self.cfg.train.num_steps:
            metrics |= {f"eval/before/{k}": v for k, v in (self.eval_before or {}).items()}
            metrics |= {f"eval/after/{k}": v for k, v in scores.items()}
        return metrics

    # -- model dir -----------------------------------------------------------------------------------------------
    def save_model(self, path: Path, state: dict[str, torch.Tensor]) -> None:
        from neobert.checkpoint import save_model_dir

        save_model_dir(
            path, self.model.encoder, self.model_cfg, kind="encoder", pooling=self.cfg.model.pooling,
            extra={"trained_by": "contrastive", "step": self.step, "config": to_dict(self.cfg)}, state=state,
        )  # fmt: skip


def train_loop_per_worker(config: dict[str, Any]) -> None:
    pairs = from_dict(MixtureSection, config["pairs"])
    run_worker(lambda cfg: ContrastiveRunner(cfg, pairs), ContrastiveConfig, config["config"])


# ----------------------------------------------------------------------------------------------------- driver
def read_bounded(ds, max_bytes: int, what: str) -> pa.Table:
    """The rows of Ray Dataset `ds` as one table on the driver, refused (ValueError) once they pass `max_bytes`
    (0 = no cap): the one way the contrastive driver reads rows into its memory."""
    tables, size = [], 0
    for t in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        size += t.nbytes
        if max_bytes and size > max_bytes:
            raise ValueError(
                f"{what} passes data.max_driver_bytes={max_bytes} bytes on the driver; training streams its rows "
                "and needs no such read: drop it, or raise data.max_driver_bytes (0 = no cap)"
            )
        tables.append(t)
    return pa.concat_tables(tables) if tables else pa.table({})


def load_rows(input_dir: str | Path, *, max_bytes: int = 0) -> pa.Table:
    """The validated rows of `input_dir` as one table on the driver (tools and tests; training streams them),
    at most `max_bytes` (0 = no cap); ValueError (with the fix) when it was not validated or is larger."""
    from pipelines.contrastive.validate import read_validated

    table = read_validated(input_dir)
    if not isinstance(table, pa.Table):  # a Ray Dataset
        table = read_bounded(table, max_bytes, f"the validated rows of {input_dir}")
    return table.select(list(ROW_COLUMNS))


def validated_rows(cfg: ContrastiveConfig, rows=None):
    """The validated rows as a lazy Ray Dataset: `rows` (a Ray Dataset, or a table the caller already holds), else
    `data.input_dir` read through Ray Data."""
    import ray.data

    if rows is None:
        from pipelines.contrastive.validate import read_validated

        return read_validated(ensure_validated(cfg.data.input_dir))
    return ray.data.from_arrow(rows) if isinstance(rows, pa.Table) else rows


def count_pairs(cfg: ContrastiveConfig, rows) -> dict[str, int]:
    """Train pairs per source, counted by Ray Data (a streaming aggregation; the driver holds one row per source)."""
    train = rows.map_batches(SplitRows(cfg.data.eval_fraction, held_out=False), batch_format="pyarrow",
                             batch_size=None)  # fmt: skip
    counts = read_bounded(train.groupby("source").count(), cfg.data.max_driver_bytes, "the per-source counts")
    if not counts.num_rows:
        counts = pa.table({"source": pa.array([], pa.string()), "count()": pa.array([], pa.int64())})
    out = {str(k): int(v) for k, v in zip(counts.column("source").to_pylist(),
                                           counts.column(counts.column_names[-1]).to_pylist(), strict=True)}  # fmt: skip
    if not out:
        raise ConfigError(
            f"no train rows: every row of {cfg.data.input_dir or 'the given rows'} fell into the held-out split "
            f"(data.eval_fraction={cfg.data.eval_fraction}); lower it or add rows"
        )
    return out


def pair_order(cfg: ContrastiveConfig, rows_per_source: dict[str, int]) -> MixtureSection:
    d, t = cfg.data, cfg.train
    try:
        return pair_mixture(
            rows_per_source, alpha=d.source_alpha, global_batch_size=t.global_batch_size,
            shuffle_window_rows=d.shuffle_window_rows, seed=t.seed, path=d.input_dir or "rows",
        )  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"contrastive sources: {e}") from None


def resolve_config(cfg: ContrastiveConfig, saved: dict[str, Any] | None = None) -> ContrastiveConfig:
    """`train.global_batch_size` = 0 becomes the checkpoint's value on a resume, else batch_size x the (largest)
    number of workers; every world size the run may use must split it."""
    t = cfg.train
    value = t.global_batch_size
    if not value:
        prev = ((saved or {}).get("config") or {}).get("train", {}).get("global_batch_size") or 0
        value = prev or t.batch_size * cfg.scaling.max_workers
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, global_batch_size=value))
    check_world_sizes(cfg, lambda w: rank_batch_size(value, w))
    return cfg


def build_trainer(cfg: ContrastiveConfig, rows, pairs: MixtureSection):
    """A `TorchTrainer` over the validated `rows` (a lazy Ray Dataset): one train dataset per source of `pairs`
    and the held-out split; nothing is split between workers (every worker reads each source in full, in file
    order, and keeps its part of the global order)."""
    from ray.data.expressions import col
    from ray.train.torch import TorchTrainer

    d = cfg.data
    # A filter expression right after the read is pushed into the Parquet scan (row groups of other sources are
    # skipped by their statistics), so each source's dataset reads about its own rows, not the whole dir.
    datasets = {
        source_dataset_name(s.name): rows.filter(expr=col("source") == s.name).map_batches(
            SplitRows(d.eval_fraction, held_out=False), batch_format="pyarrow", batch_size=None
        )
        for s in pairs.sources
    }
    datasets[EVAL_DATASET] = rows.map_batches(
        SplitRows(d.eval_fraction, held_out=True), batch_format="pyarrow", batch_size=None
    )
    log.info("contrastive: %d pairs per step from sources %s -> %s", cfg.train.global_batch_size,
             {s.name: round(s.weight, 3) for s in pairs.sources}, cfg.run_dir)  # fmt: skip
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "pairs": to_dict(pairs)},
        scaling_config=cfg.scaling.ray_scaling_config(),
        datasets=datasets,
        dataset_config=source_data_config(),  # nothing split; preserve_order: the same order on every worker
        run_config=run_config(cfg),
    )


def finalize(cfg: ContrastiveConfig, result) -> dict[str, Any]:
    """Write eval.json and copy the final model dir into the run dir; return the eval dict."""
    if result.error is not None:
        raise result.error
    metrics = result.metrics or {}
    evals: dict[str, Any] = {}
    for phase in ("before", "after"):
        prefix = f"eval/{phase}/"
        evals[phase] = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
        if "recall@10" not in evals[phase]:
            raise RuntimeError(
                f"the final report lacks {prefix}recall@10 (got {sorted(metrics)}); see the worker logs"
            )
    evals["step"] = metrics.get("step")
    from pipelines.io import filesystem_for

    fs, root = filesystem_for(cfg.run_dir)
    with fs.open_output_stream(f"{root.rstrip('/')}/{EVAL_FILE}") as f:
        f.write((json.dumps(evals, indent=2) + "\n").encode())
    if result.checkpoint is not None:
        import pyarrow.fs as pafs

        with result.checkpoint.as_directory() as d:
            target = f"{root.rstrip('/')}/model"
            if fs.get_file_info(target).type == pafs.FileType.Directory:
                fs.delete_dir(target)
            if "://" in cfg.run_dir:
                pafs.copy_files(str(Path(d) / "model"), target, source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=fs)  # fmt: skip
            else:
                shutil.copytree(Path(d) / "model", target)
    return evals


def check_contrastive_resume(cfg: ContrastiveConfig, pairs: MixtureSection):
    """The job's resume rule: the saved position must be one of the same pair order (seed, shuffle window,
    sources); any number of workers continues it."""

    def check(saved: dict[str, Any]) -> None:
        data = saved.get("data") or {}
        if data.get("kind") != STATE_KIND:
            raise ConfigError(
                f"{cfg.run_dir} holds a checkpoint whose data position is not one of the contrastive pair order "
                f"(kind {data.get('kind')!r}: another job, or an older version of this one); pick another "
                "--checkpoint.name or --checkpoint.storage_path"
            )
        try:
            check_state(pairs, data, 1, kind=STATE_KIND)
        except ValueError as e:
            raise ConfigError(f"{cfg.run_dir} cannot resume: {e}") from None
        if saved["world_size"] != cfg.scaling.num_workers:
            log.info("resuming a run of %d workers on %s: the pair order continues at the next unseen pair",
                     saved["world_size"], cfg.scaling.num_workers)  # fmt: skip

    return check


def fit(cfg: ContrastiveConfig, rows=None) -> dict[str, Any]:
    """Train + evaluate (or resume) the contrastive job `cfg`; returns {"before", "after", "step"}, also written to
    RUN_DIR/eval.json next to the final `model/`. `rows`: a Ray Dataset (or a table) of validated rows; default:
    `data.input_dir` (streamed: the driver reads only the per-source counts)."""
    if not cfg.model.init:
        raise ConfigError("model.init is empty: pass --init (see `default_init` for the embedded checkpoint)")
    latest = rd.latest_checkpoint(cfg.run_dir)
    cfg = resolve_config(cfg, None if latest is None else rd.read_train_state(latest))
    rows = validated_rows(cfg, rows)
    pairs = pair_order(cfg, count_pairs(cfg, rows))
    prepare_run(cfg, check_contrastive_resume(cfg, pairs))
    result = fit_trainer(build_trainer(cfg, rows, pairs), cfg)
    return finalize(cfg, result)


# ------------------------------------------------------------------------------------ defaults (job layer)
def embedded_validated_dir() -> Path:
    """Where the validated embedded contrastive sources live: next to the embedded data, keyed like it."""
    from pipelines.embedded import materialize

    root = materialize().root
    return root.parent / f"{root.name}-contrastive-validated"


def ensure_validated(input_dir: str) -> Path:
    """`input_dir` if it is a finished validation output; for "" the embedded sources, validated on first use.

    A user dir that was not validated is refused (ValueError naming the command to run), never validated
    behind the user's back with guessed options.
    """
    from pipelines.contrastive.sources import ValidateContrastiveConfig
    from pipelines.contrastive.validate import MARKER_NAME, validate_contrastive
    from pipelines.embedded import contrastive_source_configs

    if input_dir:
        d = Path(input_dir)
        if not (d / MARKER_NAME).is_file():
            raise ConfigError(
                f"{d} is not a validated contrastive dataset (no {MARKER_NAME}); validate it first: "
                f"`python jobs/validate_contrastive.py --source NAME=PATH ... --output {d}`, then pass "
                f"--data.input_dir {d}"
            )
        return d
    d = embedded_validated_dir()
    if not (d / MARKER_NAME).is_file():
        log.info("validating the embedded contrastive sources into %s (first run only)", d)
        validate_contrastive(ValidateContrastiveConfig(sources=contrastive_source_configs(), output=str(d)))
    return d


def embedded_pretrained_dir() -> Path:
    """The tiny pretraining checkpoint the no-argument job starts from (a model dir), next to the embedded data."""
    from pipelines.embedded import materialize

    root = materialize().root
    return root.parent / f"{root.name}-pretrained-tiny" / "model"


def default_init(cfg: ContrastiveConfig) -> Path:
    """The `model.init` of a job given none: the embedded tiny pretraining checkpoint, trained on first use by the
    pretraining job's driver (`pipelines.train.pretrain.fit`, configs/pretrain.yaml defaults) and cached as a model
    dir. Called by the job layer, never by the runtime."""
    import os

    from neobert.checkpoint import CONFIG_FILE
    from pipelines.train import pretrain

    target = embedded_pretrained_dir()
    if (target / CONFIG_FILE).exists():
        return target
    storage = target.parent / "ray"
    log.info("no embedded pretraining checkpoint at %s: pretraining the tiny model first", target)
    overrides = [
        f"--checkpoint.storage_path={storage}",
        "--checkpoint.name=embedded-tiny",
        f"--scaling.num_workers={cfg.scaling.num_workers}",
        f"--scaling.use_gpu={str(cfg.scaling.use_gpu).lower()}",
        f"--scaling.resources_per_worker={json.dumps(cfg.scaling.resources_per_worker)}",
    ]
    result = pretrain.fit(pretrain.load_pretrain_config(None, overrides))
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"pretraining into {storage} finished without a checkpoint; see its logs")
    tmp = target.parent / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with result.checkpoint.as_directory() as d:
        shutil.copytree(Path(d) / "model", tmp)
    os.replace(tmp, target)
    return target


__all__ = [
    "RANDOM_INIT_PREFIX", "ContrastiveConfig", "ContrastiveDataSection", "ContrastiveModelSection",
    "ContrastiveRunner", "ContrastiveTrainSection", "build_trainer", "count_pairs", "read_bounded", "default_init",
    "ensure_validated", "finalize", "fit", "load_contrastive_config", "load_rows",
]  # fmt: skip
