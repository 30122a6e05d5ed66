"""Contrastive fine-tuning of a pretrained NeoBERT into a sentence embedder on Ray Train.

    load/resume -> eval "before" -> loop { sample batch -> pack -> encode -> InfoNCE -> step -> log -> checkpoint }
    -> eval "after" -> eval.json + final model dir

Data: the validated, normalised rows of `jobs/validate_contrastive.py` (`query`, `positive`, `negatives`,
`source`). The driver splits off a held-out set by a stable hash of the query text (`eval_fraction`), so the
split never changes between runs or resumes, and hands both splits to the workers as Ray Datasets (not split
between workers: contrastive sets are small, every worker holds the train rows in memory and samples from them).

Sampling (`SourceSampler`): a source is drawn with probability proportional to rows**alpha (alpha=1: as in the
data, alpha=0: uniform over sources); with `one_source_per_batch` the whole GLOBAL batch comes from one source
(in-batch negatives from another source are trivially easy). The global batch of every step is a pure function of
(seed, step), and rank r takes its slice, so ranks never share a row in a step and a resumed run draws exactly the
batches an uninterrupted one would have (the data position is the step counter).

Collate (`ContrastiveCollate`): queries, positives and hard negatives of a batch are tokenised as
`[CLS] text [SEP]` (truncated to `max_seq_len`) and packed into ONE flat token stream with `cu_seqlens`
(order: B queries, B positives, M negatives), encoded once on the varlen path and pooled per sequence.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from neobert.config_io import from_dict, to_dict, to_yaml
from neobert.contrastive import (
    POOLING_MODES,
    ContrastiveEncoder,
    cosine_scores,
    info_nce_loss,
    retrieval_metrics,
)

log = logging.getLogger("neobert.contrastive")

ROW_COLUMNS = ("query", "positive", "negatives", "source")
RANDOM_INIT_PREFIX = "random:"


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class ContrastiveDataConfig:
    input_dir: str = (
        ""  # validated dir (jobs/validate_contrastive.py --output DIR); "" = the embedded sources
    )
    eval_fraction: float = 0.1  # held-out share of the rows (stable hash of the query text)
    num_eval_rows: int = 512  # cap on held-out queries evaluated (0 = all)
    max_seq_len: int = 128  # tokens per text incl. [CLS] and [SEP]
    num_negatives: int = 1  # hard negatives per query taken from the row (0 = in-batch negatives only)
    source_alpha: float = 0.5  # P(source) ∝ rows**alpha
    one_source_per_batch: bool = False  # every global batch from a single source
    tokenizer: str = ""  # tokenizer.json or dir; "" = the default bert-base-uncased vocabulary

    def __post_init__(self):
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
        if self.source_alpha < 0:
            raise ValueError(
                f"data.source_alpha must be >= 0 (0 = uniform over sources), got {self.source_alpha}"
            )


@dataclass
class ContrastiveModelConfig:
    init: str = ""  # pretraining checkpoint / model dir / HF export dir / random:<preset>; "" = embedded tiny
    pooling: Literal["mean", "cls"] = "mean"

    def __post_init__(self):
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"model.pooling must be one of {POOLING_MODES}, got {self.pooling!r}")


@dataclass
class ContrastiveTrainConfig:
    batch_size: int = 32  # queries per worker per step (global batch = batch_size * num_workers)
    max_steps: int = 200
    lr: float = 5e-5
    warmup_steps: int = 20
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max grad norm (0 = off)
    temperature: float = 0.05
    mask_duplicate_positives: bool = True  # a batch text equal to the query's positive is not a negative
    precision: Literal["fp32", "bf16"] = "bf16"  # bf16 autocast on CUDA; CPU always runs fp32
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100  # steps (0 = only at the end)
    eval_batch_size: int = 256  # sequences per encoder call during evaluation
    fail_at_step: int = 0  # testing: rank 0 raises once at this step when not resumed (0 = off)

    def __post_init__(self):
        for name in ("batch_size", "max_steps", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.fail_at_step < 0:
            raise ValueError("train.warmup_steps, train.checkpoint_every and train.fail_at_step must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"train.temperature must be > 0 (default 0.05), got {self.temperature}")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


@dataclass
class ContrastiveRunConfig:
    output_dir: str = "outputs/contrastive_ft"  # eval.json, metrics.jsonl, model/, ray/ (checkpoints)
    name: str = "contrastive"  # Ray Train run name; re-running with the same output_dir + name resumes
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # < 1 on small CPU boxes, so Ray Data tasks still find a CPU
    max_failures: int = 1
    num_checkpoints_to_keep: int = 2

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"run.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"run.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ValueError(f"run.max_failures must be >= -1 (-1 = unlimited), got {self.max_failures}")


@dataclass
class ContrastiveConfig:
    data: ContrastiveDataConfig = field(default_factory=ContrastiveDataConfig)
    model: ContrastiveModelConfig = field(default_factory=ContrastiveModelConfig)
    train: ContrastiveTrainConfig = field(default_factory=ContrastiveTrainConfig)
    run: ContrastiveRunConfig = field(default_factory=ContrastiveRunConfig)


# ------------------------------------------------------------------------------------------------ data rows
def text_key(text: str) -> int:
    """A stable 63-bit id of a text (dedup of passages in batches and in the eval corpus)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def split_rows(table: pa.Table, eval_fraction: float) -> tuple[pa.Table, pa.Table]:
    """(train, eval) by a stable hash of the query text: a query never lands in both, and reruns agree.

    Both splits come back sorted by (query hash, positive hash): Ray Data may read the validated files in any
    order, and the sampler addresses rows by position, so a fixed order is what makes batches (and resumes)
    reproducible. The eval cap (`num_eval_rows`) then takes a stable subset as well."""
    missing = [c for c in ROW_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"contrastive rows lack column(s) {missing} (have {table.column_names}); read a dir written by "
            "jobs/validate_contrastive.py"
        )
    qkey = np.array([text_key(q) for q in table.column("query").to_pylist()], dtype=np.int64)
    pkey = np.array([text_key(p) for p in table.column("positive").to_pylist()], dtype=np.int64)
    table = table.take(pa.array(np.lexsort((pkey, qkey))))
    qkey.sort()
    is_eval = qkey % 10_000 < int(round(eval_fraction * 10_000))
    train, held = table.filter(pa.array(~is_eval)), table.filter(pa.array(is_eval))
    if train.num_rows == 0 or held.num_rows == 0:
        raise ValueError(
            f"eval_fraction={eval_fraction} splits {table.num_rows} rows into {train.num_rows} train / "
            f"{held.num_rows} held-out; both must be non-empty: add rows or change data.eval_fraction"
        )
    return train, held


