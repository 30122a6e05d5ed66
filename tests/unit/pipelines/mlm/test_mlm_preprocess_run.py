"""run_preprocess end to end without a Ray cluster: the Ray Data stream is replaced by the same tokenizer and
packer actors called in-process, so the driver logic (input checks, staging, publishing, failure report, report
contents) is tested on tiny inputs. The real Ray wiring is covered by tests/integration/test_preprocess.py."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipelines.mlm.preprocess as pp
from pipelines.io import FAILURE_NAME
from pipelines.mlm.pack import PackChunks
from pipelines.mlm.read import BadInputError, ReadOptions, iter_document_chunks
from pipelines.mlm.report import render_html
from pipelines.mlm.tokenize import TokenizeFiles


class _Rows:
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def take_all(self) -> list[dict]:
        return self.rows

    def union(self, *others: _Rows) -> _Rows:
        return _Rows(self.rows + [r for o in others for r in o.rows])


def _in_process_stream(
    cfg, files, splits, output_uri, stream=0, num_streams=1, published_uri=None, min_doc_tokens=0
):
    actor = TokenizeFiles(
        tokenizer_path=None, max_seq_len=cfg.max_seq_len, min_seq_len=cfg.min_seq_len,
        read_options=cfg.read_options(), eval_fraction=cfg.eval_fraction, seed=cfg.seed, splits=splits,
        min_doc_tokens=min_doc_tokens,
    )  # fmt: skip
    packer = PackChunks(
        num_units=len(files), pack_tokens=cfg.pack_tokens, max_seq_len=cfg.max_seq_len,
        buffer_segments=cfg.pack_buffer_segments, close_fill=cfg.pack_close_fill,
        rows_per_shard=cfg.rows_per_shard, splits=splits, output_uri=output_uri, published_uri=published_uri,
        stream=stream, num_streams=num_streams,
    )  # fmt: skip
    rows: list[dict] = []
    for i, f in enumerate(files):
        unit = pa.table(
            {"unit": [i], "uri": [f.uri], "format": [f.format], "name": [f.name], "size": [f.size]}
        )
        for chunk in actor(unit):
            for t in packer(chunk):
                rows += t.to_pylist()
    return _Rows(rows)


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.setattr(pp, "_packed_stream", _in_process_stream)


def _cfg(inp, out, **kw) -> pp.PreprocessConfig:
    base = dict(
        input=[str(p) for p in inp], output=str(out), max_seq_len=32, min_seq_len=4, pack_tokens=64,
        pack_buffer_segments=64, rows_per_shard=4, eval_fraction=0.2, on_bad_row="skip",
    )  # fmt: skip
    return pp.PreprocessConfig(**(base | kw))


def _docs(path: Path, n: int, extra: bytes = b"") -> Path:
    rows = [{"id": f"d{i}", "text": " ".join(f"word{j}" for j in range(i % 30 + 5))} for i in range(n)]
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + extra)
    return path


def test_input_inside_the_output_is_refused_and_never_deleted(tmp_path, tree_digests):
    d = tmp_path / "d"
    (d / "train").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a document of some words"] * 3}), d / "train" / "part-00000.parquet")
    before = tree_digests(d)
    with pytest.raises(ValueError, match="overlaps the output"):
        pp.run_preprocess(_cfg([d / "train"], d))
    assert tree_digests(d) == before


def test_failed_rerun_keeps_previous_output_and_reports_the_failure(tmp_path, tree_digests):
    src = tmp_path / "src"
    src.mkdir()
    _docs(src / "a.jsonl", 60)
    out = tmp_path / "out"
    report = pp.run_preprocess(_cfg([src], out))
    assert report["splits"]["train"]["packs"] >= 2 and (out / "report.html").is_file()
    assert all(s["path"].startswith(str(out) + "/") for s in report["splits"]["train"]["shards"])
    good = tree_digests(out)
    _docs(src / "b.jsonl", 3, extra=b'{"id": "bad", "text": ""}\n')
    with pytest.raises(BadInputError, match=r"b\.jsonl, row 4, field 'text': empty_text"):
        pp.run_preprocess(_cfg([src], out, on_bad_row="error"))
    failure = json.loads((out / FAILURE_NAME).read_text())
    assert "row 4" in failure["error"]
    assert {k: v for k, v in tree_digests(out).items() if k != FAILURE_NAME} == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no staging dir left


def test_report_warns_about_skipped_files_and_an_empty_eval_split(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    _docs(src / "a.jsonl", 3, extra=b'{"id": "x", "text": ["<script>alert(1)</script>"]}\n{"id": 5}\n')
    (src / "notes.csv").write_text("a,b\n")
    (src / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        report = pp.run_preprocess(_cfg([src], out, eval_fraction=0.001))
    assert report["splits"]["eval"]["documents"] == 0
    assert any("eval split is empty" in w for w in report["warnings"])
    assert (
        "eval split is empty" in caplog.text and "notes.csv" in caplog.text and ".hidden.jsonl" in caplog.text
    )
    assert sorted(Path(s["file"]).name for s in report["skipped_input_files"]) == [
        ".hidden.jsonl",
        "notes.csv",
    ]
    assert report["per_file"] == [{"file": str(src / "a.jsonl"), "rows": 5, "bad_rows": 2, "documents": 3}]
    html = (out / "report.html").read_text()
    assert "eval split is empty" in html and "notes.csv" in html
    assert "<script>" not in html and "&lt;script&gt;" in html  # the document text is escaped, not executed
    example = report["skipped_rows"]["examples"][1]
    assert example["row"] == 5 and example["reason"] == "missing_text_column" and '"id": 5' in example["text"]
    assert "<th>p50</th>" in html and "<th>p99</th>" in html  # percentiles as a table


def test_length_views_hold_only_long_documents(tmp_path):
    from pipelines.mlm.packed_io import packed_files
    from pipelines.mlm.views import length_views
    from pipelines.tokenizer import load_tokenizer

    src = _docs(tmp_path / "a.jsonl", 60)
    out = tmp_path / "out"
    report = pp.run_preprocess(_cfg([src], out, length_views=[20, 30]))
    tok = load_tokenizer()
    lengths = [len(tok.encode(json.loads(ln)["text"], add_special_tokens=False).ids) for ln in src.open()]
    for length in (20, 30):
        view = json.loads((out / "views" / f"min{length}" / "report.json").read_text())
        want = sum(n >= length for n in lengths)
        assert view["documents"] == want == report["length_views"][f"min{length}"]["documents"] > 0
        assert view["documents_below_view_length"] == len(lengths) - want
        assert view["document_length_tokens"]["percentiles"]["min"] >= length
        assert packed_files(str(out / "views" / f"min{length}"), "train")
    assert report["documents"] == len(lengths)
    assert length_views(str(out)) == {20: f"{out}/views/min20", 30: f"{out}/views/min30"}
    with pytest.raises(ValueError, match="length_views"):
        pp.PreprocessConfig(length_views=[0])


def test_render_html_escapes_file_names_and_rounds_numbers():
    report = {
        "warnings": [], "rows_read": 1234567, "documents": 1, "segments": 1, "tokens": 10, "packs": 1,
        "fill_ratio": 0.123456789, "elapsed_s": 1.23456, "tokens_per_s": 12345.678,
        "splits": {"train": {"documents": 1, "segments": 1, "tokens": 10, "packs": 1, "fill_ratio": 0.5,
                             "fill_histogram": {"0-0.5": 1}, "dropped_segments": {}, "shards": []}},
        "document_length_tokens": {"percentiles": {"p50": 10, "min": 10, "max": 10}, "histogram_log2": {"8-15": 1}},
        "per_file": [{"file": "<img src=x onerror=alert(1)>.jsonl", "rows": 1, "bad_rows": 0, "documents": 1}],
        "skipped_rows": {"total": 0, "by_reason": {}, "examples": []}, "skipped_files": [], "config": {},
    }  # fmt: skip
    html = render_html(report)
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "1,234,567" in html and "0.123" in html and "0.123456789" not in html and "12,346" in html


# --------------------------------------------------------------------------------------------- fuzz


_LINE = st.one_of(
    st.builds(lambda i: json.dumps({"text": f"doc {i} words here"}).encode(), st.integers(0, 50)),
    st.sampled_from([
        b"", b"{", b"[]", b"null", b'{"text": null}', b'{"text": 3}', b'{"text": "  "}', b'{"body": "x"}',
        b'{"text": "lone \\udc80"}', b'{"text": "\xff\xfe"}', b"\xff{", b'{"text": "ok \\u00e9"}',
    ]),
    st.binary(max_size=10).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ")),
)  # fmt: skip


def _is_good(line: bytes) -> bool:
    try:
        obj = json.loads(line.decode("utf-8"))
        text = obj["text"]
        text.encode("utf-8")
        return isinstance(obj, dict) and isinstance(text, str) and bool(text.strip())
    except Exception:
        return False


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(_LINE, max_size=25), chunk_docs=st.integers(1, 4))
def test_every_row_is_either_a_document_or_a_counted_bad_row(tmp_path_factory, lines, chunk_docs):
    """MLM reader: every non-blank line is kept as a document or reported with a reason, never both, never neither."""
    d = tmp_path_factory.mktemp("fuzz")
    p = d / "x.jsonl"
    p.write_bytes(b"".join(ln + b"\n" for ln in lines))
    if lines and lines[0].lstrip().startswith(b"[") and not _is_good(lines[0]):
        return  # a JSON array file is refused as a whole (tested elsewhere)
    from pipelines.io import resolve_inputs

    (f,) = resolve_inputs([str(p)])
    chunks = list(
        iter_document_chunks(f, ReadOptions(on_bad_row="skip", chunk_docs=chunk_docs, id_column=""))
    )
    kept = {int(i.rsplit(":", 1)[1]) for c in chunks for i in c.doc_ids}
    bad = sum(sum(c.bad_counts.values()) for c in chunks)
    nonblank = [i for i, ln in enumerate(lines) if ln.strip()]
    assert kept == {i for i in nonblank if _is_good(lines[i])}
    assert len(kept) + bad == len(nonblank) == sum(c.num_rows for c in chunks)
    reported = {e["row"] - 1 for c in chunks for e in c.bad_examples}
    assert not reported & kept and reported <= set(nonblank)


# --------------------------------------------------------------------------------------------- the job


def test_job_reports_a_missing_input_before_ray_starts(tmp_path, monkeypatch, capsys):
    import pipelines.ray_session
    from jobs.preprocess import main

    def must_not_start(*_a, **_k):
        raise AssertionError("Ray must not start for an input error")

    monkeypatch.setattr(pipelines.ray_session, "init_ray", must_not_start)
    rc = main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        rc == 2
        and len(err) == 1
        and err[0].startswith("preprocess: error: input path")
        and "does not exist" in err[0]
    )


def test_job_prints_one_error_line_for_a_bad_row_raised_inside_ray(tmp_path, monkeypatch, capsys):
    """Ray wraps the worker's BadInputError (RayTaskError, then Ray Data's own error): the job prints the cause as
    one `error:` line naming file, 1-based row and field, and exits 2."""
    from ray.exceptions import RayTaskError

    import jobs.preprocess as job
    import pipelines.ray_session

    src = _docs(tmp_path / "a.jsonl", 2, extra=b'{"text": null}\n')
    f = pp.input_files(_cfg([src], tmp_path / "out"))[0]

    def run(cfg):
        try:
            list(iter_document_chunks(f, ReadOptions()))
        except BadInputError as e:
            wrapped = RayTaskError("TokenizeFiles", "Traceback ...\n" * 50, e).as_instanceof_cause()
            raise RuntimeError("Ray Data execution failed") from wrapped

    monkeypatch.setattr(pipelines.ray_session, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(job, "run_preprocess", run)
    assert job.main(["--input", str(src), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("preprocess: error: ") and "a.jsonl, row 3, field 'text': null_text" in err[0]


def test_job_length_views_flag(tmp_path, monkeypatch):
    import jobs.preprocess as job
    import pipelines.ray_session

    src = _docs(tmp_path / "a.jsonl", 2)
    seen = []

    def run(cfg):
        seen.append(cfg)
        raise ValueError("stop here: only the parsed config matters")

    monkeypatch.setattr(pipelines.ray_session, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(job, "run_preprocess", run)
    argv = ["--input", str(src), "--output", str(tmp_path / "o"), "--length-views"]
    for flag, want in (("1024,2048", [1024, 2048]), ("512", [512])):
        assert job.main([*argv, flag]) == 2
        assert seen[-1].length_views == want
