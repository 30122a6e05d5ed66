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
     that `pipelines.contrastive.report` merges into `report.json` / `report.html`.
Only the key table (step 3) and the BEIR id maps are held whole; see docs/contrastive_data.md.

Outputs are written aside and published on success (`pipelines.io.StagedOutput`): the sources are resolved and
checked first, a source inside OUTPUT is refused, and a run that fails leaves the previous OUTPUT as it was plus
`failure.json`. A run that completes but fails the reject threshold is still published (marker passed=false).

This module holds the per-row validator, the finalizer and the two engines: one concept (deciding where each row
ends up, and publishing that), hence its length; the cross-row steps (dedup, negative counts) are in
`pipelines.contrastive.dedup`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import shutil
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from neobert.config_io import to_dict
from pipelines.contrastive import report as rep
from pipelines.contrastive.dedup import KEY_COLUMNS, add_key_bucket, expected_negative_counts, find_duplicates
from pipelines.contrastive.rules import (
    BLANK_LINE,
    NUMERIC_IDS,
    RowRejected,
    check_text,
    compare_key,
    pair_key,
    short,
)
from pipelines.contrastive.sources import (
    BeirJoiner,
    ResolvedSource,
    SourceConfig,
    ValidateContrastiveConfig,
    _rel_file,
    iter_raw_file,
    read_raw_sources,
    resolve_source,
)
from pipelines.io import StagedOutput, check_no_overlap, parse_json_object, ray_data_console_errors_held
from pipelines.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

MARKER_NAME = "_VALIDATED.json"
REPORT_NAME = "report.json"
CONTRASTIVE_SCHEMA_VERSION = 1
DEDUP_ROWS_PER_BUCKET = 1_000_000  # key-table rows per hash bucket of the duplicate search (~36 MB)


def parse_record(raw: bytes, cfg: SourceConfig, kind: str) -> tuple[str, str, list[str]]:
    """Raw bytes of one record -> normalized (query, positive, negatives); raises RowRejected. Pure."""
    rec, reason, detail = parse_json_object(raw)
    if rec is None:
        raise RowRejected(reason, detail)
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
    query = check_text(rec[qc], qc)
    positive = check_text(rec[pc], pc)
    neg = rec.get(nc)
    if neg is None:
        negs_in: list = []
    elif isinstance(neg, str):
        negs_in = [neg]
    elif isinstance(neg, list):
        negs_in = neg
    else:
        raise RowRejected(
            "wrong_type", f"{nc} is {type(neg).__name__} ({short(neg)}), expected string or list"
        )
    negatives = [check_text(n, f"{nc}[{i}]") for i, n in enumerate(negs_in)]
    if compare_key(query) == compare_key(positive):
        raise RowRejected("positive_equals_query", f"{pc} equals {qc}: {short(positive)}")
    pk = compare_key(positive)
    for i, n in enumerate(negatives):
        if compare_key(n) == pk:
            raise RowRejected("negative_equals_positive", f"{nc}[{i}] equals {pc}: {short(n)}")
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
        self.sources, self.kinds = sources, kinds
        self.max_seq_len, self.truncation, self.tokenize = max_seq_len, truncation, tokenize
        self.tok = load_tokenizer(tokenizer or None)
        # ids only (no offsets: about half the time); `_truncate` re-encodes the few over-long texts with offsets
        self._encode_batch = self.tok.encode_batch_fast
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
        encs = iter(self._encode_batch(texts)) if texts else iter(())
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
                        cut = self._truncate(texts_i[j], self.tok.encode(texts_i[j]))  # with offsets
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


