"""Contrastive validation never loses data: sources inside the output are refused (never deleted), a failed re-run
leaves the previous output as it was plus failure.json, skipped directory files and BEIR id normalization are
reported (engine="local", no Ray cluster)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import pipelines.contrastive.validate as val
from pipelines.contrastive.report import render_html
from pipelines.contrastive.sources import SourceConfig, ValidateContrastiveConfig
from pipelines.io import FAILURE_NAME

GOOD = [
    {"query": "what is a cat", "corpus": "A cat is a small mammal.", "negative": "Dogs bark."},
    {"query": "what is rust", "corpus": "A systems language.", "negative": "A red oxide."},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tree(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def _cfg(out: Path, *sources: SourceConfig) -> ValidateContrastiveConfig:
    return ValidateContrastiveConfig(sources=list(sources), output=str(out), max_reject_fraction=1.0)


def test_a_source_inside_the_output_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    src = _jsonl(out / "valid" / "mine.jsonl", GOOD)
    with pytest.raises(ValueError, match="overlaps the output"):
        val.validate_contrastive(_cfg(out, SourceConfig("mine", str(src))), engine="local")
    assert src.is_file() and json.loads(src.read_text().splitlines()[0]) == GOOD[0]


def test_failed_rerun_keeps_the_previous_output(tmp_path, monkeypatch):
    src = _jsonl(tmp_path / "a.jsonl", GOOD)
    out = tmp_path / "out"
    val.validate_contrastive(_cfg(out, SourceConfig("a", str(src))), engine="local")
    good = _tree(out)
    assert val.MARKER_NAME in good and any(k.startswith("valid/") for k in good)

    def crash(cfg, resolved, staging):
        (staging / "valid" / "part-x.parquet").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(val, "_run_local", crash)
    with pytest.raises(OSError, match="disk full"):
        val.validate_contrastive(_cfg(out, SourceConfig("a", str(src))), engine="local")
    assert json.loads((out / FAILURE_NAME).read_text())["error"] == "OSError: disk full"
    assert {k: v for k, v in _tree(out).items() if k != FAILURE_NAME} == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out"]  # no staging dir left behind


def test_directory_source_reports_the_files_it_skips(tmp_path, caplog):
    d = tmp_path / "src"
    _jsonl(d / "a.jsonl", GOOD)
    (d / "notes.csv").write_text("x,y\n")
    with caplog.at_level("WARNING"):
        report = val.validate_contrastive(_cfg(tmp_path / "out", SourceConfig("d", str(d))), engine="local")
    assert [Path(p).name for p in report["sources"]["d"]["skipped_files"]] == ["notes.csv"]
    assert "notes.csv" in caplog.text and "notes.csv" in (tmp_path / "out" / "report.html").read_text()


def test_beir_numeric_ids_are_normalized_and_counted_lists_rejected(tmp_path):
    root = tmp_path / "beir"
    _jsonl(root / "queries.jsonl", [{"_id": 1, "text": "what is rust"}, {"_id": ["q2"], "text": "a list id"}])
    _jsonl(
        root / "corpus.jsonl", [{"_id": 7.0, "text": "A systems language."}, {"_id": "d8", "text": "Other."}]
    )
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\t7\t1\n")
    report = val.validate_contrastive(_cfg(tmp_path / "out", SourceConfig("b", str(root))), engine="local")
    s = report["sources"]["b"]
    assert s["numeric_ids_normalized"] == 2 and s["valid"] == 1
    assert s["reasons"] == {"wrong_type": 1}
    ex = s["examples"]["wrong_type"][0]
    assert ex["file"] == "queries.jsonl" and ex["row"] == 2 and "_id is list" in ex["detail"]
    assert s["rows_read"] == s["valid"] + s["rejected"] == 2
    assert ">2</td></tr>" in render_html(report).split("numeric ids normalized")[1].split("</table>")[0]
