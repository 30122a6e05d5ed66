"""Report of a contrastive validation run: merge per-batch statistics -> `report.json` + `report.html`.

`ContrastiveFinalizer` returns one JSON statistics dict per batch (`{source: new_source_stats()}` shape);
`build_report` merges them exactly (token lengths are kept as {length: count} so percentiles are exact) and
checks the invariant rows_read == valid + rejected for every source. Layout: docs/contrastive_data.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipelines.contrastive.rules import REASONS
from pipelines.report_html import render

PERCENTILES = (50, 90, 95, 99)
NUM_HIST_BINS = 20


def new_source_stats() -> dict[str, Any]:
    return {
        "rows_read": 0,
        "valid": 0,
        "rejected": 0,
        "reasons": {},
        "negatives_hist": {},  # str(num negatives) -> valid rows
        "token_lengths": {"query": {}, "positive": {}, "negative": {}},  # str(length) -> count (valid rows)
        "over_max_seq_len": {},  # field -> texts over max_seq_len kept as-is (truncation=report)
        "truncated": {},  # field -> texts truncated (truncation=truncate)
        "duplicates_within": 0,
        "duplicates_across": 0,
        "duplicate_first_sources": {},  # source holding the first occurrence -> count
        "negative_count_mismatch_reported": 0,  # negative_count_policy=report
        "blank_lines_skipped": 0,  # empty lines of JSONL / qrels files: not rows
        "numeric_ids_normalized": 0,  # BEIR `_id` numbers turned into strings
        "examples": {},  # reason -> [{file, row, detail, original, _order}]
    }


def _add_counts(dst: dict, src: dict) -> None:
    for k, v in src.items():
        dst[k] = dst.get(k, 0) + v


def merge_stats(batches: list[str | dict], num_examples: int) -> dict[str, dict]:
    merged: dict[str, dict] = {}
    for b in batches:
        for source, st in (json.loads(b) if isinstance(b, str) else b).items():
            m = merged.setdefault(source, new_source_stats())
            for k in ("rows_read", "valid", "rejected", "duplicates_within", "duplicates_across",
                      "negative_count_mismatch_reported", "blank_lines_skipped", "numeric_ids_normalized"):  # fmt: skip
                m[k] += st[k]
            for k in (
                "reasons",
                "negatives_hist",
                "over_max_seq_len",
                "truncated",
                "duplicate_first_sources",
            ):
                _add_counts(m[k], st[k])
            for f, h in st["token_lengths"].items():
                _add_counts(m["token_lengths"][f], h)
            for reason, ex in st["examples"].items():
                m["examples"].setdefault(reason, []).extend(ex)
    for m in merged.values():  # deterministic examples: the first ones in (source, file, row) order
        for reason, ex in m["examples"].items():
            ex.sort(key=lambda e: e["_order"])
            m["examples"][reason] = ex[:num_examples]
    return merged


def length_summary(hist: dict[str, int]) -> dict[str, Any]:
    """{length: count} -> count, mean, exact percentiles (nearest-rank), max, and a binned histogram."""
    items = sorted((int(k), v) for k, v in hist.items())
    total = sum(v for _, v in items)
    if total == 0:
        return {"count": 0}
    out: dict[str, Any] = {"count": total, "mean": round(sum(k * v for k, v in items) / total, 2)}
    for p in PERCENTILES:
        rank = max(1, math.ceil(p / 100 * total))
        acc = 0
        for k, v in items:
            acc += v
            if acc >= rank:
                out[f"p{p}"] = k
                break
    out["min"], out["max"] = items[0][0], items[-1][0]
    width = max(1, math.ceil((items[-1][0] + 1) / NUM_HIST_BINS))
    counts = [0] * (items[-1][0] // width + 1)
    for k, v in items:
        counts[k // width] += v
    out["histogram"] = {
        "bin_width": width,
        "bin_starts": [i * width for i in range(len(counts))],
        "counts": counts,
    }
    return out


def build_report(
    batches: list[str],
    *,
    sources: list[tuple[Any, str, str, list[str], list[str]]],
    expected_negatives: dict[str, int],
    config: dict[str, Any],
    num_examples: int,
) -> dict[str, Any]:
    """Merged statistics -> the report dict. `sources`: (SourceConfig, kind, format, files, skipped files)."""
    merged = merge_stats(batches, num_examples)
    out_sources: dict[str, Any] = {}
    across: dict[tuple[str, str], int] = {}
    for cfg, kind, fmt, files, skipped in sources:
        st = merged.get(cfg.name, new_source_stats())
        assert st["rows_read"] == st["valid"] + st["rejected"], (
            cfg.name,
            st["rows_read"],
            st["valid"],
            st["rejected"],
        )
        assert sum(st["reasons"].values()) == st["rejected"], (cfg.name, st["reasons"], st["rejected"])
        for first, n in st["duplicate_first_sources"].items():
            if first != cfg.name:
                across[(cfg.name, first)] = across.get((cfg.name, first), 0) + n
        out_sources[cfg.name] = {
            "path": cfg.path,
            "kind": kind,
            "format": fmt,
            "num_files": len(files),
            "skipped_files": skipped,
            "numeric_ids_normalized": st["numeric_ids_normalized"],
            "rows_read": st["rows_read"],
            "valid": st["valid"],
            "rejected": st["rejected"],
            "reject_fraction": st["rejected"] / st["rows_read"] if st["rows_read"] else 0.0,
            "reasons": dict(sorted(st["reasons"].items(), key=lambda kv: (-kv[1], kv[0]))),
            "blank_lines_skipped": st["blank_lines_skipped"],
            "expected_num_negatives": expected_negatives.get(cfg.name),
            "negative_count_mismatch_reported": st["negative_count_mismatch_reported"],
            "negatives_per_query": dict(sorted(st["negatives_hist"].items(), key=lambda kv: int(kv[0]))),
            "token_lengths": {f: length_summary(h) for f, h in st["token_lengths"].items()},
            "over_max_seq_len": st["over_max_seq_len"],
            "truncated": st["truncated"],
            "duplicates": {
                "within_source": st["duplicates_within"],
                "across_sources": st["duplicates_across"],
                "first_seen_in": st["duplicate_first_sources"],
            },
            "examples": {
                r: [{k: v for k, v in e.items() if k != "_order"} for e in ex]
                for r, ex in st["examples"].items()
            },
        }
    missing = sorted(set(merged) - set(out_sources))
    assert not missing, f"statistics for unknown sources {missing}"
    totals = {k: sum(s[k] for s in out_sources.values()) for k in ("rows_read", "valid", "rejected")}
    assert totals["rows_read"] == totals["valid"] + totals["rejected"], totals
    return {
        "schema": "neobert-ray/contrastive-report/v1",
        "config": config,
        "totals": totals,
        "sources": out_sources,
        "duplicates_across_sources": [
            {"source": s, "first_source": f, "count": n} for (s, f), n in sorted(across.items())
        ],
        "reason_descriptions": REASONS,
    }


def write_report(report: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (out / "report.html").write_text(render_html(report), encoding="utf-8")


def render_html(report: dict) -> str:
    """Self-contained HTML (no scripts, inline SVG); every user-controlled string is escaped by the template."""
    srcs = report["sources"]
    return render(
        "contrastive_report.html.j2",
        report=report,
        sources=srcs,
        passed=report.get("passed", True),
        reasons=sorted({r for s in srcs.values() for r in s["reasons"]}),
    )
