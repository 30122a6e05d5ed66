"""Readers for raw text: local or remote (s3://, gs://, ... through pyarrow filesystems) Parquet, JSON Lines,
plain text, and HF `datasets` directories written by `save_to_disk`.

Two steps, both without Ray:
  * `resolve_inputs(paths)` (driver): expands directories / globs / HF dataset dirs into an ordered list of
    `InputFile`s (sorted inside each directory, so the order is deterministic).
  * `iter_document_chunks(file, options)` (inside a Ray actor): streams one file, yielding `DocChunk`s of at most
    `chunk_docs` documents / `chunk_chars` characters, so memory stays bounded however large the file.

Document ids: the `id_column` value when the source has one, else `<file name>:<row>` (row = 0-based row index
in the file; for JSONL the line index, for plain text the document index). The file name is relative to the
input directory (or the bare file name for a file given directly), so ids stay stable when the corpus moves.

Bad input never disappears silently: with `on_bad_row="error"` the first bad row raises `BadInputError`
naming the file, the row, the field and the value, plus the fix; with `"skip"` it is counted by reason, with a
few examples, in `DocChunk.bad_counts` / `bad_examples` (the report shows them). Reasons: `invalid_utf8`,
`invalid_json`, `missing_text_column`, `null_text`, `non_string_text`, `empty_text`, `unreadable_file`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import posixpath
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

FORMATS = ("parquet", "jsonl", "text", "hf_arrow")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
_EXT = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
_EXT.update({".txt": "text", ".text": "text"})
BAD_REASONS = (
    "invalid_utf8",
    "invalid_json",
    "missing_text_column",
    "null_text",
    "non_string_text",
    "empty_text",
    "unreadable_file",
)
MAX_EXAMPLES = 5  # bad-row examples kept per reason per chunk


class BadInputError(ValueError):
    """A row or file of the input is unusable and `on_bad_row="error"`; the message names file, row and fix."""


@dataclasses.dataclass(frozen=True)
class InputFile:
    uri: str  # absolute local path or scheme://bucket/key
    format: str  # one of FORMATS
    name: str  # stable display name used in document ids (relative to the input dir)
    size: int  # bytes


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    text_column: str = "text"
    id_column: str = "id"  # "" = always use <file name>:<row>
    text_split: str = "paragraph"  # plain text: "paragraph" (blank-line separated) | "line" | "file"
    on_bad_row: str = "error"  # "error" | "skip"
    chunk_docs: int = 512  # documents per yielded chunk (= one tokenizer batch)
    chunk_chars: int = 4_000_000  # ... or fewer, once this many characters are buffered


@dataclasses.dataclass
class DocChunk:
    doc_ids: list[str]
    texts: list[str]
    num_rows: int  # rows consumed, good + bad
    bad_counts: Counter
    bad_examples: list[dict[str, Any]]
    skipped_file: dict[str, Any] | None = None  # set when the whole file was skipped


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/key or gs://bucket/key."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise ValueError(
                f"cannot open filesystem for {uri!r}: {e}; check the scheme (s3://, gs://, hdfs://, file://) "
                "and that pyarrow was built with it and credentials are configured"
            ) from e
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _join(uri_root: str, path: str, fs_path_root: str) -> str:
    """URI for `path` (a path inside the filesystem) given the URI and fs path of its root."""
    if "://" not in uri_root:
        return path
    rel = posixpath.relpath(path, fs_path_root)
    return uri_root if rel == "." else uri_root.rstrip("/") + "/" + rel


def format_of(path: str) -> str | None:
    p = path.lower()
    for suf in COMPRESSION_SUFFIXES:
        if p.endswith(suf):
            p = p[: -len(suf)]
            break
    return _EXT.get(posixpath.splitext(p)[1])


def _hf_arrow_files(fs: pafs.FileSystem, root: str) -> list[str] | None:
    """Data files of a `save_to_disk` directory in their order, or None when `root` is not one."""
    infos = {i.base_name: i for i in fs.get_file_info(pafs.FileSelector(root))}
    if "dataset_dict.json" in infos:  # DatasetDict: every split, in the order the dict lists them
        with fs.open_input_stream(posixpath.join(root, "dataset_dict.json")) as f:
            splits = json.loads(f.read())["splits"]
        out: list[str] = []
        for s in splits:
            out += _hf_arrow_files(fs, posixpath.join(root, s)) or []
        return out
    if "state.json" in infos:
        with fs.open_input_stream(posixpath.join(root, "state.json")) as f:
            state = json.loads(f.read())
        return [posixpath.join(root, d["filename"]) for d in state.get("_data_files", [])]
    return None


def resolve_inputs(paths: Sequence[str]) -> list[InputFile]:
    """Expand files, directories (recursive), globs (`*`, `?` in the last component) and HF dataset dirs."""
    if not paths:
        raise ValueError("no input paths given; pass --input PATH... (files, directories, globs or URIs)")
    out: list[InputFile] = []
    seen: set[str] = set()
    for given in paths:
        fs, root = filesystem_for(given)
        base = posixpath.basename(root.rstrip("/"))
        if any(c in base for c in "*?["):
            parent = posixpath.dirname(root)
            infos = [
                i
                for i in fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
                if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, base)
            ]
            found = [
                (i.path, posixpath.relpath(i.path, parent), i.size)
                for i in sorted(infos, key=lambda i: i.path)
            ]
            if not found:
                raise ValueError(f"input glob {given!r} matched no files")
            given_root, fs_root = (given[: given.rfind("/")] if "://" in given else parent), parent
        else:
            info = fs.get_file_info(root)
            if info.type == pafs.FileType.NotFound:
                raise ValueError(f"input path {given!r} does not exist; check --input")
            given_root, fs_root = given, root
            if info.type == pafs.FileType.File:
                found = [(root, posixpath.basename(root), info.size)]
            else:
                hf = _hf_arrow_files(fs, root)
                if hf is not None:
                    for p in hf:
                        i = fs.get_file_info(p)
                        if i.type != pafs.FileType.File:
                            raise ValueError(
                                f"HF dataset dir {given!r} lists {p} in state.json but it is missing"
                            )
                        name = posixpath.join(base, posixpath.relpath(p, root))
                        uri = _join(given, p, root)
                        if uri not in seen:
                            seen.add(uri)
                            out.append(InputFile(uri=uri, format="hf_arrow", name=name, size=i.size))
                    continue
                infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
                found = sorted(
                    (i.path, posixpath.relpath(i.path, root), i.size)
                    for i in infos
                    if i.type == pafs.FileType.File and format_of(i.path) and not i.base_name.startswith(".")
                )
                if not found:
                    raise ValueError(
                        f"input directory {given!r} holds no .parquet/.jsonl/.json/.txt files (optionally "
                        f"{'/'.join(COMPRESSION_SUFFIXES)} compressed) and is not an HF save_to_disk directory"
                    )
        for path, rel, size in found:
            fmt = format_of(path)
            if fmt is None:
                raise ValueError(
                    f"input file {path!r} has an unsupported extension; use .parquet, .jsonl/.json/.ndjson or "
                    f".txt (optionally {'/'.join(COMPRESSION_SUFFIXES)} compressed)"
                )
            uri = _join(given_root, path, fs_root)
            if uri not in seen:
                seen.add(uri)
                out.append(InputFile(uri=uri, format=fmt, name=rel, size=size))
    names = Counter(f.name for f in out)
    return [dataclasses.replace(f, name=f.uri) if names[f.name] > 1 else f for f in out]


def is_eval_document(doc_id: str, eval_fraction: float, seed: int) -> bool:
    """Stable split: blake2b(seed, id) as a fraction of 2^64 < eval_fraction. Same id -> same split, always."""
    if eval_fraction <= 0.0:
        return False
    h = int.from_bytes(hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest(), "little")
    return h < eval_fraction * 2.0**64


class _Chunker:
    """Accumulates good documents and bad-row counts; raises on the first bad row in "error" mode."""

    def __init__(self, f: InputFile, opts: ReadOptions):
        self.f, self.opts = f, opts
        self._reset()

    def _reset(self) -> None:
        self.ids: list[str] = []
        self.texts: list[str] = []
        self.chars = 0
        self.rows = 0
        self.bad: Counter = Counter()
        self.examples: list[dict[str, Any]] = []

    def bad_row(self, row: int, reason: str, detail: str, fix: str) -> None:
        if self.opts.on_bad_row == "error":
            raise BadInputError(
                f"{self.f.uri}, row {row}, field {self.opts.text_column!r}: {reason}: {detail}; {fix}, or pass "
                f"--on-bad-row skip to count and report such rows instead"
            )
        self.rows += 1
        self.bad[reason] += 1
        if sum(1 for e in self.examples if e["reason"] == reason) < MAX_EXAMPLES:
            self.examples.append({"file": self.f.uri, "row": row, "reason": reason, "detail": detail[:200]})

    def text(self, row: int, value: Any, doc_id: Any) -> None:
        """Check one text value and keep it or count it."""
        if value is None:
            return self.bad_row(row, "null_text", "value is null", "drop or fill null texts")
        if not isinstance(value, str):
            return self.bad_row(
                row,
                "non_string_text",
                f"{type(value).__name__} {repr(value)[:60]}",
                "store the text as a string",
            )
        if not value or value.isspace():
            return self.bad_row(row, "empty_text", f"{value!r}", "drop empty documents")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogate, e.g. from a "\udc80" JSON escape
            return self.bad_row(
                row, "invalid_utf8", f"unpaired surrogate at char {e.start}", "fix the encoding"
            )
        self.rows += 1
        self.ids.append(str(doc_id) if doc_id is not None else f"{self.f.name}:{row}")
        self.texts.append(value)
        self.chars += len(value)

    def full(self) -> bool:
        return len(self.ids) >= self.opts.chunk_docs or self.chars >= self.opts.chunk_chars

    def take(self) -> DocChunk:
        c = DocChunk(self.ids, self.texts, self.rows, self.bad, self.examples)
        self._reset()
        return c


def iter_document_chunks(f: InputFile, opts: ReadOptions) -> Iterator[DocChunk]:
    """Stream `f` as chunks of good documents plus counts of bad rows. Always yields at least one chunk."""
    ch = _Chunker(f, opts)
    fs, path = filesystem_for(f.uri)
    reader = {"jsonl": _jsonl_rows, "text": _text_rows, "parquet": _columnar_rows, "hf_arrow": _columnar_rows}
    try:
        for _ in reader[f.format](fs, path, f, opts, ch):
            if ch.full():
                yield ch.take()
    except BadInputError:
        raise
    except (OSError, pa.ArrowException) as e:
        what = f"cannot read {f.format} file {f.uri} (after {ch.rows} rows): {type(e).__name__}: {e}"
        if opts.on_bad_row == "error":
            raise BadInputError(f"{what}; fix or remove the file, or pass --on-bad-row skip") from e
        chunk = ch.take()
        chunk.bad_counts["unreadable_file"] += 1
        chunk.skipped_file = {"file": f.uri, "reason": "unreadable_file", "detail": what[:300]}
        yield chunk
        return
    yield ch.take()


def _file_lines(fs, path) -> Iterator[bytes]:
    """The lines of a (possibly compressed) file, streamed in 8 MiB blocks; no trailing '\n' on each line, and
    the file's final newline does not start another line."""
    with fs.open_input_stream(path, compression="detect") as stream:
        rest = b""
        while True:
            block = stream.read(8 << 20)
            lines = (rest + block).split(b"\n")
            rest = lines.pop() if block else b""
            if not block and lines and not lines[-1]:
                lines.pop()
            yield from lines
            if not block:
                return


