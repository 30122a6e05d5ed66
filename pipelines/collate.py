"""Collate packed rows (see `neobert.schema`) into one flat, statically-shaped micro-batch.

A micro-batch is `R` packed rows concatenated into a single token stream of exactly `token_budget` tokens:

    input_ids     (T,) int64   the rows back to back, then `pad` tokens of PAD_ID
    position_ids  (T,) int64   per-document positions copied from the rows; 0, 1, ... in the padding segment
    cu_seqlens    (S+1,) int32 every row's cu_seqlens shifted by the row's start; the padding (if any) is one
                               extra trailing segment, so attention never mixes it with real documents (split
                               into pieces of at most `max_pad_segment` tokens when that is set, so that it
                               never exceeds the model's max_position_embeddings nor costs quadratic attention)
    max_seqlen    Python int   max over the rows' `max_seqlen` column and the padding segment(s) (no GPU sync)
    num_tokens    Python int   real (non-padding) tokens

T is fixed (static shapes for torch.compile / CUDA graphs); S varies with the number of documents. Labels of
the padding are -100 automatically: PAD is a special id that masking never selects.

`collate_packed` is the pure logic on a `pyarrow.Table` (flattens the list columns through their Arrow offsets,
no per-row Python loop); `PackedCollateFn` wraps it as the `ray.data.collate_fn.ArrowBatchCollateFn` that
`iter_torch_batches(collate_fn=...)` expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from neobert.schema import validate_packed_table
from pipelines.tokenizer import PAD_ID

try:  # Ray is optional for the pure function (unit tests run without it)
    from ray.data.collate_fn import ArrowBatchCollateFn
except ImportError:  # pragma: no cover
    ArrowBatchCollateFn = object  # type: ignore[assignment,misc]


@dataclass
class PackedBatch:
    """One collated micro-batch (CPU tensors; pinned when `pin_memory`)."""

    input_ids: torch.Tensor  # (T,) int64
    position_ids: torch.Tensor  # (T,) int64
    cu_seqlens: torch.Tensor  # (S+1,) int32
    max_seqlen: int
    num_tokens: int  # real tokens; T - num_tokens are padding
    num_rows: int
    sum_sq_seqlens: int  # sum of squared real document lengths (attention FLOPs for MFU)
    row_keys: torch.Tensor | None = (
        None  # (rows,) int64: a key per packed row (seeds its mask); set by the reader
    )


def _flat(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (R+1,) int64 from 0, values) of a list<int32> column, via Arrow offsets (zero-copy where possible)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(arr, pa.ChunkedArray):  # 0 chunks
        arr = pa.array([], type=arr.type)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


def collate_packed(
    table: pa.Table,
    token_budget: int,
    *,
    pad_id: int = PAD_ID,
    max_pad_segment: int | None = None,
    validate: bool = False,
    pack_tokens: int | None = None,
    source: str = "<batch>",
) -> PackedBatch:
    """Concatenate the packed rows of `table` and pad to `token_budget` tokens (see the module docstring)."""
    if table.num_rows == 0:
        raise ValueError(f"{source}: empty batch; the data iterator yielded no rows")
    if validate:
        validate_packed_table(table, source=source, pack_tokens=pack_tokens)
    ids_off, ids = _flat(table.column("input_ids"))
    _, pos = _flat(table.column("position_ids"))
    cu_off, cu = _flat(table.column("cu_seqlens"))
    n = int(ids_off[-1])
    if n > token_budget:
        raise ValueError(
            f"{source}: {table.num_rows} packed rows hold {n} tokens > token budget {token_budget}; set "
            f"train.tokens_per_micro_batch >= rows_per_micro_batch * data.pack_tokens (rows are packed to at most "
            f"pack_tokens) or re-run preprocessing with a smaller pack_tokens"
        )
    pad = token_budget - n
    input_ids = np.full(token_budget, pad_id, dtype=np.int64)
    input_ids[:n] = ids
    position_ids = np.empty(token_budget, dtype=np.int64)
    position_ids[:n] = pos
    # Row r's cu_seqlens (minus its trailing end, except for the last row) shifted by ids_off[r].
    cu_len = np.diff(cu_off)
    shifted = cu.astype(np.int64) + np.repeat(ids_off[:-1], cu_len)
    keep = np.ones(len(shifted), dtype=bool)
    keep[cu_off[1:-1] - 1] = False  # row r's end == row r+1's start: keep one copy
    cu_flat = shifted[keep]
    seg = np.diff(cu_flat)
    pad_piece = pad if not max_pad_segment else min(pad, max_pad_segment)
    if pad:
        pad_starts = np.arange(n, token_budget, pad_piece, dtype=np.int64)
        cu_flat = np.concatenate([cu_flat, pad_starts[1:], [token_budget]])
        position_ids[n:] = (np.arange(token_budget - n) % pad_piece).astype(np.int64)
    max_seqlen = int(table.column("max_seqlen").to_numpy().max())
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        cu_seqlens=torch.from_numpy(cu_flat.astype(np.int32)),
        max_seqlen=max(max_seqlen, pad_piece),
        num_tokens=n,
        num_rows=table.num_rows,
        sum_sq_seqlens=int((seg.astype(np.int64) ** 2).sum()),
    )


class PackedCollateFn(ArrowBatchCollateFn):
    """`iter_torch_batches(collate_fn=PackedCollateFn(budget))`: Arrow batch -> `PackedBatch`.

    Runs in Ray's prefetch threads, so flattening and pinning overlap the training step. The output is not a
    plain tensor dict, so Ray does not move it: the trainer copies it to the device (non_blocking from pinned
    memory).
    """

    def __init__(
        self,
        token_budget: int,
        *,
        pad_id: int = PAD_ID,
        max_pad_segment: int | None = None,
        validate: bool = True,
        pack_tokens: int | None = None,
        pin_memory: bool = False,
    ):
        super().__init__()
        if token_budget <= 0:
            raise ValueError(f"token_budget must be > 0, got {token_budget}")
        self.token_budget = token_budget
        self.pad_id = pad_id
        self.max_pad_segment = max_pad_segment
        self.validate = validate
        self.pack_tokens = pack_tokens
        self.pin_memory = pin_memory

    def __call__(self, batch: pa.Table) -> PackedBatch:
        out = collate_packed(
            batch,
            self.token_budget,
            pad_id=self.pad_id,
            max_pad_segment=self.max_pad_segment,
            validate=self.validate,
            pack_tokens=self.pack_tokens,
            source="train batch (packed rows)",
        )
        if self.pin_memory:
            out.input_ids = out.input_ids.pin_memory()
            out.position_ids = out.position_ids.pin_memory()
            out.cu_seqlens = out.cu_seqlens.pin_memory()
        return out