class SourceSampler:
    """Row indices of step `step` for `rank`: see the module docstring. `sources` holds one name per row."""

    def __init__(
        self,
        sources: list[str],
        *,
        batch_size: int,
        world_size: int,
        alpha: float,
        one_source_per_batch: bool,
        seed: int,
    ):
        names, inverse = np.unique(np.asarray(sources, dtype=object).astype(str), return_inverse=True)
        self.source_names = [str(n) for n in names]
        self.rows_by_source = [np.flatnonzero(inverse == i) for i in range(len(names))]
        counts = np.array([len(r) for r in self.rows_by_source], dtype=np.float64)
        weights = counts**alpha
        self.probs = weights / weights.sum()
        self.batch_size, self.world_size = batch_size, world_size
        self.one_source_per_batch, self.seed = one_source_per_batch, seed
        global_batch = batch_size * world_size
        if one_source_per_batch and counts.min() < global_batch:
            small = {n: int(c) for n, c in zip(self.source_names, counts, strict=True) if c < global_batch}
            log.warning(
                "sources %s have fewer rows than the global batch (%d): their batches repeat rows",
                small,
                global_batch,
            )

    def global_batch(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        n = self.batch_size * self.world_size
        if self.one_source_per_batch:
            src = int(rng.choice(len(self.probs), p=self.probs))
            counts = np.zeros(len(self.probs), dtype=np.int64)
            counts[src] = n
        else:
            counts = rng.multinomial(n, self.probs)
        picks = []
        for rows, k in zip(self.rows_by_source, counts, strict=True):
            if k:
                picks.append(rows[rng.choice(len(rows), size=k, replace=k > len(rows))])
        out = np.concatenate(picks)
        return out[rng.permutation(n)]  # mix the sources across ranks

    def indices(self, step: int, rank: int) -> np.ndarray:
        return self.global_batch(step)[rank * self.batch_size : (rank + 1) * self.batch_size]


# --------------------------------------------------------------------------------------------------- collate
@dataclass
class ContrastiveBatch:
    """One packed batch (CPU tensors). Sequence order in the stream: queries, positives, negatives."""

    input_ids: torch.Tensor  # (T,) int64
    lengths: torch.Tensor  # (2B+M,) int64
    num_queries: int  # B
    num_negatives: int  # M
    pos_keys: torch.Tensor  # (B,) int64 text ids of the positives
    neg_keys: torch.Tensor  # (M,) int64
    num_truncated: int  # texts cut to max_seq_len

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def pack_token_lists(token_lists: list[list[int]], max_seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """`[CLS] ids [SEP]` per sequence, truncated to `max_seq_len` -> (flat ids (T,), lengths (S,), #truncated)."""
    from pipelines.tokenizer import CLS_ID, SEP_ID

    keep = max_seq_len - 2
    lengths = np.array([min(len(t), keep) + 2 for t in token_lists], dtype=np.int64)
    num_truncated = int(sum(len(t) > keep for t in token_lists))
    flat = np.empty(int(lengths.sum()), dtype=np.int64)
    pos = 0
    for t, n in zip(
        token_lists, lengths, strict=True
    ):  # list -> array copy; the tokenizer returns Python lists anyway
        flat[pos] = CLS_ID
        flat[pos + 1 : pos + n - 1] = t[: n - 2]
        flat[pos + n - 1] = SEP_ID
        pos += n
    return flat, lengths, num_truncated


class ContrastiveCollate:
    """Rows -> `ContrastiveBatch`. Stateful (holds the tokenizer), so build it once per worker."""

    def __init__(self, *, max_seq_len: int, num_negatives: int, tokenizer_path: str = "", seed: int = 0):
        from pipelines.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path or None)
        self.max_seq_len, self.num_negatives, self.seed = max_seq_len, num_negatives, seed

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def __call__(self, rows: dict[str, list], step: int = 0, rank: int = 0) -> ContrastiveBatch:
        queries, positives = list(rows["query"]), list(rows["positive"])
        rng = np.random.default_rng([self.seed, step, rank, 7])
        negatives: list[str] = []
        for negs in rows["negatives"]:
            negs = list(negs or [])
            if len(negs) > self.num_negatives:
                negs = [negs[i] for i in sorted(rng.choice(len(negs), self.num_negatives, replace=False))]
            negatives.extend(negs)
        texts = queries + positives + negatives
        flat, lengths, num_truncated = pack_token_lists(self.tokenize(texts), self.max_seq_len)
        return ContrastiveBatch(
            input_ids=torch.from_numpy(flat),
            lengths=torch.from_numpy(lengths),
            num_queries=len(queries),
            num_negatives=len(negatives),
            pos_keys=torch.tensor([text_key(t) for t in positives], dtype=torch.long),
            neg_keys=torch.tensor([text_key(t) for t in negatives], dtype=torch.long),
            num_truncated=num_truncated,
        )


# ------------------------------------------------------------------------------------------------ evaluation
def build_eval_set(table: pa.Table, num_eval_rows: int) -> tuple[list[str], list[str], np.ndarray]:
    """(queries, corpus, positive index per query): the corpus is every distinct held-out positive and hard
    negative, so each query must find its passage among all others (its own negatives included)."""
    if num_eval_rows and table.num_rows > num_eval_rows:
        table = table.slice(0, num_eval_rows)  # split_rows sorted the rows: a stable subset
    queries = table.column("query").to_pylist()
    corpus: list[str] = []
    index: dict[str, int] = {}

    def add(text: str) -> int:
        if text not in index:
            index[text] = len(corpus)
            corpus.append(text)
        return index[text]

    pos_idx = np.array([add(t) for t in table.column("positive").to_pylist()], dtype=np.int64)
    for negs in table.column("negatives").to_pylist():
        for t in negs or []:
            add(t)
    return queries, corpus, pos_idx


def eval_fingerprint(eval_set) -> str:
    """A hash of the held-out queries, corpus and labels: "before" and "after" must score the same set."""
    queries, corpus, pos_idx = eval_set
    h = hashlib.blake2b(digest_size=8)
    for text in (*queries, "\0", *corpus):
        h.update(text.encode("utf-8") + b"\0")
    h.update(np.asarray(pos_idx, dtype=np.int64).tobytes())
    return h.hexdigest()


@torch.no_grad()
def embed_texts(
    model: ContrastiveEncoder,
    collate: ContrastiveCollate,
    texts: list[str],
    *,
    batch_size: int,
    device: torch.device,
    autocast,
) -> torch.Tensor:
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


# ------------------------------------------------------------------------------------------------ init model
def load_init_encoder(path: str | Path) -> tuple[torch.nn.Module, Any, str | None]:
    """(NeoBERT encoder, NeoBERTConfig, pooling stored in the dir or None). `random:<preset>` (e.g.
    `random:tiny`) builds a freshly initialised preset instead: for tests and throughput benchmarks."""
    from neobert.checkpoint import CONFIG_FILE, load_encoder, resolve_model_dir
    from neobert.hf.export import load_hf_encoder

    if str(path).startswith(RANDOM_INIT_PREFIX):
        from neobert.model import NeoBERT, NeoBERTConfig

        cfg = NeoBERTConfig.preset(str(path).removeprefix(RANDOM_INIT_PREFIX))
        log.warning(
            "model.init=%s: a freshly initialised encoder, NOT a pretrained one (tests/benchmarks)", path
        )
        return NeoBERT(cfg), cfg, None
    try:
        d = resolve_model_dir(path)
    except ValueError as e:
        raise ValueError(f"model.init: {e}") from None
    if (d / CONFIG_FILE).exists():
        encoder = load_encoder(d)  # reads the weights once; pooling comes from the small config JSON
        return encoder, encoder.config, json.loads((d / CONFIG_FILE).read_text()).get("pooling")
    return load_hf_encoder(d)


# ----------------------------------------------------------------------------------------------- worker loop
def _read_dataset_table(name: str) -> pa.Table:
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    tables = list(shard.iter_batches(batch_size=4096, batch_format="pyarrow"))
    if not tables:
        raise ValueError(f"dataset {name!r} reached the worker empty")
    return pa.concat_tables(tables).combine_chunks()


class ContrastiveRunner:
    """Per-worker state and loop. `run()` reads like the table of contents in the module docstring."""

    def __init__(self, cfg: ContrastiveConfig):
        import ray.train
        import ray.train.torch

        self.cfg = cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(cfg.train.seed)
        encoder, self.model_cfg, _ = load_init_encoder(cfg.model.init)
        self.model = ContrastiveEncoder(encoder, cfg.model.pooling)
        self.ddp_model = (
            ray.train.torch.prepare_model(self.model) if self.world > 1 else self.model.to(self.device)
        )
        from neobert.training import build_optimizer, build_scheduler

        self.optimizer = build_optimizer(self.model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.scheduler = build_scheduler(
            self.optimizer,
            warmup_steps=cfg.train.warmup_steps,
            total_steps=cfg.train.max_steps,
            schedule=cfg.train.schedule,
            min_lr_ratio=cfg.train.min_lr_ratio,
        )
        use_bf16 = self.device.type == "cuda" and cfg.train.precision == "bf16"
        if cfg.train.precision == "bf16" and not use_bf16 and self.rank == 0:
            log.warning("train.precision=bf16 has no effect on %s: running fp32", self.device)
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else (lambda: nullcontext())
        )
        self.collate = ContrastiveCollate(
            max_seq_len=cfg.data.max_seq_len,
            num_negatives=cfg.data.num_negatives,
            tokenizer_path=cfg.data.tokenizer,
            seed=cfg.train.seed,
        )
        self.train_table = _read_dataset_table("train")
        self.sampler = SourceSampler(
            self.train_table.column("source").to_pylist(),
            batch_size=cfg.train.batch_size,
            world_size=self.world,
            alpha=cfg.data.source_alpha,
            one_source_per_batch=cfg.data.one_source_per_batch,
            seed=cfg.train.seed,
        )
        self.eval_set = (
            build_eval_set(_read_dataset_table("eval"), cfg.data.num_eval_rows) if self.rank == 0 else None
        )
        self.step = 0
        self.eval_before: dict[str, float] | None = None
        self.eval_before_fingerprint: str | None = None
        self.resumed = False
        self.metrics_path = Path(cfg.run.output_dir) / "metrics.jsonl"
        if self.rank == 0:
            log.info(
                "contrastive: %d workers on %s, attention backend %s, %d train rows from sources %s (p=%s)",
                self.world,
                self.device,
                getattr(encoder, "attn_backend", "?"),
                self.train_table.num_rows,
                self.sampler.source_names,
                np.round(self.sampler.probs, 3).tolist(),
            )

    # -- checkpoints ------------------------------------------------------------------------------------------
    def restore(self) -> None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            from neobert.checkpoint import encoder_state_dict, load_model_dir

            md = load_model_dir(Path(d) / "model")
            self.model.encoder.load_state_dict(encoder_state_dict(md.state_dict), strict=True)
            state = torch.load(Path(d) / "train_state.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.eval_before = int(state["step"]), state.get("eval_before")
        self.eval_before_fingerprint = state.get("eval_fingerprint")
        torch.set_rng_state(state["torch_rng"])
        self.resumed = True
        if self.rank == 0:
            log.info("resumed from step %d", self.step)

    def report(self, metrics: dict[str, Any], *, checkpoint: bool) -> None:
        """All ranks call this (a barrier); rank 0 attaches the checkpoint: model/ + train_state.pt."""
        import ray.train
        from ray.train import Checkpoint

        from neobert.checkpoint import save_model_dir

        if not checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            ck = None
            if self.rank == 0:
                save_model_dir(
                    Path(d) / "model",
                    self.model.encoder,
                    self.model_cfg,
                    kind="encoder",
                    pooling=self.cfg.model.pooling,
                    extra={"trained_by": "contrastive", "step": self.step, "config": to_dict(self.cfg)},
                )
                torch.save(
                    {
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "step": self.step,
                        "eval_before": self.eval_before,
                        "eval_fingerprint": self.eval_before_fingerprint,
                        "torch_rng": torch.get_rng_state(),
                    },
                    Path(d) / "train_state.pt",
                )
                ck = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ck)

    def log_metrics(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log.info(
            "%s", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        )

    def evaluate(self, *, init_model: bool = False) -> dict[str, float] | None:
        """Retrieval metrics on rank 0 (None elsewhere); `init_model` scores a fresh copy of `model.init`."""
        if self.rank != 0:
            return None
        model = self.model
        if init_model:
            torch.manual_seed(
                self.cfg.train.seed
            )  # same as __init__, so random:<preset> rebuilds the same model
            encoder, _, _ = load_init_encoder(self.cfg.model.init)
            model = ContrastiveEncoder(encoder, self.cfg.model.pooling).to(self.device)
        return evaluate_retrieval(
            model,
            self.collate,
            self.eval_set,
            batch_size=self.cfg.train.eval_batch_size,
            device=self.device,
            autocast=self.autocast,
        )

    # -- one step ---------------------------------------------------------------------------------------------
    def make_batch(self, step: int) -> ContrastiveBatch:
        """The packed batch of `step` for this rank (runs in the prefetch thread; tokenizers release the GIL)."""
        idx = self.sampler.indices(step, self.rank)
        rows = self.train_table.take(pa.array(idx)).to_pydict()
        batch = self.collate(rows, step=step, rank=self.rank)
        if self.device.type == "cuda":
            batch.input_ids = batch.input_ids.pin_memory()
        return batch

    def train_step(self, batch: ContrastiveBatch, t0: float, t_data: float) -> dict[str, float]:
        """One optimizer step on `batch`; `t0` = when this step started waiting for it, `t_data` = that wait."""
        from neobert.packing import PackedMeta

        t1 = time.perf_counter()
        meta = PackedMeta.from_lengths(batch.lengths, device=self.device)
        input_ids = batch.input_ids.to(self.device, non_blocking=True)
        t_data += time.perf_counter() - t1
        b, m = batch.num_queries, batch.num_negatives
        with self.autocast():
            emb_SD = self.ddp_model(input_ids, meta)  # (2B+M, D)
        use_keys = self.cfg.train.mask_duplicate_positives
        out = info_nce_loss(
            emb_SD[:b],
            emb_SD[b : 2 * b],
            emb_SD[2 * b : 2 * b + m],
            temperature=self.cfg.train.temperature,
            pos_keys_B=batch.pos_keys.to(self.device) if use_keys else None,
            neg_keys_M=batch.neg_keys.to(self.device) if use_keys else None,
        )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        clip = self.cfg.train.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), clip if clip > 0 else float("inf")
        )
        self.optimizer.step()
        self.scheduler.step()
        stats = torch.tensor(
            [out.loss_sum.item(), out.num_correct, batch.num_tokens, batch.num_truncated, b + b + m],
            dtype=torch.float64,
            device=self.device,
        )
        if self.world > 1:
            torch.distributed.all_reduce(stats)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        loss = stats[0].item() / out.num_global_queries
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"train/loss is {loss} at step {self.step}; lower train.lr or check the --init checkpoint"
            )
        return {
            "train/loss": loss,
            "train/accuracy": stats[1].item() / out.num_global_queries,
            "train/tokens_per_s": stats[2].item() / dt,
            "train/sequences_per_s": stats[4].item() / dt,
            "train/candidates": float(out.num_candidates),
            "train/grad_norm": float(grad_norm),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/step_time_s": dt,
            "data/wait_fraction": t_data / dt,
            "data/truncated_texts": stats[3].item(),
        }

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg.train
        self.restore()
        fingerprint = eval_fingerprint(self.eval_set) if self.rank == 0 else None
        stale = (
            self.rank == 0 and self.eval_before is not None and self.eval_before_fingerprint != fingerprint
        )
        if stale:
            log.warning(
                "the held-out set changed since the checkpoint: re-running eval 'before' on the init model"
            )
        if self.eval_before is None or stale:
            self.eval_before = self.evaluate(init_model=stale)
            if self.rank == 0:
                self.log_metrics(
                    {"step": self.step, **{f"eval/before/{k}": v for k, v in self.eval_before.items()}}
                )
        self.eval_before_fingerprint = fingerprint
        self.ddp_model.train()
        prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="contrastive-collate")
        upcoming = prefetch.submit(self.make_batch, self.step) if self.step < cfg.max_steps else None
        while self.step < cfg.max_steps:
            if cfg.fail_at_step and self.step == cfg.fail_at_step and not self.resumed and self.rank == 0:
                raise RuntimeError(f"fail_at_step={cfg.fail_at_step}: injected failure to test resume")
            t0 = time.perf_counter()
            batch = upcoming.result()
            t_data = time.perf_counter() - t0
            if self.step + 1 < cfg.max_steps:
                upcoming = prefetch.submit(self.make_batch, self.step + 1)
            metrics = self.train_step(batch, t0, t_data)
            self.step += 1
            is_ckpt = bool(cfg.checkpoint_every) and self.step % cfg.checkpoint_every == 0
            is_ckpt = is_ckpt and self.step < cfg.max_steps
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or self.step == 1:
                self.log_metrics({"step": self.step, **metrics})
                if not is_ckpt:  # as in pretraining: Ray Train (dashboard, callbacks) sees every logged step
                    self.report({"step": self.step, **metrics}, checkpoint=False)
            if is_ckpt:
                self.report({"step": self.step, **metrics}, checkpoint=True)
        after = self.evaluate()
        final: dict[str, Any] = {"step": self.step}
        if self.rank == 0:
            final.update({f"eval/before/{k}": v for k, v in self.eval_before.items()})
            final.update({f"eval/after/{k}": v for k, v in after.items()})
            self.log_metrics(final)
        prefetch.shutdown()
        self.report(final, checkpoint=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ContrastiveRunner(from_dict(ContrastiveConfig, config)).run()


# ----------------------------------------------------------------------------------------------------- driver
def load_rows(input_dir: str | Path) -> pa.Table:
    """The validated rows of `input_dir`; ValueError (with the fix) when it was not validated."""
    from pipelines.contrastive.validate import read_validated

    table = read_validated(input_dir)
    if not isinstance(table, pa.Table):  # a Ray Dataset
        table = pa.concat_tables(list(table.iter_batches(batch_format="pyarrow", batch_size=None)))
    return table.select(list(ROW_COLUMNS))


def build_trainer(cfg: ContrastiveConfig, rows: pa.Table):
    """A `TorchTrainer` over the train/held-out split of `rows` (validated rows). The driver keeps nothing else."""
    import ray.data
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train, held = split_rows(rows, cfg.data.eval_fraction)
    out = Path(cfg.run.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(out)))
    (out / "config.yaml").write_text(to_yaml(cfg))
    log.info("contrastive rows: %d train, %d held-out -> %s", train.num_rows, held.num_rows, out)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=to_dict(cfg),
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.use_gpu else {})},
        ),
        datasets={"train": ray.data.from_arrow(train), "eval": ray.data.from_arrow(held)},
        # not split: every worker samples from all rows; preserve_order: rows arrive in split_rows' order, which the
        # sampler's positions (and therefore resume) rely on
        dataset_config=DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=str(out / "ray"),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_checkpoints_to_keep),
        ),
    )


