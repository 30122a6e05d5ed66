"""Preprocessing statistics and the `report.json` / `report.html` a person can open.

`PreprocessStats` is a plain accumulator (no Ray): the packer feeds it every chunk's document statistics and
every emitted pack, then `to_dict()` gives the report body. Document lengths are kept in an exact histogram
(`np.bincount` up to 2^16 tokens plus an exact overflow list), so percentiles are exact with bounded memory.
`write_report(report, output_uri)` writes both files (local path or URI); the HTML embeds its plots as inline SVG.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from typing import Any

import numpy as np

from pipelines.read import filesystem_for
from pipelines.tokenize import SPLITS

FILL_EDGES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 1.0)  # fill-ratio histogram bins
_DENSE = 1 << 16  # exact bincount for document lengths below this
PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)


class LengthHistogram:
    """Exact multiset of non-negative integer lengths with bounded memory for realistic data."""

    def __init__(self) -> None:
        self.counts = np.zeros(_DENSE, dtype=np.int64)
        self.overflow: list[int] = []

    def add(self, lengths: np.ndarray) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        small = lengths[lengths < _DENSE]
        self.counts += np.bincount(small, minlength=_DENSE)
        self.overflow.extend(lengths[lengths >= _DENSE].tolist())

    @property
    def n(self) -> int:
        return int(self.counts.sum()) + len(self.overflow)

    def percentiles(self, qs: tuple[int, ...] = PERCENTILES) -> dict[str, int]:
        """Nearest-rank percentiles (the smallest length with at least q% of documents at or below it)."""
        n = self.n
        if not n:
            return {}
        cum = np.cumsum(self.counts)
        over = sorted(self.overflow)
        out = {}
        for q in qs:
            rank = max(1, math.ceil(q / 100 * n))
            out[f"p{q}"] = (
                int(np.searchsorted(cum, rank)) if rank <= cum[-1] else over[rank - int(cum[-1]) - 1]
            )
        out["min"] = int(np.flatnonzero(self.counts)[0]) if cum[-1] else over[0]
        out["max"] = max(over) if over else int(np.flatnonzero(self.counts)[-1])
        return out

    def log2_histogram(self) -> dict[str, int]:
        """Counts per power-of-two bucket: "[2^k, 2^(k+1))"."""
        out: dict[str, int] = {}
        values = np.arange(_DENSE)
        nz = np.flatnonzero(self.counts)
        for v, c in zip(values[nz], self.counts[nz], strict=True):
            k = int(v).bit_length() - 1 if v else -1
            key = "0" if k < 0 else f"{1 << k}-{(2 << k) - 1}"
            out[key] = out.get(key, 0) + int(c)
        for v in self.overflow:
            k = int(v).bit_length() - 1
            key = f"{1 << k}-{(2 << k) - 1}"
            out[key] = out.get(key, 0) + 1
        return out


class _SplitStats:
    def __init__(self) -> None:
        self.documents = 0
        self.segments = 0
        self.tokens = 0
        self.packs = 0
        self.fill_hist = np.zeros(len(FILL_EDGES) - 1, dtype=np.int64)
        self.dropped = {"short_document": Counter(), "short_tail": Counter()}
        self.shards: list[dict[str, Any]] = []


class PreprocessStats:
    """Accumulates everything the report shows; fed in stream order by the packer."""

    def __init__(self, pack_tokens: int, splits: tuple[str, ...] = ("train", "eval")):
        self.pack_tokens = pack_tokens
        self.splits = {s: _SplitStats() for s in splits}
        self.rows = 0
        self.bad_counts: Counter = Counter()
        self.bad_examples: list[dict[str, Any]] = []
        self.skipped_files: list[dict[str, Any]] = []
        self.doc_lengths = LengthHistogram()

    def add_chunk(self, stats: dict[str, Any], doc_lengths: np.ndarray, doc_split: np.ndarray) -> None:
        """One tokenized chunk: its `stats_json` dict, content lengths (D,) and split codes (D,) of its documents."""
        self.rows += stats["rows"]
        self.bad_counts.update(stats["bad_counts"])
        for ex in stats["bad_examples"]:
            if sum(1 for e in self.bad_examples if e["reason"] == ex["reason"]) < 20:
                self.bad_examples.append(ex)
        if stats.get("skipped_file"):
            self.skipped_files.append(stats["skipped_file"])
        self.doc_lengths.add(doc_lengths)
        for name, s in self.splits.items():
            s.documents += int((np.asarray(doc_split) == _code(name)).sum())
            for reason, c in stats["dropped"].get(name, {}).items():
                s.dropped[reason].update(c)

    def add_packs(self, split: str, num_tokens: np.ndarray, num_segments: np.ndarray) -> None:
        s = self.splits[split]
        s.packs += len(num_tokens)
        s.tokens += int(num_tokens.sum())
        s.segments += int(num_segments.sum())
        fill = np.asarray(num_tokens, dtype=np.float64) / self.pack_tokens
        idx = np.clip(np.searchsorted(FILL_EDGES, fill, side="right") - 1, 0, len(FILL_EDGES) - 2)
        s.fill_hist += np.bincount(idx, minlength=len(FILL_EDGES) - 1)

    def add_shard(self, split: str, path: str, num_rows: int, num_tokens: int) -> None:
        self.splits[split].shards.append({"path": path, "num_rows": num_rows, "num_tokens": num_tokens})

    def state(self) -> dict[str, Any]:
        """Lossless, JSON-able state, so that several packer streams' statistics can be merged exactly."""
        nz = np.flatnonzero(self.doc_lengths.counts)
        return {
            "pack_tokens": self.pack_tokens,
            "rows": self.rows,
            "bad_counts": dict(self.bad_counts),
            "bad_examples": self.bad_examples,
            "skipped_files": self.skipped_files,
            "doc_lengths": [nz.tolist(), self.doc_lengths.counts[nz].tolist(), self.doc_lengths.overflow],
            "splits": {
                n: {
                    "documents": s.documents,
                    "segments": s.segments,
                    "tokens": s.tokens,
                    "packs": s.packs,
                    "fill_hist": s.fill_hist.tolist(),
                    "dropped": {r: dict(c) for r, c in s.dropped.items()},
                    "shards": s.shards,
                }
                for n, s in self.splits.items()
            },
        }

    def merge_state(self, st: dict[str, Any]) -> None:
        """Add another accumulator's `state()` (same pack_tokens and splits)."""
        assert st["pack_tokens"] == self.pack_tokens and set(st["splits"]) == set(self.splits)
        self.rows += st["rows"]
        self.bad_counts.update(st["bad_counts"])
        self.bad_examples += st["bad_examples"]
        self.skipped_files += st["skipped_files"]
        values, counts, overflow = st["doc_lengths"]
        np.add.at(
            self.doc_lengths.counts, np.asarray(values, dtype=np.int64), np.asarray(counts, dtype=np.int64)
        )
        self.doc_lengths.overflow += overflow
        for n, o in st["splits"].items():
            s = self.splits[n]
            s.documents += o["documents"]
            s.segments += o["segments"]
            s.tokens += o["tokens"]
            s.packs += o["packs"]
            s.fill_hist += np.asarray(o["fill_hist"], dtype=np.int64)
            for r, c in o["dropped"].items():
                s.dropped[r].update(c)
            s.shards += o["shards"]

    def to_dict(self) -> dict[str, Any]:
        splits = {}
        for name, s in self.splits.items():
            labels = [f"{a:g}-{b:g}" for a, b in zip(FILL_EDGES[:-1], FILL_EDGES[1:], strict=True)]
            splits[name] = {
                "documents": s.documents,
                "segments": s.segments,
                "tokens": s.tokens,
                "packs": s.packs,
                "fill_ratio": s.tokens / (s.packs * self.pack_tokens) if s.packs else None,
                "fill_histogram": dict(zip(labels, s.fill_hist.tolist(), strict=True)),
                "dropped_segments": {
                    r: {"segments": c["segments"], "tokens": c["tokens"], "why": _WHY[r]}
                    for r, c in s.dropped.items()
                },
                "shards": s.shards,
            }
        total_tokens = sum(s.tokens for s in self.splits.values())
        total_packs = sum(s.packs for s in self.splits.values())
        return {
            "rows_read": self.rows,
            "documents": sum(s.documents for s in self.splits.values()),
            "segments": sum(s.segments for s in self.splits.values()),
            "tokens": total_tokens,
            "packs": total_packs,
            "fill_ratio": total_tokens / (total_packs * self.pack_tokens) if total_packs else None,
            "skipped_rows": {
                "total": int(sum(self.bad_counts.values())),
                "by_reason": dict(sorted(self.bad_counts.items())),
                "examples": self.bad_examples,
            },
            "skipped_files": self.skipped_files,
            "document_length_tokens": {
                "percentiles": self.doc_lengths.percentiles(),
                "histogram_log2": self.doc_lengths.log2_histogram(),
                "note": "content tokens per tokenized document, before splitting, without [CLS]/[SEP]",
            },
            "splits": splits,
        }


