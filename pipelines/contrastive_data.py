"""Contrastive data: read many (query, positive, negatives) sources, validate every row, normalize, quarantine.

Sources disagree on layout (`negative` a string here, a list there; some are BEIR-style id-referenced), so every
row read goes through one pure validator and ends up in exactly one place:

- `OUTPUT/valid/*.parquet`       canonical rows `query: string, positive: string, negatives: list<string>,
                                 source: string` (+ `*_input_ids` when `tokenize=True`);
- `OUTPUT/quarantine/*.parquet`  rejected rows `source, file, row, reason, detail, original` (raw record text).

Pipeline (Ray Data, streaming):
  1. readers (one Ray task per file; BEIR: one actor that holds the queries/corpus id maps) yield raw records with
     their file and line/row number;
  2. `ContrastiveRowValidator` (callable class, Ray actors; unit tests call it directly) parses, type-checks,
     normalizes (NFC + strip), compares texts, measures token lengths -> staged Parquet (valid and rejected rows);
  3. a small key table (16-byte pair hash + position, no text) is grouped by key (`groupby().map_groups`) to find
     duplicate (query, positive) pairs; per-source negative counts are counted from the same table;
  4. `ContrastiveFinalizer` re-reads the staged rows, rejects later duplicates (`duplicate_pair`, naming the first
     occurrence) and negative-count outliers, writes `valid/` and `quarantine/` and returns per-batch statistics
     that `pipelines.contrastive_report` merges into `report.json` / `report.html`.
Only the key table (step 3) and the BEIR id maps are held whole; see docs/contrastive_data.md.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import unicodedata
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

MARKER_NAME = "_VALIDATED.json"
REPORT_NAME = "report.json"
CONTRASTIVE_SCHEMA_VERSION = 1
READ_CHUNK_ROWS = 2048  # rows per block yielded by the readers
DEDUP_ROWS_PER_BUCKET = 1_000_000  # key-table rows per hash bucket of the duplicate search (~36 MB)
READER_NUM_CPUS = 0.5  # readers mostly wait on I/O and split lines
BLANK_LINE = "_blank_line"  # reader marker: an empty line, counted in the report, not a row

# Machine-readable rejection reasons -> one-line description (the docs table is generated from the same text).
REASONS: dict[str, str] = {
    "invalid_utf8": "bytes are not valid UTF-8 (or the JSON holds a lone surrogate escape)",
    "malformed_json": "the line is not valid JSON, or not a JSON object",
    "missing_field": "a required field (query / positive) is absent from the record",
    "wrong_type": "number / bool / null / list / object where a string belongs, or a non-string list element",
    "empty_text": "query, positive or a negative is empty or whitespace-only",
    "control_characters": "text contains control characters other than tab / newline / carriage return",
    "positive_equals_query": "positive equals the query (case-insensitive, whitespace-collapsed)",
    "negative_equals_positive": "a negative equals the positive (case-insensitive, whitespace-collapsed)",
    "duplicate_pair": "(query, positive) already seen earlier (same or earlier source); detail names the first",
    "dangling_id": "BEIR: qrels / hard negatives reference a query or corpus id that does not exist",
    "duplicate_id": "BEIR: an `_id` already defined earlier in the same queries / corpus file (first one kept)",
    "malformed_qrels": "BEIR: a qrels line without query-id, corpus-id, integer score",
    "qrel_not_positive": "BEIR: qrels score below min_qrel_score (not a positive pair)",
    "too_long": "a text is longer than max_seq_len tokens (truncation='reject')",
    "negative_count_mismatch": "number of negatives differs from the source's expected count",
}

# ----------------------------------------------------------------------------------------------- config


@dataclasses.dataclass
class SourceConfig:
    name: str  # short name, used in reports and in the `source` column
    path: str  # file or directory
    kind: Literal["auto", "inline", "beir"] = "auto"  # auto: a dir with queries.jsonl + corpus.jsonl is BEIR
    format: Literal["auto", "jsonl", "parquet", "hf_disk"] = (
        "auto"  # inline only; auto from suffix / dir content
    )
    query_column: str = "query"  # inline column remaps
    positive_column: str = "corpus"
    negative_column: str = "negative"  # optional column; string or list of strings
    num_negatives: int = -1  # expected negatives per row; -1 = the source's most common count
    negative_count_policy: Literal["reject", "report"] = "reject"  # for rows that differ from num_negatives
    # BEIR options (paths relative to `path`)
    queries_file: str = "queries.jsonl"
    corpus_file: str = "corpus.jsonl"
    qrels_glob: str = "qrels/*.tsv"
    negatives_file: str = (
        ""  # "" = auto: hard_negatives.jsonl / negatives.jsonl if present; JSONL {query-id, corpus-ids}
    )
    min_qrel_score: int = 1
    include_title: bool = True  # BEIR positive = "title text" when the corpus row has a title

    def __post_init__(self):
        if not self.name or any(c in self.name for c in "=/\\ \t\n"):
            raise ValueError(f"source name {self.name!r} must be non-empty without '=', '/', or whitespace")
        if not self.path:
            raise ValueError(f"source {self.name!r}: path is empty; give a file or directory")
        if self.num_negatives < -1:
            raise ValueError(
                f"source {self.name!r}: num_negatives={self.num_negatives}; use -1 (auto) or >= 0"
            )
        for col in ("query_column", "positive_column", "negative_column"):
            if not getattr(self, col):
                raise ValueError(f"source {self.name!r}: {col} is empty; name the column in the input rows")


@dataclasses.dataclass
class ValidateContrastiveConfig:
    sources: list[SourceConfig] = dataclasses.field(default_factory=list)  # [] = embedded sources
    output: str = "outputs/contrastive"  # DIR: valid/, quarantine/, report.json, report.html
    max_reject_fraction: float = 0.05  # a source rejecting more than this fails the job
    max_seq_len: int = 512  # tokens incl. [CLS]/[SEP]
    truncation: Literal["report", "truncate", "reject"] = "report"  # texts longer than max_seq_len
    tokenize: bool = False  # add query/positive/negatives_input_ids columns
    tokenizer: str = ""  # tokenizer.json or dir; "" = pipelines.tokenizer default
    num_validator_actors: int = 2  # Ray actors running the validator (each holds a tokenizer)
    num_examples_per_reason: int = 5  # rejected examples per (source, reason) in the report
    engine: Literal["ray", "local"] = (
        "ray"  # local: same steps in-process, no Ray (tiny inputs, tests, debugging)
    )

    def __post_init__(self):
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError(f"max_reject_fraction={self.max_reject_fraction} must be in [0, 1]")
        if self.max_seq_len < 3:
            raise ValueError(f"max_seq_len={self.max_seq_len} must be >= 3 ([CLS] + 1 token + [SEP])")
        if self.num_validator_actors < 1:
            raise ValueError(f"num_validator_actors={self.num_validator_actors} must be >= 1")
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique, got {dup} more than once; rename one")


def parse_source_arg(arg: str) -> SourceConfig:
    """`NAME=PATH` (CLI `--source`) -> SourceConfig with default options."""
    if "=" not in arg:
        raise ValueError(f"--source {arg!r}: expected NAME=PATH, e.g. --source msmarco=data/msmarco.jsonl")
    name, path = arg.split("=", 1)
    return SourceConfig(name=name.strip(), path=path.strip())


# ----------------------------------------------------------------------------------------------- resolution


@dataclasses.dataclass(frozen=True)
class ResolvedSource:
    """A source with its kind / format decided once and its files listed (sorted: file_index is stable)."""

    index: int
    cfg: SourceConfig
    kind: str  # inline | beir
    format: str  # jsonl | parquet | hf_disk | beir
    files: tuple[str, ...]  # inline data files, or BEIR qrels files
    root: str


def _hf_disk_files(root: Path) -> list[str]:
    """Arrow files of a `datasets` save_to_disk dir (a DatasetDict: every split, in its listed order)."""
    try:
        if (root / "dataset_dict.json").exists():
            splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
            return [f for s in splits for f in _hf_disk_files(root / s)]
        state = json.loads((root / "state.json").read_text())
        return [str(root / d["filename"]) for d in state["_data_files"]]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{root} is not a readable `datasets` save_to_disk directory ({type(e).__name__}: {e}); re-save it "
            "with Dataset.save_to_disk or set format to jsonl/parquet"
        ) from None


def _check_readable(name: str, path: str, fmt: str) -> None:
    """Fail before any work on files that cannot be opened (Parquet footer / Arrow header read, cheap)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source {name!r}: file {path} is missing")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"source {name!r}: cannot read {path}; fix its permissions")
    try:
        if fmt == "parquet":
            pq.ParquetFile(path).metadata  # noqa: B018  (reads the footer)
        elif fmt == "hf_disk":
            next(iter(_iter_ipc(path)), None)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(
            f"source {name!r}: {path} is not a readable {fmt} file ({e}); fix or remove the file, or set format"
        ) from None