class ContrastiveFinalizer:
    """Map-batches sink over staged rows: decide duplicates + negative counts, write valid / quarantine part files,
    return one row per batch with JSON statistics (merged by `pipelines.contrastive.report`)."""

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
        if isinstance(batch, dict):
            batch = pa.table(batch)
        cols = batch.to_pydict()
        valid: dict[str, list] = {f.name: [] for f in self.valid_schema}
        quar: dict[str, list] = {f.name: [] for f in QUARANTINE_SCHEMA}
        stats: dict[str, dict] = {}
        for i in range(batch.num_rows):
            si, src = cols["source_index"][i], cols["source"][i]
            st = stats.setdefault(src, rep.new_source_stats())
            reason, detail = cols["reason"][i], cols["detail"][i]
            if reason == BLANK_LINE:
                st["blank_lines_skipped"] += 1
                continue
            if reason == NUMERIC_IDS:
                st["numeric_ids_normalized"] += int(detail)
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


class RejectThresholdExceeded(RuntimeError):
    pass


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
        keys.map_batches(add_key_bucket, batch_format="pyarrow", fn_kwargs={"num_buckets": num_buckets})
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


def check_inputs(cfg: ValidateContrastiveConfig) -> tuple[ValidateContrastiveConfig, list[ResolvedSource]]:
    """Driver-side checks before any Ray work or output: every source resolves and its files open (footers /
    headers only), and no source lies inside OUTPUT (or OUTPUT inside a source). Returns the config and the
    resolved sources. (The jobs fill in the embedded sources, `pipelines.embedded.contrastive_source_configs`,
    when the user names none.)"""
    if not cfg.sources:
        raise ValueError(
            "no contrastive sources: name at least one (--source NAME=PATH, or `sources:` in --sources-yaml)"
        )
    resolved = [resolve_source(s, i) for i, s in enumerate(cfg.sources)]
    check_no_overlap([s.path for s in cfg.sources], cfg.output, what="source path")
    return cfg, resolved


def validate_contrastive(
    cfg: ValidateContrastiveConfig, *, engine: Literal["ray", "local"] | None = None
) -> dict:
    """Run the whole validation; publishes OUTPUT/{valid,quarantine,report.json,report.html,_VALIDATED.json}.

    engine="ray" streams through Ray Data (connects with plain `ray.init()` when no Ray is initialized);
    engine="local" runs the same steps in-process. Returns the report dict. Raises FileNotFoundError /
    PermissionError / ValueError for sources that cannot be read (before any output is touched) and
    RejectThresholdExceeded (after publishing everything; the marker says passed=false) for too-dirty sources.
    Everything is written into a staging directory beside OUTPUT and swapped in at the end; any other failure
    leaves the previous OUTPUT as it was, plus OUTPUT/failure.json.
    """
    cfg, resolved = check_inputs(cfg)
    for r in resolved:
        log.info("source %s: kind=%s format=%s files=%d", r.cfg.name, r.kind, r.format, len(r.files))
    stage = StagedOutput(cfg.output, owned_marker=MARKER_NAME)
    try:
        report = _validate_into(cfg, resolved, Path(stage.uri), Path(stage.target), engine or cfg.engine)
    except BaseException as e:
        where = stage.fail(e)
        log.error("validation failed; previous output (if any) left as it was; see %s", where)
        raise
    stage.publish()
    if not report["passed"]:
        raise RejectThresholdExceeded("; ".join(report["failures"]))
    return report


def _validate_into(
    cfg: ValidateContrastiveConfig, resolved: list[ResolvedSource], out: Path, final: Path, engine: str
) -> dict:
    """Every step of `validate_contrastive`, writing into `out` (the staging dir); messages name `final`."""
    (out / "valid").mkdir(parents=True)
    (out / "quarantine").mkdir(parents=True)
    with ray_data_console_errors_held() if engine == "ray" else contextlib.nullcontext():
        stats_rows, expected = (_run_ray if engine == "ray" else _run_local)(cfg, resolved, out)

    report = rep.build_report(
        stats_rows,
        sources=[(r.cfg, r.kind, r.format, list(r.files), list(r.skipped)) for r in resolved],
        expected_negatives={resolved[i].cfg.name: v for i, v in expected.items()},
        config=to_dict(cfg),
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
        f"{dict(Counter(s['reasons']).most_common(3))}; inspect {final / 'quarantine'} and fix the source, "
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
