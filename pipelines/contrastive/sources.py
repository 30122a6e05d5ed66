"""Contrastive sources: configuration, resolution (kind, format, files) and the readers that turn every record of
every source into one RAW_SCHEMA row (or a counted marker), through `pipelines.io`.

Inline sources (JSONL, Parquet, HF save_to_disk) are streamed one Ray task per file; BEIR sources
(queries / corpus / qrels / optional hard negatives) are joined by `BeirJoiner`, one actor holding the id maps.
A reader never decides validity beyond what it must (bytes, JSON, ids); `pipelines.contrastive.validate` does.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from pipelines.contrastive.rules import BLANK_LINE, NUMERIC_IDS
from pipelines.io import (
    column_names,
    filesystem_for,
    hf_disk_files,
    iter_lines,
    iter_record_batches,
    jsonable,
    parse_json_object,
)

log = logging.getLogger(__name__)

READ_CHUNK_ROWS = 2048  # rows per block yielded by the readers
READER_NUM_CPUS = 0.5  # readers mostly wait on I/O and split lines

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
    skipped: tuple[str, ...] = ()  # files of a source directory that are not read (other extensions, hidden)


def _hf_disk_files(root: Path) -> list[str]:
    """Arrow files of a `datasets` save_to_disk dir (a DatasetDict: every split, in its listed order)."""
    fs, path = filesystem_for(str(root))
    files = hf_disk_files(fs, path)
    if files is None:
        raise ValueError(
            f"{root} is not a `datasets` save_to_disk directory (no state.json / dataset_dict.json); re-save it "
            "with Dataset.save_to_disk or set format to jsonl/parquet"
        )
    return files


def _check_readable(name: str, path: str, fmt: str) -> None:
    """Fail before any work on files that cannot be opened (Parquet footer / Arrow header read, cheap)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source {name!r}: file {path} is missing")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"source {name!r}: cannot read {path}; fix its permissions")
    try:
        if fmt in ("parquet", "hf_disk"):
            column_names(path, _IO_FORMAT[fmt])  # reads the Parquet footer / the Arrow schema only
    except (pa.ArrowException, OSError) as e:
        raise ValueError(
            f"source {name!r}: {path} is not a readable {fmt} file ({e}); fix or remove the file, or set format"
        ) from None


_IO_FORMAT = {"jsonl": "jsonl", "parquet": "parquet", "hf_disk": "hf_arrow"}


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
        skipped: list[str] = []
        if fmt == "hf_disk":
            files = _hf_disk_files(root)
        else:
            files = sorted(glob.glob(str(root / ("*.jsonl" if fmt == "jsonl" else "*.parquet"))))
            skipped = sorted(str(p) for p in root.iterdir() if p.is_file() and str(p) not in files)
            for p in skipped:
                log.warning(
                    "source %s: %s skipped (only *.%s files of the directory are read)", cfg.name, p, fmt
                )
        if not files:
            raise FileNotFoundError(f"source {cfg.name!r}: no {fmt} files in {root}")
        for f in files:
            _check_readable(cfg.name, f, fmt)
        return ResolvedSource(index, cfg, "inline", fmt, tuple(files), str(root), tuple(skipped))
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


def iter_raw_file(
    src: ResolvedSource, file_index: int, chunk_rows: int = READ_CHUNK_ROWS
) -> Iterator[pa.Table]:
    """Stream one inline file as RAW_SCHEMA tables. JSONL lines are read as bytes so a bad line is one bad row."""
    path = src.files[file_index]
    buf = _RawBuffer(src, file_index, _rel_file(src, path))
    if src.format == "jsonl":
        for lineno, line in iter_lines(path):
            if not line.strip():  # not a record: counted (blank_lines_skipped), never quarantined
                buf.add(lineno, b"", "", BLANK_LINE)
            else:
                buf.add(lineno, line, _display(line))
            if len(buf) >= chunk_rows:
                yield buf.flush()
    else:
        row = 0
        for rb in iter_record_batches(path, _IO_FORMAT[src.format], batch_size=chunk_rows):
            for rec in rb.to_pylist():
                original = json.dumps(rec, default=repr, ensure_ascii=False)
                try:
                    raw = json.dumps(jsonable(rec), ensure_ascii=False).encode("utf-8", "surrogatepass")
                    buf.add(row, raw, original)
                except UnicodeDecodeError as e:
                    buf.add(row, b"", original, "invalid_utf8", f"binary value is not UTF-8: {e}")
                row += 1
                if len(buf) >= chunk_rows:
                    yield buf.flush()
    if len(buf):
        yield buf.flush()


def _read_inline_batch(batch: dict, sources: dict[int, ResolvedSource]) -> Iterator[pa.Table]:
    """Ray map_batches UDF over a dataset of (source_index, file_index) work items."""
    for si, fi in zip(batch["source_index"], batch["file_index"], strict=True):
        yield from iter_raw_file(sources[int(si)], int(fi))