_WHY = {
    "short_document": "the whole document is shorter than min_seq_len tokens incl. [CLS]/[SEP]",
    "short_tail": "last piece of a document split at max_seq_len is shorter than min_seq_len",
}


def _code(split: str) -> int:
    return SPLITS.index(split)


def _svg_bars(title: str, counts: dict[str, int], xlabel: str) -> str:
    """A small inline SVG bar chart (no plotting library needed)."""
    items = list(counts.items())
    w, h, pad, top = 640, 240, 40, 24
    n = max(len(items), 1)
    bw = (w - 2 * pad) / n
    peak = max([c for _, c in items] + [1])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 60}" role="img">',
        f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
        f'<line x1="{pad}" y1="{h}" x2="{w - pad}" y2="{h}" stroke="#333"/>',
    ]
    for i, (label, c) in enumerate(items):
        bh = (h - top) * c / peak
        x = pad + i * bw
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{h - bh:.1f}" width="{bw - 2:.1f}" height="{bh:.1f}" fill="#4a7ebb">'
            f"<title>{html.escape(label)}: {c}</title></rect>"
        )
        parts.append(
            f'<text x="{x + bw / 2:.1f}" y="{h - bh - 3:.1f}" text-anchor="middle" font-size="9">{c}</text>'
        )
        parts.append(
            f'<text x="{x + bw / 2:.1f}" y="{h + 12}" text-anchor="end" font-size="9" '
            f'transform="rotate(-40 {x + bw / 2:.1f} {h + 12})">{html.escape(label)}</text>'
        )
    parts.append(
        f'<text x="{w / 2}" y="{h + 56}" text-anchor="middle" font-size="11">{html.escape(xlabel)}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: dict[str, Any]) -> str:
    def row(k: str, v: Any) -> str:
        return f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"

    summary = {
        k: report.get(k) for k in ("rows_read", "documents", "segments", "tokens", "packs", "fill_ratio")
    }
    summary["elapsed_s"] = report.get("elapsed_s")
    summary["tokens_per_s"] = report.get("tokens_per_s")
    body = ["<h1>NeoBERT preprocessing report</h1>", "<table>"]
    body += [row(k, v) for k, v in summary.items()]
    body.append("</table><h2>Per split</h2><table><tr><th>split</th><th>documents</th><th>segments</th>"
                "<th>tokens</th><th>packs</th><th>fill ratio</th><th>dropped segments</th></tr>")  # fmt: skip
    for name, s in report["splits"].items():
        dropped = ", ".join(
            f"{r}: {d['segments']} ({d['tokens']} tokens)" for r, d in s["dropped_segments"].items()
        )
        fill = "-" if s["fill_ratio"] is None else f"{s['fill_ratio']:.5f}"
        body.append(
            f"<tr><td>{name}</td><td>{s['documents']}</td><td>{s['segments']}</td><td>{s['tokens']}</td>"
            f"<td>{s['packs']}</td><td>{fill}</td><td>{html.escape(dropped)}</td></tr>"
        )
    body.append("</table>")
    pct = report["document_length_tokens"]["percentiles"]
    body.append("<h2>Document length (tokens)</h2><p>" + html.escape(json.dumps(pct)) + "</p>")
    body.append(
        _svg_bars("Document length histogram", report["document_length_tokens"]["histogram_log2"], "tokens")
    )
    for name, s in report["splits"].items():
        if s["packs"]:
            body.append(
                _svg_bars(f"Pack fill ratio ({name})", s["fill_histogram"], "num_tokens / pack_tokens")
            )
    sk = report["skipped_rows"]
    body.append(f"<h2>Skipped rows: {sk['total']}</h2><table>")
    body += [row(k, v) for k, v in sk["by_reason"].items()]
    body.append("</table><ul>")
    body += [f"<li>{html.escape(json.dumps(e))}</li>" for e in sk["examples"]]
    body.append("</ul>")
    if report["skipped_files"]:
        body.append("<h2>Skipped files</h2><ul>")
        body += [f"<li>{html.escape(json.dumps(e))}</li>" for e in report["skipped_files"]]
        body.append("</ul>")
    body.append(
        "<h2>Configuration</h2><pre>" + html.escape(json.dumps(report.get("config", {}), indent=2)) + "</pre>"
    )
    style = (
        "body{font-family:sans-serif;max-width:960px;margin:2em auto}td,th{padding:2px 8px;text-align:left}"
    )
    return f"<!doctype html><html><head><meta charset='utf-8'><title>preprocess report</title><style>{style}</style></head><body>{''.join(body)}</body></html>"


def write_report(report: dict[str, Any], output_uri: str) -> tuple[str, str]:
    """Write `report.json` and `report.html` under `output_uri`; return their paths."""
    fs, root = filesystem_for(output_uri)
    fs.create_dir(root, recursive=True)
    paths = (f"{root}/report.json", f"{root}/report.html")
    with fs.open_output_stream(paths[0]) as f:
        f.write(json.dumps(report, indent=2, default=str).encode())
    with fs.open_output_stream(paths[1]) as f:
        f.write(render_html(report).encode())
    return paths