def resolve_source(cfg: SourceConfig, index: int) -> ResolvedSource:
    """Decide kind/format and list files; raises FileNotFoundError/ValueError naming the source and the fix."""
    root = Path(cfg.path)
    if not root.exists():
        raise FileNotFoundError(
            f"source {cfg.name!r}: path {root} does not exist; fix --source {cfg.name}=PATH"
        )
    kind = cfg.kind
    if kind == "auto":
        is_beir = root.is_dir() and (root / cfg.queries_file).exists() and (root / cfg.corpus_file).exists()
        kind = "beir" if is_beir else "inline"
    if kind == "beir":
        if not root.is_dir():
            raise ValueError(f"source {cfg.name!r}: kind=beir needs a directory, got file {root}")
        for f in (cfg.queries_file, cfg.corpus_file, cfg.negatives_file):
            if f and not (root / f).is_file():
                raise FileNotFoundError(f"source {cfg.name!r}: BEIR file {root / f} is missing")
        qrels = sorted(glob.glob(str(root / cfg.qrels_glob)))
        if not qrels:
            raise FileNotFoundError(
                f"source {cfg.name!r}: no qrels files match {root / cfg.qrels_glob}; set qrels_glob in the YAML"
            )
        return ResolvedSource(index, cfg, "beir", "beir", tuple(qrels), str(root))
    fmt = cfg.format
    if root.is_file():
        if fmt == "auto":
            suffix = root.name.lower()
            if suffix.endswith((".jsonl", ".json", ".ndjson")):
                fmt = "jsonl"
            elif suffix.endswith(".parquet"):
                fmt = "parquet"
            else:
                raise ValueError(
                    f"source {cfg.name!r}: cannot tell the format of {root} from its suffix; "
                    "set format: jsonl|parquet|hf_disk for this source in the sources YAML"
                )
        files = [str(root)]
    else:
        if fmt == "auto":
            if (root / "state.json").exists() or (root / "dataset_dict.json").exists():
                fmt = "hf_disk"
            else:
                has_j = bool(glob.glob(str(root / "*.jsonl")))
                has_p = bool(glob.glob(str(root / "*.parquet")))
                if has_j == has_p:
                    raise ValueError(
                        f"source {cfg.name!r}: directory {root} holds "
                        f"{'both *.jsonl and *.parquet' if has_j else 'no *.jsonl, *.parquet or HF save_to_disk'}"
                        " files; point the source at one file or set format"
                    )
                fmt = "jsonl" if has_j else "parquet"
        if fmt == "hf_disk":
            files = _hf_disk_files(root)
        else:
            files = sorted(glob.glob(str(root / ("*.jsonl" if fmt == "jsonl" else "*.parquet"))))
        if not files:
            raise FileNotFoundError(f"source {cfg.name!r}: no {fmt} files in {root}")
    for f in files:
        _check_readable(cfg.name, f, fmt)
    return ResolvedSource(index, cfg, "inline", fmt, tuple(files), str(root))


# ----------------------------------------------------------------------------------------------- readers

RAW_SCHEMA = pa.schema(
    [
        ("source_index", pa.int32()),
        ("source", pa.string()),
        ("file_index", pa.int32()),  # -1 for BEIR auxiliary files (queries/corpus/negatives)
        ("file", pa.string()),
        ("row", pa.int64()),  # JSONL / TSV: 1-based line number; Parquet / Arrow: 0-based row index
        ("raw", pa.binary()),  # bytes the validator parses (JSON object)
        ("original", pa.string()),  # the record as read, for the quarantine
        ("reader_error", pa.string()),  # a reason already decided by the reader, "" if none
        ("reader_detail", pa.string()),
    ]
)


class _RawBuffer:
    def __init__(self, src: ResolvedSource, file_index: int, file: str):
        self.src, self.file_index, self.file = src, file_index, file
        self.cols: dict[str, list] = {f.name: [] for f in RAW_SCHEMA}

    def add(self, row: int, raw: bytes, original: str, error: str = "", detail: str = ""):
        c = self.cols
        c["source_index"].append(self.src.index)
        c["source"].append(self.src.cfg.name)
        c["file_index"].append(self.file_index)
        c["file"].append(self.file)
        c["row"].append(row)
        c["raw"].append(raw)
        c["original"].append(original)
        c["reader_error"].append(error)
        c["reader_detail"].append(detail)

    def __len__(self):
        return len(self.cols["row"])

    def flush(self) -> pa.Table:
        t = pa.table(self.cols, schema=RAW_SCHEMA)
        self.cols = {f.name: [] for f in RAW_SCHEMA}
        return t


def _rel_file(src: ResolvedSource, path: str) -> str:
    """How a data file is named in quarantine rows and duplicate details: relative to the source's root."""
    return os.path.relpath(path, src.root) if os.path.isdir(src.root) else os.path.basename(path)


