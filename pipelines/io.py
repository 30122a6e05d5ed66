"""Storage and raw-record readers shared by both data paths (MLM preprocessing and contrastive validation).

Storage: every path is a local path or a URI (s3://, gs://, hdfs://, file://) opened through pyarrow filesystems
(`filesystem_for`), so local disks and object stores take the same code path.

Readers, without Ray (the callers run them inside Ray tasks / actors):
  * `list_inputs(paths)`: files, directories (recursive, sorted), globs and HF `save_to_disk` directories ->
    ordered `InputFile`s, plus the files a directory scan passed over (other extensions, hidden files) so that
    callers can say which files were skipped instead of ignoring them silently.
  * `iter_lines(uri)`: (1-based line number, bytes) of a possibly compressed text file, streamed in 8 MiB blocks.
  * `parse_json_object(line)`: one JSONL line -> its object, or the reason it is not one.
  * `iter_record_batches(uri, format)`: Arrow record batches of a Parquet file or an HF Arrow file.

Bad-row accounting: readers never drop a row silently; a line that is not UTF-8 or not a JSON object comes back
with one of `READER_REASONS` and a detail, and the caller counts or quarantines it (MLM: `DocChunk.bad_counts`;
contrastive: the quarantine). A file that cannot be read at all is `unreadable_file`.

Publishing outputs (`StagedOutput`): a job writes into a staging location beside its target and publishes only on
success; a failed run leaves the previous output as it was, plus `failure.json`.

Error reporting: Ray re-raises a worker's exception wrapped (RayTaskError, Ray Data's own errors) and Ray Data logs
it with long tracebacks; `pipelines.cli.root_cause` recovers the user-facing cause, and
`ray_data_console_errors_held` keeps those console tracebacks back while the caller reports the error itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fnmatch
import json
import logging
import math
import os
import posixpath
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

FORMATS = ("parquet", "jsonl", "text", "hf_arrow")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
_EXT = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
_EXT.update({".txt": "text", ".text": "text"})
READER_REASONS = {
    "invalid_utf8": "bytes are not valid UTF-8 (or the JSON holds a lone surrogate escape)",
    "malformed_json": "the line is not valid JSON, or not a JSON object",
    "unreadable_file": "the file cannot be opened or decoded as its format",
}
FAILURE_NAME = "failure.json"


class BadRowError(ValueError):
    """One unusable input row; `str(e)` is a single line naming file, 1-based row, field and the fix."""


@dataclasses.dataclass(frozen=True)
class InputFile:
    uri: str  # absolute local path or scheme://bucket/key
    format: str  # one of FORMATS
    name: str  # stable display name used in document ids (relative to the input dir)
    size: int  # bytes


# ----------------------------------------------------------------------------------------------- storage


def is_uri(path: str) -> bool:
    return "://" in path


def absolute_uri(path: str) -> str:
    """Local paths made absolute on the driver (Ray workers may run in another directory); URIs unchanged."""
    return path if is_uri(path) else os.path.abspath(path)


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/key or gs://bucket/key."""
    if is_uri(uri):
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise ValueError(
                f"cannot open filesystem for {uri!r}: {e}; check the scheme (s3://, gs://, hdfs://, file://) "
                "and that pyarrow was built with it and credentials are configured"
            ) from e
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def path_exists(uri: str) -> bool:
    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _join(uri_root: str, path: str, fs_path_root: str) -> str:
    """URI for `path` (a path inside the filesystem) given the URI and fs path of its root."""
    if not is_uri(uri_root):
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


def hf_disk_files(fs: pafs.FileSystem, root: str) -> list[str] | None:
    """Data files of a `datasets` save_to_disk directory in their order (a DatasetDict: every split, in the order
    its dict lists them), or None when `root` is not one. ValueError when its metadata is unreadable."""
    infos = {i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))}
    try:
        if "dataset_dict.json" in infos:
            with fs.open_input_stream(posixpath.join(root, "dataset_dict.json")) as f:
                splits = json.loads(f.read())["splits"]
            return [p for s in splits for p in hf_disk_files(fs, posixpath.join(root, s)) or []]
        if "state.json" in infos:
            with fs.open_input_stream(posixpath.join(root, "state.json")) as f:
                state = json.loads(f.read())
            return [posixpath.join(root, d["filename"]) for d in state["_data_files"]]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{root} is not a readable `datasets` save_to_disk directory ({type(e).__name__}: {e}); re-save it "
            "with Dataset.save_to_disk or convert it to JSONL / Parquet"
        ) from None
    return None


