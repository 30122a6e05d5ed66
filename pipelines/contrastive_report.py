"""Report of a contrastive validation run: merge per-batch statistics -> `report.json` + `report.html`.

`ContrastiveFinalizer` returns one JSON statistics dict per batch (`{source: new_source_stats()}` shape);
`build_report` merges them exactly (token lengths are kept as {length: count} so percentiles are exact) and
checks the invariant rows_read == valid + rejected for every source. Layout: docs/contrastive_data.md.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

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
                      "negative_count_mismatch_reported", "blank_lines_skipped"):  # fmt: skip
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
    sources: list[tuple[Any, str, str, list[str]]],
    expected_negatives: dict[str, int],
    config: Any,
    num_examples: int,
) -> dict[str, Any]:
    from neobert.config_io import to_dict
    from pipelines.contrastive_data import REASONS

    merged = merge_stats(batches, num_examples)
    out_sources: dict[str, Any] = {}
    across: dict[tuple[str, str], int] = {}
    for cfg, kind, fmt, files in sources:
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
        "config": to_dict(config),
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


# ------------------------------------------------------------------------------------------------ HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.bad{color:#b00;font-weight:bold}.ok{color:#070;font-weight:bold}
pre{background:#f7f7f7;padding:.4em;white-space:pre-wrap;word-break:break-all;max-height:8em;overflow:auto;margin:0}
.charts{display:flex;gap:1.5em;flex-wrap:wrap}figure{margin:0}figcaption{font-size:.9em;color:#555}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _svg_hist(summary: dict, title: str, width: int = 320, height: int = 140) -> str:
    if not summary.get("count"):
        return f"<figure><figcaption>{_e(title)}: no data</figcaption></figure>"
    h = summary["histogram"]
    counts, starts, bw = h["counts"], h["bin_starts"], h["bin_width"]
    peak = max(counts) or 1
    pad, barw = 24, (width - 30) / len(counts)
    bars = []
    for i, c in enumerate(counts):
        bh = (height - pad - 8) * c / peak
        x, y = 28 + i * barw, height - pad - bh
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(barw - 1, 1):.1f}" height="{bh:.1f}" fill="#4a7ebb">'
            f"<title>{starts[i]}-{starts[i] + bw - 1} tokens: {c}</title></rect>"
        )
    axis = (
        f'<line x1="28" y1="{height - pad}" x2="{width - 2}" y2="{height - pad}" stroke="#444"/>'
        f'<text x="28" y="{height - 8}" font-size="10">0</text>'
        f'<text x="{width - 2}" y="{height - 8}" font-size="10" text-anchor="end">{starts[-1] + bw} tokens</text>'
        f'<text x="2" y="12" font-size="10">{peak}</text>'
    )
    return (
        f'<figure><svg width="{width}" height="{height}" role="img" aria-label="{_e(title)}">{"".join(bars)}{axis}'
        f"</svg><figcaption>{_e(title)} (n={summary['count']}, p50={summary['p50']}, p99={summary['p99']})"
        "</figcaption></figure>"
    )


def _table(headers: list[str], rows: list[list[Any]], left: int = 1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(headers))
    trs = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{th}</tr>{trs}</table>"


def render_html(report: dict) -> str:
    """Self-contained HTML (no scripts, inline SVG); every user-controlled string is HTML-escaped."""
    srcs = report["sources"]
    passed = report.get("passed", True)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Contrastive data validation report</title>",
        f"<style>{_CSS}</style></head><body><h1>Contrastive data validation report</h1>",
        f"<p>Status: <span class='{'ok' if passed else 'bad'}'>{'PASSED' if passed else 'FAILED'}</span> &middot; "
        f"{report['totals']['rows_read']} rows read, {report['totals']['valid']} valid, "
        f"{report['totals']['rejected']} rejected. max_reject_fraction="
        f"{_e(report['config'].get('max_reject_fraction'))}, max_seq_len={_e(report['config'].get('max_seq_len'))}, "
        f"truncation={_e(report['config'].get('truncation'))}.</p>",
    ]
    for f in report.get("failures", []):
        parts.append(f"<p class='bad'>{_e(f)}</p>")
    parts.append("<h2>Sources</h2>")
    rows = []
    for name, s in srcs.items():
        frac = s["reject_fraction"]
        cls = "bad" if frac > report["config"].get("max_reject_fraction", 1) else ""
        rows.append(
            [_e(name), _e(s["kind"]), _e(s["format"]), s["rows_read"], s["valid"], s["rejected"],
             f"<span class='{cls}'>{frac:.2%}</span>", s["duplicates"]["within_source"],
             s["duplicates"]["across_sources"], _e(s["expected_num_negatives"]), s["blank_lines_skipped"]]
        )  # fmt: skip
    parts.append(
        _table(
            [
                "source",
                "kind",
                "format",
                "rows read",
                "valid",
                "rejected",
                "reject %",
                "dup within",
                "dup across",
                "negatives/row",
                "blank lines",
            ],
            rows,
            left=3,
        )  # fmt: skip
    )
    reasons = sorted({r for s in srcs.values() for r in s["reasons"]})
    if reasons:
        parts.append("<h2>Rejections by reason</h2>")
        rows = [
            [f"<code>{_e(r)}</code>", _e(report["reason_descriptions"].get(r, ""))]
            + [s["reasons"].get(r, 0) for s in srcs.values()]
            for r in reasons
        ]
        parts.append(_table(["reason", "meaning", *srcs], rows, left=2))
    if report.get("duplicates_across_sources"):
        parts.append("<h2>Duplicate (query, positive) pairs across sources</h2>")
        rows = [
            [_e(d["source"]), _e(d["first_source"]), d["count"]] for d in report["duplicates_across_sources"]
        ]
        parts.append(_table(["rejected in source", "first seen in source", "pairs"], rows, left=2))
    for name, s in srcs.items():
        parts.append(f"<h2>Source <code>{_e(name)}</code></h2><p>{_e(s['path'])}</p>")
        tl = s["token_lengths"]
        rows = [
            [f, tl[f].get("count", 0)]
            + [tl[f].get(k, "") for k in ("mean", "p50", "p90", "p95", "p99", "max")]
            for f in ("query", "positive", "negative")
        ]
        parts.append("<h3>Token lengths (valid rows, incl. [CLS]/[SEP])</h3>")
        parts.append(_table(["field", "texts", "mean", "p50", "p90", "p95", "p99", "max"], rows))
        over = s["over_max_seq_len"] or s["truncated"]
        if over:
            what = "over max_seq_len (kept)" if s["over_max_seq_len"] else "truncated to max_seq_len"
            parts.append(f"<p>Texts {what}: {_e(over)}</p>")
        parts.append(
            "<div class='charts'>" + "".join(_svg_hist(tl[f], f"{name}: {f} tokens") for f in tl) + "</div>"
        )
        parts.append("<h3>Negatives per query</h3>")
        parts.append(_table(["negatives", "rows"], [[_e(k), v] for k, v in s["negatives_per_query"].items()]))
        if s["examples"]:
            parts.append("<h3>Example rejected rows</h3>")
            rows = [
                [
                    f"<code>{_e(r)}</code>",
                    _e(e["file"]),
                    e["row"],
                    _e(e["detail"]),
                    f"<pre>{_e(e['original'])}</pre>",
                ]
                for r, ex in sorted(s["examples"].items())
                for e in ex
            ]
            parts.append(_table(["reason", "file", "row", "detail", "original"], rows, left=5))
    parts.append("</body></html>")
    return "\n".join(parts)