def _display(b: bytes) -> str:
    return b.decode("utf-8", errors="backslashreplace")


def _jsonable(v: Any) -> Any:
    """Python value from Arrow -> JSON-able; bytes that are not UTF-8 raise UnicodeDecodeError."""
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


def iter_raw_file(
    src: ResolvedSource, file_index: int, chunk_rows: int = READ_CHUNK_ROWS
) -> Iterator[pa.Table]:
    """Stream one inline file as RAW_SCHEMA tables. JSONL lines are read as bytes so a bad line is one bad row."""
    path = src.files[file_index]
    buf = _RawBuffer(src, file_index, _rel_file(src, path))
    if src.format == "jsonl":
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip(b"\r\n")
                if not line.strip():  # not a record: counted (blank_lines_skipped), never quarantined
                    buf.add(lineno, b"", "", BLANK_LINE)
                else:
                    buf.add(lineno, line, _display(line))
                if len(buf) >= chunk_rows:
                    yield buf.flush()
    else:
        if src.format == "parquet":
            batches = pq.ParquetFile(path).iter_batches(batch_size=chunk_rows)
        else:  # hf_disk: Arrow IPC stream files written by datasets.save_to_disk
            batches = _iter_ipc(path)
        row = 0
        for rb in batches:
            for rec in rb.to_pylist():
                original = json.dumps(rec, default=repr, ensure_ascii=False)
                try:
                    raw = json.dumps(_jsonable(rec), ensure_ascii=False).encode("utf-8", "surrogatepass")
                    buf.add(row, raw, original)
                except UnicodeDecodeError as e:
                    buf.add(row, b"", original, "invalid_utf8", f"binary value is not UTF-8: {e}")
                row += 1
                if len(buf) >= chunk_rows:
                    yield buf.flush()
    if len(buf):
        yield buf.flush()


def _iter_ipc(path: str) -> Iterator[pa.RecordBatch]:
    with pa.memory_map(path) as mm:
        try:
            reader = pa.ipc.open_stream(mm)
        except pa.ArrowInvalid:
            mm.seek(0)
            reader = pa.ipc.open_file(mm)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        yield from reader


def _read_inline_batch(batch: dict, sources: dict[int, ResolvedSource]) -> Iterator[pa.Table]:
    """Ray map_batches UDF over a dataset of (source_index, file_index) work items."""
    for si, fi in zip(batch["source_index"], batch["file_index"], strict=True):
        yield from iter_raw_file(sources[int(si)], int(fi))


# --- BEIR -----------------------------------------------------------------------------------------