def _supported() -> str:
    return f".parquet, .jsonl/.json/.ndjson or .txt (optionally {'/'.join(COMPRESSION_SUFFIXES)} compressed)"


def list_inputs(
    paths: Sequence[str], formats: Sequence[str] = FORMATS
) -> tuple[list[InputFile], list[dict[str, str]]]:
    """Expand files, directories (recursive), globs (`*`, `?` in the last component) and HF dataset dirs.

    Returns (files in a deterministic order, skipped) where `skipped` lists the files a directory scan passed
    over: `{"file", "reason"}` with reason `hidden_file` or `unsupported_extension`. A file named directly with
    an unsupported extension, a missing path and an empty match are ValueErrors.
    """
    if not paths:
        raise ValueError("no input paths given; pass --input PATH... (files, directories, globs or URIs)")
    out: list[InputFile] = []
    skipped: list[dict[str, str]] = []
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
            given_root, fs_root = (given[: given.rfind("/")] if is_uri(given) else parent), parent
        else:
            info = fs.get_file_info(root)
            if info.type == pafs.FileType.NotFound:
                raise ValueError(f"input path {given!r} does not exist; check --input")
            given_root, fs_root = given, root
            if info.type == pafs.FileType.File:
                found = [(root, posixpath.basename(root), info.size)]
            else:
                hf = hf_disk_files(fs, root) if "hf_arrow" in formats else None
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
                found = []
                infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
                for i in sorted(infos, key=lambda i: i.path):
                    if i.type != pafs.FileType.File:
                        continue
                    rel = posixpath.relpath(i.path, root)
                    if any(part.startswith(".") for part in rel.split("/")):
                        skipped.append({"file": _join(given, i.path, root), "reason": "hidden_file"})
                    elif format_of(i.path) not in formats:
                        skipped.append(
                            {"file": _join(given, i.path, root), "reason": "unsupported_extension"}
                        )
                    else:
                        found.append((i.path, rel, i.size))
                if not found:
                    raise ValueError(
                        f"input directory {given!r} holds no {_supported()} files and is not an HF save_to_disk "
                        f"directory ({len(skipped)} other files)"
                    )
        for path, rel, size in found:
            fmt = format_of(path)
            if fmt is None or fmt not in formats:
                raise ValueError(f"input file {path!r} has an unsupported extension; use {_supported()}")
            uri = _join(given_root, path, fs_root)
            if uri not in seen:
                seen.add(uri)
                out.append(InputFile(uri=uri, format=fmt, name=rel, size=size))
    names = Counter(f.name for f in out)
    return [dataclasses.replace(f, name=f.uri) if names[f.name] > 1 else f for f in out], skipped


def resolve_inputs(paths: Sequence[str]) -> list[InputFile]:
    """`list_inputs` for callers that only need the files; the skipped ones are logged (one line each)."""
    files, skipped = list_inputs(paths)
    log_skipped(skipped)
    return files


def log_skipped(skipped: list[dict[str, str]]) -> None:
    for s in skipped:
        log.warning("input %s skipped: %s (supported: %s)", s["file"], s["reason"], _supported())


def check_no_overlap(inputs: Sequence[str], output: str, *, what: str = "--input") -> None:
    """ValueError when an input lies inside the output location or the output inside an input: the job would
    read what it writes (and publishing would replace the user's data)."""
    out = _norm(output)
    for given in inputs:
        inp = _norm(given.split("*", 1)[0].rstrip("/") if "*" in given else given)
        if inp == out or inp.startswith(out + "/") or out.startswith(inp + "/"):
            raise ValueError(
                f"{what} {given!r} overlaps the output {output!r}: the job never writes where it reads; choose an "
                "output directory outside the inputs (e.g. a sibling directory)"
            )


