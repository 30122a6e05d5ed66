"""PackedMeta: construction from lengths and the one validation function (ValueError for every broken invariant)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neobert.packing import PackedMeta, validate_packed_meta


def test_from_lengths_fields() -> None:
    meta = PackedMeta.from_lengths([5, 3, 7])
    assert meta.cu_seqlens.dtype == torch.int32
    assert meta.cu_seqlens.tolist() == [0, 5, 8, 15]
    assert meta.max_seqlen == 7 and isinstance(meta.max_seqlen, int)
    assert meta.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6]
    assert (meta.num_docs, meta.num_tokens) == (3, 15)
    moved = meta.to("cpu")
    assert isinstance(moved, PackedMeta) and moved.max_seqlen == 7


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_from_lengths_roundtrip(lengths: list[int]) -> None:
    meta = PackedMeta.from_lengths(lengths)
    cu = meta.cu_seqlens.long()
    assert (cu[1:] - cu[:-1]).tolist() == lengths
    assert meta.max_seqlen == max(lengths)
    starts = meta.position_ids == 0
    assert starts.nonzero().flatten().tolist() == cu[:-1].tolist()  # positions restart at every document


@pytest.mark.parametrize("lengths", [[], [3, 0, 2], [-1]])
def test_from_lengths_rejects_empty_documents(lengths) -> None:
    with pytest.raises(ValueError):
        PackedMeta.from_lengths(lengths)


def _meta(cu, max_seqlen=None, pos=None, dtype=torch.int32) -> PackedMeta:
    cu_t = torch.tensor(cu, dtype=dtype)
    if pos is None:
        pos = torch.cat(
            [torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:], strict=True) if b > a] or [torch.arange(0)]
        )
    lens = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    return PackedMeta(cu_t, max_seqlen if max_seqlen is not None else max(max(lens), 1), pos)


@pytest.mark.parametrize(
    ("meta", "num_tokens", "message"),
    [
        (_meta([0, 5, 8], dtype=torch.int64), 8, "int32"),
        (_meta([1, 5, 8], pos=torch.arange(7)), 7, "start at 0"),
        (_meta([0, 5, 8], pos=torch.cat([torch.arange(5), torch.arange(4)])), 9, "end at T"),
        (_meta([0, 5, 9], pos=torch.cat([torch.arange(5), torch.arange(4)])), 8, "shape"),
        (_meta([0, 5, 5, 8]), 8, "strictly increasing"),
        (_meta([0, 6, 5, 8], max_seqlen=6, pos=torch.arange(8)), 8, "strictly increasing"),
        (_meta([0, 5, 8], max_seqlen=4), 8, "max_seqlen=4"),
        (
            PackedMeta(torch.tensor([0, 5, 8], dtype=torch.int32), torch.tensor(5), torch.arange(8)),
            8,
            "Python int",
        ),
        (PackedMeta(torch.tensor([0, 8], dtype=torch.int32), 8, torch.arange(8) + 1), 8, "restart at 0"),
        (PackedMeta(torch.tensor([0], dtype=torch.int32), 1, torch.arange(0)), 0, "at least 2"),
        (
            PackedMeta(torch.tensor([0, 8], dtype=torch.int32), 8, torch.arange(8).float()),
            8,
            "int32 or int64",
        ),
    ],
)
def test_validate_rejects(meta: PackedMeta, num_tokens: int, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        validate_packed_meta(meta, num_tokens)
    print(err.value)


def test_validate_accepts_a_static_bound_for_max_seqlen() -> None:
    validate_packed_meta(_meta([0, 5, 8], max_seqlen=1024), 8)


def test_value_checks_can_be_skipped_for_device_tensors() -> None:
    """On the GPU the value checks would sync; check_values=False (the default off the CPU) skips them."""
    bad = PackedMeta(torch.tensor([1, 8], dtype=torch.int32), 8, torch.arange(8))
    validate_packed_meta(bad, 8, check_values=False)
    with pytest.raises(ValueError, match="start at 0"):
        validate_packed_meta(bad, 8, check_values=True)


def test_not_a_packed_meta() -> None:
    with pytest.raises(ValueError, match="PackedMeta"):
        validate_packed_meta((torch.tensor([0, 3], dtype=torch.int32), 3, torch.arange(3)), 3)