def _iter_jsonl_objects(path: Path) -> Iterator[tuple[int, bytes, dict | None, str, str]]:
    """(line number, raw line, JSON object or None, reason, error) per non-blank line of a BEIR JSONL file."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield lineno, line, None, "invalid_utf8", str(e)
                continue
            except json.JSONDecodeError as e:
                yield lineno, line, None, "malformed_json", str(e)
                continue
            if not isinstance(rec, dict):
                yield lineno, line, None, "malformed_json", "not a JSON object"
                continue
            yield lineno, line, rec, "", ""


def _load_jsonl_map(path: Path, value_fn) -> tuple[dict[str, Any], list[tuple[int, bytes, str, str]]]:
    """id -> value for a BEIR JSONL file; bad lines returned as (line, raw, reason, detail)."""
    out: dict[str, Any] = {}
    bad: list[tuple[int, bytes, str, str]] = []
    for lineno, line, rec, reason, error in _iter_jsonl_objects(path):
        if rec is None:
            bad.append((lineno, line, reason, f"{path.name} line {lineno}: {error}"))
            continue
        rid = rec.get("_id")
        if rid is None or "text" not in rec:
            missing = "'_id'" if rid is None else "'text'"
            bad.append((lineno, line, "missing_field", f"{path.name} line {lineno}: no {missing}"))
            continue
        if str(rid) in out:  # a later definition would silently replace the first one
            bad.append(
                (
                    lineno,
                    line,
                    "duplicate_id",
                    f"{path.name} line {lineno}: _id {str(rid)!r} defined "
                    "earlier in the file; the first definition is kept, remove or rename this one",
                )
            )
            continue
        try:
            out[str(rid)] = value_fn(rec)
        except ValueError as e:
            bad.append((lineno, line, "wrong_type", f"{path.name} line {lineno}: {e}"))
    return out, bad


def _first_key(rec: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in rec:
            return rec[k]
    return None


class BeirJoiner:
    """Ray actor UDF: loads queries / corpus / hard negatives id maps once, then streams qrels files and joins.

    Work items: file_index -1 emits the quarantined bad lines of the auxiliary files; file_index i >= 0 streams
    qrels file i. Each joined row is a JSON object {query, corpus, negative: [..], query_id, corpus_id}
    validated like an inline row; unknown ids become `dangling_id` rows.
    """

    def __init__(self, sources: dict[int, ResolvedSource]):
        self.sources = sources
        self.maps: dict[int, tuple] = {}

    def _load(self, src: ResolvedSource):
        if src.index in self.maps:
            return self.maps[src.index]
        cfg, root = src.cfg, Path(src.root)

        def query_value(rec):
            return rec.get("text")

        def corpus_value(rec):
            text, title = rec.get("text"), rec.get("title") or ""
            if cfg.include_title and isinstance(title, str) and title.strip() and isinstance(text, str):
                return f"{title.strip()} {text}"
            return text

        queries, bad_q = _load_jsonl_map(root / cfg.queries_file, query_value)
        corpus, bad_c = _load_jsonl_map(root / cfg.corpus_file, corpus_value)
        bad = [(cfg.queries_file, *b) for b in bad_q] + [(cfg.corpus_file, *b) for b in bad_c]
        negs: dict[str, list] = {}
        neg_file = cfg.negatives_file
        if not neg_file:
            for cand in ("hard_negatives.jsonl", "negatives.jsonl"):
                if (root / cand).is_file():
                    neg_file = cand
                    break
        if neg_file:
            p = root / neg_file
            if not p.is_file():
                raise FileNotFoundError(f"source {cfg.name!r}: negatives_file {p} does not exist")
            for lineno, line, rec, reason, error in _iter_jsonl_objects(p):
                if rec is None:
                    bad.append((neg_file, lineno, line, reason, f"{neg_file} line {lineno}: {error}"))
                    continue
                qid = _first_key(rec, ("query-id", "query_id", "qid"))
                ids = _first_key(rec, ("corpus-ids", "corpus_ids", "neg", "negatives", "negative_ids"))
                if qid is None or ids is None:
                    bad.append(
                        (
                            neg_file,
                            lineno,
                            line,
                            "missing_field",
                            f"{neg_file} line {lineno}: needs query-id and corpus-ids",
                        )
                    )
                    continue
                if str(qid) not in queries:  # otherwise never joined: silently unused
                    detail = (
                        f"{neg_file} line {lineno}: unknown query-id {str(qid)!r} (not in {cfg.queries_file})"
                    )
                    bad.append((neg_file, lineno, line, "dangling_id", detail))
                    continue
                if not isinstance(ids, list):
                    ids = [ids]
                negs.setdefault(str(qid), []).extend(str(i) for i in ids)
        self.maps[src.index] = (queries, corpus, negs, bad)
        return self.maps[src.index]

    def __call__(self, batch: dict) -> Iterator[pa.Table]:
        for si, fi in zip(batch["source_index"], batch["file_index"], strict=True):
            src = self.sources[int(si)]
            queries, corpus, negs, bad = self._load(src)
            if int(fi) < 0:
                buf = _RawBuffer(src, -1, "")
                for fname, lineno, line, reason, detail in bad:
                    buf.file = fname
                    buf.add(lineno, b"", _display(line), reason, detail)
                if len(buf):
                    yield buf.flush()
                continue
            yield from self._join_qrels(src, int(fi), queries, corpus, negs)

    def _join_qrels(self, src, fi, queries, corpus, negs) -> Iterator[pa.Table]:
        cfg = src.cfg
        path = src.files[fi]
        buf = _RawBuffer(src, fi, _rel_file(src, path))
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip(b"\r\n")
                if not line.strip():
                    buf.add(lineno, b"", "", BLANK_LINE)
                    continue
                original = _display(line)
                parts = original.split("\t")
                if lineno == 1 and parts[0].strip().lower() in ("query-id", "query_id", "qid"):
                    continue  # header
                if len(parts) < 2 or (len(parts) >= 3 and not parts[2].strip().lstrip("-").isdigit()):
                    buf.add(
                        lineno, b"", original, "malformed_qrels", "expected query-id<TAB>corpus-id<TAB>score"
                    )
                else:
                    qid, cid = parts[0].strip(), parts[1].strip()
                    score = int(parts[2]) if len(parts) >= 3 else 1
                    missing = [f"query-id {qid!r}"] if qid not in queries else []
                    missing += [f"corpus-id {cid!r}"] if cid not in corpus else []
                    neg_ids = negs.get(qid, [])
                    missing += [f"negative corpus-id {n!r}" for n in neg_ids if n not in corpus]
                    if score < cfg.min_qrel_score:
                        buf.add(
                            lineno,
                            b"",
                            original,
                            "qrel_not_positive",
                            f"score {score} < {cfg.min_qrel_score}",
                        )
                    elif missing:
                        buf.add(lineno, b"", original, "dangling_id", "unknown " + ", ".join(missing))
                    else:
                        rec = {
                            "query": queries[qid],
                            "corpus": corpus[cid],
                            "negative": [corpus[n] for n in neg_ids],
                            "query_id": qid,
                            "corpus_id": cid,
                        }
                        raw = json.dumps(rec, ensure_ascii=False).encode("utf-8", "surrogatepass")
                        buf.add(lineno, raw, original)
                if len(buf) >= READ_CHUNK_ROWS:
                    yield buf.flush()
        if len(buf):
            yield buf.flush()


def read_raw_sources(sources: list[ResolvedSource]):
    """Ray Dataset (RAW_SCHEMA) over all sources; one work item per file, streamed."""
    import ray

    inline = {s.index: s for s in sources if s.kind == "inline"}
    beir = {s.index: s for s in sources if s.kind == "beir"}
    parts = []
    if inline:
        items = [
            {"source_index": s.index, "file_index": i} for s in inline.values() for i in range(len(s.files))
        ]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # num_cpus differs from the validator's so Ray does not fuse reader and validator: a big file is read by
        # one task while its blocks spread over the whole validator actor pool
        parts.append(
            ds.map_batches(
                _read_inline_batch, batch_size=1, fn_kwargs={"sources": inline}, num_cpus=READER_NUM_CPUS
            )
        )
    if beir:
        items = [
            {"source_index": s.index, "file_index": i} for s in beir.values() for i in range(-1, len(s.files))
        ]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        parts.append(
            ds.map_batches(
                BeirJoiner,
                batch_size=1,
                fn_constructor_kwargs={"sources": beir},
                compute=ray.data.ActorPoolStrategy(size=1),  # one copy of the id maps
            )
        )
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


# ----------------------------------------------------------------------------------------------- validator

# Unicode category Cc (C0, DEL, C1) minus tab / newline / carriage return
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def compare_key(text: str) -> str:
    """Texts compared for identity / duplicates: whitespace collapsed, case-folded."""
    return " ".join(text.split()).casefold()


def normalize_text(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()


def pair_key(query: str, positive: str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(compare_key(query).encode("utf-8"))
    h.update(b"\x00")
    h.update(compare_key(positive).encode("utf-8"))
    return h.digest()


class RowRejected(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _check_text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise RowRejected("wrong_type", f"{field} is {kind} ({_short(value)}), expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RowRejected("invalid_utf8", f"{field} holds a lone surrogate ({_short(value)})") from None
    if not value.strip():
        raise RowRejected("empty_text", f"{field} is empty or whitespace-only ({value!r})")
    m = _CONTROL_RE.search(value)
    if m:
        raise RowRejected(
            "control_characters", f"{field} has control character {m.group()!r} at char {m.start()}"
        )
    return normalize_text(value)


def _short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def parse_record(raw: bytes, cfg: SourceConfig, kind: str) -> tuple[str, str, list[str]]:
    """Raw bytes of one record -> normalized (query, positive, negatives); raises RowRejected. Pure."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowRejected("invalid_utf8", f"byte {e.start}: {e.reason}") from None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise RowRejected("malformed_json", f"{e.msg} (char {e.pos})") from None
    if not isinstance(rec, dict):
        raise RowRejected("malformed_json", f"expected a JSON object, got {type(rec).__name__}")
    if kind == "beir":
        qc, pc, nc = "query", "corpus", "negative"
    else:
        qc, pc, nc = cfg.query_column, cfg.positive_column, cfg.negative_column
    for col in (qc, pc):
        if col not in rec:
            fix = (
                "the BEIR join always produces it; report a bug"
                if kind == "beir"
                else f"if the column has another name, set {'query' if col == qc else 'positive'}_column for "
                f"source {cfg.name!r} in the sources YAML"
            )
            raise RowRejected("missing_field", f"no {col!r} field (has {sorted(rec)[:8]}); {fix}")
    query = _check_text(rec[qc], qc)
    positive = _check_text(rec[pc], pc)
    neg = rec.get(nc)
    if neg is None:
        negs_in: list = []
    elif isinstance(neg, str):
        negs_in = [neg]
    elif isinstance(neg, list):
        negs_in = neg
    else:
        raise RowRejected(
            "wrong_type", f"{nc} is {type(neg).__name__} ({_short(neg)}), expected string or list"
        )
    negatives = [_check_text(n, f"{nc}[{i}]") for i, n in enumerate(negs_in)]
    if compare_key(query) == compare_key(positive):
        raise RowRejected("positive_equals_query", f"{pc} equals {qc}: {_short(positive)}")
    pk = compare_key(positive)
    for i, n in enumerate(negatives):
        if compare_key(n) == pk:
            raise RowRejected("negative_equals_positive", f"{nc}[{i}] equals {pc}: {_short(n)}")
    return query, positive, negatives