def _norm(path: str) -> str:
    if is_uri(path):
        return path.rstrip("/")
    return os.path.realpath(os.path.abspath(path)).rstrip("/")


# ----------------------------------------------------------------------------------------------- readers


def iter_lines(uri: str, block_bytes: int = 8 << 20) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) of a possibly compressed file, streamed; the newline and a trailing '\\r' are
    removed, and the file's final newline does not start another line."""
    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path, compression="detect") as stream:
        rest = b""
        lineno = 0
        while True:
            block = stream.read(block_bytes)
            lines = (rest + block).split(b"\n")
            rest = lines.pop() if block else b""
            if not block and lines and not lines[-1]:
                lines.pop()
            for line in lines:
                lineno += 1
                yield lineno, line[:-1] if line.endswith(b"\r") else line
            if not block:
                return


def parse_json_object(line: bytes) -> tuple[dict | None, str, str]:
    """(object, "", "") for a line holding a JSON object, else (None, reason, detail), reason in READER_REASONS."""
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, "invalid_utf8", f"byte {e.start}: {line[e.start : e.start + 8]!r}"
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        return None, "malformed_json", f"{e.msg} at column {e.colno}: {s[:60]!r}"
    if not isinstance(obj, dict):
        return None, "malformed_json", f"expected a JSON object, got {type(obj).__name__}"
    return obj, "", ""


def iter_record_batches(
    uri: str, format: str, *, columns: list[str] | None = None, batch_size: int = 2048
) -> Iterator[pa.RecordBatch]:
    """Record batches of a Parquet file or an HF `save_to_disk` Arrow file (IPC stream, or IPC file)."""
    fs, path = filesystem_for(uri)
    if format == "parquet":
        pf = pq.ParquetFile(fs.open_input_file(path))
        yield from pf.iter_batches(batch_size=batch_size, columns=columns)
        return
    f = fs.open_input_file(path)
    try:
        batches: Iterator[pa.RecordBatch] = iter(pa.ipc.open_stream(f))
    except pa.ArrowInvalid:
        f.seek(0)
        reader = pa.ipc.open_file(f)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    for b in batches:
        yield b.select(columns) if columns is not None else b


def column_names(uri: str, format: str) -> tuple[list[str], int | None]:
    """(column names, row count or None when the format has no footer count) without reading the data."""
    fs, path = filesystem_for(uri)
    if format == "parquet":
        pf = pq.ParquetFile(fs.open_input_file(path))
        return pf.schema_arrow.names, pf.metadata.num_rows
    f = fs.open_input_file(path)
    try:
        return pa.ipc.open_stream(f).schema.names, None
    except pa.ArrowInvalid:
        f.seek(0)
        r = pa.ipc.open_file(f)
        return r.schema.names, sum(r.get_batch(i).num_rows for i in range(r.num_record_batches))


# ----------------------------------------------------------------------------------------------- publishing


