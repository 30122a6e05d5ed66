"""Contrastive training data: the train/held-out split, the global pair order, the packed batch and its collate.

Data: the validated, normalised rows of `jobs/validate_contrastive.py` (`query`, `positive`, `negatives`,
`source`), read by Ray Data and never gathered on the driver. The split is a stable hash of the query text
(`eval_fraction`, `SplitRows`, applied as a Ray Data map), so it never changes between runs or resumes.

Order (`ContrastiveStepSource`, a `pipelines.train.data.GlobalStepSource`): each source is its own Ray Dataset of
train pairs, read in full and in file order by every worker (not split); the global order is the one of
pretraining (docs/data_order.md): per source and epoch a seeded window shuffle, then the deficit interleaving of the
sources, here counting PAIRS (every row weighs 1) with source weights rows**alpha (alpha=1: as in the data,
alpha=0: uniform over sources; `source_weights`). Sources repeat (a new epoch, newly shuffled, at their end).
Global step s takes the next `global_batch_size` pairs (always: the batch-size warmup of pretraining,
`pipelines.train.data.BatchRamp`, is not offered here; `pair_mixture` leaves it off); rank r of W trains pairs [r*G/W, (r+1)*G/W) of them. With
`one_source_per_batch` the whole global batch comes from the one source the deficit rule picks (in-batch negatives
from another source are trivially easy). Nothing depends on W: the state (`state_dict()`) is the global position,
so a run resumes on any number of workers at the next unseen pair.

Collate (`ContrastiveCollate`): queries, positives and hard negatives of a batch are tokenised as
`[CLS] text [SEP]` (truncated to `max_seq_len`) and packed into ONE flat token stream with `cu_seqlens`
(order: B queries, B positives, M negatives), encoded once on the varlen path and pooled per sequence. Which hard
negatives a row keeps (when it has more than `num_negatives`) is seeded by the row's key, not by rank or step.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import torch

from pipelines.train.data import (
    GlobalStepSource,
    MixtureSection,
    OpenEpoch,
    SourceSection,
    _keys,
    dataset_name,
    ray_open_epochs,
)

log = logging.getLogger("neobert.contrastive")

ROW_COLUMNS = ("query", "positive", "negatives", "source")


def text_key(text: str) -> int:
    """A stable 63-bit id of a text (dedup of passages in batches and in the eval corpus)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def check_columns(table: pa.Table) -> None:
    missing = [c for c in ROW_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"contrastive rows lack column(s) {missing} (have {table.column_names}); read a dir written by "
            "jobs/validate_contrastive.py"
        )


def eval_mask(table: pa.Table, eval_fraction: float) -> np.ndarray:
    """(n,) bool: the rows held out, by a stable hash of the query text (a query is never on both sides)."""
    qkey = np.array([text_key(q) for q in table.column("query").to_pylist()], dtype=np.int64)
    return qkey % 10_000 < int(round(eval_fraction * 10_000))


def sort_rows(table: pa.Table) -> pa.Table:
    """The rows sorted by (query hash, positive hash): an order no file layout changes."""
    qkey = np.array([text_key(q) for q in table.column("query").to_pylist()], dtype=np.int64)
    pkey = np.array([text_key(p) for p in table.column("positive").to_pylist()], dtype=np.int64)
    return table.take(pa.array(np.lexsort((pkey, qkey))))


class SplitRows:
    """Ray Data step (`map_batches(..., batch_format="pyarrow")`): the train (`held_out=False`) or held-out rows
    of a batch of validated rows, the `ROW_COLUMNS` only."""

    def __init__(self, eval_fraction: float, *, held_out: bool) -> None:
        self.eval_fraction, self.held_out = eval_fraction, held_out

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch)
        batch = batch.select(list(ROW_COLUMNS))
        mask = eval_mask(batch, self.eval_fraction)
        return batch.filter(pa.array(mask if self.held_out else ~mask, type=pa.bool_()))


def split_rows(table: pa.Table, eval_fraction: float) -> tuple[pa.Table, pa.Table]:
    """(train, eval) of a table the caller holds (the evaluation harness's held-out triples), split as `SplitRows`
    splits the training stream: a query never lands in both, and reruns agree. Both come back in `sort_rows`
    order, so the eval cap (`num_eval_rows`) takes a stable subset whatever order the rows arrived in."""
    check_columns(table)
    table = sort_rows(table)
    is_eval = eval_mask(table, eval_fraction)
    train, held = table.filter(pa.array(~is_eval)), table.filter(pa.array(is_eval))
    if train.num_rows == 0 or held.num_rows == 0:
        raise ValueError(
            f"eval_fraction={eval_fraction} splits {table.num_rows} rows into {train.num_rows} train / "
            f"{held.num_rows} held-out; both must be non-empty: add rows or change data.eval_fraction"
        )
    return train, held


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
    row_keys: torch.Tensor | None = None  # (B,) int64 global-order keys of the rows (source, epoch, position)

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
        # ids only (no offsets)
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def __call__(self, rows: dict[str, list], keys: np.ndarray | None = None) -> ContrastiveBatch:
        """`keys`: one int key per row (its global-order key) that seeds the choice of its hard negatives, so a
        row gets the same negatives on any rank and world size; None = a hash of the query text."""
        queries, positives = list(rows["query"]), list(rows["positive"])
        if keys is None:
            keys = np.array([text_key(q) for q in queries], dtype=np.int64)
        negatives: list[str] = []
        for key, negs in zip(keys, rows["negatives"], strict=True):
            negs = list(negs or [])
            if len(negs) > self.num_negatives:
                rng = np.random.default_rng([self.seed, int(key), 7])
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
            row_keys=torch.as_tensor(np.asarray(keys, dtype=np.int64)),
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