def _stage_schema(tokenize: bool) -> pa.Schema:
    fields = [
        ("source_index", pa.int32()),
        ("source", pa.string()),
        ("file_index", pa.int32()),
        ("file", pa.string()),
        ("row", pa.int64()),
        ("query", pa.string()),
        ("positive", pa.string()),
        ("negatives", pa.list_(pa.string())),
        ("reason", pa.string()),  # "" = valid so far
        ("detail", pa.string()),
        ("original", pa.string()),
        ("key", pa.binary()),  # pair_key for valid rows, b"" otherwise
        ("num_negatives", pa.int32()),
        ("query_len", pa.int32()),  # tokens incl. specials, before truncation
        ("positive_len", pa.int32()),
        ("negatives_len", pa.list_(pa.int32())),
        (
            "over_max_len",
            pa.list_(pa.string()),
        ),  # fields longer than max_seq_len ("report"/"truncate" policy)
    ]
    if tokenize:
        fields += [
            ("query_input_ids", pa.list_(pa.int32())),
            ("positive_input_ids", pa.list_(pa.int32())),
            ("negatives_input_ids", pa.list_(pa.list_(pa.int32()))),
        ]
    return pa.schema(fields)


class ContrastiveRowValidator:
    """Callable class (Ray actor): RAW_SCHEMA batch -> staged batch, every input row exactly once.

    Per row: reader-decided reason, UTF-8, JSON object, required fields, types, empty text, control characters,
    positive == query, negative == positive, token length vs max_seq_len (policy report|truncate|reject).
    Duplicates and negative counts need all rows and are decided later by `ContrastiveFinalizer`.
    """

    def __init__(
        self,
        sources: dict[int, SourceConfig],
        kinds: dict[int, str],
        max_seq_len: int = 512,
        truncation: str = "report",
        tokenize: bool = False,
        tokenizer: str = "",
    ):
        from pipelines.tokenizer import load_tokenizer

        self.sources, self.kinds = sources, kinds
        self.max_seq_len, self.truncation, self.tokenize = max_seq_len, truncation, tokenize
        self.tok = load_tokenizer(tokenizer or None)
        self.schema = _stage_schema(tokenize)

    def _truncate(self, text: str, enc) -> tuple[str, Any] | None:
        """Cut text at the char end of the last content token that fits and re-encode (WordPiece may split a cut
        word differently), cutting one more token per retry. None if no non-empty prefix fits."""
        keep = self.max_seq_len - 2  # content tokens besides [CLS]/[SEP]
        for _ in range(64):
            if len(enc.ids) <= self.max_seq_len:
                return (text, enc) if text else None
            if keep < 1:
                return None
            content = [o for o, sid in zip(enc.offsets, enc.special_tokens_mask, strict=True) if not sid]
            text = text[: content[min(keep, len(content)) - 1][1]].rstrip()
            enc = self.tok.encode(text)
            keep -= 1
        return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        if isinstance(batch, dict):
            batch = pa.table(batch)
        cols = batch.to_pydict()
        n = batch.num_rows
        out: dict[str, list] = {f.name: [] for f in self.schema}
        parsed: list[tuple[str, str, list[str]] | None] = []
        for i in range(n):
            si = cols["source_index"][i]
            err = cols["reader_error"][i]
            reason = detail = ""
            rec = None
            if err:
                reason, detail = err, cols["reader_detail"][i]
            else:
                try:
                    rec = parse_record(cols["raw"][i], self.sources[si], self.kinds[si])
                except RowRejected as e:
                    reason, detail = e.reason, e.detail
            parsed.append(rec)
            out["reason"].append(reason)
            out["detail"].append(detail)
        # token lengths for rows still valid: one batched encode call
        texts: list[str] = []
        for rec in parsed:
            if rec is not None:
                texts.append(rec[0])
                texts.append(rec[1])
                texts.extend(rec[2])
        encs = iter(self.tok.encode_batch(texts)) if texts else iter(())
        for i, rec in enumerate(parsed):
            for c in ("source_index", "source", "file_index", "file", "row", "original"):
                out[c].append(cols[c][i])
            if rec is None:
                for c in ("query", "positive", "negatives", "query_len", "positive_len", "negatives_len"):
                    out[c].append(None)
                out["key"].append(b"")
                out["num_negatives"].append(-1)
                out["over_max_len"].append([])
                if self.tokenize:
                    for c in ("query_input_ids", "positive_input_ids", "negatives_input_ids"):
                        out[c].append(None)
                continue
            q, p, negs = rec
            field_names = ["query", "positive"] + [f"negatives[{j}]" for j in range(len(negs))]
            texts_i = [q, p, *negs]
            encs_i = [next(encs) for _ in texts_i]
            lens = [len(e.ids) for e in encs_i]
            over = [f for f, ln in zip(field_names, lens, strict=True) if ln > self.max_seq_len]
            if over and self.truncation == "reject":
                j = field_names.index(over[0])
                out["reason"][i] = "too_long"
                out["detail"][i] = f"{over[0]} has {lens[j]} tokens > max_seq_len={self.max_seq_len}"
            elif over and self.truncation == "truncate":
                for j, ln in enumerate(lens):
                    if ln > self.max_seq_len:
                        cut = self._truncate(texts_i[j], encs_i[j])
                        if cut is None:
                            out["reason"][i] = "too_long"
                            out["detail"][i] = (
                                f"{field_names[j]} has {ln} tokens and no prefix fits {self.max_seq_len}"
                            )
                            break
                        texts_i[j], encs_i[j] = cut
                if out["reason"][i] == "":  # cutting can make texts equal that differed only after the cut
                    pk = compare_key(texts_i[1])
                    if compare_key(texts_i[0]) == pk:
                        out["reason"][i], out["detail"][i] = "positive_equals_query", "equal after truncation"
                    elif any(compare_key(t) == pk for t in texts_i[2:]):
                        out["reason"][i], out["detail"][i] = (
                            "negative_equals_positive",
                            "equal after truncation",
                        )
            valid = out["reason"][i] == ""
            q, p, negs = texts_i[0], texts_i[1], texts_i[2:]
            out["query"].append(q)
            out["positive"].append(p)
            out["negatives"].append(negs)
            out["key"].append(pair_key(q, p) if valid else b"")
            out["num_negatives"].append(len(negs))
            out["query_len"].append(lens[0])
            out["positive_len"].append(lens[1])
            out["negatives_len"].append(lens[2:])
            out["over_max_len"].append(over)
            if self.tokenize:
                ids = [list(e.ids) for e in encs_i]
                out["query_input_ids"].append(ids[0])
                out["positive_input_ids"].append(ids[1])
                out["negatives_input_ids"].append(ids[2:])
        table = pa.table(out, schema=self.schema)
        assert table.num_rows == n, (table.num_rows, n)
        return table


