"""Collate of packed rows: offsets, the trailing padding segment, static shape (pure function, no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from neobert.schema import PACKED_SCHEMA
from pipelines.train.collate import PackedCollateFn, collate_packed


def packed_table(rows_of_lengths: list[list[int]], seed: int = 0) -> pa.Table:
    """Rows of packed docs with the given segment lengths (ids are random non-special tokens)."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in PACKED_SCHEMA.names}
    for lengths in rows_of_lengths:
        ids = [int(x) for x in rng.integers(1000, 2000, sum(lengths))]
        cols["input_ids"].append(ids)
        cols["position_ids"].append([p for n in lengths for p in range(n)])
        cols["cu_seqlens"].append([0, *np.cumsum(lengths).tolist()])
        cols["max_seqlen"].append(max(lengths))
        cols["num_tokens"].append(sum(lengths))
        cols["num_segments"].append(len(lengths))
    return pa.Table.from_pydict(cols, schema=PACKED_SCHEMA)


def naive(rows_of_lengths, table, budget):
    """Reference: Python loop over rows."""
    ids, pos, cu = [], [], [0]
    for r, lengths in enumerate(rows_of_lengths):
        ids += table.column("input_ids")[r].as_py()
        pos += table.column("position_ids")[r].as_py()
        for n in lengths:
            cu.append(cu[-1] + n)
    pad = budget - len(ids)
    if pad:
        cu.append(budget)
    return ids + [0] * pad, pos + list(range(pad)), cu


@pytest.mark.parametrize(
    "rows",
    [[[3, 5], [8], [1, 1, 2]], [[16]], [[4, 4, 4, 4], [16]], [[2]]],
    ids=["mixed", "full", "exact", "one"],
)
def test_collate_matches_naive(rows):
    table = packed_table(rows)
    budget = 32
    out = collate_packed(table, budget, validate=True)
    ids, pos, cu = naive(rows, table, budget)
    assert out.input_ids.shape == (budget,) and out.position_ids.shape == (budget,)
    assert out.input_ids.tolist() == ids
    assert out.position_ids.tolist() == pos
    assert out.cu_seqlens.tolist() == cu
    n = sum(map(sum, rows))
    assert out.num_tokens == n and out.num_rows == len(rows)
    lens = [n for r in rows for n in r] + ([budget - n] if budget > n else [])
    assert out.max_seqlen == max(lens) and isinstance(out.max_seqlen, int)
    assert out.sum_sq_seqlens == sum(x * x for r in rows for x in r)
    assert out.cu_seqlens.dtype.is_floating_point is False and str(out.cu_seqlens.dtype) == "torch.int32"


def test_padding_split_into_bounded_segments_passes_packed_meta_validation():
    from neobert.packing import PackedMeta, validate_packed_meta

    out = collate_packed(packed_table([[3, 5]]), 32, max_pad_segment=10)
    assert out.cu_seqlens.tolist() == [0, 3, 8, 18, 28, 32]
    assert out.position_ids[8:].tolist() == [*range(10), *range(10), *range(4)]
    assert out.max_seqlen == 10
    meta = PackedMeta(out.cu_seqlens, out.max_seqlen, out.position_ids)
    validate_packed_meta(meta, 32, check_values=True)


def test_no_padding_segment_when_full():
    rows = [[10, 6], [16]]
    out = collate_packed(packed_table(rows), 32)
    assert out.cu_seqlens.tolist() == [0, 10, 16, 32] and out.num_tokens == 32


def test_static_shape_across_batches():
    shapes = {
        collate_packed(packed_table(r, seed=i), 64).input_ids.shape
        for i, r in enumerate([[[5]], [[30, 2], [9]], [[64]]])
    }
    assert shapes == {(64,)}


def test_chunked_table_and_sliced_offsets():
    rows = [[3, 5], [8], [1, 1, 2], [7]]
    table = packed_table(rows)
    chunked = pa.concat_tables([table.slice(0, 1), table.slice(1, 2), table.slice(3, 1)])
    sliced = table.slice(1, 3)
    a = collate_packed(chunked, 40)
    assert a.input_ids.tolist() == collate_packed(table, 40).input_ids.tolist()
    b = collate_packed(sliced, 40)
    ids, pos, cu = naive(rows[1:], sliced, 40)
    assert b.input_ids.tolist() == ids and b.cu_seqlens.tolist() == cu and b.position_ids.tolist() == pos


def test_over_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="token budget 8"):
        collate_packed(packed_table([[5], [5]]), 8)


def test_bad_rows_rejected_when_validating():
    table = packed_table([[3, 5]])
    bad = table.set_column(2, "cu_seqlens", pa.array([[0, 3, 9]], type=pa.list_(pa.int32())))
    with pytest.raises(ValueError, match="cu_seqlens"):
        collate_packed(bad, 16, validate=True)


def test_collate_fn_class():
    pytest.importorskip("ray")
    from ray.data.collate_fn import ArrowBatchCollateFn

    fn = PackedCollateFn(32)
    assert isinstance(fn, ArrowBatchCollateFn)
    out = fn(packed_table([[3, 5]]))
    assert out.input_ids.shape == (32,) and out.cu_seqlens.tolist() == [0, 3, 8, 32]