def _jsonl_rows(fs, path, f: InputFile, opts: ReadOptions, ch: _Chunker) -> Iterator[None]:
    col, idc = opts.text_column, opts.id_column
    for row, line in enumerate(_file_lines(fs, path)):
        if line.strip():
            _jsonl_line(line, row, col, idc, ch)
            yield None


def _jsonl_line(line: bytes, row: int, col: str, idc: str, ch: _Chunker) -> None:
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return ch.bad_row(
            row, "invalid_utf8", f"byte {e.start}: {line[e.start : e.start + 8]!r}", "re-encode as UTF-8"
        )
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        if row == 0 and s.lstrip().startswith("["):
            raise BadInputError(
                f"{ch.f.uri} is a JSON array, not JSON Lines (one object per line); convert it, e.g. "
                f"`jq -c '.[]' in.json > out.jsonl`"
            ) from None
        return ch.bad_row(
            row, "invalid_json", f"{e.msg} at column {e.colno}: {s[:60]!r}", "fix the JSON line"
        )
    if not isinstance(obj, dict):
        return ch.bad_row(
            row, "invalid_json", f"line is a {type(obj).__name__}, not an object", "fix the JSON line"
        )
    if col not in obj:
        return ch.bad_row(
            row,
            "missing_text_column",
            f"no key {col!r}; the row has keys {sorted(obj)[:20]}",
            "pick the text field with --text-column",
        )
    ch.text(row, obj[col], obj.get(idc) if idc else None)


