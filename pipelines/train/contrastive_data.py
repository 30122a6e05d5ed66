"""Contrastive training data: the train/held-out split, the source sampler, the packed batch and its collate,
and `SampledStepSource`, the `StepSource` the contrastive runner reads.

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

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

log = logging.getLogger("neobert.contrastive")

ROW_COLUMNS = ("query", "positive", "negatives", "source")


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


class SampledStepSource:
    """`StepSource` of contrastive training: step s's batch is `sampler.indices(s, rank)` of the train rows,
    collated one step ahead in a thread (tokenizers release the GIL). State: the step counter."""

    def __init__(self, table: pa.Table, sampler: SourceSampler, collate: ContrastiveCollate, *, rank: int,
                 start_step: int, num_steps: int, pin_memory: bool = False) -> None:  # fmt: skip
        self.table, self.sampler, self.collate, self.rank = table, sampler, collate, rank
        self.step, self.num_steps, self.pin_memory = start_step, num_steps, pin_memory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="contrastive-collate")
        self._next = self._pool.submit(self.make_batch, self.step) if self.step < num_steps else None

    def make_batch(self, step: int) -> ContrastiveBatch:
        idx = self.sampler.indices(step, self.rank)
        rows = self.table.take(pa.array(idx)).to_pydict()
        batch = self.collate(rows, step=step, rank=self.rank)
        if self.pin_memory:
            batch.input_ids = batch.input_ids.pin_memory()
        return batch

    def next_step(self) -> list[ContrastiveBatch]:
        if self._next is None:
            raise RuntimeError(
                f"SampledStepSource: asked for step {self.step + 1} of train.num_steps={self.num_steps}"
            )
        batch = self._next.result()
        self.step += 1
        self._next = self._pool.submit(self.make_batch, self.step) if self.step < self.num_steps else None
        return [batch]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sampled", "step": self.step}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
