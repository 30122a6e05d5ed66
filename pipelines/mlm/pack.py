"""Packing document segments into rows of at most `pack_tokens` tokens: best-fit decreasing over a bounded buffer.

Pure numpy/pyarrow (no Ray): unit tests call everything here directly. `PackChunks` is the Ray Data actor that
runs one `StreamingPacker` per split over the tokenizer's chunk stream and writes the shards.

Algorithm (`StreamingPacker`):
  1. Segments (each already `[CLS] ... [SEP]`, length <= max_seq_len <= pack_tokens) arrive as one ordered stream.
  2. They are buffered; when the buffer holds exactly `buffer_segments` segments, one *round* runs best-fit
     decreasing (BFD) over the buffer: longest segment first, each into the open pack whose free space is the
     smallest that still fits it (ties: the oldest pack), else into a new pack.
  3. Packs with fill >= `close_fill` are emitted; the segments of the other packs are *carried* into the next
     round (they are usually the last one or two packs of the round, holding the leftovers), so the stream's only
     under-full packs are those of the final flush. If more than half the buffer would be carried (a length
     distribution that cannot reach `close_fill`), the fullest open packs are emitted anyway, so every round makes
     progress and memory stays bounded by `buffer_segments` segments.
  4. `finish()` runs a last round that emits everything.

Determinism: a round starts exactly when the buffer reaches `buffer_segments`, whatever the sizes of the chunks
fed to `add()`, and BFD breaks ties by arrival index. So the packs depend only on the *sequence* of segments, not
on how that sequence was cut into chunks or batches (tested). Within a pack, segments keep their arrival order.
"""

from __future__ import annotations

import json
import logging
from bisect import bisect_left, insort
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from neobert.schema import PACKED_SCHEMA, PackedSchemaError, validate_packed_table
from pipelines.io import filesystem_for
from pipelines.mlm.packed_io import shard_path, write_shard
from pipelines.mlm.report import PreprocessStats
from pipelines.mlm.tokenize import SPLITS