# ----------------------------------------------------------------------------------------------- cross-row steps

VALID_SCHEMA = pa.schema(
    [
        ("query", pa.string()),
        ("positive", pa.string()),
        ("negatives", pa.list_(pa.string())),
        ("source", pa.string()),
    ]
)
TOKENIZED_FIELDS = [
    ("query_input_ids", pa.list_(pa.int32())),
    ("positive_input_ids", pa.list_(pa.int32())),
    ("negatives_input_ids", pa.list_(pa.list_(pa.int32()))),
]
QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("file", pa.string()),
        ("row", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("original", pa.string()),
    ]
)


DUPLICATES_SCHEMA = pa.schema(
    [
        ("source_index", pa.int32()),
        ("file_index", pa.int32()),
        ("row", pa.int64()),
        ("first_source_index", pa.int32()),
        ("first_file_index", pa.int32()),
        ("first_row", pa.int64()),
    ]
)


def find_duplicates(keys: pa.Table, excluded_counts: dict[int, int] | None = None) -> pa.Table:
    """Rows of `keys` (any set of key-table rows: one hash partition, or everything) whose pair key occurred
    before -> their position and the first occurrence's. Vectorized: sort by (key, source_index, file_index,
    row); a row equal in key to its predecessor is a duplicate of the run's first row. The first occurrence is
    the smallest (source_index, file_index, row), so the answer does not depend on Ray's block order.

    excluded_counts: source_index -> expected negatives for sources whose mismatching rows are rejected anyway;
    those rows are left out so a pair is never dropped as a duplicate of a row that is itself rejected.
    """
    if excluded_counts:
        uniq, inverse = np.unique(keys["source_index"].to_numpy(), return_inverse=True)
        nn = keys["num_negatives"].to_numpy()
        exp_row = np.array([excluded_counts.get(int(s), -1) for s in uniq])[inverse]
        keys = keys.filter(pa.array((exp_row == -1) | (exp_row == nn)))
    t = keys.sort_by([(c, "ascending") for c in ("key", "source_index", "file_index", "row")])
    n = t.num_rows
    if n < 2:
        return DUPLICATES_SCHEMA.empty_table()
    same = pa.compute.equal(t["key"].slice(1), t["key"].slice(0, n - 1)).to_numpy(zero_copy_only=False)
    is_first = np.concatenate([[True], ~same])
    first_idx = np.maximum.accumulate(np.where(is_first, np.arange(n), 0))
    dup = np.flatnonzero(~is_first)
    first = pa.array(first_idx[dup])
    return pa.table(
        {
            "source_index": t["source_index"].take(dup),
            "file_index": t["file_index"].take(dup),
            "row": t["row"].take(dup),
            "first_source_index": t["source_index"].take(first),
            "first_file_index": t["file_index"].take(first),
            "first_row": t["row"].take(first),
        },
        schema=DUPLICATES_SCHEMA,
    )


def _add_key_bucket(t: pa.Table, num_buckets: int) -> pa.Table:
    """Hash partition of the key table: bucket = first 4 bytes of the (uniform) BLAKE2 key mod num_buckets."""
    prefix = np.array([int.from_bytes(k[:4], "big") for k in t["key"].to_pylist()], dtype=np.int64)
    return t.append_column("bucket", pa.array(prefix % num_buckets, pa.int32()))


def expected_negative_counts(counts: dict[int, Counter], sources: dict[int, SourceConfig]) -> dict[int, int]:
    """source_index -> expected negatives per row: the configured value, else the most common count (ties: the
    larger count, so a few rows lacking negatives do not define the norm)."""
    out = {}
    for si, cfg in sources.items():
        if cfg.num_negatives >= 0:
            out[si] = cfg.num_negatives
        elif counts.get(si):
            c = counts[si]
            out[si] = max(c, key=lambda k: (c[k], k))
    return out


class ContrastiveFinalizer:
    """Map-batches sink over staged rows: decide duplicates + negative counts, write valid / quarantine part files,
    return one row per batch with JSON statistics (merged by `pipelines.contrastive_report`)."""

    def __init__(
        self,
        output: str,
        duplicates: dict[tuple[int, int, int], tuple[str, str, int]],
        expected_negatives: dict[int, int],
        policies: dict[int, str],
        max_seq_len: int,
        truncation: str,
        tokenize: bool,
        num_examples: int,
    ):
        self.output = Path(output)
        self.duplicates, self.expected, self.policies = duplicates, expected_negatives, policies
        self.max_seq_len, self.truncation, self.tokenize = max_seq_len, truncation, tokenize
        self.num_examples = num_examples
        self.valid_schema = pa.schema(list(VALID_SCHEMA) + (TOKENIZED_FIELDS if tokenize else []))

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipelines.contrastive_report import new_source_stats

        if isinstance(batch, dict):
            batch = pa.table(batch)
        cols = batch.to_pydict()
        valid: dict[str, list] = {f.name: [] for f in self.valid_schema}
        quar: dict[str, list] = {f.name: [] for f in QUARANTINE_SCHEMA}
        stats: dict[str, dict] = {}
        for i in range(batch.num_rows):
            si, src = cols["source_index"][i], cols["source"][i]
            st = stats.setdefault(src, new_source_stats())
            reason, detail = cols["reason"][i], cols["detail"][i]
            if reason == BLANK_LINE:
                st["blank_lines_skipped"] += 1
                continue
            st["rows_read"] += 1
            pos = (si, cols["file_index"][i], cols["row"][i])
            if not reason and pos in self.duplicates:
                fs, ff, fr = self.duplicates[pos]
                reason, detail = "duplicate_pair", f"first seen in source {fs!r} file {ff!r} row {fr}"
                where = "within" if fs == src else "across"
                st[f"duplicates_{where}"] += 1
                st["duplicate_first_sources"][fs] = st["duplicate_first_sources"].get(fs, 0) + 1
            if not reason and si in self.expected and cols["num_negatives"][i] != self.expected[si]:
                msg = f"{cols['num_negatives'][i]} negatives, source expects {self.expected[si]}"
                if self.policies[si] == "reject":
                    reason, detail = "negative_count_mismatch", msg
                else:
                    st["negative_count_mismatch_reported"] += 1
            if reason:
                st["rejected"] += 1
                st["reasons"][reason] = st["reasons"].get(reason, 0) + 1
                for c in ("source", "file", "row", "original"):
                    quar[c].append(cols[c][i])
                quar["reason"].append(reason)
                quar["detail"].append(detail)
                ex = st["examples"].setdefault(reason, [])
                if len(ex) < self.num_examples:
                    ex.append(
                        {"file": cols["file"][i], "row": cols["row"][i], "detail": detail,
                         "original": cols["original"][i][:2000], "_order": list(pos)}
                    )  # fmt: skip
                continue
            st["valid"] += 1
            for c in valid:
                valid[c].append(cols[c][i])
            nn = str(cols["num_negatives"][i])
            st["negatives_hist"][nn] = st["negatives_hist"].get(nn, 0) + 1
            for field, lens in (
                ("query", [cols["query_len"][i]]),
                ("positive", [cols["positive_len"][i]]),
                ("negative", cols["negatives_len"][i]),
            ):
                h = st["token_lengths"][field]
                for ln in lens:
                    h[str(ln)] = h.get(str(ln), 0) + 1
            for f in cols["over_max_len"][i]:
                key = "truncated" if self.truncation == "truncate" else "over_max_seq_len"
                fld = "negative" if f.startswith("negatives[") else f
                st[key][fld] = st[key].get(fld, 0) + 1
        name = f"part-{uuid.uuid4().hex}.parquet"
        if valid["query"]:
            pq.write_table(pa.table(valid, schema=self.valid_schema), self.output / "valid" / name)
        if quar["row"]:
            pq.write_table(pa.table(quar, schema=QUARANTINE_SCHEMA), self.output / "quarantine" / name)
        return pa.table({"stats": [json.dumps(stats)]})


