"""Cross-row steps of contrastive validation over the key table (16-byte pair hash + position, no text):
duplicate (query, positive) pairs and the expected number of negatives per source. Pure numpy/pyarrow; the Ray
engine runs `find_duplicates` per hash bucket (`add_key_bucket`), the local engine on the whole table."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from pipelines.contrastive.sources import SourceConfig

# 16-byte pair hash + position: the only table the cross-row steps hold (~36 bytes per valid row)
KEY_COLUMNS = ["key", "source_index", "file_index", "row", "num_negatives"]

DUPLICATES_SCHEMA = pa.schema(
    [
        ("source_index", pa.int32()),
        ("file_index", pa.int32()),
        ("row", pa.int64()),
        ("first_source_index", pa.int32()),
        ("first_file_index", pa.int32()),
        ("first_row", pa.int64()),
    ]
)


def find_duplicates(keys: pa.Table, excluded_counts: dict[int, int] | None = None) -> pa.Table:
    """Rows of `keys` (any set of key-table rows: one hash partition, or everything) whose pair key occurred
    before -> their position and the first occurrence's. Vectorized: sort by (key, source_index, file_index,
    row); a row equal in key to its predecessor is a duplicate of the run's first row. The first occurrence is
    the smallest (source_index, file_index, row), so the answer does not depend on Ray's block order.

    excluded_counts: source_index -> expected negatives for sources whose mismatching rows are rejected anyway;
    those rows are left out so a pair is never dropped as a duplicate of a row that is itself rejected.
    """
    if excluded_counts:
        uniq, inverse = np.unique(keys["source_index"].to_numpy(), return_inverse=True)
        nn = keys["num_negatives"].to_numpy()
        exp_row = np.array([excluded_counts.get(int(s), -1) for s in uniq])[inverse]
        keys = keys.filter(pa.array((exp_row == -1) | (exp_row == nn)))
    t = keys.sort_by([(c, "ascending") for c in ("key", "source_index", "file_index", "row")])
    n = t.num_rows
    if n < 2:
        return DUPLICATES_SCHEMA.empty_table()
    same = pa.compute.equal(t["key"].slice(1), t["key"].slice(0, n - 1)).to_numpy(zero_copy_only=False)
    is_first = np.concatenate([[True], ~same])
    first_idx = np.maximum.accumulate(np.where(is_first, np.arange(n), 0))
    dup = np.flatnonzero(~is_first)
    first = pa.array(first_idx[dup])
    return pa.table(
        {
            "source_index": t["source_index"].take(dup),
            "file_index": t["file_index"].take(dup),
            "row": t["row"].take(dup),
            "first_source_index": t["source_index"].take(first),
            "first_file_index": t["file_index"].take(first),
            "first_row": t["row"].take(first),
        },
        schema=DUPLICATES_SCHEMA,
    )


def add_key_bucket(t: pa.Table, num_buckets: int) -> pa.Table:
    """Hash partition of the key table: bucket = first 4 bytes of the (uniform) BLAKE2 key mod num_buckets."""
    prefix = np.array([int.from_bytes(k[:4], "big") for k in t["key"].to_pylist()], dtype=np.int64)
    return t.append_column("bucket", pa.array(prefix % num_buckets, pa.int32()))


def expected_negative_counts(counts: dict[int, Counter], sources: dict[int, SourceConfig]) -> dict[int, int]:
    """source_index -> expected negatives per row: the configured value, else the most common count (ties: the
    larger count, so a few rows lacking negatives do not define the norm)."""
    out = {}
    for si, cfg in sources.items():
        if cfg.num_negatives >= 0:
            out[si] = cfg.num_negatives
        elif counts.get(si):
            c = counts[si]
            out[si] = max(c, key=lambda k: (c[k], k))
    return out