def _text_rows(fs, path, f: InputFile, opts: ReadOptions, ch: _Chunker) -> Iterator[None]:
    """Documents: blank-line separated paragraphs, single lines, or the whole file (`opts.text_split`)."""
    doc: list[str] = []
    bad_utf8: str | None = None
    row = 0

    def flush() -> None:
        nonlocal doc, bad_utf8, row
        if bad_utf8 is not None:
            ch.bad_row(row, "invalid_utf8", bad_utf8, "re-encode the file as UTF-8")
        elif doc:
            ch.text(row, "\n".join(doc), None)
        doc, bad_utf8 = [], None
        row += 1

    for line in _file_lines(fs, path):
        try:
            s = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            s = ""
            if bad_utf8 is None:
                bad_utf8 = f"byte {e.start}: {line[e.start : e.start + 8]!r}"
        blank = not s.strip() and bad_utf8 is None
        if opts.text_split == "paragraph" and blank:
            if doc:
                flush()
                yield None
        elif opts.text_split == "line":
            if not blank or bad_utf8 is not None:
                doc.append(s)
                flush()
                yield None
        else:
            doc.append(s)
    if doc or bad_utf8 is not None:
        flush()
        yield None


def _text_values(arr: pa.Array) -> list[Any]:
    """Python values of a text column; undecodable bytes become `bytes` objects (reported as invalid_utf8)."""
    if (
        pa.types.is_string(arr.type)
        or pa.types.is_large_string(arr.type)
        or pa.types.is_string_view(arr.type)
    ):
        try:
            return arr.to_pylist()
        except UnicodeDecodeError:
            arr = arr.cast(pa.large_binary())
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        out: list[Any] = []
        for v in arr.to_pylist():
            try:
                out.append(v.decode("utf-8") if v is not None else None)
            except UnicodeDecodeError:
                out.append(v)
        return out
    return arr.to_pylist()