# ----------------------------------------------------------------------------------------------------------------
# The global pair order
# ----------------------------------------------------------------------------------------------------------------
STATE_KIND = "contrastive"


def source_weights(rows_per_source: dict[str, int], alpha: float) -> dict[str, float]:
    """P(source) ∝ train rows**alpha, normalized (the share of PAIRS each source gets)."""
    names = sorted(n for n, c in rows_per_source.items() if c > 0)
    if not names:
        raise ValueError("no train rows in any source: check data.input_dir and data.eval_fraction")
    w = np.array([float(rows_per_source[n]) for n in names]) ** alpha
    return {n: float(x) for n, x in zip(names, w / w.sum(), strict=True)}


def pair_mixture(
    rows_per_source: dict[str, int], *, alpha: float, global_batch_size: int, shuffle_window_rows: int,
    seed: int, path: str, prefetch_steps: int = 2,
) -> MixtureSection:  # fmt: skip
    """The `MixtureSection` of the contrastive pair order: one repeating source per validated source, weighted by
    `source_weights`; a "token" of it is one pair (`global_batch_tokens` = pairs per global step)."""
    return MixtureSection(
        sources=[
            SourceSection(name=n, path=path, weight=w, repeat=True)
            for n, w in source_weights(rows_per_source, alpha).items()
        ],  # fmt: skip
        global_batch_tokens=global_batch_size,
        shuffle_window_rows=shuffle_window_rows,
        seed=seed,
        prefetch_steps=prefetch_steps,
    )


def rank_batch_size(global_batch_size: int, world_size: int) -> int:
    """Pairs per rank and step; ValueError unless the workers split the global batch evenly."""
    if world_size < 1 or global_batch_size % world_size:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} pairs do not split over {world_size} workers; make it a "
            f"multiple of every number of workers the run may use (e.g. {max(1, global_batch_size // max(world_size, 1)) * max(world_size, 1)})"
        )
    return global_batch_size // world_size


def source_dataset_name(source: str) -> str:
    """The Ray Train dataset name of a source's train pairs."""
    return dataset_name(source)


class ContrastiveStepSource(GlobalStepSource):
    """`StepSource` of contrastive training over the global pair order (module docstring): one
    `ContrastiveBatch` per step with this rank's G/W pairs, assembled ahead in a background thread."""

    size_column = None  # every pair weighs 1
    size_metric = "pairs"
    state_kind = STATE_KIND

    def __init__(
        self, cfg: MixtureSection, open_epochs: dict[str, OpenEpoch], collate: ContrastiveCollate, *,
        rank: int = 0, world_size: int = 1, one_source_per_batch: bool = False, state: dict | None = None,
        max_steps: int | None = None, pin_memory: bool = False,
    ) -> None:  # fmt: skip
        self.collate, self.one_source_per_batch = collate, one_source_per_batch
        super().__init__(
            cfg, open_epochs, pack_tokens=1,
            rows_per_micro_batch=rank_batch_size(cfg.global_batch_tokens, world_size), rank=rank,
            world_size=world_size, state=state, max_steps=max_steps, validate=False, pin_memory=pin_memory,
        )  # fmt: skip

    def _global_rows(self, n: int) -> list:
        if self.one_source_per_batch:
            return self.order.next_rows_one_source(n)
        return super()._global_rows(n)

    def _snapshot(self, step: int) -> dict[str, Any]:
        return {**super()._snapshot(step), "kind": STATE_KIND}

    def _collate(self, rows: list) -> ContrastiveBatch:
        parts: list[pa.Table] = []
        run: list[int] = []
        for j, r in enumerate(rows):  # one `take` per run of rows from the same window
            run.append(r.row)
            if j + 1 == len(rows) or rows[j + 1].window is not r.window:
                parts.append(r.window.table.take(pa.array(run, type=pa.int64())).select(list(ROW_COLUMNS)))
                run = []
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        bases = np.array([self._key_bases(r.source, r.epoch) for r in rows], dtype=np.uint64)
        keys = _keys(bases, np.array([r.pos for r in rows], dtype=np.uint64))
        batch = self.collate(table.to_pydict(), keys=keys)
        if self.pin_memory:
            batch.input_ids = batch.input_ids.pin_memory()
        return batch


def pair_source_from_shards(
    cfg: MixtureSection, collate: ContrastiveCollate, *, one_source_per_batch: bool, state: dict | None,
    max_steps: int | None, prefetch_batches: int = 2, pin_memory: bool = False,
) -> ContrastiveStepSource:  # fmt: skip
    """On a Ray Train worker: this rank's `ContrastiveStepSource` over `get_dataset_shard(source_dataset_name(s))`."""
    import ray.train

    ctx = ray.train.get_context()
    its = {s.name: ray.train.get_dataset_shard(source_dataset_name(s.name)) for s in cfg.sources}
    return ContrastiveStepSource(
        cfg, ray_open_epochs(its, prefetch_batches=prefetch_batches), collate, rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(), one_source_per_batch=one_source_per_batch, state=state,
        max_steps=max_steps, pin_memory=pin_memory,
    )  # fmt: skip
