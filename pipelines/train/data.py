"""The global data order: packed rows of one or more sources, in an order no world size or batch setting changes.

    sources (packed dirs) --(each worker reads every source in full, file and row order)--> per source, epoch e:
      windows of `shuffle_window_rows` input rows, each permuted by (seed, source, e, window)  = the epoch order
    -> token-deficit interleaving of the sources                                              = the global order
    -> global step s = the next rows(s) rows of the global order (`BatchRamp`: R = global_batch_tokens //
       pack_tokens at every step, or with a batch-size warmup k x S rows at the k-th level, then R)
    -> rank r of W takes rows [r*A*m, (r+1)*A*m) of the step: A = rows(s) / (W*m) micro-batches of
       m = rows_per_micro_batch rows

Every function of that chain depends only on (seed, sources, their weights, `shuffle_window_rows` and the batch
config), never on the world size W, the micro-batch size m or the accumulation A, so the state
(`StepSource.state_dict`) is the GLOBAL position: per source the epoch and the rows consumed in it, the tokens
consumed, the global step (and the ramp, which a resume must keep). A run stopped on W workers resumes on W' (or
with another m) at the next unseen row: no row lost or repeated, and every later global step holds the same rows
as in the uninterrupted run (the rank that trains a row may change), inside a batch warmup too.

Batch-size warmup: the rows of step s are a closed-form function of s (`BatchRamp.rows`), so the global order is
the same whatever the warmup; only where it is cut into steps changes. Every level is a multiple of the start S,
so S (not only R) must split into W x m on every world size of the run (`BatchRamp.check_split`).

Reading. Every worker reads every source's whole Ray Dataset (`ray.train.get_dataset_shard` of a dataset that
`DataConfig(datasets_to_split=[])` does NOT split; `preserve_order=True`, so each worker sees the same rows in
the same order) and keeps only its own rows. The rows of the other ranks cost reading and Arrow slicing, never
collation. That is W times the read work of a split dataset; it buys independence from W (a split's row ->
worker assignment depends on W and on block arrival) and a resume that skips consumed rows by dropping whole
Arrow batches (`_EpochCursor._skip_input`).

Shuffling: a seeded WINDOW shuffle, not a sliding buffer. Input rows [w*B, (w+1)*B) of an epoch form window w and
are permuted by a generator seeded with (seed, source, epoch, w): position p of the epoch order is row
`w*B + perm_w[p - w*B]`. The row at any position is computable from B input rows, so resuming at position p reads
and drops the first `(p // B) * B` input rows without keeping them. Ray's `local_shuffle_buffer_size` (a sliding
buffer) mixes across window edges, but which row comes out at position p depends on everything before p, so a
resume would have to replay (and hold) every row of the epoch up to p, and its output also depends on the
`batch_size` it is asked for. Trade-off: a window only mixes rows that are within B input rows of each other, so
rows of one file stay near each other; raise B (memory: B packed rows per source per worker) or shuffle the
files when the dataset is written. B = 0 keeps file order.

Mixtures: each next row of the global order comes from the source whose consumed tokens are furthest below its
weight's share of all tokens consumed so far (ties: the first listed), so the realized token share of every
source stays within one row's tokens of its weight (the unit tests check < 1% after a few hundred rows). Each
source counts its epochs; a source with `repeat: false` runs out at its epoch's end, and then, by
`on_exhausted`, the stream stops (`DataExhausted` at the next step) or continues with the others, their weights
renormalized.

Masks: each packed row gets a `row_key` from (source, epoch, position in the epoch), so a runner that seeds each
row's mask with its key masks a row identically on any world size.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import torch

from pipelines.train.collate import PackedBatch, collate_packed

log = logging.getLogger("neobert.data")

STATE_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_U64 = np.uint64((1 << 64) - 1)


class StepSource(Protocol):
    """Where the runner gets each step's data. It stores `state_dict()` in every checkpoint; a resumed run rebuilds
    the source from that state and must get exactly the batches an uninterrupted run would have got. Masks are
    keyed by each batch's `row_keys`, never by rank or micro-batch index."""

    def next_step(self) -> list[PackedBatch]:
        """This rank's micro-batches for the next global step (collated, on the CPU)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-able data position after the last step returned by `next_step`."""
        ...

    def close(self) -> None:
        """Stop background readers; safe to call twice."""
        ...


class DataExhausted(Exception):
    """No further full global step: a source with `repeat: false` ran out (or all of them, with renormalize)."""


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SourceSection:
    name: str = ""  # [A-Za-z0-9_.-]+; the metric tag (data/tokens/<name>) and the key in the data state
    path: str = ""  # a packed dir of jobs/preprocess.py (its train/*.parquet), local path or URI
    weight: float = 1.0  # share of the TOKENS of the mixture (normalized over the sources)
    repeat: bool = True  # start a new epoch at the end of this source (false: it runs out, see on_exhausted)

    def __post_init__(self) -> None:
        if not self.name or not _NAME_RE.match(self.name):
            raise ValueError(
                f"data source name {self.name!r} must be non-empty letters, digits, '_', '.' or '-' (it names a "
                f"metric and a dataset); rename it"
            )
        if not self.path:
            raise ValueError(
                f"data source {self.name!r}: set its path to a packed dir made by jobs/preprocess.py"
            )
        if not (self.weight > 0 and np.isfinite(self.weight)):
            raise ValueError(
                f"data source {self.name!r}: weight must be a finite number > 0, got {self.weight}"
            )