# ----------------------------------------------------------------------------------------------- driver


def default_sources() -> list[SourceConfig]:
    """The embedded contrastive sources (pipelines.embedded), as inline JSONL triples."""
    from pipelines.embedded import materialize

    data = materialize()
    return [
        SourceConfig(name=name, path=str(path)) for name, path in sorted(data.contrastive_sources.items())
    ]


class RejectThresholdExceeded(RuntimeError):
    pass


# 16-byte pair hash + position: the only table the cross-row steps hold (~36 bytes per valid row)
KEY_COLUMNS = ["key", "source_index", "file_index", "row", "num_negatives"]


def _validator_kwargs(cfg: ValidateContrastiveConfig, resolved: list[ResolvedSource]) -> dict:
    return dict(
        sources={r.index: r.cfg for r in resolved}, kinds={r.index: r.kind for r in resolved},
        max_seq_len=cfg.max_seq_len, truncation=cfg.truncation, tokenize=cfg.tokenize, tokenizer=cfg.tokenizer,
    )  # fmt: skip


def _finalizer_kwargs(cfg, resolved, out, duplicates, expected) -> dict:
    return dict(
        output=str(out), duplicates=duplicates, expected_negatives=expected,
        policies={r.index: r.cfg.negative_count_policy for r in resolved},
        max_seq_len=cfg.max_seq_len, truncation=cfg.truncation, tokenize=cfg.tokenize,
        num_examples=cfg.num_examples_per_reason,
    )  # fmt: skip


def _reject_counts(expected: dict[int, int], resolved: list[ResolvedSource]) -> dict[int, int]:
    return {si: n for si, n in expected.items() if resolved[si].cfg.negative_count_policy == "reject"}


def _dup_map(rows, resolved: list[ResolvedSource]) -> dict[tuple[int, int, int], tuple[str, str, int]]:
    """(source_index, file_index, row) of each later duplicate -> (source, file, row) of its first occurrence."""
    out = {}
    for d in rows:
        first = resolved[d["first_source_index"]]
        rel = _rel_file(first, first.files[d["first_file_index"]])
        out[(d["source_index"], d["file_index"], d["row"])] = (first.cfg.name, rel, d["first_row"])
    return out


def _run_ray(cfg: ValidateContrastiveConfig, resolved: list[ResolvedSource], out: Path):
    """Streaming Ray Data engine -> (per-batch stats, expected negatives per source_index)."""
    import ray

    if not ray.is_initialized():
        ray.init()  # under `ray job submit` this connects to the job's cluster; locally it starts one
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.num_validator_actors)
    # pass 1: read + per-row validation -> staged Parquet (all rows, valid and rejected)
    staging = out / "_staging"
    staged = read_raw_sources(resolved).map_batches(
        ContrastiveRowValidator,
        batch_format="pyarrow",
        batch_size=512,
        fn_constructor_kwargs=_validator_kwargs(cfg, resolved),
        compute=pool,
    )
    staged.write_parquet(str(staging), mode="overwrite")
    if not glob.glob(str(staging / "**" / "*.parquet"), recursive=True):
        return [], {}
    # cross-row steps on the key table only (16-byte hash + position, no text): negative counts, duplicates
    from ray.data.expressions import col

    keys = (
        ray.data.read_parquet(str(staging))
        .select_columns([*KEY_COLUMNS, "reason"])
        .filter(expr=col("reason") == "")
        .select_columns(KEY_COLUMNS)
        .materialize()
    )
    neg_counts: dict[int, Counter] = {}
    for r in keys.groupby(["source_index", "num_negatives"]).count().take_all():
        neg_counts.setdefault(r["source_index"], Counter())[r["num_negatives"]] = r["count()"]
    expected = expected_negative_counts(neg_counts, {r.index: r.cfg for r in resolved})
    # duplicates: hash-partition the key table into buckets of ~DEDUP_ROWS_PER_BUCKET rows (equal keys share a
    # bucket), one vectorized find_duplicates call per bucket; only the duplicates come back to the driver
    num_buckets = max(1, math.ceil(keys.count() / DEDUP_ROWS_PER_BUCKET))
    dups = (
        keys.map_batches(_add_key_bucket, batch_format="pyarrow", fn_kwargs={"num_buckets": num_buckets})
        .groupby("bucket")
        .map_groups(
            find_duplicates,
            batch_format="pyarrow",
            fn_kwargs={"excluded_counts": _reject_counts(expected, resolved)},
        )
        .take_all()
    )
    # pass 2: final decisions, write valid/ + quarantine/, per-batch statistics
    finals = ray.data.read_parquet(str(staging)).map_batches(
        ContrastiveFinalizer,
        batch_format="pyarrow",
        batch_size=4096,
        fn_constructor_kwargs=_finalizer_kwargs(cfg, resolved, out, _dup_map(dups, resolved), expected),
        compute=pool,
    )
    stats = [r["stats"] for r in finals.take_all()]
    shutil.rmtree(staging, ignore_errors=True)
    return stats, expected