def _columnar_rows(fs, path, f: InputFile, opts: ReadOptions, ch: _Chunker) -> Iterator[None]:
    col, idc = opts.text_column, opts.id_column
    if f.format == "parquet":
        pf = pq.ParquetFile(fs.open_input_file(path))
        names = pf.schema_arrow.names
        num_rows = pf.metadata.num_rows
    else:  # HF save_to_disk: Arrow IPC stream
        reader = pa.ipc.open_stream(fs.open_input_file(path))
        names = reader.schema.names
        num_rows = None
    if col not in names:
        what = f"{f.uri} has no text column {col!r}; its columns are {names}"
        if opts.on_bad_row == "error":
            raise BadInputError(f"{what}; pass --text-column with one of them")
        if num_rows is None:  # Arrow IPC stream: no footer row count; count the batches (no text decoding)
            num_rows = sum(b.num_rows for b in reader)
        ch.rows += num_rows
        ch.bad["missing_text_column"] += num_rows
        ch.examples.append({"file": f.uri, "row": None, "reason": "missing_text_column", "detail": what})
        return
    cols = [col] + ([idc] if idc and idc in names and idc != col else [])
    if f.format == "parquet":
        batches = pf.iter_batches(batch_size=max(opts.chunk_docs, 64), columns=cols)
    else:
        batches = (b.select(cols) for b in reader)
    row = 0
    for batch in batches:
        texts = _text_values(batch.column(col))
        ids = batch.column(idc).to_pylist() if len(cols) == 2 else [None] * len(texts)
        for text, doc_id in zip(texts, ids, strict=True):
            if isinstance(text, bytes):
                ch.bad_row(row, "invalid_utf8", f"{text[:16]!r}", "re-encode the column as UTF-8")
            else:
                ch.text(row, text, doc_id)
            row += 1
            yield None
