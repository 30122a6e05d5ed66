"""jobs/validate_contrastive.py on a mixed set of sources with planted bad rows, through Ray Data.

Sources: inline JSONL with string negatives, inline Parquet with list negatives (remapped column names), a
BEIR-style directory. Checks report.json counts, the quarantine rows, that the valid rows equal the expected
set, that the Ray engine agrees with the in-process reference engine, and `ray job submit`. (Exit codes of the
job are unit-tested with the local engine.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _jsonl(path: Path, rows: list) -> None:
    with open(path, "wb") as f:
        for r in rows:
            f.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")


def make_sources(root: Path) -> tuple[str, dict]:
    """Writes three sources + a YAML listing them; returns (yaml path, expected outcome)."""
    root.mkdir(parents=True, exist_ok=True)
    good_a = [
        {"query": f"question {i}", "corpus": f"answer passage {i}", "negative": f"wrong passage {i}"}
        for i in range(8)
    ]
    _jsonl(
        root / "a.jsonl",
        good_a[:4]
        + [
            b'{"query": "truncated',  # line 5 malformed_json
            {"query": "no positive"},  # line 6 missing_field
            {"query": 42, "corpus": "x", "negative": "y"},  # line 7 wrong_type
            b'{"query": "bad \xff byte", "corpus": "p", "negative": "n"}',  # line 8 invalid_utf8
            {"query": "same", "corpus": "Same", "negative": "n"},  # line 9 positive_equals_query
            {**good_a[0], "negative": "another"},  # line 10 duplicate of line 1
        ]
        + good_a[4:],  # lines 11-14
    )
    good_b = [
        {"q": f"parquet query {i}", "pos": f"parquet passage {i}", "negs": [f"pn{i}a", f"pn{i}b"]}
        for i in range(5)
    ]
    bad_b = [
        {"q": "parquet query x", "pos": "parquet passage x", "negs": ["parquet passage x", "z"]},  # row 5
        {"q": "   ", "pos": "p", "negs": ["a", "b"]},  # row 6 empty_text
        {"q": "question 1", "pos": "answer passage 1", "negs": ["c", "d"]},  # row 7 duplicate of a line 2
        {"q": "parquet query y", "pos": "parquet passage y", "negs": ["only one"]},  # row 8 count mismatch
    ]
    pq.write_table(pa.Table.from_pylist(good_b + bad_b), root / "b.parquet")
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    _jsonl(beir / "queries.jsonl", [{"_id": f"q{i}", "text": f"beir query {i}"} for i in range(4)])
    _jsonl(beir / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": f"beir doc {i}"} for i in range(4)])
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\nq2\td2\t1\nq3\tmissing\t1\nq9\td3\t1\n"
    )
    yaml_path = root / "sources.yaml"
    yaml_path.write_text(
        "sources:\n"
        f"  - {{name: strneg, path: {root / 'a.jsonl'}}}\n"
        f"  - {{name: listneg, path: {root / 'b.parquet'}, query_column: q, positive_column: pos,"
        " negative_column: negs}\n"
        f"  - {{name: beir, path: {beir}}}\n"
        "max_reject_fraction: 0.5\n"
    )
    expected = {
        "counts": {
            "strneg": (
                14,
                8,
                {
                    "malformed_json": 1,
                    "missing_field": 1,
                    "wrong_type": 1,
                    "invalid_utf8": 1,
                    "positive_equals_query": 1,
                    "duplicate_pair": 1,
                },
            ),
            "listneg": (
                9,
                5,
                {
                    "negative_equals_positive": 1,
                    "empty_text": 1,
                    "duplicate_pair": 1,
                    "negative_count_mismatch": 1,
                },
            ),
            "beir": (5, 3, {"dangling_id": 2}),
        },  # fmt: skip
        "valid": sorted(
            [(r["query"], r["corpus"], (r["negative"],), "strneg") for r in good_a]
            + [(r["q"], r["pos"], tuple(r["negs"]), "listneg") for r in good_b]
            + [(f"beir query {i}", f"beir doc {i}", (), "beir") for i in range(3)]
        ),
        "quarantine": sorted(
            [
                ("strneg", r, reason)
                for r, reason in [
                    (5, "malformed_json"),
                    (6, "missing_field"),
                    (7, "wrong_type"),
                    (8, "invalid_utf8"),
                    (9, "positive_equals_query"),
                    (10, "duplicate_pair"),
                ]
            ]
            + [
                ("listneg", 5, "negative_equals_positive"),
                ("listneg", 6, "empty_text"),
                ("listneg", 7, "duplicate_pair"),
                ("listneg", 8, "negative_count_mismatch"),
            ]
            + [("beir", 5, "dangling_id"), ("beir", 6, "dangling_id")]
        ),  # fmt: skip
    }
    return str(yaml_path), expected


def _valid_set(out: Path) -> list[tuple]:
    rows = pq.read_table(out / "valid").to_pylist()
    return sorted((r["query"], r["positive"], tuple(r["negatives"]), r["source"]) for r in rows)


def test_mixed_sources_report_quarantine_valid(ray_session, tmp_path):
    from jobs.validate_contrastive import build_config
    from pipelines.contrastive.validate import read_validated, validate_contrastive

    yaml_path, exp = make_sources(tmp_path / "src")
    cfg = build_config(["--sources-yaml", yaml_path, "--output", str(tmp_path / "out"), "--tokenize"])
    report = validate_contrastive(cfg)  # Ray Data engine on the shared cluster
    out = tmp_path / "out"
    disk = json.loads((out / "report.json").read_text())
    assert disk["passed"] is True
    for name, (read, valid, reasons) in exp["counts"].items():
        s = disk["sources"][name]
        assert (s["rows_read"], s["valid"], s["rejected"]) == (read, valid, read - valid), name
        assert s["reasons"] == reasons, name
    assert disk["duplicates_across_sources"] == [{"source": "listneg", "first_source": "strneg", "count": 1}]
    assert disk["sources"]["listneg"]["negatives_per_query"] == {"2": 5}
    assert disk["sources"]["strneg"]["token_lengths"]["query"]["count"] == 8

    assert _valid_set(out) == exp["valid"]
    quar = pq.read_table(out / "quarantine").to_pylist()
    assert sorted((q["source"], q["row"], q["reason"]) for q in quar) == exp["quarantine"]
    by_row = {(q["source"], q["row"]): q for q in quar}
    assert by_row[("strneg", 8)]["original"] == '{"query": "bad \\xff byte", "corpus": "p", "negative": "n"}'
    assert by_row[("beir", 5)]["detail"] == "unknown corpus-id 'missing'"
    assert by_row[("listneg", 7)]["detail"] == "first seen in source 'strneg' file 'a.jsonl' row 2"

    ds = read_validated(out)
    assert ds.count() == 16
    assert {"query", "positive", "negatives", "source", "query_input_ids"} <= set(ds.schema().names)

    # the in-process reference engine produces the same report numbers and rows
    local_out = tmp_path / "local"
    ref = validate_contrastive(
        build_config(["--sources-yaml", yaml_path, "--output", str(local_out)]), engine="local"
    )
    for name in exp["counts"]:
        for k in ("rows_read", "valid", "rejected", "reasons", "negatives_per_query", "token_lengths"):
            assert report["sources"][name][k] == ref["sources"][name][k], (name, k)
    assert _valid_set(local_out) == exp["valid"]


def test_ray_job_submit(ray_cluster, tmp_path):
    yaml_path, exp = make_sources(tmp_path / "src")
    out = tmp_path / "out"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.dashboard_url)
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--working-dir", str(REPO), "--",
           sys.executable, "jobs/validate_contrastive.py", "--sources-yaml", yaml_path, "--output", str(out)]  # fmt: skip
    deadline = time.time() + 60
    while True:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=REPO)
        # a fresh cluster's job agent may not be up yet: the submit is refused before anything runs
        if "No available agent to submit job" not in proc.stderr + proc.stdout or time.time() > deadline:
            break
        agent_log = "".join(
            p.read_text(errors="replace")
            for p in Path(ray_cluster.temp_dir).glob("session_*/logs/dashboard_agent.log")
        )
        # another Ray on this host may hold the agent's default HTTP port (52365): a host problem, not ours
        if "address already in use" in agent_log:
            pytest.skip(
                "the test cluster's job agent could not bind its HTTP port (taken by another Ray on this host)"
            )
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _valid_set(out) == exp["valid"]
