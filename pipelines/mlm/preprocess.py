"""Ray Data preprocessing: read -> tokenize -> pack -> write Parquet shards + report.

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

Outputs are written aside and published on success (`pipelines.io.StagedOutput`): `run_preprocess` checks its
inputs on the driver first (`check_inputs`: paths exist, no input inside the output or the output inside an
input), packs into a staging location beside OUTPUT and swaps it in at the end. A failed run leaves the previous
OUTPUT as it was, plus `OUTPUT/failure.json`; inputs are never deleted.

Public API: `PreprocessConfig`, `check_inputs(cfg)`, `run_preprocess(cfg) -> report dict`,
`build_packed_datasets(cfg) -> {"train": Dataset, "eval": Dataset}` (on the fly from raw text); reading shards
back is `pipelines.mlm.packed_io.read_packed`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Literal

from neobert.config_io import to_dict
from neobert.schema import SCHEMA_VERSION
from pipelines.embedded import materialize
from pipelines.io import (
    InputFile,
    StagedOutput,
    absolute_uri,
    check_no_overlap,
    list_inputs,
    log_skipped,
    ray_data_console_errors_held,
)
from pipelines.mlm.pack import PackChunks
from pipelines.mlm.read import ReadOptions
from pipelines.mlm.report import PreprocessStats, write_report
from pipelines.mlm.tokenize import SPLITS, TokenizeFiles
from pipelines.mlm.views import view_name, view_path
from pipelines.tokenizer import load_tokenizer

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
    # Length views (run_preprocess only): for each L, OUTPUT/views/min<L>/{train,eval}/ + report.* hold the packed
    # documents of at least L content tokens (e.g. [1024, 2048] for a long-context phase that weights them).
    length_views: list[int] = dataclasses.field(default_factory=list)

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
        if isinstance(self.length_views, int):
            self.length_views = [self.length_views]
        if any(not isinstance(v, int) or v < 1 for v in self.length_views) or len(
            set(self.length_views)
        ) != len(self.length_views):
            raise bad("length_views", "must be distinct positive token counts, e.g. [1024, 2048]")

    def read_options(self) -> ReadOptions:
        return ReadOptions(
            text_column=self.text_column,
            id_column=self.id_column,
            text_split=self.text_split,
            on_bad_row=self.on_bad_row,
            chunk_docs=self.chunk_docs,
        )


def list_input_files(cfg: PreprocessConfig) -> tuple[list[InputFile], list[dict[str, str]]]:
    """(ordered input units, files a directory scan skipped); with no `cfg.input`, the embedded corpus."""
    if cfg.input:
        return list_inputs(cfg.input)
    return list_inputs([str(p) for p in materialize().mlm_files])


def input_files(cfg: PreprocessConfig) -> list[InputFile]:
    """The ordered input units (skipped files are logged)."""
    files, skipped = list_input_files(cfg)
    log_skipped(skipped)
    return files


def check_inputs(cfg: PreprocessConfig) -> tuple[list[InputFile], list[dict[str, str]]]:
    """Cheap driver-side checks to run before Ray starts: every input exists and lists at least one file, no input
    overlaps the output, and the tokenizer loads. Raises ValueError with the fix; returns `list_input_files`."""
    files, skipped = list_input_files(cfg)
    if cfg.input:
        check_no_overlap(cfg.input, cfg.output)
    if cfg.tokenizer:
        load_tokenizer(cfg.tokenizer)
    return files, skipped


# --------------------------------------------------------------------------------------------------- wiring


def _packed_stream(
    cfg: PreprocessConfig,
    files: list[InputFile],
    splits: tuple[str, ...],
    output_uri: str | None,
    stream: int = 0,
    num_streams: int = 1,
    published_uri: str | None = None,
    min_doc_tokens: int = 0,
):  # -> ray.data.Dataset
    """One tokenize -> pack pipeline over `files` (unit indices are local to this stream); `min_doc_tokens` > 0
    keeps only documents of at least that many content tokens (a length view)."""
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
            min_doc_tokens=min_doc_tokens,
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
            published_uri=published_uri,
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


def run_preprocess(cfg: PreprocessConfig) -> dict[str, Any]:
    """Tokenize + pack `cfg.input` into `cfg.output/{train,eval}/part-*.parquet`, write report.json/.html.

    Everything is written into a staging location beside `cfg.output` and published when complete; on any error
    the previous output stays as it was and `cfg.output/failure.json` says what failed. Returns the report dict.
    Raises ValueError when no training pack was produced (nothing is published then).
    """
    t0 = time.perf_counter()
    files, skipped = check_inputs(cfg)
    log_skipped(skipped)
    output = absolute_uri(cfg.output)
    stage = StagedOutput(output, owned_marker="report.json")
    try:
        with ray_data_console_errors_held():
            report = _preprocess_into(cfg, files, skipped, stage.uri, output, t0)
    except BaseException as e:
        where = stage.fail(e)
        log.error("preprocess failed; the previous output (if any) is unchanged; see %s", where)
        raise
    stage.publish()
    log.info(
        "preprocess done in %.1fs: %d documents, %d packs, fill %.4f; report %s/report.html",
        report["elapsed_s"], report["documents"], report["packs"], report["fill_ratio"] or 0.0, output,
    )  # fmt: skip
    return report


def _pack_all(
    cfg: PreprocessConfig,
    files: list[InputFile],
    splits: tuple[str, ...],
    staging: str,
    output: str,
    min_doc: int,
) -> PreprocessStats:
    """Run the packer streams writing under `staging` (report paths name `output`); merged statistics."""
    # Files dealt round-robin to independent packer streams (deterministic for a given num_pack_streams).
    n = min(cfg.num_pack_streams, len(files))
    streams = [
        _packed_stream(cfg, files[p::n], splits, staging, p, n, output, min_doc_tokens=min_doc)
        for p in range(n)
    ]
    ds = streams[0].union(*streams[1:]) if n > 1 else streams[0]
    rows = ds.take_all()  # tiny metadata rows, one per shard
    final = [r for r in rows if r["shard"] == -1]
    assert len(final) == n, f"expected {n} statistics rows from the packers, got {len(final)}"
    stats = PreprocessStats(cfg.pack_tokens, splits)
    for r in final:
        stats.merge_state(json.loads(r["stats_json"]))
    for s in stats.splits.values():
        s.shards.sort(key=lambda x: x["path"])
    return stats


def _preprocess_into(
    cfg: PreprocessConfig,
    files: list[InputFile],
    skipped: list[dict[str, str]],
    staging: str,
    output: str,
    t0: float,
) -> dict[str, Any]:
    """The whole run, writing shards and the report under `staging`; paths in the report name `output`."""
    splits = SPLITS if cfg.eval_fraction > 0 else ("train",)
    log.info("preprocess: %d input files -> %s", len(files), output)
    report = _pack_all(cfg, files, splits, staging, output, 0).to_dict()
    elapsed = time.perf_counter() - t0
    warnings = [f"input file {s['file']} skipped: {s['reason']}" for s in skipped]
    if cfg.eval_fraction > 0 and not report["splits"]["eval"]["documents"]:
        warnings.append(
            f"the eval split is empty: eval_fraction={cfg.eval_fraction} selected 0 of {report['documents']} "
            "documents (the split is a stable hash of each document id); raise --eval-fraction or add documents"
        )
    for w in warnings:
        log.warning("preprocess: %s", w)
    common = {
        "pack_tokens": cfg.pack_tokens,  # the contract jobs/pretrain.py checks (pipelines.contracts)
        "inputs": [dataclasses.asdict(f) for f in files],
        "skipped_input_files": skipped,
        "config": to_dict(cfg),
    }
    report = {
        "schema_version": SCHEMA_VERSION,
        "output": output,
        "warnings": warnings,
        **report,
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(report["tokens"] / elapsed, 1) if elapsed > 0 else None,
        **common,
    }
    if not report["splits"]["train"]["packs"]:
        raise ValueError(
            f"no training packs were produced from {len(files)} input files ({report['skipped_rows']['total']} "
            f"rows skipped: {report['skipped_rows']['by_reason']}); check --text-column / inputs"
        )
    views = {}
    for length in cfg.length_views:
        name, where = view_name(length), view_path(output, length)
        v = _pack_all(cfg, files, splits, view_path(staging, length), where, length).to_dict()
        view_warnings = []
        if not v["splits"]["train"]["packs"]:
            view_warnings.append(f"length view {name}: no document has >= {length} tokens; the view is empty")
            log.warning("preprocess: %s", view_warnings[-1])
        v = {"schema_version": SCHEMA_VERSION, "output": where, "min_doc_tokens": length,
             "warnings": view_warnings, **v, **common}  # fmt: skip
        write_report(v, view_path(staging, length))
        views[name] = {k: v[k] for k in ("min_doc_tokens", "documents", "tokens", "packs", "output")}
        report["warnings"] += view_warnings
    if views:
        report["length_views"] = views
    write_report(report, staging)
    return report