def finalize(cfg: ContrastiveConfig, result) -> dict[str, Any]:
    """Write eval.json and copy the final model dir into the output dir; return the eval dict."""
    out = Path(cfg.run.output_dir).resolve()
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
    (out / "eval.json").write_text(json.dumps(evals, indent=2) + "\n")
    if result.checkpoint is not None:
        import shutil

        with result.checkpoint.as_directory() as d:
            shutil.rmtree(out / "model", ignore_errors=True)
            shutil.copytree(Path(d) / "model", out / "model")
    return evals


def run_contrastive(cfg: ContrastiveConfig, rows: pa.Table) -> dict[str, Any]:
    """Train + evaluate; returns {"before": ..., "after": ..., "step": ...} (also in OUTPUT/eval.json)."""
    os.makedirs(cfg.run.output_dir, exist_ok=True)
    cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, output_dir=str(Path(cfg.run.output_dir).resolve()))
    )
    result = build_trainer(cfg, rows).fit()
    return finalize(cfg, result)


# ------------------------------------------------------------------------------------ embedded defaults
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

    if input_dir:
        d = Path(input_dir)
        if not (d / MARKER_NAME).is_file():
            raise ValueError(
                f"{d} is not a validated contrastive dataset (no {MARKER_NAME}); validate it first: "
                f"`python jobs/validate_contrastive.py --source NAME=PATH ... --output {d}`, then pass "
                f"--data.input_dir {d}"
            )
        return d
    d = embedded_validated_dir()
    if not (d / MARKER_NAME).is_file():
        log.info("validating the embedded contrastive sources into %s (first run only)", d)
        validate_contrastive(ValidateContrastiveConfig(output=str(d)))
    return d