log = logging.getLogger(__name__)


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of indices into `lengths`, ascending) in creation order; each bin's sum <= capacity."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() <= 0 or lengths.max() > capacity):
        bad = int(np.flatnonzero((lengths <= 0) | (lengths > capacity))[0])
        raise ValueError(f"segment {bad} has length {int(lengths[bad])}, must be in [1, capacity={capacity}]")
    order = np.argsort(-lengths, kind="stable")  # longest first, ties by arrival index
    free: list[tuple[int, int]] = []  # sorted (free tokens, bin id) of bins that still have room
    bins: list[list[int]] = []
    for i in order.tolist():
        need = int(lengths[i])
        k = bisect_left(free, (need, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
        else:
            b, room = len(bins), capacity
            bins.append([i])
        if room - need > 0:
            insort(free, (room - need, b))
    for b in bins:
        b.sort()
    return bins


class StreamingPacker:
    """Best-fit decreasing over a bounded, deterministic buffer of segments (see module docstring).

    `add()` / `finish()` return packs, each a list of segment token arrays (int32, `[CLS] ... [SEP]`).
    """

    def __init__(self, pack_tokens: int, buffer_segments: int = 4096, close_fill: float = 0.995):
        if pack_tokens <= 0 or buffer_segments < 2 or not 0.0 < close_fill <= 1.0:
            raise ValueError(
                f"pack_tokens={pack_tokens} must be > 0, buffer_segments={buffer_segments} >= 2, "
                f"close_fill={close_fill} in (0, 1]"
            )
        self.pack_tokens = pack_tokens
        self.buffer_segments = buffer_segments
        self.close_fill = close_fill
        self._buf: list[np.ndarray] = []

    @property
    def buffered_segments(self) -> int:
        return len(self._buf)

    def add(self, tokens: np.ndarray, seg_lengths: np.ndarray) -> list[list[np.ndarray]]:
        """Add consecutive segments (`tokens` (sum(seg_lengths),) cut by `seg_lengths` (S,)); return closed packs."""
        seg_lengths = np.asarray(seg_lengths, dtype=np.int64)
        if int(seg_lengths.sum()) != len(tokens):
            raise ValueError(
                f"seg_lengths sum to {int(seg_lengths.sum())} but tokens has {len(tokens)} entries"
            )
        if len(seg_lengths) and (seg_lengths.min() <= 0 or seg_lengths.max() > self.pack_tokens):
            raise ValueError(f"segment lengths must be in [1, pack_tokens={self.pack_tokens}]")
        bounds = np.concatenate([[0], np.cumsum(seg_lengths)])
        out: list[list[np.ndarray]] = []
        for s in range(len(seg_lengths)):
            self._buf.append(tokens[bounds[s] : bounds[s + 1]])
            if len(self._buf) >= self.buffer_segments:
                out.extend(self._round(final=False))
        return out

    def finish(self) -> list[list[np.ndarray]]:
        """Emit every buffered segment (the stream's last, possibly under-full, packs)."""
        return self._round(final=True) if self._buf else []

    def _round(self, final: bool) -> list[list[np.ndarray]]:
        segs = self._buf
        lengths = np.fromiter((len(s) for s in segs), dtype=np.int64, count=len(segs))
        bins = best_fit_decreasing(lengths, self.pack_tokens)
        if final:
            self._buf = []
            return [[segs[i] for i in b] for b in bins]
        fill = np.array([lengths[b].sum() for b in bins], dtype=np.float64) / self.pack_tokens
        emit = fill >= self.close_fill
        max_carry = self.buffer_segments // 2
        carried = sum(len(b) for b, e in zip(bins, emit, strict=True) if not e)
        if carried > max_carry:  # cannot reach close_fill: emit the fullest open packs until the carry fits
            for j in sorted(np.flatnonzero(~emit).tolist(), key=lambda j: (-fill[j], j)):
                if carried <= max_carry:
                    break
                emit[j] = True
                carried -= len(bins[j])
        keep = sorted(i for b, e in zip(bins, emit, strict=True) if not e for i in b)
        self._buf = [segs[i] for i in keep]
        return [[segs[i] for i in b] for b, e in zip(bins, emit, strict=True) if e]


def packs_to_table(packs: list[list[np.ndarray]]) -> pa.Table:
    """Packed rows of the `neobert.schema.PACKED_SCHEMA` contract (list<int32> columns, schema version attached).

    Vectorized: one concatenation of all tokens, offsets from cumsums; never a ragged numpy array.
    """
    if not packs:
        return PACKED_SCHEMA.empty_table()
    nseg = np.fromiter((len(p) for p in packs), dtype=np.int64, count=len(packs))  # (R,)
    flat_segs = [s for p in packs for s in p]
    seg_len = np.fromiter((len(s) for s in flat_segs), dtype=np.int64, count=len(flat_segs))  # (S,)
    values = np.concatenate(flat_segs).astype(np.int32, copy=False)  # (T,)
    seg_first = np.concatenate([[0], np.cumsum(nseg)[:-1]])  # (R,) index of each pack's first segment
    num_tokens = np.add.reduceat(seg_len, seg_first)  # (R,)
    max_seqlen = np.maximum.reduceat(seg_len, seg_first)  # (R,)
    row_off = np.concatenate([[0], np.cumsum(num_tokens)])  # (R+1,)
    seg_start = np.concatenate([[0], np.cumsum(seg_len)[:-1]])  # (S,) global start of each segment
    # (T,) int32 throughout (T < 2^31 per shard): half the memory traffic of int64 on this O(tokens) step
    position_ids = np.arange(len(values), dtype=np.int32)
    position_ids -= np.repeat(seg_start.astype(np.int32), seg_len)
    pack_of_seg = np.repeat(np.arange(len(packs)), nseg)  # (S,)
    cu_off = np.concatenate([[0], np.cumsum(nseg + 1)])  # (R+1,)
    cu = np.empty(int(cu_off[-1]), dtype=np.int32)  # (S+R,)
    is_end = np.zeros(len(cu), dtype=bool)
    is_end[cu_off[1:] - 1] = True
    cu[is_end] = num_tokens
    cu[~is_end] = seg_start - row_off[pack_of_seg]

    def lists(offsets: np.ndarray, vals: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(vals, type=pa.int32()))

    return pa.Table.from_arrays(
        [
            lists(row_off, values),
            lists(row_off, position_ids),
            lists(cu_off, cu),
            pa.array(max_seqlen.astype(np.int32)),
            pa.array(num_tokens.astype(np.int32)),
            pa.array(nseg.astype(np.int32)),
        ],
        schema=PACKED_SCHEMA,
    )


# --------------------------------------------------------------------------------------------------- packer


WRITE_RESULT_SCHEMA = pa.schema(
    [
        pa.field("split", pa.string()),
        pa.field("shard", pa.int32()),  # -1 on the final row, which carries the statistics
        pa.field("path", pa.string()),
        pa.field("num_rows", pa.int64()),
        pa.field("num_tokens", pa.int64()),
        pa.field("stats_json", pa.string()),
    ]
)


class PackChunks:
    """Ray Data actor (pool of exactly one): CHUNK_SCHEMA rows in stream order -> packed shards.

    With `output_uri` (where to write; `published_uri`: where the shards will be once the output is published, the
    paths the report shows), writes each shard as Parquet and yields one WRITE_RESULT_SCHEMA row per shard, plus a final
    row with the statistics (`PreprocessStats.state()`). Without, yields the packed rows (PACKED_SCHEMA, one split).
    `stream` / `num_streams`: this packer's index among independent packer streams (shard file names).
    """

    def __init__(
        self,
        *,
        num_units: int,
        pack_tokens: int,
        max_seq_len: int,
        buffer_segments: int,
        close_fill: float,
        rows_per_shard: int,
        splits: tuple[str, ...],
        output_uri: str | None = None,
        published_uri: str | None = None,
        compression: str = "zstd",
        row_group_rows: int = 64,
        stream: int = 0,
        num_streams: int = 1,
        validate_shards: str = "first",
    ):
        self.stream, self.num_streams = stream, num_streams
        self.validate_all = validate_shards == "all"
        self.num_units, self.pack_tokens, self.max_seq_len = num_units, pack_tokens, max_seq_len
        self.rows_per_shard, self.splits, self.output_uri = rows_per_shard, tuple(splits), output_uri
        self.compression, self.row_group_rows = compression, row_group_rows
        self.packers = {s: StreamingPacker(pack_tokens, buffer_segments, close_fill) for s in self.splits}
        self.pending: dict[str, list[list[np.ndarray]]] = {s: [] for s in self.splits}
        self.next_shard = dict.fromkeys(self.splits, 0)
        self.stats = PreprocessStats(pack_tokens, self.splits)
        self.expect = (0, 0)
        self.finished = False
        self.fs = filesystem_for(output_uri) if output_uri else None
        self.published_uri = published_uri or output_uri  # shard paths as the report names them

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        list_cols = ("tokens", "seg_lengths", "seg_split", "doc_lengths", "doc_split")
        cols = {n: batch.column(n).combine_chunks() for n in list_cols}
        units = batch.column("unit").to_pylist()
        chunks = batch.column("chunk").to_pylist()
        lasts = batch.column("last").to_pylist()
        stats = batch.column("stats_json").to_pylist()
        for r in range(batch.num_rows):
            if self.finished or (units[r], chunks[r]) != self.expect:
                raise RuntimeError(
                    f"packer received unit {units[r]} chunk {chunks[r]} but expected {self.expect} "
                    f"(finished={self.finished}): chunks must arrive in stream order. This happens when "
                    "preserve_order is off (Ray Train's DataConfig replaces a dataset's execution options: pass "
                    "DataConfig(execution_options=ExecutionOptions(preserve_order=True))), the packer actor runs "
                    "tasks out of order (allow_out_of_order_execution) or was restarted; packing would not be "
                    "deterministic"
                )
            self.expect = (units[r] + 1, 0) if lasts[r] else (units[r], chunks[r] + 1)
            row = {n: _row_values(a, r) for n, a in cols.items()}
            self.stats.add_chunk(json.loads(stats[r]), row["doc_lengths"], row["doc_split"])
            seg_len = row["seg_lengths"].astype(np.int64)
            for split in self.splits:
                sel = row["seg_split"] == SPLITS.index(split)
                if not sel.any():
                    continue
                tokens = row["tokens"][np.repeat(sel, seg_len)]  # copy: never hold views of Ray's buffers
                self.pending[split].extend(self.packers[split].add(tokens, seg_len[sel]))
                yield from self._emit(split, final=False)
            if lasts[r] and units[r] == self.num_units - 1:
                self.finished = True
                for split in self.splits:
                    self.pending[split].extend(self.packers[split].finish())
                    yield from self._emit(split, final=True)
                if self.output_uri:
                    yield _result_row("", -1, "", 0, 0, json.dumps(self.stats.state()))
                else:
                    log.info("packed on the fly: %s", json.dumps(self.stats.to_dict())[:2000])

    def _emit(self, split: str, final: bool) -> Iterator[pa.Table]:
        pending = self.pending[split]
        while len(pending) >= self.rows_per_shard or (final and pending):
            packs, self.pending[split] = pending[: self.rows_per_shard], pending[self.rows_per_shard :]
            pending = self.pending[split]
            table = packs_to_table(packs)
            index = self.next_shard[split]
            self.next_shard[split] += 1
            where = shard_path(self.published_uri or "<stream>", split, index, self.stream, self.num_streams)
            nt = table.column("num_tokens").to_numpy()
            if self.validate_all or index == 0:
                validate_packed_table(
                    table, source=where, pack_tokens=self.pack_tokens, max_seq_len=self.max_seq_len
                )
            else:
                _check_pack_bounds(table, where, self.pack_tokens, self.max_seq_len)
            self.stats.add_packs(split, nt, table.column("num_segments").to_numpy())
            if not self.output_uri:
                yield table
                continue
            fs, root = self.fs
            path = shard_path(root, split, index, self.stream, self.num_streams)
            write_shard(fs, path, table, row_group_rows=self.row_group_rows, compression=self.compression)
            self.stats.add_shard(split, where, table.num_rows, int(nt.sum()))
            yield _result_row(split, index, where, table.num_rows, int(nt.sum()), None)


def _check_pack_bounds(table: pa.Table, source: str, pack_tokens: int, max_seq_len: int) -> None:
    """O(rows) checks of a shard built by `packs_to_table` (whose construction guarantees the rest)."""
    nt = table.column("num_tokens").to_numpy()
    ms = table.column("max_seqlen").to_numpy()
    ns = table.column("num_segments").to_numpy()
    for name, bad, want in (
        ("num_tokens", (nt <= 0) | (nt > pack_tokens), f"in [1, pack_tokens={pack_tokens}]"),
        ("max_seqlen", (ms <= 0) | (ms > max_seq_len) | (ms > nt), f"in [1, min(num_tokens, {max_seq_len})]"),
        ("num_segments", (ns <= 0) | (ns > nt), "in [1, num_tokens]"),
    ):
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise PackedSchemaError(
                f"{source}, row {r}, field {name!r}: value {int(table.column(name)[r].as_py())} must be {want}; "
                "this is a bug in pipelines/pack.py (packs_to_table), please report it"
            )


def _row_values(arr: pa.ListArray, r: int) -> np.ndarray:
    off = arr.offsets
    return arr.values.slice(off[r].as_py(), off[r + 1].as_py() - off[r].as_py()).to_numpy(
        zero_copy_only=False
    )


def _result_row(split: str, shard: int, path: str, rows: int, tokens: int, stats: str | None) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "split": split,
                "shard": shard,
                "path": path,
                "num_rows": rows,
                "num_tokens": tokens,
                "stats_json": stats,
            }
        ],
        schema=WRITE_RESULT_SCHEMA,
    )
