"""Packing document segments into rows of at most `pack_tokens` tokens: best-fit decreasing over a bounded buffer.

Pure numpy/pyarrow (no Ray): unit tests call everything here directly.

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

from bisect import bisect_left, insort

import numpy as np
import pyarrow as pa

from neobert.schema import PACKED_SCHEMA


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
