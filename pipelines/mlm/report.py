"""Preprocessing statistics and the `report.json` / `report.html` a person can open.

`PreprocessStats` is a plain accumulator (no Ray): the packer feeds it every chunk's document statistics and
every emitted pack, then `to_dict()` gives the report body. Document lengths are kept in an exact histogram
(`np.bincount` up to 2^16 tokens plus an exact overflow list), so percentiles are exact with bounded memory.
`write_report(report, output_uri)` writes both files (local path or URI); the HTML embeds its plots as inline SVG.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import numpy as np

from pipelines.io import filesystem_for
from pipelines.report_html import render

SPLITS = ("train", "eval")  # split codes: index in this tuple (the tokenizer actor imports it from here)

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
        self.files: dict[str, dict[str, int]] = {}  # input file -> rows, bad_rows, documents
        self.below_view_length = (
            0  # length views: documents left out for being shorter than the view's length
        )

    def add_chunk(self, stats: dict[str, Any], doc_lengths: np.ndarray, doc_split: np.ndarray) -> None:
        """One tokenized chunk: its `stats_json` dict, content lengths (D,) and split codes (D,) of its documents."""
        self.rows += stats["rows"]
        self.bad_counts.update(stats["bad_counts"])
        f = self.files.setdefault(stats.get("file", ""), {"rows": 0, "bad_rows": 0, "documents": 0})
        f["rows"] += stats["rows"]
        f["bad_rows"] += sum(stats["bad_counts"].values())
        f["documents"] += len(doc_lengths)
        self.below_view_length += stats.get("below_view_length", 0)
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
            "files": self.files,
            "below_view_length": self.below_view_length,
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
        self.below_view_length += st["below_view_length"]
        for name, c in st["files"].items():
            f = self.files.setdefault(name, {"rows": 0, "bad_rows": 0, "documents": 0})
            for k in f:
                f[k] += c[k]
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
                "fill_ratio": round(s.tokens / (s.packs * self.pack_tokens), 6) if s.packs else None,
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
            "fill_ratio": round(total_tokens / (total_packs * self.pack_tokens), 6) if total_packs else None,
            "skipped_rows": {
                "total": int(sum(self.bad_counts.values())),
                "by_reason": dict(sorted(self.bad_counts.items())),
                "examples": self.bad_examples,
            },
            "skipped_files": self.skipped_files,
            "per_file": [{"file": k, **v} for k, v in sorted(self.files.items())],
            "documents_below_view_length": self.below_view_length,
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


def render_html(report: dict[str, Any]) -> str:
    keys = (
        "rows_read",
        "documents",
        "segments",
        "tokens",
        "packs",
        "fill_ratio",
        "elapsed_s",
        "tokens_per_s",
    )
    pct = report["document_length_tokens"]["percentiles"]
    names = [k for k in ("min", *(f"p{q}" for q in PERCENTILES), "max") if k in pct]
    return render(
        "preprocess_report.html.j2",
        report=report,
        summary={k: report.get(k) for k in keys},
        percentile_names=names,
    )


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