def _run_local(cfg: ValidateContrastiveConfig, resolved: list[ResolvedSource], out: Path):
    """Same steps in this process, no Ray (unit tests, tiny inputs, and the reference for the Ray engine)."""
    raw: list[pa.Table] = []
    for r in resolved:
        if r.kind == "inline":
            for fi in range(len(r.files)):
                raw.extend(iter_raw_file(r, fi))
        else:
            joiner = BeirJoiner({r.index: r})
            for fi in range(-1, len(r.files)):
                raw.extend(joiner({"source_index": [r.index], "file_index": [fi]}))
    validator = ContrastiveRowValidator(**_validator_kwargs(cfg, resolved))
    staged = [validator(t) for t in raw]
    if not staged:
        return [], {}
    keys = pa.concat_tables([t.select([*KEY_COLUMNS, "reason"]) for t in staged])
    keys = keys.filter(pa.compute.equal(keys["reason"], "")).select(KEY_COLUMNS)
    neg_counts: dict[int, Counter] = {}
    for si, n in zip(keys["source_index"].to_pylist(), keys["num_negatives"].to_pylist(), strict=True):
        neg_counts.setdefault(si, Counter())[n] += 1
    expected = expected_negative_counts(neg_counts, {r.index: r.cfg for r in resolved})
    dups = find_duplicates(keys, _reject_counts(expected, resolved)).to_pylist()
    finalizer = ContrastiveFinalizer(
        **_finalizer_kwargs(cfg, resolved, out, _dup_map(dups, resolved), expected)
    )
    return [finalizer(t)["stats"][0].as_py() for t in staged], expected


def _check_written_rows(out: Path, totals: dict) -> None:
    """The part files on disk must hold exactly the rows the statistics counted. They would not when OUTPUT is a
    node-local path on a multi-node cluster (finalizer actors on other nodes write to their own disks): fail
    loudly instead of handing on a silently partial valid/ set."""

    def rows(d: Path) -> int:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in d.glob("*.parquet"))

    on_disk = {"valid": rows(out / "valid"), "rejected": rows(out / "quarantine")}
    if on_disk != {"valid": totals["valid"], "rejected": totals["rejected"]}:
        raise RuntimeError(
            f"{out}: valid/ and quarantine/ hold {on_disk['valid']} and {on_disk['rejected']} rows, but "
            f"{totals['valid']} valid and {totals['rejected']} rejected rows were counted; on a multi-node cluster "
            "--output must be storage every node can reach (NFS), see docs/contrastive_data.md"
        )


def validate_contrastive(
    cfg: ValidateContrastiveConfig, *, engine: Literal["ray", "local"] | None = None
) -> dict:
    """Run the whole validation; writes OUTPUT/{valid,quarantine,report.json,report.html,_VALIDATED.json}.

    engine="ray" streams through Ray Data (connects with plain `ray.init()` when no Ray is initialized);
    engine="local" runs the same steps in-process. Returns the report dict. Raises FileNotFoundError /
    PermissionError / ValueError for sources that cannot be read (before any output is touched) and
    RejectThresholdExceeded (after writing everything; the marker says passed=false) for too-dirty sources.
    """
    from pipelines import contrastive_report as rep

    if not cfg.sources:
        cfg = dataclasses.replace(cfg, sources=default_sources())
    resolved = [resolve_source(s, i) for i, s in enumerate(cfg.sources)]
    for r in resolved:
        log.info("source %s: kind=%s format=%s files=%d", r.cfg.name, r.kind, r.format, len(r.files))
    out = Path(cfg.output)
    for sub in ("valid", "quarantine", "_staging"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for f in (MARKER_NAME, REPORT_NAME, "report.html"):
        (out / f).unlink(missing_ok=True)
    (out / "valid").mkdir(parents=True)
    (out / "quarantine").mkdir(parents=True)

    engine = engine or cfg.engine
    stats_rows, expected = (_run_ray if engine == "ray" else _run_local)(cfg, resolved, out)

    report = rep.build_report(
        stats_rows,
        sources=[(r.cfg, r.kind, r.format, list(r.files)) for r in resolved],
        expected_negatives={resolved[i].cfg.name: v for i, v in expected.items()},
        config=cfg,
        num_examples=cfg.num_examples_per_reason,
    )
    _check_written_rows(out, report["totals"])
    failing = {
        name: s for name, s in report["sources"].items() if s["reject_fraction"] > cfg.max_reject_fraction
    }
    # a source that yields no rows at all (empty file, only blank lines, a qrels glob matching empty files) is a
    # broken input, not a clean one: it must not pass with reject_fraction 0
    empty = [name for name, s in report["sources"].items() if s["rows_read"] == 0]
    report["passed"] = not failing and not empty
    report["failures"] = [
        f"source {name!r}: {s['rejected']}/{s['rows_read']} rows rejected "
        f"({s['reject_fraction']:.1%} > max_reject_fraction={cfg.max_reject_fraction:.1%}); top reasons "
        f"{dict(Counter(s['reasons']).most_common(3))}; inspect {out / 'quarantine'} and fix the source, "
        "its column remaps, or raise --max-reject-fraction"
        for name, s in failing.items()
    ] + [
        f"source {name!r}: no rows read from {report['sources'][name]['path']} (empty or blank files only); "
        "fix its path or remove the source"
        for name in empty
    ]
    rep.write_report(report, out)
    (out / MARKER_NAME).write_text(
        json.dumps(
            {
                "schema_version": CONTRASTIVE_SCHEMA_VERSION,
                "passed": report["passed"],
                "tokenized": cfg.tokenize,
                "valid_rows": report["totals"]["valid"],
                "report": REPORT_NAME,
            },
            indent=2,
        )
    )
    if not report["passed"]:
        raise RejectThresholdExceeded("; ".join(report["failures"]))
    return report


def read_validated(path: str | Path, *, allow_failed: bool = False):
    """`OUTPUT/valid/` of a finished `jobs/validate_contrastive.py` run as a ray.data.Dataset.

    Refuses directories the validator did not finish (no marker / report), or whose run failed the reject
    threshold (unless allow_failed=True).
    """
    import ray

    root = Path(path)
    marker = root / MARKER_NAME
    if not marker.is_file() or not (root / REPORT_NAME).is_file():
        raise ValueError(
            f"{root} is not a finished contrastive validation output (missing {MARKER_NAME} or {REPORT_NAME}); "
            f"run `python jobs/validate_contrastive.py --output {root} ...` first"
        )
    meta = json.loads(marker.read_text())
    if meta.get("schema_version") != CONTRASTIVE_SCHEMA_VERSION:
        raise ValueError(
            f"{marker}: schema_version {meta.get('schema_version')} != {CONTRASTIVE_SCHEMA_VERSION}; re-run "
            "jobs/validate_contrastive.py with this code"
        )
    if not meta.get("passed") and not allow_failed:
        raise ValueError(
            f"{root}: the validation run failed its reject threshold (see {root / REPORT_NAME} 'failures'); fix "
            "the sources or pass allow_failed=True to train on the rows that did pass"
        )
    if meta.get("valid_rows", 0) == 0:
        raise ValueError(f"{root}: the validation run produced no valid rows; see {root / REPORT_NAME}")
    return ray.data.read_parquet(str(root / "valid"))


def main_error(msg: str) -> None:
    print(f"validate_contrastive: error: {msg}", file=sys.stderr)
