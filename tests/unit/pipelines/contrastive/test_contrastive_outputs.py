"""Contrastive validation never loses data: sources inside the output are refused (never deleted), a failed re-run
leaves the previous output as it was plus failure.json, skipped directory files and BEIR id normalization are
reported (engine="local", no Ray cluster)."""

from __future__ import annotations

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


def _cfg(out: Path, *sources: SourceConfig) -> ValidateContrastiveConfig:
    return ValidateContrastiveConfig(sources=list(sources), output=str(out), max_reject_fraction=1.0)


def test_a_source_inside_the_output_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    src = _jsonl(out / "valid" / "mine.jsonl", GOOD)
    with pytest.raises(ValueError, match="overlaps the output"):
        val.validate_contrastive(_cfg(out, SourceConfig("mine", str(src))), engine="local")
    assert src.is_file() and json.loads(src.read_text().splitlines()[0]) == GOOD[0]


def test_failed_rerun_keeps_the_previous_output(tmp_path, monkeypatch, tree_digests):
    src = _jsonl(tmp_path / "a.jsonl", GOOD)
    out = tmp_path / "out"
    val.validate_contrastive(_cfg(out, SourceConfig("a", str(src))), engine="local")
    good = tree_digests(out)
    assert val.MARKER_NAME in good and any(k.startswith("valid/") for k in good)

    def crash(cfg, resolved, staging):
        (staging / "valid" / "part-x.parquet").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(val, "_run_local", crash)
    with pytest.raises(OSError, match="disk full"):
        val.validate_contrastive(_cfg(out, SourceConfig("a", str(src))), engine="local")
    assert json.loads((out / FAILURE_NAME).read_text())["error"] == "OSError: disk full"
    assert {k: v for k, v in tree_digests(out).items() if k != FAILURE_NAME} == good
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
    _jsonl(root / "hard_negatives.jsonl", [{"query-id": 1.0, "corpus-ids": ["d8"]}])  # same id rules
    report = val.validate_contrastive(_cfg(tmp_path / "out", SourceConfig("b", str(root))), engine="local")
    s = report["sources"]["b"]
    assert s["numeric_ids_normalized"] == 2 and s["valid"] == 1 and s["negatives_per_query"] == {"1": 1}
    assert s["reasons"] == {"wrong_type": 1}
    ex = s["examples"]["wrong_type"][0]
    assert ex["file"] == "queries.jsonl" and ex["row"] == 2 and "_id is list" in ex["detail"]
    assert s["rows_read"] == s["valid"] + s["rejected"] == 2
    assert ">2</td></tr>" in render_html(report).split("numeric ids normalized")[1].split("</table>")[0]


def test_every_beir_line_is_valid_or_quarantined(tmp_path):
    """BEIR fuzz: every qrels line and every bad queries/corpus line lands in exactly one place (valid or the
    quarantine with a reason), never both, never neither; valid pairs are the distinct resolvable ones."""
    import itertools

    import pyarrow.parquet as pq
    from hypothesis import given, settings
    from hypothesis import strategies as st

    case = itertools.count()
    qrel = st.one_of(
        st.tuples(st.sampled_from(["q0", "q1", "q404"]), st.sampled_from(["d0", "d1", "d404"]),
                  st.sampled_from(["1", "2", "0", "-1", "x", ""])).map(lambda t: "\t".join(t).rstrip("\t")),
        st.sampled_from(["", "q0", "garbage line", "q0\td0\t1\textra"]),
    )  # fmt: skip
    aux_bad = st.lists(
        st.sampled_from(['{"_id": [1], "text": "l"}', "{oops", '{"text": "no id"}', "[]"]), max_size=3
    )

    @settings(max_examples=25, deadline=None)
    @given(lines=st.lists(qrel, min_size=1, max_size=12), bad_q=aux_bad, bad_c=aux_bad)
    def check(lines, bad_q, bad_c):
        root = tmp_path / f"case{next(case)}" / "beir"
        (root / "qrels").mkdir(parents=True)
        queries = [
            json.dumps({"_id": "q0", "text": "query zero"}),
            json.dumps({"_id": "q1", "text": "query one"}),
        ]
        corpus = [json.dumps({"_id": "d0", "text": "doc zero"}), json.dumps({"_id": "d1", "text": "doc one"})]
        (root / "queries.jsonl").write_text("\n".join(queries + bad_q) + "\n")
        (root / "corpus.jsonl").write_text("\n".join(corpus + bad_c) + "\n")
        (root / "qrels" / "t.tsv").write_text("\n".join(lines) + "\n")
        out = root.parent / "out"
        if not any(ln.strip() for ln in lines) and not bad_q and not bad_c:
            return  # no rows at all: a failed source (tested in test_contrastive_validate.py)
        report = val.validate_contrastive(_cfg(out, SourceConfig("b", str(root))), engine="local")
        s = report["sources"]["b"]
        valid = pq.read_table(out / "valid").num_rows if any((out / "valid").iterdir()) else 0
        quar = pq.read_table(out / "quarantine").to_pylist() if any((out / "quarantine").iterdir()) else []
        places = [(q["file"], q["row"]) for q in quar]
        assert len(places) == len(set(places))  # never twice
        records = [i + 1 for i, ln in enumerate(lines) if ln.strip()]
        assert s["rows_read"] == len(records) + len(bad_q) + len(bad_c) == valid + len(quar)  # never neither
        good = []
        for ln in lines:
            p = ln.split("\t")
            positive = len(p) == 2 or (len(p) > 2 and p[2].lstrip("-").isdigit() and int(p[2]) >= 1)
            if positive and p[0] in ("q0", "q1") and p[1] in ("d0", "d1"):
                good.append((p[0], p[1]))
        assert valid == len(set(good))

    check()
