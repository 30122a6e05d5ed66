"""End to end on a slice of the embedded corpus through the shared Ray cluster: shards + report written and
valid, bit-identical on a re-run, readable with read_packed, identical to the on-the-fly stream; bad input named,
and a failed re-run leaves the previous output as it was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from neobert.schema import validate_packed_table
from pipelines.mlm.packed_io import read_packed
from pipelines.mlm.preprocess import PreprocessConfig, build_packed_datasets, run_preprocess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """First documents of each embedded MLM file (same JSONL format), plus one dirty file."""
    from pipelines.embedded import materialize

    d = tmp_path_factory.mktemp("corpus")
    for f in materialize().mlm_files:
        lines = Path(f).read_text(encoding="utf-8").splitlines()[:12]
        (d / Path(f).name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (d / "dirty.jsonl").write_bytes(
        b'{"id": "x1", "text": ""}\n{"id": "x2", "text": "\xff bad"}\n{"id": "x3"}\n'
    )
    return d


def _digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*.parquet"))
    }


def _cfg(corpus: Path, out: Path, **kw) -> PreprocessConfig:
    base = dict(input=[str(corpus)], output=str(out), eval_fraction=0.2, rows_per_shard=8, on_bad_row="skip")
    return PreprocessConfig(**(base | kw))


def test_preprocess_end_to_end(ray_session, corpus, tmp_path):
    out = tmp_path / "packed"
    report = run_preprocess(_cfg(corpus, out))

    # report: files, counts, skipped rows with reasons, fill
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["packs"] == report["packs"] > 10
    assert on_disk["skipped_rows"]["by_reason"] == {
        "empty_text": 1,
        "invalid_utf8": 1,
        "missing_text_column": 1,
    }
    html = (out / "report.html").read_text()
    assert html.count("<svg") >= 2 and "Document length histogram" in html and "Pack fill ratio" in html
    train = report["splits"]["train"]
    assert train["fill_ratio"] >= 0.99 and report["splits"]["eval"]["packs"] >= 1
    assert report["documents"] == 24 and report["rows_read"] == 27

    # shards: contract holds, schema version in the Parquet metadata, counts agree with the report
    shards = sorted((out / "train").glob("*.parquet"))
    assert [s.name for s in shards] == [f"part-{i:05d}.parquet" for i in range(len(shards))] and len(
        shards
    ) >= 2
    for s in shards:
        validate_packed_table(
            pq.read_table(s), source=str(s), pack_tokens=8192, max_seq_len=1024, check_version=True
        )
    assert sum(pq.read_metadata(s).num_rows for s in shards) == train["packs"]

    # re-run (overwrite) with one tokenizer actor instead of two and 5-document chunks instead of 512: other
    # scheduling and other chunk/block boundaries, yet bit-identical files
    first = _digests(out)
    run_preprocess(_cfg(corpus, out, num_tokenizers=1, chunk_docs=5))
    assert _digests(out) == first

    # two independent packer streams (files dealt round-robin): same documents, tokens and length statistics
    two = run_preprocess(_cfg(corpus, tmp_path / "two", num_pack_streams=2, length_views=[300]))
    for key in ("documents", "tokens", "rows_read", "document_length_tokens", "skipped_rows"):
        assert two[key] == report[key], key
    # the length view: only documents of >= 300 tokens, packed on their own, readable like the main output
    view = json.loads((tmp_path / "two" / "views" / "min300" / "report.json").read_text())
    assert 0 < view["documents"] < two["documents"]
    assert view["documents"] + view["documents_below_view_length"] == two["documents"]
    assert view["document_length_tokens"]["percentiles"]["min"] >= 300
    assert read_packed(str(tmp_path / "two" / "views" / "min300")).count() == view["splits"]["train"]["packs"]
    names = sorted(p.name for p in (tmp_path / "two" / "train").glob("*.parquet"))
    assert names[0].startswith("part-s000-") and names[-1].startswith("part-s001-")
    assert read_packed(str(tmp_path / "two")).count() == two["splits"]["train"]["packs"]

    # read back through Ray Data, in order
    ds = read_packed(str(out), split="train")
    rows = ds.take_all()
    assert len(rows) == train["packs"] and sum(r["num_tokens"] for r in rows) == train["tokens"]
    assert list(rows[0]["input_ids"]) == pq.read_table(shards[0]).column("input_ids")[0].as_py()
    assert read_packed(str(out), split="eval").count() == report["splits"]["eval"]["packs"]

    # the on-the-fly stream yields exactly the written rows, in the same order
    live = build_packed_datasets(_cfg(corpus, out))["train"].take_all()
    assert [list(r["input_ids"]) for r in live] == [list(r["input_ids"]) for r in rows]

    # a failed re-run (a bad row raised inside a Ray actor) leaves the previous output exactly as it was, plus
    # failure.json naming the row; nothing is left staged beside it
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(Exception, match=r"dirty\.jsonl, row 1, field 'text': empty_text"):
        run_preprocess(_cfg(corpus, out, on_bad_row="error"))
    assert "dirty.jsonl, row 1" in json.loads((out / "failure.json").read_text())["error"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "failure.json"} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["packed", "two"]


def test_bad_input_is_named(ray_session, corpus, tmp_path):
    with pytest.raises(Exception, match=r"dirty\.jsonl, row 1, field 'text': empty_text"):
        run_preprocess(_cfg(corpus, tmp_path / "o", on_bad_row="error"))
    with pytest.raises(ValueError, match="no Parquet shards"):
        read_packed(str(tmp_path / "nothing"))
