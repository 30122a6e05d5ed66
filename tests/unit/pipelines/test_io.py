"""pipelines.io: file listing with skipped files, the shared line / JSON / Arrow readers, staged publishing
(local rename swap and URI manifest), overlap refusal and unwrapping Ray's wrapped errors (no Ray cluster)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.io import (
    FAILURE_NAME,
    StagedOutput,
    check_no_overlap,
    iter_lines,
    iter_record_batches,
    list_inputs,
    parse_json_object,
    published_files,
)


def test_directory_scan_names_the_files_it_skips(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "notes.csv").write_text("a,b\n")
    (tmp_path / ".hidden.jsonl").write_text('{"text": "y"}\n')
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "c.jsonl").write_text('{"text": "z"}\n')
    files, skipped = list_inputs([str(tmp_path)])
    assert [f.name for f in files] == ["a.jsonl"]
    assert sorted((Path(s["file"]).name, s["reason"]) for s in skipped) == [
        (".hidden.jsonl", "hidden_file"),
        ("c.jsonl", "hidden_file"),
        ("notes.csv", "unsupported_extension"),
    ]
    with pytest.raises(ValueError, match="does not exist"):
        list_inputs([str(tmp_path / "missing")])


def test_lines_are_one_based_and_compression_is_detected(tmp_path):
    p = tmp_path / "x.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"a": 1}\r\n\n{"b": 2}\n'))
    assert list(iter_lines(str(p), block_bytes=3)) == [(1, b'{"a": 1}'), (2, b""), (3, b'{"b": 2}')]


@pytest.mark.parametrize(
    "line,reason",
    [(b"\xff{}", "invalid_utf8"), (b"{oops", "malformed_json"), (b"[1]", "malformed_json"), (b"{}", "")],
)
def test_parse_json_object_reasons(line, reason):
    obj, why, detail = parse_json_object(line)
    assert why == reason and (obj is None) == bool(reason) and (bool(detail) == bool(reason))


def test_record_batches_of_parquet_and_arrow_stream(tmp_path):
    t = pa.table({"text": ["a", "b", "c"], "id": [1, 2, 3]})
    pq.write_table(t, tmp_path / "x.parquet")
    with pa.OSFile(str(tmp_path / "x.arrow"), "wb") as f, pa.ipc.new_stream(f, t.schema) as w:
        w.write_table(t)
    for path, fmt in ((tmp_path / "x.parquet", "parquet"), (tmp_path / "x.arrow", "hf_arrow")):
        got = pa.Table.from_batches(list(iter_record_batches(str(path), fmt, columns=["text"], batch_size=2)))
        assert got.column("text").to_pylist() == ["a", "b", "c"] and got.num_columns == 1


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_staged_output_publishes_by_swap_and_keeps_old_output_on_failure(tmp_path):
    out = tmp_path / "out"
    s1 = StagedOutput(str(out), owned_marker="report.json")
    Path(s1.uri, "train").mkdir()
    Path(s1.uri, "train", "part-0.parquet").write_bytes(b"first")
    Path(s1.uri, "report.json").write_text("{}")
    assert not out.exists()  # nothing visible before publish
    s1.publish()
    good = _tree(out)
    assert good == {"report.json": b"{}", "train/part-0.parquet": b"first"}

    s2 = StagedOutput(str(out), owned_marker="report.json")
    Path(s2.uri, "train").mkdir()
    Path(s2.uri, "train", "part-0.parquet").write_bytes(b"half-written")
    where = s2.fail(ValueError("x.jsonl, row 3, field 'text': empty_text"))
    failure = json.loads((out / FAILURE_NAME).read_text())
    assert "row 3" in failure["error"] and where.endswith(FAILURE_NAME)
    assert {k: v for k, v in _tree(out).items() if k != FAILURE_NAME} == good  # previous output untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left behind

    s3 = StagedOutput(str(out), owned_marker="report.json")
    Path(s3.uri, "report.json").write_text('{"new": 1}')
    s3.publish()
    assert _tree(out) == {"report.json": b'{"new": 1}'}  # old shards and failure.json replaced as a whole


def test_staged_output_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(ValueError, match="not an earlier output of this job"):
        StagedOutput(str(tmp_path), owned_marker="report.json")
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_uri_output_publishes_a_manifest_last(tmp_path):
    target = f"file://{tmp_path}/out"
    s1 = StagedOutput(target, owned_marker="report.json")
    assert s1.uri.startswith(target + "/.staging-")
    Path(s1.staging, "train").mkdir(parents=True)
    Path(s1.staging, "train", "a.parquet").write_bytes(b"1")
    s1.publish()
    assert published_files(target) == ["train/a.parquet"]
    s2 = StagedOutput(target, owned_marker="report.json")
    Path(s2.staging, "train").mkdir(parents=True)
    Path(s2.staging, "train", "b.parquet").write_bytes(b"2")
    s2.publish()
    assert published_files(target) == ["train/b.parquet"]
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == ["b.parquet"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".staging")]


def test_overlapping_input_and_output_are_refused(tmp_path):
    with pytest.raises(ValueError, match="overlaps the output"):
        check_no_overlap([str(tmp_path / "d" / "train")], str(tmp_path / "d"))
    with pytest.raises(ValueError, match="overlaps the output"):
        check_no_overlap([str(tmp_path / "d")], str(tmp_path / "d" / "packed"))
    with pytest.raises(ValueError, match="overlaps the output"):
        check_no_overlap([str(tmp_path / "d" / "*.jsonl")], str(tmp_path / "d"))
    check_no_overlap([str(tmp_path / "raw")], str(tmp_path / "raw-packed"))  # a sibling with a common prefix