class StagedOutput:
    """Write aside, publish on success.

    Local targets: the job writes into `<target>.staging-<id>/` (same parent, so the same filesystem); `publish()`
    renames the previous output to `<target>.old-<id>`, renames the staging dir into place and then removes the
    old one, so the target is always either the complete old or the complete new output. URI targets (object
    stores, where a rename is a copy): the job writes into `<target>/.staging-<id>/`; `publish()` removes the
    previous files listed in `_MANIFEST.json`, moves the new ones into place and writes `_MANIFEST.json` (the
    complete file set) last; readers trust only files the manifest names.

    `fail(error)` removes the staging location and writes `failure.json` (error, time, staging id) into the target,
    leaving every file of the previous output as it was. `owned_marker`: a file name that proves an existing
    local target is an earlier output of this job (a non-empty directory without it is refused, never replaced).
    """

    MANIFEST = "_MANIFEST.json"

    def __init__(self, target: str, *, owned_marker: str):
        self.target = absolute_uri(target).rstrip("/")
        self.id = uuid.uuid4().hex[:12]
        self.remote = is_uri(self.target)
        self.fs, self.root = filesystem_for(self.target)
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise ValueError(f"output {target!r} is a file; give a directory")
        if info.type == pafs.FileType.Directory and not self.remote:
            names = set(os.listdir(self.root))
            if names and not names & {owned_marker, FAILURE_NAME, self.MANIFEST}:
                raise ValueError(
                    f"output {target!r} is a non-empty directory that is not an earlier output of this job (no "
                    f"{owned_marker}); publishing would replace its contents: choose a new or empty directory"
                )
        self.uri = f"{self.target}/.staging-{self.id}" if self.remote else f"{self.target}.staging-{self.id}"
        _, self.staging = filesystem_for(self.uri)
        self.fs.create_dir(self.staging, recursive=True)

    def publish(self) -> None:
        if not self.remote:
            old = f"{self.root}.old-{self.id}"
            had_old = os.path.exists(self.root)
            if had_old:
                os.replace(self.root, old)
            os.replace(self.staging, self.root)
            if had_old:
                shutil.rmtree(old, ignore_errors=True)
            return
        files = sorted(
            posixpath.relpath(i.path, self.staging)
            for i in self.fs.get_file_info(pafs.FileSelector(self.staging, recursive=True))
            if i.type == pafs.FileType.File
        )
        manifest_path = f"{self.root}/{self.MANIFEST}"
        previous: list[str] = []
        if self.fs.get_file_info(manifest_path).type == pafs.FileType.File:
            with self.fs.open_input_stream(manifest_path) as f:
                previous = json.loads(f.read())["files"]
            self.fs.delete_file(manifest_path)  # from here until the new manifest: no complete output
        for rel in previous:
            if self.fs.get_file_info(f"{self.root}/{rel}").type == pafs.FileType.File:
                self.fs.delete_file(f"{self.root}/{rel}")
        for rel in [*files, FAILURE_NAME]:
            if rel == FAILURE_NAME and self.fs.get_file_info(f"{self.root}/{rel}").type == pafs.FileType.File:
                self.fs.delete_file(f"{self.root}/{rel}")
        for rel in files:
            dst = f"{self.root}/{rel}"
            self.fs.create_dir(posixpath.dirname(dst), recursive=True)
            self.fs.move(f"{self.staging}/{rel}", dst)
        self.fs.delete_dir(self.staging)
        with self.fs.open_output_stream(manifest_path) as f:
            f.write(json.dumps({"files": files, "published": _now(), "id": self.id}, indent=2).encode())

    def fail(self, error: BaseException) -> str:
        """Drop the staging location, write failure.json into the target; returns the failure file's URI."""
        with contextlib.suppress(OSError, FileNotFoundError):
            self.fs.delete_dir(self.staging)
        self.fs.create_dir(self.root, recursive=True)
        path = f"{self.root}/{FAILURE_NAME}"
        body = {
            "error": f"{type(error).__name__}: {error}",
            "failed_at": _now(),
            "staging_id": self.id,
            "note": "the previous output in this directory (if any) was left as it was",
        }
        with self.fs.open_output_stream(path) as f:
            f.write(json.dumps(body, indent=2, default=str).encode())
        return f"{self.target}/{FAILURE_NAME}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def published_files(target: str) -> list[str] | None:
    """Relative paths a URI output's `_MANIFEST.json` names, or None when there is no manifest."""
    fs, root = filesystem_for(target)
    path = f"{root.rstrip('/')}/{StagedOutput.MANIFEST}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return list(json.loads(f.read())["files"])


class _DropErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def ray_data_console_errors_held():
    """Ray Data logs a failed task's exception on the console with two long tracebacks before it re-raises it; the
    caller reports that error itself (one `error:` line and failure.json), so the console ERROR records of
    `ray.data` are held back during the run. Ray Data's log file (`<session>/logs/ray-data/`) still has them."""
    import ray.data  # noqa: F401  (configures the `ray.data` loggers)

    drop = _DropErrors()
    handlers = [h for h in logging.getLogger("ray.data").handlers if not isinstance(h, logging.FileHandler)]
    for h in handlers:
        h.addFilter(drop)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(drop)


def jsonable(v: Any) -> Any:
    """Python value from Arrow -> JSON-able; bytes that are not UTF-8 raise UnicodeDecodeError."""
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v
