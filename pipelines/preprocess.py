"""Ray Data preprocessing: read -> tokenize -> pack -> write Parquet shards + report, and read them back.

Plan (one streaming Ray Dataset, `preserve_order=True`):

    from_items(input files, one block each)                    driver: ordered list of *units* (files)
      .map_batches(TokenizeFiles, batch_size=1, actor pool)    read + split train/eval + tokenize + segment;
                                                               one CHUNK_SCHEMA row per chunk of documents
      .map_batches(PackChunks, actor pool of size 1)           best-fit-decreasing packing over a bounded
                                                               buffer, in stream order; writes shards or
                                                               yields packed rows

Why a single packer actor per stream: packing costs ~10% of a tokenizer core per tokenizer core (one packer
saturates near 10 tokenizer cores; `num_pack_streams` deals files to independent streams), and a single ordered
consumer makes the packs depend only on the (deterministic) sequence of segments — never on Ray's block boundaries, batch sizes or
which tokenizer actor finished first — while one global buffer keeps every pack but the last >= `pack_close_fill`
full. The packer checks that chunks arrive exactly in (unit, chunk) order and fails loudly otherwise (e.g. after
an actor restart lost its state) instead of writing different data. Shard files are written by the packer with
deterministic names (`part-00000.parquet`, ...) and fixed writer settings, so a re-run gives bit-identical files.

Memory: each tokenizer actor holds one chunk (`chunk_docs` documents) at a time; the packer holds at most
`pack_buffer_segments` segments plus one shard; Ray Data's backpressure bounds what sits in between. Nothing is
materialized except the tiny per-shard metadata rows the driver collects for the report.

Public API: `PreprocessConfig`, `run_preprocess(cfg) -> report dict`, `build_packed_datasets(cfg) -> {"train":
Dataset, "eval": Dataset}` (on the fly from raw text), `read_packed(path, split) -> Dataset` (validated).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from neobert.config_io import to_dict
from neobert.schema import (
    PACKED_SCHEMA,
    SCHEMA_VERSION,
    PackedSchemaError,
    check_schema_version,
    validate_packed_table,
)
from pipelines.pack import StreamingPacker, packs_to_table
from pipelines.read import InputFile, ReadOptions, filesystem_for, resolve_inputs
from pipelines.report import PreprocessStats, write_report
from pipelines.tokenize import SPLITS, TokenizeFiles

log = logging.getLogger(__name__)

COMPRESSIONS = ("zstd", "snappy", "gzip", "lz4", "brotli", "none")
_MAX_SHARD_TOKENS = 1 << 28  # int32 list offsets and a bounded packer memory


@dataclasses.dataclass
class PreprocessConfig:
    input: list[str] = dataclasses.field(default_factory=list)  # files/dirs/globs/URIs; [] = embedded corpus
    output: str = "outputs/preprocessed"  # run_preprocess writes OUTPUT/{train,eval}/*.parquet + report.*
    tokenizer: str = ""  # tokenizer.json or a dir holding one; "" = bundled bert-base-uncased WordPiece
    text_column: str = "text"  # JSONL key / Parquet or HF column holding the document text
    id_column: str = "id"  # document id column if present ("" = none); else "<file>:<row>"
    text_split: Literal["paragraph", "line", "file"] = "paragraph"  # what one document is in .txt inputs
    max_seq_len: int = 1024  # longest segment incl. [CLS]/[SEP]; longer documents are split
    min_seq_len: int = 16  # shorter segments (tails, tiny documents) are dropped and counted
    pack_tokens: int = 8192  # tokens per packed row (upper bound)
    pack_buffer_segments: int = 4096  # best-fit-decreasing buffer size (segments)
    pack_close_fill: float = 0.995  # a pack leaves the buffer once this full (see pipelines/pack.py)
    eval_fraction: float = 0.01  # share of documents (by stable hash of id) in the eval split; 0 = none
    seed: int = 0  # salt of the eval-split hash
    on_bad_row: Literal["error", "skip"] = "error"  # bad rows/files: raise, or count + report and go on
    rows_per_shard: int = 512  # packs per Parquet shard
    row_group_rows: int = 64  # packs per Parquet row group (the read-back streaming granularity)
    compression: str = "zstd"  # Parquet codec
    chunk_docs: int = 512  # documents per tokenizer batch
    num_tokenizers: int = 0  # fixed tokenizer actor pool size; 0 = autoscale 1..min(#files, cluster CPUs)
    tokenizer_num_cpus: float = 1.0  # logical CPUs per tokenizer actor
    num_pack_streams: int = 1  # run_preprocess: independent packers over files dealt round-robin (scale-out)
    # Full contract check (`validate_packed_table`, O(tokens)) of the packer's output: "first" shard of each split
    # (catches a systematic bug at once) or "all" shards (~40% of the packer's CPU time, measured). Every shard
    # also gets O(rows) bound checks, and `read_packed` validates every row group it reads.
    validate_shards: Literal["first", "all"] = "first"

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"PreprocessConfig.{key}={getattr(self, key)!r}: {why}")

        if isinstance(self.input, str):
            self.input = [self.input]
        if not all(isinstance(p, str) and p for p in self.input):
            raise bad("input", "must be a list of non-empty path strings")
        if not self.output:
            raise bad("output", "must be a directory path or URI")
        if not self.text_column:
            raise bad("text_column", "must name the text column")
        if self.max_seq_len < 3:
            raise bad("max_seq_len", "must be >= 3 ([CLS] + 1 token + [SEP])")
        if not 3 <= self.min_seq_len <= self.max_seq_len:
            raise bad("min_seq_len", f"must be in [3, max_seq_len={self.max_seq_len}]")
        if self.pack_tokens < self.max_seq_len:
            raise bad(
                "pack_tokens", f"must be >= max_seq_len={self.max_seq_len} so every segment fits a pack"
            )
        if self.pack_buffer_segments < 2 * -(-self.pack_tokens // self.min_seq_len):
            raise bad(
                "pack_buffer_segments",
                f"must be >= 2 * ceil(pack_tokens / min_seq_len) = {2 * -(-self.pack_tokens // self.min_seq_len)} "
                "so that a buffer can fill at least one pack",
            )
        if not 0.5 <= self.pack_close_fill <= 1.0:
            raise bad("pack_close_fill", "must be in [0.5, 1]")
        if not 0.0 <= self.eval_fraction <= 0.5:
            raise bad("eval_fraction", "must be in [0, 0.5]")
        if self.on_bad_row not in ("error", "skip"):
            raise bad("on_bad_row", "must be 'error' or 'skip'")
        if self.text_split not in ("paragraph", "line", "file"):
            raise bad("text_split", "must be 'paragraph', 'line' or 'file'")
        if self.rows_per_shard < 1 or self.rows_per_shard * self.pack_tokens > _MAX_SHARD_TOKENS:
            raise bad(
                "rows_per_shard", f"must be >= 1 and rows_per_shard * pack_tokens <= {_MAX_SHARD_TOKENS}"
            )
        if self.row_group_rows < 1:
            raise bad("row_group_rows", "must be >= 1")
        if self.compression not in COMPRESSIONS:
            raise bad("compression", f"must be one of {COMPRESSIONS}")
        if self.chunk_docs < 1:
            raise bad("chunk_docs", "must be >= 1")
        if self.num_tokenizers < 0:
            raise bad("num_tokenizers", "must be >= 0 (0 = autoscale)")
        if self.tokenizer_num_cpus <= 0:
            raise bad("tokenizer_num_cpus", "must be > 0")
        if self.num_pack_streams < 1:
            raise bad("num_pack_streams", "must be >= 1")
        if self.validate_shards not in ("first", "all"):
            raise bad("validate_shards", "must be 'first' or 'all'")

    def read_options(self) -> ReadOptions:
        return ReadOptions(
            text_column=self.text_column,
            id_column=self.id_column,
            text_split=self.text_split,
            on_bad_row=self.on_bad_row,
            chunk_docs=self.chunk_docs,
        )


def absolute_uri(path: str) -> str:
    """Local paths made absolute on the driver (Ray workers may run in another directory); URIs unchanged."""
    return path if "://" in path else os.path.abspath(path)


def input_files(cfg: PreprocessConfig) -> list[InputFile]:
    """The ordered input units; with no `cfg.input`, the embedded corpus (`pipelines.embedded`)."""
    if cfg.input:
        return resolve_inputs(cfg.input)
    from pipelines.embedded import materialize

    return resolve_inputs([str(p) for p in materialize().mlm_files])


# --------------------------------------------------------------------------------------------------- packer


WRITE_RESULT_SCHEMA = pa.schema(
    [
        pa.field("split", pa.string()),
        pa.field("shard", pa.int32()),  # -1 on the final row, which carries the statistics
        pa.field("path", pa.string()),
        pa.field("num_rows", pa.int64()),
        pa.field("num_tokens", pa.int64()),
        pa.field("stats_json", pa.string()),
    ]
)


def shard_path(output_uri: str, split: str, index: int, stream: int = 0, num_streams: int = 1) -> str:
    name = f"part-{index:05d}" if num_streams == 1 else f"part-s{stream:03d}-{index:05d}"
    return f"{output_uri.rstrip('/')}/{split}/{name}.parquet"


class PackChunks:
    """Ray Data actor (pool of exactly one): CHUNK_SCHEMA rows in stream order -> packed shards.

    With `output_uri`, writes each shard as Parquet and yields one WRITE_RESULT_SCHEMA row per shard, plus a final
    row with the statistics (`PreprocessStats.state()`). Without, yields the packed rows (PACKED_SCHEMA, one split).
    `stream` / `num_streams`: this packer's index among independent packer streams (shard file names).
    """

    def __init__(
        self,
        *,
        num_units: int,
        pack_tokens: int,
        max_seq_len: int,
        buffer_segments: int,
        close_fill: float,
        rows_per_shard: int,
        splits: tuple[str, ...],
        output_uri: str | None = None,
        compression: str = "zstd",
        row_group_rows: int = 64,
        stream: int = 0,
        num_streams: int = 1,
        validate_shards: str = "first",
    ):
        self.stream, self.num_streams = stream, num_streams
        self.validate_all = validate_shards == "all"
        self.num_units, self.pack_tokens, self.max_seq_len = num_units, pack_tokens, max_seq_len
        self.rows_per_shard, self.splits, self.output_uri = rows_per_shard, tuple(splits), output_uri
        self.compression, self.row_group_rows = compression, row_group_rows
        self.packers = {s: StreamingPacker(pack_tokens, buffer_segments, close_fill) for s in self.splits}
        self.pending: dict[str, list[list[np.ndarray]]] = {s: [] for s in self.splits}
        self.next_shard = dict.fromkeys(self.splits, 0)
        self.stats = PreprocessStats(pack_tokens, self.splits)
        self.expect = (0, 0)
        self.finished = False
        self.fs = filesystem_for(output_uri) if output_uri else None

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        list_cols = ("tokens", "seg_lengths", "seg_split", "doc_lengths", "doc_split")
        cols = {n: batch.column(n).combine_chunks() for n in list_cols}
        units = batch.column("unit").to_pylist()
        chunks = batch.column("chunk").to_pylist()
        lasts = batch.column("last").to_pylist()
        stats = batch.column("stats_json").to_pylist()
        for r in range(batch.num_rows):
            if self.finished or (units[r], chunks[r]) != self.expect:
                raise RuntimeError(
                    f"packer received unit {units[r]} chunk {chunks[r]} but expected {self.expect} "
                    f"(finished={self.finished}): chunks must arrive in stream order. This happens when "
                    "preserve_order is off (Ray Train's DataConfig replaces a dataset's execution options: pass "
                    "DataConfig(execution_options=ExecutionOptions(preserve_order=True))), the packer actor runs "
                    "tasks out of order (allow_out_of_order_execution) or was restarted; packing would not be "
                    "deterministic"
                )
            self.expect = (units[r] + 1, 0) if lasts[r] else (units[r], chunks[r] + 1)
            row = {n: _row_values(a, r) for n, a in cols.items()}
            self.stats.add_chunk(json.loads(stats[r]), row["doc_lengths"], row["doc_split"])
            seg_len = row["seg_lengths"].astype(np.int64)
            for split in self.splits:
                sel = row["seg_split"] == SPLITS.index(split)
                if not sel.any():
                    continue
                tokens = row["tokens"][np.repeat(sel, seg_len)]  # copy: never hold views of Ray's buffers
                self.pending[split].extend(self.packers[split].add(tokens, seg_len[sel]))
                yield from self._emit(split, final=False)
            if lasts[r] and units[r] == self.num_units - 1:
                self.finished = True
                for split in self.splits:
                    self.pending[split].extend(self.packers[split].finish())
                    yield from self._emit(split, final=True)
                if self.output_uri:
                    yield _result_row("", -1, "", 0, 0, json.dumps(self.stats.state()))
                else:
                    log.info("packed on the fly: %s", json.dumps(self.stats.to_dict())[:2000])

    def _emit(self, split: str, final: bool) -> Iterator[pa.Table]:
        pending = self.pending[split]
        while len(pending) >= self.rows_per_shard or (final and pending):
            packs, self.pending[split] = pending[: self.rows_per_shard], pending[self.rows_per_shard :]
            pending = self.pending[split]
            table = packs_to_table(packs)
            index = self.next_shard[split]
            self.next_shard[split] += 1
            where = shard_path(self.output_uri or "<stream>", split, index, self.stream, self.num_streams)
            nt = table.column("num_tokens").to_numpy()
            if self.validate_all or index == 0:
                validate_packed_table(
                    table, source=where, pack_tokens=self.pack_tokens, max_seq_len=self.max_seq_len
                )
            else:
                _check_pack_bounds(table, where, self.pack_tokens, self.max_seq_len)
            self.stats.add_packs(split, nt, table.column("num_segments").to_numpy())
            if not self.output_uri:
                yield table
                continue
            fs, root = self.fs
            path = shard_path(root, split, index, self.stream, self.num_streams)
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(path) as f:
                pq.write_table(
                    table,
                    f,
                    row_group_size=self.row_group_rows,
                    compression=self.compression,
                    write_statistics=False,
                )
            self.stats.add_shard(split, where, table.num_rows, int(nt.sum()))
            yield _result_row(split, index, where, table.num_rows, int(nt.sum()), None)


def _check_pack_bounds(table: pa.Table, source: str, pack_tokens: int, max_seq_len: int) -> None:
    """O(rows) checks of a shard built by `packs_to_table` (whose construction guarantees the rest)."""
    nt = table.column("num_tokens").to_numpy()
    ms = table.column("max_seqlen").to_numpy()
    ns = table.column("num_segments").to_numpy()
    for name, bad, want in (
        ("num_tokens", (nt <= 0) | (nt > pack_tokens), f"in [1, pack_tokens={pack_tokens}]"),
        ("max_seqlen", (ms <= 0) | (ms > max_seq_len) | (ms > nt), f"in [1, min(num_tokens, {max_seq_len})]"),
        ("num_segments", (ns <= 0) | (ns > nt), "in [1, num_tokens]"),
    ):
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise PackedSchemaError(
                f"{source}, row {r}, field {name!r}: value {int(table.column(name)[r].as_py())} must be {want}; "
                "this is a bug in pipelines/pack.py (packs_to_table), please report it"
            )


def _row_values(arr: pa.ListArray, r: int) -> np.ndarray:
    off = arr.offsets
    return arr.values.slice(off[r].as_py(), off[r + 1].as_py() - off[r].as_py()).to_numpy(
        zero_copy_only=False
    )


def _result_row(split: str, shard: int, path: str, rows: int, tokens: int, stats: str | None) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "split": split,
                "shard": shard,
                "path": path,
                "num_rows": rows,
                "num_tokens": tokens,
                "stats_json": stats,
            }
        ],
        schema=WRITE_RESULT_SCHEMA,
    )


# --------------------------------------------------------------------------------------------------- wiring


def _packed_stream(
    cfg: PreprocessConfig,
    files: list[InputFile],
    splits: tuple[str, ...],
    output_uri: str | None,
    stream: int = 0,
    num_streams: int = 1,
):  # -> ray.data.Dataset
    """One tokenize -> pack pipeline over `files` (unit indices are local to this stream)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    items = [
        {"unit": i, "uri": f.uri, "format": f.format, "name": f.name, "size": f.size}
        for i, f in enumerate(files)
    ]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds.context.execution_options.preserve_order = True  # this dataset's own context copy
    # Two units in flight per actor: the next file is already queued on the actor when one finishes. With one,
    # every unit waited ~0.15 s for the executor loop to dispatch the next (measured: ~8% of an actor's time).
    if cfg.num_tokenizers > 0:
        size = max(1, cfg.num_tokenizers // num_streams)
        pool = ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=2)
    else:
        # Autoscale 1..N: never waits for CPUs that Ray Train workers hold, grows when they are free. Ray's
        # utilization is tasks in flight / actors, so upscale as soon as every actor is busy (the default
        # threshold of 175% needs 2+ tasks per actor).
        cpus = int(ray.cluster_resources().get("CPU", 1) // cfg.tokenizer_num_cpus) // num_streams
        pool = ray.data.ActorPoolStrategy(
            min_size=1, max_size=max(1, min(len(files), cpus)), max_tasks_in_flight_per_actor=2
        )
        ds.context.autoscaling_config.actor_pool_util_upscaling_threshold = 0.5
    if cfg.tokenizer:
        from pipelines.tokenizer import load_tokenizer

        load_tokenizer(cfg.tokenizer)  # fail on the driver, with the path in the message, not in an actor
    ds = ds.map_batches(
        TokenizeFiles,
        batch_size=1,
        batch_format="pyarrow",
        compute=pool,
        num_cpus=cfg.tokenizer_num_cpus,
        fn_constructor_kwargs=dict(
            tokenizer_path=absolute_uri(cfg.tokenizer) if cfg.tokenizer else None,
            max_seq_len=cfg.max_seq_len,
            min_seq_len=cfg.min_seq_len,
            read_options=cfg.read_options(),
            eval_fraction=cfg.eval_fraction,
            seed=cfg.seed,
            splits=splits,
        ),
    )
    # The packer is light (~1% of tokenization) and must be exactly one actor: 0 logical CPUs so it never
    # competes with the tokenizers for scheduling slots. Ray Data lets actor tasks run out of submission order
    # by default (`allow_out_of_order_execution=True`; preserve_order only reorders *outputs*): a stateful,
    # order-dependent actor must turn that off. `max_restarts=0`: a restarted packer would have lost its buffer,
    # so fail loudly instead of retrying.
    return ds.map_batches(
        PackChunks,
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0,
        allow_out_of_order_execution=False,
        max_restarts=0,
        fn_constructor_kwargs=dict(
            num_units=len(files),
            pack_tokens=cfg.pack_tokens,
            max_seq_len=cfg.max_seq_len,
            buffer_segments=cfg.pack_buffer_segments,
            close_fill=cfg.pack_close_fill,
            rows_per_shard=cfg.rows_per_shard,
            splits=splits,
            output_uri=output_uri,
            compression=cfg.compression,
            row_group_rows=cfg.row_group_rows,
            stream=stream,
            num_streams=num_streams,
            validate_shards=cfg.validate_shards,
        ),
    )


def build_packed_datasets(cfg: PreprocessConfig) -> dict[str, Any]:
    """Lazy, streaming packed datasets straight from raw text: {"train": Dataset[, "eval": Dataset]}.

    Each split is its own pipeline whose readers skip the other split's documents before tokenizing them, so
    consuming only "train" never tokenizes eval documents (and vice versa). Rows follow PACKED_SCHEMA.
    The datasets need `preserve_order=True` (set here); Ray Train's `DataConfig` replaces execution options, so
    pass it `execution_options=ExecutionOptions(preserve_order=True)` (the packer refuses out-of-order input).
    """
    files = input_files(cfg)
    if cfg.num_pack_streams > 1:
        log.warning("num_pack_streams=%d has no effect on the on-the-fly path (one ordered packer per split)",
                    cfg.num_pack_streams)  # fmt: skip
    out = {"train": _packed_stream(cfg, files, ("train",), None)}
    if cfg.eval_fraction > 0:
        out["eval"] = _packed_stream(cfg, files, ("eval",), None)
    return out


def _clear_outputs(output_uri: str) -> None:
    """Overwrite mode: remove earlier shards and report (only our files; anything else is left alone)."""
    fs, root = filesystem_for(output_uri)
    for split in SPLITS:
        for path in _parquet_files(fs, f"{root}/{split}"):
            fs.delete_file(path)
    for name in ("report.json", "report.html"):
        if fs.get_file_info(f"{root}/{name}").type == pafs.FileType.File:
            fs.delete_file(f"{root}/{name}")


def run_preprocess(cfg: PreprocessConfig) -> dict[str, Any]:
    """Tokenize + pack `cfg.input` into `cfg.output/{train,eval}/part-*.parquet`, write report.json/.html.

    Returns the report dict. Raises ValueError when no training pack was produced (the report is still written).
    """
    t0 = time.perf_counter()
    files = input_files(cfg)
    splits = SPLITS if cfg.eval_fraction > 0 else ("train",)
    output = absolute_uri(cfg.output)
    _clear_outputs(output)
    log.info("preprocess: %d input files -> %s", len(files), output)
    # Files dealt round-robin to independent packer streams (deterministic for a given num_pack_streams).
    n = min(cfg.num_pack_streams, len(files))
    streams = [_packed_stream(cfg, files[p::n], splits, output, p, n) for p in range(n)]
    ds = streams[0].union(*streams[1:]) if n > 1 else streams[0]
    rows = ds.take_all()  # tiny metadata rows, one per shard
    final = [r for r in rows if r["shard"] == -1]
    assert len(final) == n, f"expected {n} statistics rows from the packers, got {len(final)}"
    elapsed = time.perf_counter() - t0
    stats = PreprocessStats(cfg.pack_tokens, splits)
    for r in final:
        stats.merge_state(json.loads(r["stats_json"]))
    for s in stats.splits.values():
        s.shards.sort(key=lambda x: x["path"])
    report = stats.to_dict()
    report = {
        "schema_version": SCHEMA_VERSION,
        "output": output,
        **report,
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(report["tokens"] / elapsed, 1) if elapsed > 0 else None,
        "inputs": [dataclasses.asdict(f) for f in files],
        "config": to_dict(cfg),
    }
    paths = write_report(report, output)
    log.info(
        "preprocess done in %.1fs: %d documents, %d packs, fill %.4f; report %s",
        elapsed,
        report["documents"],
        report["packs"],
        report["fill_ratio"] or 0.0,
        paths[1],
    )
    if not report["splits"]["train"]["packs"]:
        raise ValueError(
            f"no training packs were produced from {len(files)} input files ({report['skipped_rows']['total']} "
            f"rows skipped: {report['skipped_rows']['by_reason']}); see {paths[1]} and check --text-column / inputs"
        )
    return report


# --------------------------------------------------------------------------------------------------- read back


def _read_packed_files(batch: pa.Table) -> Iterator[pa.Table]:
    """Ray task: stream the row groups of each Parquet shard, validating every one against the contract."""
    for uri in batch.column("uri").to_pylist():
        fs, path = filesystem_for(uri)
        pf = pq.ParquetFile(fs.open_input_file(path))
        check_schema_version(pf.schema_arrow.metadata, source=uri)
        offset = 0
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g)
            validate_packed_table(table, source=uri, row_offset=offset)
            offset += table.num_rows
            yield table


