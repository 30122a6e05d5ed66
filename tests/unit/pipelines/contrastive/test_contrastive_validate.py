"""One test per rejection reason of pipelines.contrastive on small hand-written rows (no Ray cluster).

Per-row reasons go through the pure `parse_record` and the `ContrastiveRowValidator` callable; cross-row reasons
(duplicates, negative counts, dangling BEIR ids) run the whole pipeline with engine="local", which calls the same
step classes the Ray engine runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.contrastive.dedup import find_duplicates
from pipelines.contrastive.report import length_summary, render_html
from pipelines.contrastive.rules import BLANK_LINE, REASONS, RowRejected, pair_key
from pipelines.contrastive.sources import (
    SourceConfig,
    ValidateContrastiveConfig,
    iter_raw_file,
    parse_source_arg,
    resolve_source,
)
from pipelines.contrastive.validate import (
    MARKER_NAME,
    ContrastiveRowValidator,
    RejectThresholdExceeded,
    parse_record,
    read_validated,
    validate_contrastive,
)
from pipelines.tokenizer import load_tokenizer

CFG = SourceConfig(name="s", path="unused")
GOOD = {"query": "what is a cat", "corpus": "A cat is a small mammal.", "negative": "Dogs bark."}


def reject_reason(rec: dict | bytes | str) -> tuple[str, str]:
    raw = rec if isinstance(rec, bytes) else (rec if isinstance(rec, str) else json.dumps(rec)).encode()
    with pytest.raises(RowRejected) as e:
        parse_record(raw, CFG, "inline")
    return e.value.reason, e.value.detail


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "wb") as f:
        for r in rows:
            f.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")
    return path


def run_local(tmp_path: Path, sources: list[SourceConfig], **kw) -> tuple[dict, list[dict], list[dict]]:
    cfg = ValidateContrastiveConfig(
        sources=sources, output=str(tmp_path / "out"), max_reject_fraction=1.0, **kw
    )
    report = validate_contrastive(cfg, engine="local")
    valid = (
        pq.read_table(tmp_path / "out" / "valid").to_pylist()
        if any((tmp_path / "out/valid").iterdir())
        else []
    )
    quar = (
        pq.read_table(tmp_path / "out" / "quarantine").to_pylist()
        if any((tmp_path / "out/quarantine").iterdir())
        else []
    )
    for name, s in report["sources"].items():
        assert s["rows_read"] == s["valid"] + s["rejected"], name
    return report, valid, quar


# ------------------------------------------------------------------------------------------- per-row reasons


def test_good_row_is_normalized():
    q, p, n = parse_record(json.dumps({**GOOD, "query": "  cafe\u0301 menu \n"}).encode(), CFG, "inline")
    assert q == "caf\u00e9 menu"  # stripped and NFC-composed
    assert p == GOOD["corpus"]
    assert n == ["Dogs bark."]  # a string negative becomes a one-element list


def test_malformed_json_line():
    assert reject_reason(b'{"query": "a", "corpus": ')[0] == "malformed_json"
    assert reject_reason(b'["a", "b"]')[0] == "malformed_json"  # valid JSON but not an object


def test_missing_required_field():
    reason, detail = reject_reason({"query": "q", "negative": "n"})
    assert reason == "missing_field" and "'corpus'" in detail


def test_wrong_type_number_null_list():
    assert reject_reason({**GOOD, "query": 5})[0] == "wrong_type"
    assert reject_reason({**GOOD, "corpus": None})[0] == "wrong_type"
    assert reject_reason({**GOOD, "query": ["a", "b"]})[0] == "wrong_type"
    assert reject_reason({**GOOD, "negative": 3.5})[0] == "wrong_type"
    reason, detail = reject_reason({**GOOD, "negative": ["ok", 7]})
    assert reason == "wrong_type" and "negative[1]" in detail
    assert reject_reason({**GOOD, "negative": ["ok", None]})[0] == "wrong_type"


def test_null_negative_means_no_negatives():
    assert parse_record(json.dumps({**GOOD, "negative": None}).encode(), CFG, "inline")[2] == []


def test_empty_and_whitespace_text():
    assert reject_reason({**GOOD, "query": ""})[0] == "empty_text"
    assert reject_reason({**GOOD, "corpus": " \t\n "})[0] == "empty_text"
    assert reject_reason({**GOOD, "negative": ["fine", "   "]})[0] == "empty_text"


def test_invalid_utf8_and_control_characters():
    assert reject_reason(b'{"query": "caf\xc3", "corpus": "x y"}')[0] == "invalid_utf8"
    assert reject_reason(b'{"query": "lone \\ud800 surrogate", "corpus": "x y"}')[0] == "invalid_utf8"
    reason, detail = reject_reason({**GOOD, "corpus": "bell\x07 here"})
    assert reason == "control_characters" and "corpus" in detail
    assert reject_reason({**GOOD, "query": "nul\x00"})[0] == "control_characters"
    # tab / newline are fine
    parse_record(json.dumps({**GOOD, "corpus": "a\tb\nc"}).encode(), CFG, "inline")


def test_positive_identical_to_query():
    assert reject_reason({"query": "Same Text", "corpus": "  same   text "})[0] == "positive_equals_query"


def test_negative_identical_to_positive():
    reason, detail = reject_reason({**GOOD, "negative": ["other", GOOD["corpus"].upper()]})
    assert reason == "negative_equals_positive" and "negative[1]" in detail


def test_column_remap():
    cfg = SourceConfig(name="r", path="x", query_column="q", positive_column="pos", negative_column="negs")
    q, p, n = parse_record(
        json.dumps({"q": "a question", "pos": "an answer", "negs": ["x", "y"]}).encode(), cfg, "inline"
    )
    assert (q, p, n) == ("a question", "an answer", ["x", "y"])
    with pytest.raises(RowRejected, match="missing_field"):
        parse_record(json.dumps(GOOD).encode(), cfg, "inline")


def _validator_batch(records: list[bytes]) -> pa.Table:
    n = len(records)
    return pa.table(
        {
            "source_index": pa.array([0] * n, pa.int32()),
            "source": ["s"] * n,
            "file_index": pa.array([0] * n, pa.int32()),
            "file": ["f.jsonl"] * n,
            "row": pa.array(range(1, n + 1), pa.int64()),
            "raw": pa.array(records, pa.binary()),
            "original": [r.decode(errors="replace") for r in records],
            "reader_error": [""] * n,
            "reader_detail": [""] * n,
        }
    )


@pytest.mark.parametrize("policy", ["report", "truncate", "reject"])
def test_too_long_under_each_policy(policy):
    max_len = 16
    long_text = " ".join(["token"] * 40)  # 40 word pieces + 2 specials
    recs = [json.dumps({**GOOD, "corpus": long_text}).encode(), json.dumps(GOOD).encode()]
    v = ContrastiveRowValidator(
        {0: CFG}, {0: "inline"}, max_seq_len=max_len, truncation=policy, tokenize=True
    )
    out = v(_validator_batch(recs)).to_pylist()
    assert len(out) == 2
    assert out[1]["reason"] == "" and out[1]["over_max_len"] == []
    tok = load_tokenizer()
    assert out[0]["positive_len"] == len(tok.encode(long_text).ids) == 42
    if policy == "reject":
        assert out[0]["reason"] == "too_long" and "corpus" not in out[0]["detail"]
        assert "positive has 42 tokens > max_seq_len=16" in out[0]["detail"]
    else:
        assert out[0]["reason"] == "" and out[0]["over_max_len"] == ["positive"]
        if policy == "report":
            assert out[0]["positive"] == long_text and len(out[0]["positive_input_ids"]) == 42
        else:
            assert len(out[0]["positive_input_ids"]) <= max_len
            assert len(tok.encode(out[0]["positive"]).ids) <= max_len
            assert long_text.startswith(out[0]["positive"]) and len(out[0]["positive"]) > 0


def test_truncate_policy_property():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    v = ContrastiveRowValidator({0: CFG}, {0: "inline"}, max_seq_len=12, truncation="truncate")
    tok = v.tok
    words = st.sampled_from(
        ["un", "believ", "able", "naïve", "x", "1234", "–", "日本", "hello", "world", ",", "a"]
    )

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.tuples(words, st.sampled_from(["", " ", "  "])), min_size=1, max_size=40))
    def check(parts):
        text = "".join(w + sep for w, sep in parts).strip() or "x"
        enc = tok.encode(text)
        cut = v._truncate(text, enc)
        if len(enc.ids) <= 12:
            assert cut is not None and cut[0] == text
        else:
            assert cut is not None, text
            assert text.startswith(cut[0]) and 0 < len(tok.encode(cut[0]).ids) <= 12

    check()


def test_truncation_can_make_texts_equal():
    prefix = " ".join(["shared"] * 30)
    rec = {"query": "q", "corpus": prefix + " positive tail", "negative": prefix + " negative tail"}
    v = ContrastiveRowValidator({0: CFG}, {0: "inline"}, max_seq_len=10, truncation="truncate")
    out = v(_validator_batch([json.dumps(rec).encode()])).to_pylist()[0]
    assert out["reason"] == "negative_equals_positive" and out["detail"] == "equal after truncation"


def test_validator_keeps_every_row_and_reader_errors():
    batch = _validator_batch([b"not json", json.dumps(GOOD).encode(), b"\xff\xfe"])
    batch = batch.set_column(7, "reader_error", pa.array(["", "", "dangling_id"]))
    out = ContrastiveRowValidator({0: CFG}, {0: "inline"})(batch).to_pylist()
    assert [r["reason"] for r in out] == ["malformed_json", "", "dangling_id"]
    assert out[1]["key"] == pair_key(GOOD["query"], GOOD["corpus"]) and out[0]["key"] == b""
    assert [r["row"] for r in out] == [1, 2, 3]


# ------------------------------------------------------------------------------------------- readers


def test_jsonl_reader_keeps_line_numbers_and_bad_bytes(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [GOOD, b"", b"bad \xff line", GOOD])
    src = resolve_source(SourceConfig(name="a", path=str(p)), 0)
    t = pa.concat_tables(iter_raw_file(src, 0, chunk_rows=2))
    assert t["row"].to_pylist() == [1, 2, 3, 4]
    assert t["reader_error"].to_pylist() == ["", BLANK_LINE, "", ""]  # counted in the report, not a row
    assert t["raw"][2].as_py() == b"bad \xff line" and t["original"][2].as_py() == "bad \\xff line"


def test_resolve_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(SourceConfig(name="x", path=str(tmp_path / "nope.jsonl")), 0)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="set format"):
        resolve_source(SourceConfig(name="x", path=str(tmp_path / "x.txt")), 0)
    (tmp_path / "bad.parquet").write_bytes(b"definitely not parquet")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        resolve_source(SourceConfig(name="x", path=str(tmp_path / "bad.parquet")), 0)
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_source_arg("no-equals-sign")
    with pytest.raises(ValueError, match="unique"):
        ValidateContrastiveConfig(sources=[SourceConfig("a", "p"), SourceConfig("a", "q")])


def test_parquet_and_hf_disk_sources(tmp_path):
    rows = [{"query": "q one", "corpus": "p one", "negative": ["n1", "n2"]},
            {"query": "q two", "corpus": 3, "negative": ["n1", "n2"]}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist([rows[0], {**rows[1], "corpus": "p two"}]), tmp_path / "a.parquet")
    import datasets

    datasets.Dataset.from_list([rows[0], {**rows[1], "corpus": "3"}]).save_to_disk(str(tmp_path / "hf"))
    report, valid, quar = run_local(
        tmp_path,
        [SourceConfig("pq", str(tmp_path / "a.parquet")), SourceConfig("hf", str(tmp_path / "hf"))],
    )
    assert report["sources"]["pq"]["format"] == "parquet" and report["sources"]["hf"]["format"] == "hf_disk"
    assert report["sources"]["pq"]["valid"] == 2
    # hf row 0 duplicates pq row 0 (pq is listed first)
    assert [(q["source"], q["row"], q["reason"]) for q in quar] == [("hf", 0, "duplicate_pair")]
    assert "first seen in source 'pq'" in quar[0]["detail"]
    assert sorted((v["source"], v["positive"]) for v in valid) == [
        ("hf", "3"),
        ("pq", "p one"),
        ("pq", "p two"),
    ]


# ------------------------------------------------------------------------------------------- cross-row reasons


def test_duplicate_pairs_within_and_across_sources(tmp_path):
    a = write_jsonl(
        tmp_path / "a.jsonl",
        [
            GOOD,
            {"query": "other q", "corpus": "other p", "negative": "n"},
            b"  ",
            {**GOOD, "negative": "different neg"},
        ],
    )
    b = write_jsonl(
        tmp_path / "b.jsonl",
        [{**GOOD, "query": "WHAT  is a cat"}, {"query": "b q", "corpus": "b p", "negative": "n"}],
    )
    report, valid, quar = run_local(tmp_path, [SourceConfig("a", str(a)), SourceConfig("b", str(b))])
    got = sorted((q["source"], q["row"], q["reason"], q["detail"]) for q in quar)
    assert got == [
        ("a", 4, "duplicate_pair", "first seen in source 'a' file 'a.jsonl' row 1"),
        ("b", 1, "duplicate_pair", "first seen in source 'a' file 'a.jsonl' row 1"),
    ]
    assert report["sources"]["a"]["duplicates"]["within_source"] == 1
    assert report["sources"]["b"]["duplicates"]["across_sources"] == 1
    assert report["duplicates_across_sources"] == [{"source": "b", "first_source": "a", "count": 1}]
    assert report["sources"]["a"]["blank_lines_skipped"] == 1 and report["sources"]["a"]["rows_read"] == 3
    assert len(valid) == 3


def test_find_duplicates_is_order_independent():
    keys = pa.table(
        {
            "key": [b"k"] * 3,
            "source_index": pa.array([1, 0, 0], pa.int32()),
            "file_index": pa.array([0, 0, 0], pa.int32()),
            "row": pa.array([1, 9, 4], pa.int64()),
            "num_negatives": pa.array([1, 1, 1], pa.int32()),
        }
    )
    for perm in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):
        out = find_duplicates(keys.take(perm)).to_pylist()
        assert [(d["source_index"], d["row"], d["first_row"]) for d in out] == [(0, 9, 4), (1, 1, 4)]


def test_find_duplicates_matches_naive_reference_and_bucketing():
    import random

    from pipelines.contrastive.dedup import add_key_bucket as _add_key_bucket

    rng = random.Random(0)
    n = 2000
    keys = pa.table(
        {
            "key": pa.array([pair_key(f"q{rng.randrange(300)}", "p") for _ in range(n)], pa.binary()),
            "source_index": pa.array([rng.randrange(3) for _ in range(n)], pa.int32()),
            "file_index": pa.array([rng.randrange(2) for _ in range(n)], pa.int32()),
            "row": pa.array(rng.sample(range(10 * n), n), pa.int64()),
            "num_negatives": pa.array([rng.choice([1, 1, 1, 2]) for _ in range(n)], pa.int32()),
        }
    )
    excluded = {1: 1}  # source 1 rejects rows without exactly one negative
    # naive reference: for each key, the smallest (source, file, row) among eligible rows is kept
    eligible = [
        r
        for r in keys.to_pylist()
        if excluded.get(r["source_index"], r["num_negatives"]) == r["num_negatives"]
    ]
    first: dict[bytes, tuple] = {}
    for r in sorted(eligible, key=lambda r: (r["source_index"], r["file_index"], r["row"])):
        first.setdefault(r["key"], (r["source_index"], r["file_index"], r["row"]))
    ref = sorted(
        ((r["source_index"], r["file_index"], r["row"]), first[r["key"]])
        for r in eligible
        if first[r["key"]] != (r["source_index"], r["file_index"], r["row"])
    )

    def as_pairs(t: pa.Table) -> list:
        return sorted(
            (
                (d["source_index"], d["file_index"], d["row"]),
                (d["first_source_index"], d["first_file_index"], d["first_row"]),
            )
            for d in t.to_pylist()
        )

    assert as_pairs(find_duplicates(keys, excluded)) == ref and len(ref) > 1000
    bucketed = _add_key_bucket(keys, 7)
    parts = [
        find_duplicates(bucketed.filter(pa.compute.equal(bucketed["bucket"], b)), excluded) for b in range(7)
    ]
    assert as_pairs(pa.concat_tables(parts)) == ref


def test_negative_count_inconsistency(tmp_path):
    rows = [{"query": f"q{i}", "corpus": f"p{i}", "negative": ["x", "y"]} for i in range(4)]
    rows.append({"query": "q9", "corpus": "p9", "negative": ["only one"]})
    rows.append({"query": "q8", "corpus": "p8"})
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    report, valid, quar = run_local(tmp_path, [SourceConfig("a", str(a))])
    assert sorted((q["row"], q["reason"]) for q in quar) == [
        (5, "negative_count_mismatch"),
        (6, "negative_count_mismatch"),
    ]
    assert report["sources"]["a"]["expected_num_negatives"] == 2
    assert report["sources"]["a"]["negatives_per_query"] == {"2": 4}
    # report-only policy keeps them and counts them; an explicit count overrides the mode
    report, valid, quar = run_local(tmp_path, [SourceConfig("a", str(a), negative_count_policy="report")])
    assert len(valid) == 6 and report["sources"]["a"]["negative_count_mismatch_reported"] == 2
    report, valid, quar = run_local(tmp_path, [SourceConfig("a", str(a), num_negatives=1)])
    assert [q["row"] for q in sorted(quar, key=lambda q: q["row"])] == [1, 2, 3, 4, 6]


def _beir_dir(root: Path) -> Path:
    root.mkdir()
    write_jsonl(root / "queries.jsonl", [{"_id": "q1", "text": "what is rust"}, {"_id": "q2", "text": "who wrote hamlet"},
                                         b"{broken", {"_id": "q3", "text": "capital of peru"}])  # fmt: skip
    write_jsonl(root / "corpus.jsonl", [{"_id": "d1", "title": "Rust", "text": "A systems language."},
                                        {"_id": "d2", "title": "", "text": "Shakespeare wrote Hamlet."},
                                        {"_id": "d3", "title": "Lima", "text": "Lima is the capital of Peru."},
                                        {"_id": "d4", "title": "", "text": "Unrelated text."}])  # fmt: skip
    (root / "qrels").mkdir()
    (root / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq404\td1\t1\nq3\td404\t1\nq1\td4\t0\nbroken-line\n"
    )
    write_jsonl(root / "hard_negatives.jsonl", [{"query-id": "q1", "corpus-ids": ["d4"]},
                                                {"query-id": "q2", "corpus-ids": ["d999"]}])  # fmt: skip
    return root


def test_beir_dangling_ids(tmp_path):
    root = _beir_dir(tmp_path / "beir")
    report, valid, quar = run_local(
        tmp_path, [SourceConfig("beir", str(root), negative_count_policy="report")]
    )
    s = report["sources"]["beir"]
    assert s["kind"] == "beir"
    got = sorted((q["file"], q["row"], q["reason"]) for q in quar)
    assert got == [
        ("qrels/train.tsv", 3, "dangling_id"),  # q2's hard negative d999 is unknown
        ("qrels/train.tsv", 4, "dangling_id"),  # q404
        ("qrels/train.tsv", 5, "dangling_id"),  # d404
        ("qrels/train.tsv", 6, "qrel_not_positive"),
        ("qrels/train.tsv", 7, "malformed_qrels"),
        ("queries.jsonl", 3, "malformed_json"),
    ]
    details = {q["row"]: q["detail"] for q in quar if q["reason"] == "dangling_id"}
    assert "d999" in details[3] and "q404" in details[4] and "d404" in details[5]
    assert valid == [
        {
            "query": "what is rust",
            "positive": "Rust A systems language.",
            "negatives": ["Unrelated text."],
            "source": "beir",
        }
    ]
    assert s["rows_read"] == 7 == s["valid"] + s["rejected"]


def test_beir_duplicate_ids_and_dangling_negative_query_ids(tmp_path):
    """A repeated `_id` must not silently replace the first definition, and a hard-negatives line for an unknown
    query id must not be silently ignored: both are quarantined."""
    root = tmp_path / "beir"
    root.mkdir()
    write_jsonl(root / "queries.jsonl", [{"_id": "q1", "text": "what is rust"},
                                         {"_id": "q1", "text": "a different query"}])  # fmt: skip
    write_jsonl(root / "corpus.jsonl", [{"_id": "d1", "text": "A systems language."},
                                        {"_id": "d2", "text": "Unrelated text."}])  # fmt: skip
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    write_jsonl(root / "hard_negatives.jsonl", [{"query-id": "q1", "corpus-ids": ["d2"]},
                                                {"query-id": "q77", "corpus-ids": ["d2"]}])  # fmt: skip
    report, valid, quar = run_local(tmp_path, [SourceConfig("beir", str(root))])
    got = sorted((q["file"], q["row"], q["reason"]) for q in quar)
    assert got == [("hard_negatives.jsonl", 2, "dangling_id"), ("queries.jsonl", 2, "duplicate_id")]
    assert valid == [
        {"query": "what is rust", "positive": "A systems language.", "negatives": ["Unrelated text."],
         "source": "beir"}
    ]  # fmt: skip
    assert report["sources"]["beir"]["reasons"] == {"dangling_id": 1, "duplicate_id": 1}


# ------------------------------------------------------------------------------------------- report / job


def test_report_threshold_marker_and_html_escaping(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD, {"query": "<script>alert(1)</script>", "corpus": 1}])
    cfg = ValidateContrastiveConfig(
        sources=[SourceConfig("a", str(a))], output=str(tmp_path / "out"), max_reject_fraction=0.25
    )
    with pytest.raises(RejectThresholdExceeded, match="1/2 rows rejected"):
        validate_contrastive(cfg, engine="local")
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and report["sources"]["a"]["reasons"] == {"wrong_type": 1}
    assert json.loads((out / MARKER_NAME).read_text())["passed"] is False
    html = (out / "report.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html and "<svg" in html
    with pytest.raises(ValueError, match="reject threshold"):
        read_validated(out)
    with pytest.raises(ValueError, match="not a finished"):
        read_validated(tmp_path)
    assert set(REASONS) >= set(report["sources"]["a"]["reasons"])
    assert "FAILED" in render_html(report)


def test_length_summary_percentiles_match_naive():
    import numpy as np

    lengths = [5, 7, 7, 9, 12, 12, 12, 30, 31, 100]
    hist: dict[str, int] = {}
    for x in lengths:
        hist[str(x)] = hist.get(str(x), 0) + 1
    s = length_summary(hist)
    for p in (50, 90, 95, 99):
        ref = int(np.percentile(lengths, p, method="inverted_cdf"))
        assert s[f"p{p}"] == ref, (p, s[f"p{p}"], ref)
    assert s["max"] == 100 and sum(s["histogram"]["counts"]) == len(lengths)


def test_job_config_from_yaml_list_and_cli(tmp_path):
    from jobs.validate_contrastive import build_config

    y = tmp_path / "s.yaml"
    y.write_text("- {name: a, path: a.jsonl, query_column: q}\n- {name: b, path: b_dir, kind: beir}\n")
    cfg = build_config(
        ["--sources-yaml", str(y), "--source", "c=c.parquet", "--max-seq-len", "64", "--tokenize"]
    )
    assert [(s.name, s.path) for s in cfg.sources] == [("a", "a.jsonl"), ("b", "b_dir"), ("c", "c.parquet")]
    assert cfg.sources[0].query_column == "q" and cfg.sources[1].kind == "beir"
    assert cfg.max_seq_len == 64 and cfg.tokenize is True and cfg.truncation == "report"
    y.write_text("sources:\n  - {name: a, path: a.jsonl, bogus: 1}\n")
    with pytest.raises(ValueError, match="bogus"):
        build_config(["--sources-yaml", str(y)])


def test_docs_list_every_reason_and_example_yaml_parses():
    from jobs.validate_contrastive import build_config

    root = Path(__file__).resolve().parents[4]
    doc = (root / "docs" / "contrastive_data.md").read_text()
    missing = [r for r in REASONS if f"| `{r}` |" not in doc]
    assert not missing, f"docs/contrastive_data.md lacks reasons {missing}"
    cfg = build_config(["--sources-yaml", str(root / "configs" / "contrastive_sources.example.yaml")])
    assert [s.kind for s in cfg.sources] == ["auto", "auto", "beir"] and cfg.sources[1].num_negatives == 3


def test_job_exit_codes_and_stderr(tmp_path, capsys):
    from jobs.validate_contrastive import main

    p = write_jsonl(tmp_path / "dirty.jsonl", [GOOD, b"{oops", b"[]"])
    args = ["--engine", "local", "--output", str(tmp_path / "out")]
    # the uniform job contract: rejected data is bad input (exit 2, one error line)
    assert main([*args, "--source", f"dirty={p}", "--max-reject-fraction", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "validate_contrastive: error: source 'dirty': 2/3 rows rejected" in err and "malformed_json" in err
    assert main([*args, "--source", f"dirty={p}", "--max-reject-fraction", "0.7"]) == 0
    assert "3 rows read, 1 valid, 2 rejected" in capsys.readouterr().out
    assert main([*args, "--source", f"gone={tmp_path / 'missing.jsonl'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
    assert main([*args, "--source", f"bad={tmp_path / 'bad.parquet'}"]) == 2
    assert "not a readable parquet file" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_bytes(
        b"\n\n"
    )  # only blank lines: readable, but no rows -> must not pass
    assert main([*args, "--source", f"empty={tmp_path / 'empty.jsonl'}", "--max-reject-fraction", "1"]) == 2
    err = capsys.readouterr().err
    assert "source 'empty': no rows read" in err and len(err.strip().splitlines()) == 1, err


def test_every_line_lands_in_exactly_one_place(tmp_path):
    """Random mixes of good, duplicate and broken lines: quarantine rows + valid rows == non-blank lines."""
    import itertools

    from hypothesis import given, settings
    from hypothesis import strategies as st

    case = itertools.count()
    line = st.one_of(
        st.builds(
            lambda i: json.dumps({"query": f"q{i}", "corpus": f"p{i}", "negative": f"n{i}"}).encode(),
            st.integers(0, 6),
        ),
        st.binary(max_size=12),
        st.sampled_from([b"", b"{", b"null", b'{"query": 1}', b'{"query": "a", "corpus": "A"}', b"\x80\x81"]),
    )

    @settings(max_examples=15, deadline=None)
    @given(st.lists(line, min_size=1, max_size=25))
    def check(lines):
        lines = [ln.replace(b"\n", b" ").replace(b"\r", b" ") for ln in lines]
        d = tmp_path / f"case{next(case)}"
        d.mkdir()
        p = write_jsonl(d / "x.jsonl", lines)
        cfg = ValidateContrastiveConfig(
            sources=[SourceConfig("x", str(p), negative_count_policy="report")],
            output=str(d / "out"),
            max_reject_fraction=1.0,
        )
        records = [i + 1 for i, ln in enumerate(lines) if ln.strip()]
        if not records:  # only blank lines: no rows is a failed source, never a clean pass
            with pytest.raises(RejectThresholdExceeded, match="no rows read"):
                validate_contrastive(cfg, engine="local")
            return
        report = validate_contrastive(cfg, engine="local")
        valid = pq.read_table(d / "out" / "valid").num_rows if any((d / "out" / "valid").iterdir()) else 0
        quar = (
            pq.read_table(d / "out" / "quarantine").to_pylist()
            if any((d / "out" / "quarantine").iterdir())
            else []
        )
        s = report["sources"]["x"]
        assert s["rows_read"] == len(records) == valid + len(quar)
        assert s["blank_lines_skipped"] == len(lines) - len(records)
        assert {q["row"] for q in quar} <= set(records) and len({q["row"] for q in quar}) == len(quar)

    check()


def test_rows_missing_from_disk_fail_loudly(tmp_path):
    """valid/ + quarantine/ must hold exactly the counted rows (a node-local OUTPUT on a multi-node cluster would
    not): the run fails instead of handing on a partial valid set."""
    from pipelines.contrastive.validate import VALID_SCHEMA, _check_written_rows

    (tmp_path / "valid").mkdir()
    (tmp_path / "quarantine").mkdir()
    row = {"query": "q", "positive": "p", "negatives": [], "source": "s"}
    pq.write_table(
        pa.Table.from_pylist([row, row], schema=VALID_SCHEMA), tmp_path / "valid" / "part-0.parquet"
    )
    _check_written_rows(tmp_path, {"valid": 2, "rejected": 0})
    with pytest.raises(RuntimeError, match="every node can reach"):
        _check_written_rows(tmp_path, {"valid": 3, "rejected": 0})