def embedded_pretrained_dir() -> Path:
    """The tiny pretraining checkpoint the no-argument job starts from (a model dir), next to the embedded data."""
    from pipelines.embedded import materialize

    root = materialize().root
    return root.parent / f"{root.name}-pretrained-tiny" / "model"


def ensure_embedded_pretrained(cfg: ContrastiveConfig) -> Path:
    """The embedded tiny pretraining checkpoint; trained with `pipelines.pretrain` (configs/pretrain.yaml
    defaults: tiny preset on the embedded text) on first use and cached as a model dir."""
    import shutil

    from neobert.checkpoint import CONFIG_FILE

    target = embedded_pretrained_dir()
    if (target / CONFIG_FILE).exists():
        return target
    from pipelines import pretrain

    storage = target.parent / "ray"
    log.info("no embedded pretraining checkpoint at %s: pretraining the tiny model first", target)
    overrides = [
        f"--checkpoint.storage_path={storage}",
        "--checkpoint.name=embedded-tiny",
        f"--scaling.num_workers={cfg.run.num_workers}",
        f"--scaling.use_gpu={str(cfg.run.use_gpu).lower()}",
        f"--scaling.resources_per_worker={json.dumps({'CPU': cfg.run.cpus_per_worker})}",
    ]
    pcfg = pretrain.load_pretrain_config(None, overrides)
    result = pretrain.build_trainer(pcfg).fit()
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
