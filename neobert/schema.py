"""The packed-row Arrow contract between `pipelines/` (which writes packs) and `neobert/` (which trains on them).

One row = one pack of whole document segments, stored without padding:

    input_ids     list<int32>  `[CLS] seg [SEP]` per segment, concatenated; len == num_tokens <= pack_tokens
    position_ids  list<int32>  restarts at 0 at every segment start
    cu_seqlens    list<int32>  starts at 0, strictly increasing, ends at num_tokens; len == num_segments + 1
    max_seqlen    int32        longest segment of the row (== max(diff(cu_seqlens)))
    num_tokens    int32
    num_segments  int32

The schema version travels in the Parquet/Arrow schema metadata under `SCHEMA_VERSION_KEY`. Both the writer
(`pipelines.mlm.pack`) and the reader (`pipelines.mlm.packed_io.read_packed`, the training collate) call
`validate_packed_table`, which checks every invariant with vectorized numpy (no per-row Python loop) and
raises `PackedSchemaError` naming the file, the row and the field.

This module imports only numpy and pyarrow so that either side can use it without Ray or torch.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "1"
SCHEMA_VERSION_KEY = b"neobert.packed_schema_version"

LIST_FIELDS = ("input_ids", "position_ids", "cu_seqlens")
SCALAR_FIELDS = ("max_seqlen", "num_tokens", "num_segments")

PACKED_SCHEMA = pa.schema(
    [
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("position_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("cu_seqlens", pa.list_(pa.int32()), nullable=False),
        pa.field("max_seqlen", pa.int32(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("num_segments", pa.int32(), nullable=False),
    ],
    metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode()},
)

_FIX = "re-run jobs/preprocess.py to rebuild the packed dataset"


class PackedSchemaError(ValueError):
    """A packed table breaks the contract; the message names source, row and field."""


def _fail(source: str, row: int | None, field: str, what: str) -> PackedSchemaError:
    where = f"{source}" + (f", row {row}" if row is not None else "")
    return PackedSchemaError(f"{where}, field {field!r}: {what}; {_FIX}")


def check_schema_version(metadata: dict[bytes, bytes] | None, *, source: str = "<table>") -> None:
    """Raise unless the Arrow/Parquet schema metadata carries our schema version."""
    found = (metadata or {}).get(SCHEMA_VERSION_KEY)
    if found is None:
        raise PackedSchemaError(
            f"{source}: no {SCHEMA_VERSION_KEY.decode()!r} in the schema metadata, so this is not a packed "
            f"dataset written by pipelines/ (expected version {SCHEMA_VERSION}); {_FIX}"
        )
    if found.decode() != SCHEMA_VERSION:
        raise PackedSchemaError(
            f"{source}: packed schema version {found.decode()!r} but this code reads version "
            f"{SCHEMA_VERSION!r}; {_FIX}"
        )


def flatten_list_column(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (R+1,) int64 starting at 0, values (sum,) in the column's value dtype) of a list column, through
    its Arrow offsets (zero-copy where possible; a sliced array's values are cut to the rows it holds)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(arr, pa.ChunkedArray):  # combine_chunks of a 0-chunk ChunkedArray
        arr = pa.array([], type=arr.type)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)
    values = values[offsets[0] : offsets[-1]] if len(offsets) else values[:0]
    return offsets - (offsets[0] if len(offsets) else 0), values


def _list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """`flatten_list_column` with int64 values (bound checks must not overflow)."""
    offsets, values = flatten_list_column(col)
    return offsets, values.astype(np.int64)


def validate_packed_table(
    table: pa.Table,
    *,
    source: str = "<table>",
    row_offset: int = 0,
    pack_tokens: int | None = None,
    max_seq_len: int | None = None,
    check_version: bool = False,
) -> None:
    """Check every invariant of the packed-row contract; raise `PackedSchemaError` on the first broken one.

    `row_offset` is added to reported row numbers (a batch's position inside its file). `pack_tokens` /
    `max_seq_len`, when given, also bound `num_tokens` / `max_seqlen`.
    """
    if check_version:
        check_schema_version(table.schema.metadata, source=source)
    for field in PACKED_SCHEMA:
        if field.name not in table.column_names:
            raise _fail(source, None, field.name, f"column missing (have {table.column_names})")
        got = table.schema.field(field.name).type
        if got != field.type:
            raise _fail(source, None, field.name, f"type is {got}, contract says {field.type}")
        if table.column(field.name).null_count:
            bad = int(np.flatnonzero(table.column(field.name).is_null().to_numpy(zero_copy_only=False))[0])
            raise _fail(source, row_offset + bad, field.name, "null value")

    def first(mask: np.ndarray) -> int:
        return row_offset + int(np.flatnonzero(mask)[0])

    num_tokens = table.column("num_tokens").to_numpy().astype(np.int64)
    num_segments = table.column("num_segments").to_numpy().astype(np.int64)
    max_seqlen = table.column("max_seqlen").to_numpy().astype(np.int64)
    ids_off, ids = _list_parts(table.column("input_ids"))
    pos_off, pos = _list_parts(table.column("position_ids"))
    cu_off, cu = _list_parts(table.column("cu_seqlens"))
    ids_len, pos_len, cu_len = np.diff(ids_off), np.diff(pos_off), np.diff(cu_off)

    if (bad := ids_len != num_tokens).any():
        r = first(bad)
        raise _fail(
            source,
            r,
            "input_ids",
            f"length {ids_len[r - row_offset]} != num_tokens {num_tokens[r - row_offset]}",
        )
    if (bad := num_tokens <= 0).any():
        raise _fail(source, first(bad), "num_tokens", "must be > 0 (an empty pack)")
    if pack_tokens is not None and (bad := num_tokens > pack_tokens).any():
        r = first(bad)
        raise _fail(source, r, "num_tokens", f"{num_tokens[r - row_offset]} > pack_tokens {pack_tokens}")
    if (bad := pos_len != num_tokens).any():
        r = first(bad)
        raise _fail(
            source,
            r,
            "position_ids",
            f"length {pos_len[r - row_offset]} != num_tokens {num_tokens[r - row_offset]}",
        )
    if (bad := cu_len != num_segments + 1).any():
        r = first(bad)
        raise _fail(
            source,
            r,
            "cu_seqlens",
            f"length {cu_len[r - row_offset]} != num_segments + 1 = {num_segments[r - row_offset] + 1}",
        )
    if (bad := num_segments <= 0).any():
        raise _fail(source, first(bad), "num_segments", "must be > 0")
    if (bad := ids < 0).any():
        row = int(np.searchsorted(ids_off, np.flatnonzero(bad)[0], side="right") - 1)
        raise _fail(source, row_offset + row, "input_ids", "negative token id")

    starts = cu[cu_off[:-1]]
    ends = cu[cu_off[1:] - 1]
    if (bad := starts != 0).any():
        r = first(bad)
        raise _fail(source, r, "cu_seqlens", f"must start at 0, starts at {starts[r - row_offset]}")
    if (bad := ends != num_tokens).any():
        r = first(bad)
        raise _fail(
            source,
            r,
            "cu_seqlens",
            f"must end at num_tokens={num_tokens[r - row_offset]}, ends at {ends[r - row_offset]}",
        )
    seg_len = np.diff(cu)  # includes meaningless cross-row diffs at row boundaries; mask them out
    row_of_diff = np.repeat(np.arange(len(cu_len)), np.maximum(cu_len - 1, 0))
    within = np.ones(len(seg_len), dtype=bool)
    within[cu_off[1:-1] - 1] = False  # the diff straddling row i / row i+1
    seg_len = seg_len[within]
    if (bad := seg_len <= 0).any():
        raise _fail(
            source,
            row_offset + int(row_of_diff[np.flatnonzero(bad)[0]]),
            "cu_seqlens",
            "must be strictly increasing",
        )
    row_max = np.zeros(len(cu_len), dtype=np.int64)
    np.maximum.at(row_max, row_of_diff, seg_len)
    if (bad := row_max != max_seqlen).any():
        r = first(bad)
        raise _fail(
            source,
            r,
            "max_seqlen",
            f"{max_seqlen[r - row_offset]} != longest segment {row_max[r - row_offset]}",
        )
    if max_seq_len is not None and (bad := max_seqlen > max_seq_len).any():
        r = first(bad)
        raise _fail(source, r, "max_seqlen", f"{max_seqlen[r - row_offset]} > max_seq_len {max_seq_len}")

    # position_ids must equal arange within every segment: expected[t] = t - start_of_its_segment.
    seg_starts_global = cu + np.repeat(ids_off[:-1], cu_len)  # segment boundaries in flat coordinates
    seg_ends_mask = np.ones(len(cu), dtype=bool)
    seg_ends_mask[cu_off[1:] - 1] = False  # drop each row's final boundary (== its end)
    starts_flat = seg_starts_global[seg_ends_mask]
    seg_index = np.searchsorted(starts_flat, np.arange(len(pos)), side="right") - 1
    expected = np.arange(len(pos)) - starts_flat[seg_index]
    if (bad := pos != expected).any():
        t = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(ids_off, t, side="right") - 1)
        raise _fail(
            source,
            row_offset + row,
            "position_ids",
            f"token {t - ids_off[row]} has position {pos[t]}, expected {expected[t]} (restart at 0 per segment)",
        )


def empty_packed_table() -> pa.Table:
    return PACKED_SCHEMA.empty_table()
