"""The packed-row validator (neobert/schema.py): one hand-broken table per invariant, each error naming the
source, the row and the field."""

from __future__ import annotations

import pyarrow as pa
import pytest

from neobert.schema import (
    PACKED_SCHEMA,
    SCHEMA_VERSION_KEY,
    PackedSchemaError,
    check_schema_version,
    validate_packed_table,
)

# Row 0: two segments (3 + 2 tokens); row 1: one segment of 4 tokens.
GOOD = {
    "input_ids": [[101, 7, 102, 101, 102], [101, 8, 9, 102]],
    "position_ids": [[0, 1, 2, 0, 1], [0, 1, 2, 3]],
    "cu_seqlens": [[0, 3, 5], [0, 4]],
    "max_seqlen": [3, 4],
    "num_tokens": [5, 4],
    "num_segments": [2, 1],
}


def _table(**changes) -> pa.Table:
    cols = {k: [list(v) if isinstance(v, list) else v for v in vals] for k, vals in GOOD.items()}
    for key, (row, value) in changes.items():
        cols[key][row] = value
    return pa.Table.from_pydict(cols, schema=PACKED_SCHEMA)


def test_good_table_passes_also_sliced_and_chunked():
    t = _table()
    validate_packed_table(t, pack_tokens=5, max_seq_len=4, check_version=True)
    validate_packed_table(t.slice(1))
    validate_packed_table(pa.concat_tables([t, t]))
    validate_packed_table(PACKED_SCHEMA.empty_table())


BROKEN = [
    # (field, row, value, message fragment)
    ("input_ids", 1, [101, 8, 102], "length 3 != num_tokens 4"),
    ("num_tokens", 0, 0, "num_tokens"),
    ("position_ids", 0, [0, 1, 2, 0], "length 4 != num_tokens 5"),
    ("cu_seqlens", 0, [0, 5], "length 2 != num_segments + 1 = 3"),
    ("input_ids", 1, [101, -8, 9, 102], "negative token id"),
    ("cu_seqlens", 1, [1, 4], "must start at 0"),
    ("cu_seqlens", 0, [0, 3, 4], "must end at num_tokens=5"),
    ("cu_seqlens", 0, [0, 0, 5], "strictly increasing"),
    ("max_seqlen", 1, 3, "3 != longest segment 4"),
    ("position_ids", 0, [0, 1, 2, 3, 4], "token 3 has position 3, expected 0"),
    ("position_ids", 1, [1, 2, 3, 4], "token 0 has position 1, expected 0"),
]


@pytest.mark.parametrize("field,row,value,msg", BROKEN)
def test_each_broken_invariant_is_named(field, row, value, msg):
    t = _table(**{field: (row, value)})
    with pytest.raises(PackedSchemaError) as e:
        validate_packed_table(t, source="shard.parquet", row_offset=100)
    text = str(e.value)
    assert f"shard.parquet, row {100 + row}" in text and msg in text, text
    assert "jobs/preprocess.py" in text  # the fix


def test_empty_pack_and_zero_segments():
    t = _table(
        input_ids=(1, []), position_ids=(1, []), cu_seqlens=(1, [0]), num_tokens=(1, 0), max_seqlen=(1, 0)
    )
    t = t.set_column(5, "num_segments", pa.array([2, 0], pa.int32()))
    with pytest.raises(PackedSchemaError, match=r"row 1, field 'num_tokens': must be > 0"):
        validate_packed_table(t)


def test_bounds_pack_tokens_and_max_seq_len():
    with pytest.raises(PackedSchemaError, match=r"row 0, field 'num_tokens': 5 > pack_tokens 4"):
        validate_packed_table(_table(), pack_tokens=4)
    with pytest.raises(PackedSchemaError, match=r"row 1, field 'max_seqlen': 4 > max_seq_len 3"):
        validate_packed_table(_table(), max_seq_len=3)


def test_missing_column_wrong_type_and_nulls():
    t = _table()
    with pytest.raises(PackedSchemaError, match=r"field 'cu_seqlens': column missing"):
        validate_packed_table(t.drop_columns(["cu_seqlens"]))
    wide = t.set_column(0, "input_ids", t.column("input_ids").cast(pa.list_(pa.int64())))
    with pytest.raises(PackedSchemaError, match=r"field 'input_ids': type is list<item: int64>"):
        validate_packed_table(wide)
    nulls = t.set_column(3, pa.field("max_seqlen", pa.int32()), pa.array([3, None], pa.int32()))
    with pytest.raises(PackedSchemaError, match=r"row 1, field 'max_seqlen': null value"):
        validate_packed_table(nulls)


def test_schema_version():
    check_schema_version(PACKED_SCHEMA.metadata)
    with pytest.raises(PackedSchemaError, match="not a packed dataset"):
        check_schema_version(None, source="x.parquet")
    with pytest.raises(PackedSchemaError, match="version '0' but this code reads"):
        check_schema_version({SCHEMA_VERSION_KEY: b"0"}, source="x.parquet")
    with pytest.raises(PackedSchemaError, match="x.parquet"):
        validate_packed_table(_table().replace_schema_metadata({}), source="x.parquet", check_version=True)