def _parquet_files(fs: pafs.FileSystem, directory: str) -> list[str]:
    """Sorted paths (inside `fs`) of the .parquet files directly under `directory`; [] when it does not exist."""
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))


def has_packed_split(path: str, split: str) -> bool:
    """Whether `path/split` holds a .parquet shard (local path or any pyarrow-filesystem URI); no footer read."""
    fs, root = filesystem_for(path)
    return bool(_parquet_files(fs, f"{root.rstrip('/')}/{split}"))


def packed_files(path: str, split: str = "train") -> list[str]:
    """Shard URIs of `path/split`, sorted, after checking each file's schema version (footers only)."""
    fs, root = filesystem_for(path)
    files = _parquet_files(fs, f"{root.rstrip('/')}/{split}")
    if not files:
        raise ValueError(
            f"no Parquet shards under {path}/{split}; build them with `python jobs/preprocess.py --output {path}` "
            "(the eval split exists only when eval_fraction > 0)"
        )
    uris = [f if "://" not in path else f"{path.rstrip('/')}/{split}/{f.rsplit('/', 1)[1]}" for f in files]

    def check(i: int) -> None:
        check_schema_version(pq.read_schema(files[i], filesystem=fs).metadata, source=uris[i])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(check, range(len(files))))
    return uris


def read_packed(path: str, split: str = "train", *, num_cpus: float = 0.25):  # -> ray.data.Dataset
    """Ray Dataset of packed rows (PACKED_SCHEMA) from `path/split`, in file and row order.

    The schema version of every shard is checked up front; each row group is validated against the contract as
    it streams (an error names file, row and field). `num_cpus` per read task is small so that reading never
    starves Ray Train workers of scheduling slots on small machines.
    """
    import ray

    uris = packed_files(path, split)
    ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=len(uris))
    ds.context.execution_options.preserve_order = True  # deterministic order for resumable training
    return ds.map_batches(_read_packed_files, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus)


__all__ = [
    "PACKED_SCHEMA",
    "PackChunks",
    "PreprocessConfig",
    "build_packed_datasets",
    "has_packed_split",
    "packed_files",
    "read_packed",
    "run_preprocess",
]