# --- BEIR -----------------------------------------------------------------------------------------


def _iter_jsonl_objects(path: Path) -> Iterator[tuple[int, bytes, dict | None, str, str]]:
    """(line number, raw line, JSON object or None, reason, detail) per non-blank line of a BEIR JSONL file."""
    for lineno, line in iter_lines(str(path)):
        if line.strip():
            yield lineno, line, *parse_json_object(line)


def _beir_id(rid: Any) -> tuple[str | None, bool, str]:
    """(id as a string or None, whether it was a number, why it is unusable). Numbers are normalized ("5" for 5
    and 5.0, as the qrels TSV writes them); lists, objects and booleans are refused."""
    if isinstance(rid, str):
        return rid, False, ""
    if isinstance(rid, bool) or not isinstance(rid, (int, float)):
        return None, False, f"_id is {type(rid).__name__} ({rid!r:.40}), expected a string or a number"
    return str(int(rid)) if float(rid).is_integer() else str(rid), True, ""


def _load_jsonl_map(path: Path, value_fn) -> tuple[dict[str, Any], list[tuple[int, bytes, str, str]], int]:
    """id -> value for a BEIR JSONL file; bad lines returned as (line, raw, reason, detail); numeric ids count."""
    out: dict[str, Any] = {}
    bad: list[tuple[int, bytes, str, str]] = []
    numeric = 0
    for lineno, line, rec, reason, error in _iter_jsonl_objects(path):
        if rec is None:
            bad.append((lineno, line, reason, f"{path.name} line {lineno}: {error}"))
            continue
        rid = rec.get("_id")
        if rid is None or "text" not in rec:
            missing = "'_id'" if rid is None else "'text'"
            bad.append((lineno, line, "missing_field", f"{path.name} line {lineno}: no {missing}"))
            continue
        rid, was_number, why = _beir_id(rid)
        if rid is None:
            bad.append((lineno, line, "wrong_type", f"{path.name} line {lineno}: {why}"))
            continue
        numeric += was_number
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
    return out, bad, numeric


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

        queries, bad_q, num_q = _load_jsonl_map(root / cfg.queries_file, query_value)
        corpus, bad_c, num_c = _load_jsonl_map(root / cfg.corpus_file, corpus_value)
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
                ids = ids if isinstance(ids, list) else [ids]
                norm = [_beir_id(i) for i in [qid, *ids]]  # the same id rules as queries / corpus
                why = next((w for _, _, w in norm if w), "")
                if why:
                    bad.append((neg_file, lineno, line, "wrong_type", f"{neg_file} line {lineno}: {why}"))
                    continue
                qid, ids = norm[0][0], [n for n, _, _ in norm[1:]]
                if qid not in queries:  # otherwise never joined: silently unused
                    detail = f"{neg_file} line {lineno}: unknown query-id {qid!r} (not in {cfg.queries_file})"
                    bad.append((neg_file, lineno, line, "dangling_id", detail))
                    continue
                negs.setdefault(qid, []).extend(ids)
        self.maps[src.index] = (queries, corpus, negs, bad, num_q + num_c)
        return self.maps[src.index]

    def __call__(self, batch: dict) -> Iterator[pa.Table]:
        for si, fi in zip(batch["source_index"], batch["file_index"], strict=True):
            src = self.sources[int(si)]
            queries, corpus, negs, bad, numeric = self._load(src)
            if int(fi) < 0:
                buf = _RawBuffer(src, -1, "")
                for fname, lineno, line, reason, detail in bad:
                    buf.file = fname
                    buf.add(lineno, b"", _display(line), reason, detail)
                if numeric:  # not a row: a count for the report
                    buf.file = f"{src.cfg.queries_file}, {src.cfg.corpus_file}"
                    buf.add(0, b"", "", NUMERIC_IDS, str(numeric))
                if len(buf):
                    yield buf.flush()
                continue
            yield from self._join_qrels(src, int(fi), queries, corpus, negs)

    def _join_qrels(self, src, fi, queries, corpus, negs) -> Iterator[pa.Table]:
        cfg = src.cfg
        path = src.files[fi]
        buf = _RawBuffer(src, fi, _rel_file(src, path))
        for lineno, line in iter_lines(path):
            if not line.strip():
                buf.add(lineno, b"", "", BLANK_LINE)
                continue
            original = _display(line)
            parts = original.split("\t")
            if lineno == 1 and parts[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue  # header
            if len(parts) < 2 or (len(parts) >= 3 and not parts[2].strip().lstrip("-").isdigit()):
                buf.add(lineno, b"", original, "malformed_qrels", "expected query-id<TAB>corpus-id<TAB>score")
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