@dataclass
class MixtureSection:
    sources: list[SourceSection] = field(default_factory=list)  # at least one (checked by `check`)
    global_batch_tokens: int = (
        65536  # token budget of one global step, all workers and micro-batches together
    )
    on_exhausted: Literal["stop", "renormalize"] = "stop"  # when a repeat=false source runs out
    shuffle_window_rows: int = 1024  # rows permuted together per source (0 = file order); see the module doc
    seed: int = 0  # seeds the window permutations
    prefetch_steps: int = 2  # global steps assembled ahead by a background thread per worker
    # Batch-size warmup (`BatchRamp`; both 0 = off): the first step holds this many tokens, each level adds as many
    batch_warmup_start_tokens: int = 0
    batch_warmup_tokens: int = 0  # tokens the warmup spans (sets the steps per level)

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"data sources must have distinct names; {dup} appear more than once")
        if self.global_batch_tokens < 1:
            raise ValueError(f"global_batch_tokens must be >= 1, got {self.global_batch_tokens}")
        for key in ("shuffle_window_rows", "seed", "prefetch_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.on_exhausted == "renormalize" and all(s.repeat for s in self.sources) and self.sources:
            log.warning("on_exhausted=renormalize has no effect: every source has repeat=true")

    def check(self, pack_tokens: int) -> None:
        """Checks that need the pack size (raise ValueError naming the keys to change)."""
        if not self.sources:
            raise ValueError("no data sources: list at least one {name, path, weight, repeat} under sources")
        if self.global_batch_tokens % pack_tokens:
            raise ValueError(
                f"global_batch_tokens={self.global_batch_tokens} is not a multiple of pack_tokens={pack_tokens} "
                f"(a global step is a whole number of packed rows); set it to e.g. "
                f"{max(1, round(self.global_batch_tokens / pack_tokens)) * pack_tokens}"
            )
        self.ramp(pack_tokens)

    def rows_per_step(self, pack_tokens: int) -> int:
        """Rows of a step at the full global batch (after any warmup)."""
        self.check(pack_tokens)
        return self.global_batch_tokens // pack_tokens

    def ramp(self, pack_tokens: int) -> BatchRamp:
        """The rows of every global step (`BatchRamp`; flat unless the batch_warmup keys are set)."""
        return BatchRamp.from_tokens(
            self.global_batch_tokens, pack_tokens, self.batch_warmup_start_tokens, self.batch_warmup_tokens
        )


def plan_accumulation(
    global_batch_tokens: int, pack_tokens: int, world_size: int, rows_per_micro_batch: int
) -> int:
    """A = R / (W * m) micro-batches per rank and step, R = global_batch_tokens // pack_tokens; ValueError unless whole."""
    if global_batch_tokens % pack_tokens:
        raise ValueError(
            f"global_batch_tokens={global_batch_tokens} is not a multiple of pack_tokens={pack_tokens}; "
            "make it one"
        )
    rows = global_batch_tokens // pack_tokens
    per_pass = world_size * rows_per_micro_batch
    if world_size < 1 or rows_per_micro_batch < 1 or rows % per_pass:
        raise ValueError(
            f"a global step of global_batch_tokens={global_batch_tokens} is {rows} rows of pack_tokens={pack_tokens}, "
            f"which {world_size} workers x {rows_per_micro_batch} rows per micro-batch (tokens_per_micro_batch / "
            f"pack_tokens) do not divide; change global_batch_tokens, the number of workers or "
            f"tokens_per_micro_batch so that workers x rows_per_micro_batch divides {rows}"
        )
    return rows // per_pass


# ----------------------------------------------------------------------------------------------------------------
# Batch-size warmup: rows of global step s
# ----------------------------------------------------------------------------------------------------------------
WARMUP_KEYS = ("train.batch_warmup_start_tokens", "train.batch_warmup_tokens", "train.global_batch_tokens")


@dataclass(frozen=True)
class BatchRamp:
    """The number of packed rows of global step s (0-based), a function of s and the config only.

    Levels are k x S rows for k = 1..K (S = start_rows, K = full_rows / S); levels 1..K-1 (the warmup) last
    `steps_per_level` = n steps each, from step (K-1) x n on every step holds full_rows = R rows. S is both the
    first batch and the increment (ModernBERT: 768 -> 4,608 sequences in steps of 768). n is chosen so that the
    warmup spans about `batch_warmup_tokens`: n = max(1, round(warmup / (pack x S x K(K-1)/2))). A flat ramp (no
    warmup) is K = 1: every step holds R rows. Every level is a multiple of S, so S is the granule that every
    world size W x rows per micro-batch m of the run must divide (`check_split`); the accumulation of step s is
    rows(s) / (W x m), the same on every rank.
    """

    pack_tokens: int
    full_rows: int  # R: rows of a step after the warmup (global_batch_tokens / pack_tokens)
    start_rows: int  # S: rows of the first level and of every increment (= R: flat)
    steps_per_level: int = 0  # n: steps of each warmup level (0 when flat)

    def __post_init__(self) -> None:
        assert self.pack_tokens >= 1 and self.start_rows >= 1 and self.full_rows % self.start_rows == 0, self
        assert (self.steps_per_level >= 1) == (self.start_rows < self.full_rows), self

    @classmethod
    def flat(cls, full_rows: int, pack_tokens: int) -> BatchRamp:
        return cls(pack_tokens, full_rows, full_rows, 0)

    @classmethod
    def from_tokens(
        cls, global_batch_tokens: int, pack_tokens: int, start_tokens: int = 0, warmup_tokens: int = 0,
        *, keys: tuple[str, str, str] = WARMUP_KEYS,
    ) -> BatchRamp:  # fmt: skip
        """The ramp of a config; ValueError naming `keys` (start, warmup, global batch) and a value that works."""
        k_start, k_warm, k_global = keys
        if global_batch_tokens < 1 or global_batch_tokens % pack_tokens:
            raise ValueError(
                f"{k_global}={global_batch_tokens} is not a positive multiple of pack_tokens={pack_tokens} (a global "
                f"step is a whole number of packed rows); set it to e.g. "
                f"{max(1, round(global_batch_tokens / pack_tokens)) * pack_tokens}"
            )
        full = global_batch_tokens // pack_tokens
        if start_tokens < 0 or warmup_tokens < 0:
            raise ValueError(f"{k_start} and {k_warm} must be >= 0, got {start_tokens} and {warmup_tokens}")
        if (start_tokens > 0) != (warmup_tokens > 0):
            raise ValueError(
                f"{k_start}={start_tokens} and {k_warm}={warmup_tokens}: set both (> 0) for a batch-size warmup, "
                "or neither (0: every step holds the full global batch)"
            )
        if not start_tokens:
            return cls.flat(full, pack_tokens)
        if start_tokens % pack_tokens:
            raise ValueError(
                f"{k_start}={start_tokens} is not a multiple of pack_tokens={pack_tokens} (every level of the "
                f"warmup is a whole number of packed rows); set it to e.g. "
                f"{max(1, round(start_tokens / pack_tokens)) * pack_tokens}"
            )
        if start_tokens >= global_batch_tokens or global_batch_tokens % start_tokens:
            good = [d * pack_tokens for d in range(1, full) if full % d == 0]
            near = min(good, key=lambda v: abs(v - start_tokens)) if good else None
            raise ValueError(
                f"{k_start}={start_tokens} must be smaller than {k_global}={global_batch_tokens} and divide it (the "
                f"warmup rises in steps of the start batch up to the full batch); "
                + (f"set it to e.g. {near}" if near else f"raise {k_global} to a multiple of it")
            )
        start = start_tokens // pack_tokens
        levels = full // start
        n = max(1, round(warmup_tokens / (pack_tokens * start * levels * (levels - 1) / 2)))
        return cls(pack_tokens, full, start, n)

    @property
    def enabled(self) -> bool:
        return self.start_rows < self.full_rows

    @property
    def num_levels(self) -> int:
        """K: the warmup levels plus the full batch (1 when flat)."""
        return self.full_rows // self.start_rows

    @property
    def warmup_steps(self) -> int:
        """Steps before the first step at the full batch."""
        return (self.num_levels - 1) * self.steps_per_level

    def rows(self, step: int) -> int:
        """Packed rows of global step `step` (0-based)."""
        if step >= self.warmup_steps:
            return self.full_rows
        return (step // self.steps_per_level + 1) * self.start_rows

    def tokens(self, step: int) -> int:
        """The token budget of global step `step` (0-based): rows(step) x pack_tokens."""
        return self.rows(step) * self.pack_tokens

    def tokens_through(self, num_steps: int) -> int:
        """The planned token budget of the first `num_steps` steps, sum of tokens(s) for s < num_steps (closed form)."""
        if num_steps <= 0:
            return 0
        w, n, S = self.warmup_steps, self.steps_per_level, self.start_rows
        if num_steps >= w:
            k = self.num_levels
            rows = S * n * k * (k - 1) // 2 + (num_steps - w) * self.full_rows
        else:
            q, r = divmod(num_steps, n)  # q whole levels (1..q), then r steps of level q + 1
            rows = S * (n * q * (q + 1) // 2 + r * (q + 1))
        return rows * self.pack_tokens

    def steps_for_tokens(self, tokens: int) -> int:
        """The fewest steps (>= 1) whose planned budget reaches `tokens` (the last step may overshoot)."""
        w = self.warmup_steps
        warm = self.tokens_through(w)
        if tokens >= warm:
            return max(1, w + math.ceil((tokens - warm) / (self.full_rows * self.pack_tokens)))
        lo, hi = 0, w  # tokens_through(lo) < tokens <= tokens_through(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.tokens_through(mid) < tokens else (lo, mid)
        return max(1, hi)

    def levels(self) -> list[tuple[int, int, int | None]]:
        """(rows, first step, steps or None for the last) of every level, in order."""
        n = self.steps_per_level
        out: list[tuple[int, int, int | None]] = [
            (k * self.start_rows, (k - 1) * n, n) for k in range(1, self.num_levels)
        ]
        return [*out, (self.full_rows, self.warmup_steps, None)]

    def check_split(self, world_size: int, rows_per_micro_batch: int) -> None:
        """ValueError unless every level splits into `world_size` x `rows_per_micro_batch` rows (S must)."""
        per_pass = world_size * rows_per_micro_batch
        if world_size < 1 or rows_per_micro_batch < 1 or self.start_rows % per_pass:
            what = "the warmup's start batch" if self.enabled else "a global step"
            raise ValueError(
                f"{what} is {self.start_rows} rows of pack_tokens={self.pack_tokens}, which {world_size} workers x "
                f"{rows_per_micro_batch} rows per micro-batch do not divide; make it a multiple of "
                f"{per_pass} rows"
            )

    def accumulation(self, step: int, world_size: int, rows_per_micro_batch: int) -> int:
        """Micro-batches per rank of global step `step`: rows(step) / (world_size x rows_per_micro_batch)."""
        return self.rows(step) // (world_size * rows_per_micro_batch)

    def describe(self, world_size: int, rows_per_micro_batch: int) -> str:
        """One line: the levels, steps per level and accumulation at each level on `world_size` workers."""
        per = world_size * rows_per_micro_batch
        parts = [
            f"{rows} rows ({rows * self.pack_tokens} tokens, {rows // per} micro-batches per worker)"
            + (f" for {steps} steps" if steps is not None else " from then on")
            for rows, _, steps in self.levels()
        ]
        if not self.enabled:
            rows = self.full_rows
            return f"no batch warmup: {rows} rows ({rows * self.pack_tokens} tokens, {rows // per} micro-batches per worker) every step"
        return (
            f"batch warmup over {self.warmup_steps} steps ({self.tokens_through(self.warmup_steps)} tokens), "
            f"{self.steps_per_level} steps per level: " + " -> ".join(parts)
        )

    def identity(self) -> dict[str, int]:
        """What a resume must keep (stored in the data state): the rows of every step."""
        return {
            "full_rows": self.full_rows,
            "start_rows": self.start_rows,
            "steps_per_level": self.steps_per_level,
        }

    @staticmethod
    def restore_hint(identity: dict[str, int], pack_tokens: int) -> str:
        """The settings that give back the ramp of `identity` (for an error message)."""
        S, R, n = identity["start_rows"], identity["full_rows"], identity["steps_per_level"]
        if S == R:
            return f"{WARMUP_KEYS[0]}: 0 and {WARMUP_KEYS[1]}: 0 (no warmup)"
        k = R // S
        return (
            f"{WARMUP_KEYS[0]}: {S * pack_tokens} and {WARMUP_KEYS[1]}: {n * pack_tokens * S * k * (k - 1) // 2} "
            f"({n} steps per level)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Keys and seeds
# ----------------------------------------------------------------------------------------------------------------
def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _key_base(source: str, epoch: int) -> int:
    x = _name_hash(source) ^ ((epoch * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
    return int(_mix64(np.array([x], dtype=np.uint64))[0])


def _keys(bases: np.ndarray, positions: np.ndarray) -> np.ndarray:
    keys = _mix64(np.asarray(bases, dtype=np.uint64) ^ _mix64(np.asarray(positions, dtype=np.uint64)))
    return (keys >> np.uint64(1)).astype(np.int64)


def row_keys(source: str, epoch: int, positions: np.ndarray) -> np.ndarray:
    """(n,) int64 >= 0: a key per row, a function of (source name, epoch, position in the epoch order) only."""
    return _keys(np.full(len(positions), _key_base(source, epoch), dtype=np.uint64), positions)


def window_permutation(seed: int, source: str, epoch: int, window: int, n: int) -> np.ndarray:
    rng = np.random.default_rng([seed, _name_hash(source), epoch, window])
    return rng.permutation(n)


# ----------------------------------------------------------------------------------------------------------------
# One source in epoch order
# ----------------------------------------------------------------------------------------------------------------
OpenEpoch = Callable[[int], Iterable[pa.Table]]  # epoch -> the source's rows in input order, as Arrow batches


@dataclass
class _Window:
    table: pa.Table  # the window's input rows, in input order
    perm: np.ndarray  # (n,) epoch-order position (relative) -> row of `table`
    tokens: np.ndarray  # (n,) int64 num_tokens in epoch order


class _EpochCursor:
    """One source's rows in its epoch order, from `open_epoch(epoch)`, starting at (epoch, pos)."""

    def __init__(
        self,
        name: str,
        open_epoch: OpenEpoch,
        *,
        seed: int,
        window_rows: int,
        repeat: bool,
        pack_tokens: int,
        epoch: int,
        pos: int,
        exhausted: bool = False,
        size_column: str | None = "num_tokens",
    ) -> None:
        self.name, self._open, self.seed, self.B, self.repeat = name, open_epoch, seed, window_rows, repeat
        self.pack_tokens, self.size_column = pack_tokens, size_column
        self.epoch, self.pos = epoch, pos
        self.exhausted = exhausted
        self._it: Iterator[pa.Table] | None = None
        self._started = False  # the epoch is opened (and consumed rows skipped) on the first has_next()
        self._pending: list[pa.Table] = []  # input rows read but not yet in a window
        self._win: _Window | None = None
        self._win_start = 0  # epoch position of the window's first row
        self._win_index = 0

    # -- input ------------------------------------------------------------------------------------------------
    def _start_epoch(self, epoch: int, pos: int) -> None:
        self.close()
        self.epoch, self.pos, self._started = epoch, pos, True
        self._it = iter(self._open(epoch))
        self._pending, self._win = [], None
        skip = (pos // self.B) * self.B if self.B else pos
        self._win_index = pos // self.B if self.B else 0
        self._win_start = skip
        self._skip_input(skip)

    def _next_input(self) -> pa.Table | None:
        if self._pending:
            return self._pending.pop(0)
        assert self._it is not None
        for t in self._it:
            if t.num_rows:
                return pa.Table.from_batches([t]) if isinstance(t, pa.RecordBatch) else t
        return None

    def _skip_input(self, n: int) -> None:
        """Drop the first n input rows of the epoch: whole Arrow batches, then a slice of one."""
        while n > 0:
            t = self._next_input()
            if t is None:
                raise ValueError(
                    f"data source {self.name!r}: the saved position (epoch {self.epoch}, row {self.pos}) is past the "
                    f"end of its epoch ({self._win_start - n} rows); the source's data changed since the checkpoint"
                )
            if t.num_rows > n:
                self._pending.insert(0, t.slice(n))
            n -= min(n, t.num_rows)

    def _load_window(self) -> bool:
        """Read the next window; False at the end of the epoch."""
        parts, n = [], 0
        want = self.B or 1
        while n < want:
            t = self._next_input()
            if t is None:
                break
            if self.B and n + t.num_rows > want:
                self._pending.insert(0, t.slice(want - n))
                t = t.slice(0, want - n)
            parts.append(t)
            n += t.num_rows
        if not n:
            return False
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        if self._win is not None:
            self._win_start += self._win.table.num_rows
            self._win_index += 1
        perm = (
            window_permutation(self.seed, self.name, self.epoch, self._win_index, n)
            if self.B
            else np.arange(n)
        )
        if self.size_column is None:  # every row counts as one unit (e.g. contrastive pairs)
            raw = np.ones(n, dtype=np.int64)
        else:
            raw = table.column(self.size_column).to_numpy().astype(np.int64)
        if (
            raw.max() > self.pack_tokens
        ):  # every rank checks every row, cheaply (the collate sees only its own)
            r = int(np.argmax(raw > self.pack_tokens))
            raise ValueError(
                f"data source {self.name!r}: input row {self._win_start + r} of epoch {self.epoch} holds {raw[r]} "
                f"tokens > pack_tokens={self.pack_tokens}; the packed dir was built with a larger pack_tokens: set "
                f"pack_tokens to the value it was preprocessed with, or re-run jobs/preprocess.py"
            )
        tokens = raw[perm]
        self._win = _Window(table, perm, tokens)
        return True

    # -- output -----------------------------------------------------------------------------------------------
    def has_next(self) -> bool:
        """Whether a next row exists (loads a window, starts the next epoch for a repeating source)."""
        if self.exhausted:
            return False
        if not self._started:
            self._start_epoch(self.epoch, self.pos)
        while self._win is None or self.pos >= self._win_start + self._win.table.num_rows:
            if self._load_window():
                continue
            length = self._win_start + (self._win.table.num_rows if self._win is not None else 0)
            if self.pos > length:
                raise ValueError(
                    f"data source {self.name!r}: the saved position (epoch {self.epoch}, row {self.pos}) is past the "
                    f"end of its epoch ({length} rows); the source's data changed since the checkpoint"
                )
            if self.pos == 0:
                raise ValueError(
                    f"data source {self.name!r}: epoch {self.epoch} holds no rows; check its path (an empty "
                    f"train/ split?) or drop it from the sources"
                )
            if not self.repeat:
                self.exhausted = True
                self.close()
                return False
            self._start_epoch(self.epoch + 1, 0)
        return True

    def take(self) -> tuple[_Window, int, int, int, int]:
        """(window, row of its table, epoch, position in the epoch, tokens) of the next row; has_next() first."""
        w = self._win
        assert w is not None
        i = self.pos - self._win_start
        out = (w, int(w.perm[i]), self.epoch, self.pos, int(w.tokens[i]))
        self.pos += 1
        return out

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()  # Ray: stops the epoch's streaming execution now
        self._it = None


# ----------------------------------------------------------------------------------------------------------------
# The global order (all sources, all ranks)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Row:
    source: int
    window: _Window
    row: int  # row of window.table
    epoch: int
    pos: int
    tokens: int


class GlobalOrder:
    """The token-deficit interleaving of the sources' epoch orders; identical on every rank."""

    def __init__(
        self,
        sources: list[SourceSection],
        open_epochs: dict[str, OpenEpoch],
        *,
        seed: int,
        window_rows: int,
        on_exhausted: str,
        pack_tokens: int,
        state: dict | None = None,
        size_column: str | None = "num_tokens",
    ) -> None:
        """`size_column`: the int column that measures a row for the mixture (tokens of a packed row); None
        counts every row as 1, so weights then share ROWS (`pack_tokens` is then the largest size: 1)."""
        missing = [s.name for s in sources if s.name not in open_epochs]
        assert not missing, f"no reader for sources {missing}"
        self.sources = sources
        self.on_exhausted = on_exhausted
        self.weights = [float(s.weight) for s in sources]
        self.tokens = [0] * len(sources)  # tokens consumed per source (all epochs)
        self.rows = [0] * len(sources)
        st = (state or {}).get("sources", {})
        self.cursors = []
        for i, s in enumerate(sources):
            ss = st.get(s.name, {"epoch": 0, "rows_in_epoch": 0, "tokens": 0, "rows": 0, "exhausted": False})
            self.tokens[i], self.rows[i] = ss["tokens"], ss["rows"]
            c = _EpochCursor(
                s.name, open_epochs[s.name], seed=seed, window_rows=window_rows, repeat=s.repeat,
                pack_tokens=pack_tokens, epoch=ss["epoch"], pos=ss["rows_in_epoch"], exhausted=ss["exhausted"],
                size_column=size_column,
            )  # fmt: skip
            self.cursors.append(c)

    def _pick(self) -> int:
        """The active source whose tokens are furthest below its (renormalized) weight's share; ties: the first."""
        active = [i for i, c in enumerate(self.cursors) if not c.exhausted]
        if not active:
            raise DataExhausted("every data source ran out (all have repeat=false)")
        if len(active) == 1:
            return active[0]
        wsum = sum(self.weights[i] for i in active)
        total = sum(self.tokens[i] for i in active)
        best, best_deficit = active[0], None
        for i in active:
            d = self.weights[i] / wsum * total - self.tokens[i]
            if best_deficit is None or d > best_deficit:
                best, best_deficit = i, d
        return best

    def next_row(self) -> _Row:
        while True:
            i = self._pick()
            c = self.cursors[i]
            if c.has_next():
                win, row, epoch, pos, tok = c.take()
                self.tokens[i] += tok
                self.rows[i] += 1
                return _Row(i, win, row, epoch, pos, tok)
            if self.on_exhausted == "stop":
                raise DataExhausted(
                    f"data source {c.name!r} (repeat=false) ran out after {c.pos} rows of epoch {c.epoch}; "
                    f"on_exhausted=stop ends the stream here (set its repeat: true or on_exhausted: renormalize)"
                )
            log.warning("data source %r ran out; continuing with the others, weights renormalized", c.name)

    def next_rows_one_source(self, n: int) -> list[_Row]:
        """The next n rows, all from ONE source: the one `_pick` chooses for the first row (so whole groups of n
        rows follow the weights). A source that runs out inside the group raises DataExhausted (no partial group)."""
        while True:
            i = self._pick()
            c = self.cursors[i]
            if c.has_next():
                break
            if self.on_exhausted == "stop":
                raise DataExhausted(
                    f"data source {c.name!r} (repeat=false) ran out after {c.pos} rows of epoch {c.epoch}; "
                    f"on_exhausted=stop ends the stream here (set its repeat: true or on_exhausted: renormalize)"
                )
        out = []
        for _ in range(n):
            if not c.has_next():
                raise DataExhausted(
                    f"data source {c.name!r} (repeat=false) ran out inside a one-source group"
                )
            win, row, epoch, pos, tok = c.take()
            self.tokens[i] += tok
            self.rows[i] += 1
            out.append(_Row(i, win, row, epoch, pos, tok))
        return out

    def state(self) -> dict[str, Any]:
        return {
            s.name: {
                "epoch": c.epoch,
                "rows_in_epoch": c.pos,
                "tokens": int(self.tokens[i]),
                "rows": int(self.rows[i]),
                "exhausted": c.exhausted,
            }
            for i, (s, c) in enumerate(zip(self.sources, self.cursors, strict=True))
        }

    def close(self) -> None:
        for c in self.cursors:
            c.close()


# ----------------------------------------------------------------------------------------------------------------
# Resume checks
# ----------------------------------------------------------------------------------------------------------------
def order_identity(cfg: MixtureSection) -> dict[str, Any]:
    """What fixes the global order (a saved position is only meaningful in the same order)."""
    return {
        "seed": cfg.seed,
        "shuffle_window_rows": cfg.shuffle_window_rows,
        "sources": [s.name for s in cfg.sources],
    }


def check_state(cfg: MixtureSection, state: dict | None, pack_tokens: int, kind: str | None = None) -> None:
    """Refuse a saved data state that `cfg` cannot continue (ConfigError naming the setting to restore); the
    driver calls it before Ray starts, the source again on the worker. World size and micro-batch size are free;
    seed, shuffle window, sources, the global step size, the batch-size warmup and the job are not (`kind`: the
    state's kind, None for pretraining's packed rows)."""
    from pipelines.train.config import ConfigError

    if state is None:
        return
    if state.get("version") != STATE_VERSION:
        raise ConfigError(
            f"the checkpoint's data position (version {state.get('version')}, kind {state.get('kind')!r}) is not "
            f"a global data order position (version {STATE_VERSION}); it cannot be resumed: start a new run with "
            "another checkpoint.name"
        )
    if state.get("kind") != kind:  # e.g. a contrastive run's pair position in a pretraining run (or back)

        def what(k: str | None) -> str:
            return f"a {k!r} order" if k else "the packed-row order of pretraining"

        raise ConfigError(
            f"the checkpoint's data position is one of {what(state.get('kind'))}, not of {what(kind)}: the run dir "
            "belongs to another job; resume it with that job, or start a new run (another checkpoint.name)"
        )
    saved, now = state["order"], order_identity(cfg)
    for key in ("seed", "shuffle_window_rows"):
        if saved[key] != now[key]:
            raise ConfigError(
                f"the checkpoint's data order has {key}={saved[key]} but the config says {now[key]}; the saved "
                f"position only means something in the same order: set {key}: {saved[key]} to resume"
            )
    if sorted(saved["sources"]) != sorted(now["sources"]):
        raise ConfigError(
            f"the checkpoint's data sources {saved['sources']} differ from the config's {now['sources']}; "
            "resume with the same sources (a new mixture starts a new run from a fresh data state)"
        )
    rows = cfg.global_batch_tokens // pack_tokens
    saved_rows = state.get("rows_per_step")
    if saved_rows not in (None, rows):
        # The position itself would continue at the next unseen row, but every later step would hold other rows
        # than the original run's (and the optimizer's batch would change under it): a resume keeps the batch.
        raise ConfigError(
            f"the checkpoint's global step is {saved_rows} rows (global_batch_tokens={saved_rows * pack_tokens}) "
            f"but the config's is {rows} rows (global_batch_tokens={cfg.global_batch_tokens}): set "
            f"global_batch_tokens: {saved_rows * pack_tokens} (or leave it unset) to resume; another global batch "
            "starts a new run (another checkpoint.name)"
        )
    saved_ramp = state.get("ramp") or BatchRamp.flat(saved_rows or rows, pack_tokens).identity()
    now_ramp = cfg.ramp(pack_tokens).identity()
    if saved_ramp != now_ramp:
        # Step s holds rows(s) rows: another ramp would give every later step other rows than the original run's.
        raise ConfigError(
            f"the checkpoint's batch-size warmup ({saved_ramp}) differs from the config's ({now_ramp}): set "
            f"{BatchRamp.restore_hint(saved_ramp, pack_tokens)} to resume; another warmup starts a new run "
            "(another checkpoint.name)"
        )


# ----------------------------------------------------------------------------------------------------------------
# StepSource
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Step:
    batches: list[PackedBatch]
    stats: dict[str, float]
    state: dict[str, Any]


_DONE = object()


class GlobalStepSource:
    """`StepSource` over the global order: rank `rank` of `world_size`'s micro-batches of every global step.

    `open_epochs[name](epoch)` yields source `name`'s rows in input order as Arrow batches: the same rows in the
    same order on every rank and every run (`ray_open_epochs` for Ray Data iterators; any iterable in tests).
    `state` is a `state_dict()` of an earlier run with the same sources, seed and shuffle window (any world size
    or micro-batch size). A background thread assembles up to `cfg.prefetch_steps` steps ahead (0 = in the
    caller's thread); `max_steps` bounds how many it assembles (None = until the data runs out).

    Subclasses (contrastive training) may set `size_column` (what a row weighs in the mixture; None = 1 per row)
    and override `_collate` (rows -> one micro-batch) and `_snapshot`.
    """

    size_column: str | None = "num_tokens"
    size_metric = "tokens"  # the step's size per source is reported as data/<size_metric>/<source>
    state_kind: str | None = (
        None  # the state's "kind" (None: pretraining's packed rows); a resume must match it
    )

    def __init__(
        self,
        cfg: MixtureSection,
        open_epochs: dict[str, OpenEpoch],
        *,
        pack_tokens: int,
        rows_per_micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
        max_steps: int | None = None,
        validate: bool = True,
        pin_memory: bool = False,
    ) -> None:
        cfg.check(pack_tokens)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.pack_tokens, self.m = pack_tokens, rows_per_micro_batch
        self.R = cfg.rows_per_step(pack_tokens)  # rows of a full step; step s holds ramp.rows(s)
        self.ramp = cfg.ramp(pack_tokens)
        if self.ramp.enabled:
            self.ramp.check_split(world_size, rows_per_micro_batch)
        else:  # its message names global_batch_tokens
            plan_accumulation(cfg.global_batch_tokens, pack_tokens, world_size, rows_per_micro_batch)
        self.validate, self.pin_memory = validate, pin_memory
        self._bases: dict[tuple[int, int], int] = {}
        self._check_state(state)
        self.order = GlobalOrder(
            cfg.sources, open_epochs, seed=cfg.seed, window_rows=cfg.shuffle_window_rows,
            on_exhausted=cfg.on_exhausted, pack_tokens=pack_tokens, state=state, size_column=self.size_column,
        )  # fmt: skip
        self.step = int(state["global_step"]) if state else 0
        self._produced = self.step
        self._max_step = None if max_steps is None else self.step + max_steps
        self._state = self._snapshot(self.step)
        self._stats: dict[str, float] = {}
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if cfg.prefetch_steps:
            self._queue = queue.Queue(maxsize=cfg.prefetch_steps)
            self._thread = threading.Thread(target=self._produce, name=f"step-source-rank{rank}", daemon=True)
            self._thread.start()

    # -- state ------------------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return order_identity(self.cfg)

    def _check_state(self, state: dict | None) -> None:
        check_state(self.cfg, state, self.pack_tokens, kind=self.state_kind)

    def _snapshot(self, step: int) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "global_step": step,
            "rows_per_step": self.R,
            "ramp": self.ramp.identity(),
            "order": self._identity(),
            "sources": self.order.state(),
        }

    def state_dict(self) -> dict:
        """The data position after the last step `next_step` returned (JSON-able, world-size independent)."""
        return self._state

    def step_stats(self) -> dict[str, float]:
        """Metrics of the last returned step: `data/tokens/<source>` (the whole global step's tokens of that
        source), `data/share/<source>` (its realized token share so far) and `data/epoch/<source>`."""
        return self._stats

    # -- assembly ---------------------------------------------------------------------------------------------
    def _global_rows(self, n: int) -> list[_Row]:
        """The n rows of the next global step, in order."""
        return [self.order.next_row() for _ in range(n)]

    def _assemble(self) -> _Step:
        n = self.ramp.rows(self._produced)  # the step being assembled is global step `_produced` (0-based)
        A = n // (self.world * self.m)
        rows = self._global_rows(n)
        mine = rows[self.rank * A * self.m : (self.rank + 1) * A * self.m]
        batches = [self._collate(mine[a * self.m : (a + 1) * self.m]) for a in range(A)]
        names = [s.name for s in self.cfg.sources]
        step_tokens = np.zeros(len(names), dtype=np.int64)
        for r in rows:
            step_tokens[r.source] += r.tokens
        total = max(sum(self.order.tokens), 1)
        stats: dict[str, float] = {}
        for i, n in enumerate(names):
            stats[f"data/{self.size_metric}/{n}"] = float(step_tokens[i])
            stats[f"data/share/{n}"] = float(self.order.tokens[i]) / total
            stats[f"data/epoch/{n}"] = float(self.order.cursors[i].epoch)
        self._produced += 1
        return _Step(batches, stats, self._snapshot(self._produced))

    def _collate(self, rows: list[_Row]) -> PackedBatch:
        parts: list[pa.Table] = []
        run: list[int] = []
        for j, r in enumerate(rows):  # one `take` per run of rows from the same window
            run.append(r.row)
            if j + 1 == len(rows) or rows[j + 1].window is not r.window:
                parts.append(r.window.table.take(pa.array(run, type=pa.int64())))
                run = []
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        out = collate_packed(
            table,
            self.m * self.pack_tokens,
            max_pad_segment=self.pack_tokens,
            validate=self.validate,
            pack_tokens=self.pack_tokens,
            source="train micro-batch (packed rows)",
        )
        bases = np.array([self._key_bases(r.source, r.epoch) for r in rows], dtype=np.uint64)
        out.row_keys = torch.from_numpy(_keys(bases, np.array([r.pos for r in rows], dtype=np.uint64)))
        if self.pin_memory:
            out.input_ids = out.input_ids.pin_memory()
            out.position_ids = out.position_ids.pin_memory()
            out.cu_seqlens = out.cu_seqlens.pin_memory()
        return out

    def _key_bases(self, source: int, epoch: int) -> int:
        k = (source, epoch)
        if k not in self._bases:
            self._bases[k] = _key_base(self.cfg.sources[source].name, epoch)
        return self._bases[k]

    def _next_assembled(self) -> _Step | None:
        if self._max_step is not None and self._produced >= self._max_step:
            return None
        return self._assemble()

    # -- producer thread --------------------------------------------------------------------------------------
    def _put(self, item: Any) -> bool:
        assert self._queue is not None
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                step = self._next_assembled()
                if step is None:
                    break
                if not self._put(step):
                    return
        except BaseException as exc:  # DataExhausted included: handed to the consumer
            self._put(exc)
            return
        self._put(_DONE)

    # -- StepSource -------------------------------------------------------------------------------------------
    def next_step(self) -> list[PackedBatch]:
        """This rank's micro-batches of the next global step s (rows(s) / (W x m) of them). Raises DataExhausted when no full step is left
        (the state stays at the last full step), RuntimeError past `max_steps`."""
        if self._queue is None:
            step = self._next_assembled()
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._queue.put(item)  # every later call raises it too
                raise item
            step = None if item is _DONE else item
            if step is None:
                self._queue.put(_DONE)
        if step is None:
            raise RuntimeError(f"rank {self.rank}: next_step() past max_steps (step {self.step})")
        self.step += 1
        self._state, self._stats = step.state, step.stats
        return step.batches

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        if self._thread is None or not self._thread.is_alive():
            self.order.close()  # else the thread is blocked inside a reader (a daemon): leave it to the process

    def __enter__(self) -> GlobalStepSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------------
# Ray glue
# ----------------------------------------------------------------------------------------------------------------
def dataset_name(source: str) -> str:
    """The Ray Train dataset name of a source (`datasets={dataset_name(s.name): read_packed(s.path)}`)."""
    return f"train.{source}"


def check_sources(cfg: MixtureSection, pack_tokens: int) -> None:
    """Driver-side checks before Ray Train starts (never retried by FailureConfig): config, and a train split
    in every source's packed dir."""
    from pipelines.mlm.packed_io import has_packed_split

    cfg.check(pack_tokens)
    for s in cfg.sources:
        if not has_packed_split(s.path, "train"):
            raise ValueError(
                f"data source {s.name!r}: {s.path} has no train/*.parquet shards; build it with "
                f"`python jobs/preprocess.py --output {s.path}` or fix the source's path"
            )


def source_datasets(cfg: MixtureSection) -> dict[str, Any]:
    """Driver side: {dataset_name(source): Ray Dataset of its packed rows} for `TorchTrainer(datasets=...)`."""
    from pipelines.mlm.packed_io import read_packed

    return {dataset_name(s.name): read_packed(s.path, split="train") for s in cfg.sources}


def source_data_config(split: list[str] | None = None):
    """The `DataConfig` for `source_datasets`: nothing split (every worker reads every source in full, see the
    module doc) unless named in `split` (e.g. other datasets of the run), and `preserve_order=True` so that
    every worker sees the same order."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(
        datasets_to_split=list(split or []), execution_options=ExecutionOptions(preserve_order=True)
    )


def ray_open_epochs(iterators: dict[str, Any], *, prefetch_batches: int = 2) -> dict[str, OpenEpoch]:
    """`open_epochs` over Ray `DataIterator`s of NON-split datasets: whole blocks as Arrow tables, in order.

    `batch_size=None` hands Ray's blocks over as they are (no re-batching copy); the order is the dataset's
    (deterministic under `preserve_order=True`), and every epoch re-executes the dataset from its start.
    """

    def opener(it: Any) -> OpenEpoch:
        def open_epoch(epoch: int) -> Iterable[pa.Table]:
            return it.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_batches)

        return open_epoch

    return {name: opener(it) for name, it in iterators.items()}


def step_source_from_shards(
    cfg: MixtureSection,
    *,
    pack_tokens: int,
    rows_per_micro_batch: int,
    state: dict | None = None,
    max_steps: int | None = None,
    prefetch_batches: int = 2,
    pin_memory: bool = False,
) -> GlobalStepSource:
    """On a Ray Train worker: the `GlobalStepSource` of this rank over `get_dataset_shard(dataset_name(s))`."""
    import ray.train

    ctx = ray.train.get_context()
    its = {s.name: ray.train.get_dataset_shard(dataset_name(s.name)) for s in cfg.sources}
    return GlobalStepSource(
        cfg,
        ray_open_epochs(its, prefetch_batches=prefetch_batches),
        pack_tokens=pack_tokens,
        rows_per_micro_batch=rows_per_micro_batch,
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        state=state,
        max_steps=max_steps,
        validate=False,  # read_packed validates every row group as it streams
        pin_memory=pin_memory,
    )


__all__ = [
    "BatchRamp",
    "DataExhausted",
    "check_sources",
    "check_state",
    "order_identity",
    "source_data_config",
    "source_datasets",
    "GlobalOrder",
    "GlobalStepSource",
    "MixtureSection",
    "SourceSection",
    "StepSource",
    "dataset_name",
    "plan_accumulation",
    "ray_open_epochs",
    "row_keys",
    "step_source_from_shards",
    "window_permutation",
]
