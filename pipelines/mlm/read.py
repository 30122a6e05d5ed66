"""MLM documents from raw text: stream one input file as chunks of good documents plus counted bad rows.

Files are listed by `pipelines.io.list_inputs` (driver) and read through `pipelines.io` (lines, JSON objects,
Arrow batches); this module decides what a *document* is and which rows are bad.
  * `iter_document_chunks(file, options)` (inside a Ray actor): streams one file, yielding `DocChunk`s of at most
    `chunk_docs` documents / `chunk_chars` characters, so memory stays bounded however large the file.

Document ids: the `id_column` value when the source has one, else `<file name>:<row>` (row = 0-based row index
in the file; for JSONL the line index, for plain text the document index). The file name is relative to the
input directory (or the bare file name for a file given directly), so ids stay stable when the corpus moves.

Bad input never disappears silently: with `on_bad_row="error"` the first bad row raises `BadInputError` (a
`pipelines.io.BadRowError`) whose one-line message names the file, the 1-based row, the field and the fix; with
`"skip"` it is counted by reason, with a few examples (1-based row, the offending text), in
`DocChunk.bad_counts` / `bad_examples` (the report shows them). Reasons: `invalid_utf8`, `malformed_json`,
`missing_text_column`, `null_text`, `non_string_text`, `empty_text`, `unreadable_file`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipelines.io import (
    BadRowError,
    InputFile,
    column_names,
    iter_lines,
    iter_record_batches,
    parse_json_object,
)

BAD_REASONS = (
    "invalid_utf8",
    "malformed_json",
    "missing_text_column",
    "null_text",
    "non_string_text",
    "empty_text",
    "unreadable_file",
)
MAX_EXAMPLES = 5  # bad-row examples kept per reason per chunk


class BadInputError(BadRowError):
    """A row or file of the input is unusable and `on_bad_row="error"`; one line naming file, row, field, fix."""


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

    def bad_row(self, row: int, reason: str, detail: str, fix: str, text: Any = "") -> None:
        """Count (or, in "error" mode, raise for) the bad row at 0-based index `row`; messages say row + 1."""
        if self.opts.on_bad_row == "error":
            raise BadInputError(
                f"{self.f.uri}, row {row + 1}, field {self.opts.text_column!r}: {reason}: {detail}; {fix}, or "
                f"pass --on-bad-row skip to count and report such rows instead"
            )
        self.rows += 1
        self.bad[reason] += 1
        if sum(1 for e in self.examples if e["reason"] == reason) < MAX_EXAMPLES:
            shown = text if isinstance(text, str) else repr(text)
            self.examples.append(
                {
                    "file": self.f.uri,
                    "row": row + 1,
                    "reason": reason,
                    "detail": detail[:200],
                    "text": shown[:300],
                }
            )

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
                value,
            )
        if not value or value.isspace():
            return self.bad_row(row, "empty_text", f"{value!r}", "drop empty documents", value)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogate, e.g. from a "\udc80" JSON escape
            return self.bad_row(
                row, "invalid_utf8", f"unpaired surrogate at char {e.start}", "fix the encoding", repr(value)
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
    reader = {"jsonl": _jsonl_rows, "text": _text_rows, "parquet": _columnar_rows, "hf_arrow": _columnar_rows}
    try:
        for _ in reader[f.format](f, opts, ch):
            if ch.full():
                yield ch.take()
    except BadInputError:
        raise
    except (OSError, pa.ArrowException) as e:
        what = f"cannot read {f.format} file {f.uri} (after {ch.rows} rows): {type(e).__name__}: {e}"
        what = " ".join(what.split())  # one line
        if opts.on_bad_row == "error":
            raise BadInputError(f"{what}; fix or remove the file, or pass --on-bad-row skip") from e
        chunk = ch.take()
        chunk.bad_counts["unreadable_file"] += 1
        chunk.skipped_file = {"file": f.uri, "reason": "unreadable_file", "detail": what[:300]}
        yield chunk
        return
    yield ch.take()


def _jsonl_rows(f: InputFile, opts: ReadOptions, ch: _Chunker) -> Iterator[None]:
    col, idc = opts.text_column, opts.id_column
    for lineno, line in iter_lines(f.uri):
        if line.strip():
            _jsonl_line(line, lineno - 1, col, idc, ch)
            yield None


def _jsonl_line(line: bytes, row: int, col: str, idc: str, ch: _Chunker) -> None:
    obj, reason, detail = parse_json_object(line)
    if obj is None:
        if row == 0 and line.lstrip().startswith(b"["):
            raise BadInputError(
                f"{ch.f.uri} is a JSON array, not JSON Lines (one object per line); convert it, e.g. "
                f"`jq -c '.[]' in.json > out.jsonl`"
            )
        fix = "re-encode as UTF-8" if reason == "invalid_utf8" else "fix the JSON line"
        return ch.bad_row(row, reason, detail, fix, line.decode("utf-8", errors="backslashreplace"))
    if col not in obj:
        return ch.bad_row(
            row,
            "missing_text_column",
            f"no key {col!r}; the row has keys {sorted(obj)[:20]}",
            "pick the text field with --text-column",
            line.decode("utf-8", errors="backslashreplace"),
        )
    ch.text(row, obj[col], obj.get(idc) if idc else None)


def _text_rows(f: InputFile, opts: ReadOptions, ch: _Chunker) -> Iterator[None]:
    """Documents: blank-line separated paragraphs, single lines, or the whole file (`opts.text_split`)."""
    doc: list[str] = []
    bad_utf8: str | None = None
    bad_text = ""
    row = 0

    def flush() -> None:
        nonlocal doc, bad_utf8, row
        if bad_utf8 is not None:
            ch.bad_row(row, "invalid_utf8", bad_utf8, "re-encode the file as UTF-8", bad_text)
        elif doc:
            ch.text(row, "\n".join(doc), None)
        doc, bad_utf8 = [], None
        row += 1

    for _, line in iter_lines(f.uri):
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as e:
            s = ""
            if bad_utf8 is None:
                bad_utf8 = f"byte {e.start}: {line[e.start : e.start + 8]!r}"
                bad_text = line.decode("utf-8", errors="backslashreplace")
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


def _columnar_rows(f: InputFile, opts: ReadOptions, ch: _Chunker) -> Iterator[None]:
    col, idc = opts.text_column, opts.id_column
    names, num_rows = column_names(f.uri, f.format)
    if col not in names:
        what = f"{f.uri} has no text column {col!r}; its columns are {names}"
        if opts.on_bad_row == "error":
            raise BadInputError(f"{what}; pass --text-column with one of them")
        if num_rows is None:  # Arrow IPC stream: no footer row count; count the batches (no text decoding)
            num_rows = sum(b.num_rows for b in iter_record_batches(f.uri, f.format, columns=[]))
        ch.rows += num_rows
        ch.bad["missing_text_column"] += num_rows
        ch.examples.append(
            {"file": f.uri, "row": None, "reason": "missing_text_column", "detail": what, "text": ""}
        )
        return
    cols = [col] + ([idc] if idc and idc in names and idc != col else [])
    row = 0
    for batch in iter_record_batches(f.uri, f.format, columns=cols, batch_size=max(opts.chunk_docs, 64)):
        texts = _text_values(batch.column(0))
        ids = batch.column(1).to_pylist() if len(cols) == 2 else [None] * len(texts)
        for text, doc_id in zip(texts, ids, strict=True):
            if isinstance(text, bytes):
                ch.bad_row(
                    row, "invalid_utf8", f"{text[:16]!r}", "re-encode the column as UTF-8",
                    text.decode("utf-8", errors="backslashreplace"),
                )  # fmt: skip
            else:
                ch.text(row, text, doc_id)
            row += 1
            yield None
