"""Tokenize documents and cut them into `[CLS] ... [SEP]` segments of at most `max_seq_len` tokens.

* `split_documents` (pure numpy): a document of n content tokens becomes ceil(n / (max_seq_len - 2)) consecutive
  segments; a segment shorter than `min_seq_len` (incl. the two specials) is dropped and counted, as
  `short_tail` (the last piece of a longer document) or `short_document` (a document that is short on its own,
  including one that tokenizes to no token at all).
* `DocumentTokenizer`: the batched fast tokenizer (`encode_batch_fast`, no offsets) -> flat int32 ids.
* `TokenizeFiles`: the stateful callable class that Ray Data runs in an actor pool
  (`map_batches(TokenizeFiles, batch_size=1, compute=ActorPoolStrategy(...))`). Each input row names one input
  file (a *unit*); the actor streams it with `pipelines.mlm.read.iter_document_chunks`, assigns each document to
  train/eval by a stable hash of its id, tokenizes a chunk at a time and yields one `CHUNK_SCHEMA` row per chunk.
  Output depends only on the file content, never on batching or scheduling.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.embedded import materialize
from pipelines.io import InputFile
from pipelines.mlm.read import DocChunk, ReadOptions, is_eval_document, iter_document_chunks
from pipelines.mlm.report import SPLITS
from pipelines.mlm.views import keep_long_documents
from pipelines.tokenizer import CLS_ID, SEP_ID, load_tokenizer

log = logging.getLogger(__name__)


# One row per chunk of documents of one unit (input file). `tokens` holds every kept segment, specials included.
CHUNK_SCHEMA = pa.schema(
    [
        pa.field("unit", pa.int32()),  # index of the input file in the resolved input list
        pa.field("chunk", pa.int32()),  # 0, 1, ... within the unit
        pa.field("last", pa.bool_()),  # last chunk of the unit
        pa.field("tokens", pa.list_(pa.int32())),  # (sum(seg_lengths),)
        pa.field("seg_lengths", pa.list_(pa.int32())),  # (S,)
        pa.field("seg_split", pa.list_(pa.int8())),  # (S,) index into SPLITS
        pa.field("doc_lengths", pa.list_(pa.int32())),  # (D,) content tokens of every tokenized document
        pa.field("doc_split", pa.list_(pa.int8())),  # (D,)
        pa.field(
            "stats_json", pa.string()
        ),  # rows, bad rows by reason + examples, dropped segments, skipped file
    ]
)


@dataclasses.dataclass
class SegmentSplit:
    tokens: np.ndarray  # (sum(seg_lengths),) int32, [CLS] content [SEP] per kept segment
    seg_lengths: np.ndarray  # (S,) int32, incl. specials
    seg_doc: np.ndarray  # (S,) int64, index of the source document
    drop_doc: np.ndarray  # (X,) int64, source document of each dropped segment
    drop_tokens: np.ndarray  # (X,) int64, content tokens lost with it
    drop_tail: np.ndarray  # (X,) bool, True = short_tail (piece of a longer document), False = short_document

    def dropped(self, doc_mask: np.ndarray | None = None) -> dict[str, dict[str, int]]:
        """reason -> {"segments", "tokens"}, optionally only for documents where `doc_mask` (D,) is True."""
        sel = np.ones(len(self.drop_doc), bool) if doc_mask is None else np.asarray(doc_mask)[self.drop_doc]
        out = {}
        for reason, m in (("short_document", sel & ~self.drop_tail), ("short_tail", sel & self.drop_tail)):
            out[reason] = {"segments": int(m.sum()), "tokens": int(self.drop_tokens[m].sum())}
        return out


def split_documents(
    flat_ids: np.ndarray,
    doc_lengths: np.ndarray,
    max_seq_len: int,
    min_seq_len: int,
    cls_id: int = CLS_ID,
    sep_id: int = SEP_ID,
) -> SegmentSplit:
    """Cut documents (content ids concatenated in `flat_ids`, lengths `doc_lengths` (D,)) into segments."""
    if max_seq_len < 3 or not 1 <= min_seq_len <= max_seq_len:
        raise ValueError(
            f"need max_seq_len >= 3 and 1 <= min_seq_len <= max_seq_len, got {max_seq_len}, {min_seq_len}"
        )
    body = max_seq_len - 2
    doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
    if int(doc_lengths.sum()) != len(flat_ids):
        raise ValueError(f"doc_lengths sum to {int(doc_lengths.sum())} but flat_ids has {len(flat_ids)} ids")
    doc_start = np.cumsum(doc_lengths) - doc_lengths  # (D,)
    nseg = -(-doc_lengths // body)  # (D,) ceil; 0 for an empty document
    seg_doc = np.repeat(np.arange(len(doc_lengths)), nseg)  # (S0,)
    first_of_doc = np.cumsum(nseg) - nseg
    seg_k = np.arange(len(seg_doc)) - np.repeat(first_of_doc, nseg)  # (S0,) index within its document
    seg_src = doc_start[seg_doc] + seg_k * body  # (S0,) start in flat_ids
    seg_body = np.minimum(body, doc_lengths[seg_doc] - seg_k * body)  # (S0,) content tokens
    short = seg_body + 2 < min_seq_len
    drop_doc, drop_tokens, drop_tail = seg_doc[short], seg_body[short], nseg[seg_doc[short]] > 1
    # A document that tokenizes to nothing (e.g. only zero-width or control characters) has no segment at all:
    # count it as a dropped short_document too, so that it never disappears unreported.
    empty = np.flatnonzero(doc_lengths == 0)
    drop_doc = np.concatenate([drop_doc, empty])
    drop_tokens = np.concatenate([drop_tokens, np.zeros(len(empty), dtype=drop_tokens.dtype)])
    drop_tail = np.concatenate([drop_tail, np.zeros(len(empty), dtype=bool)])
    keep = ~short
    seg_doc, seg_src, seg_body = seg_doc[keep], seg_src[keep], seg_body[keep]
    seg_len = seg_body + 2  # (S,)
    out_off = np.concatenate([[0], np.cumsum(seg_len)])  # (S+1,)
    tokens = np.empty(int(out_off[-1]), dtype=np.int32)
    tokens[out_off[:-1]] = cls_id
    tokens[out_off[1:] - 1] = sep_id
    # content: output position out_off[s] + 1 + j  <-  flat_ids[seg_src[s] + j]
    body_start = np.cumsum(seg_body) - seg_body
    j = np.arange(int(seg_body.sum())) - np.repeat(body_start, seg_body)
    s_of = np.repeat(np.arange(len(seg_body)), seg_body)
    tokens[out_off[s_of] + 1 + j] = np.asarray(flat_ids)[seg_src[s_of] + j]
    return SegmentSplit(tokens, seg_len.astype(np.int32), seg_doc, drop_doc, drop_tokens, drop_tail)


class DocumentTokenizer:
    """Batched fast tokenizer returning flat int32 ids (no specials) and per-document lengths."""

    def __init__(self, tokenizer_path: str | None = None):
        self.tokenizer = load_tokenizer(tokenizer_path or None)
        self._encode = self.tokenizer.encode_batch_fast

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(flat ids (sum(lengths),) int32, lengths (D,) int64) for `texts`."""
        if not texts:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
        ids = [e.ids for e in self._encode(list(texts), add_special_tokens=False)]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        return flat, lengths


_EMBEDDED_ROOT = re.compile(r"embedded-[0-9a-f]{12}")  # pipelines.embedded: <cache_dir>/embedded-<key>/...


def embedded_cache_dir_to_build(uri: str) -> Path | None:
    """The embedded-data cache dir to materialize so that `uri` exists on this node, or None (nothing to do).

    The driver resolves the embedded corpus to local paths under `<cache_dir>/embedded-<key>/`; on a multi-node
    cluster another node's read actor finds them missing. Non-None only for a *missing local* path inside such
    a directory; one `exists()` call otherwise, so it is cheap when the file is present.
    """
    if "://" in uri or os.path.exists(uri):
        return None
    p = Path(uri)
    for parent in p.parents:
        if _EMBEDDED_ROOT.fullmatch(parent.name):
            return parent.parent
    return None


def ensure_input_on_node(uri: str) -> None:
    """Materialize the embedded corpus on this node when `uri` is one of its files and is missing here."""
    cache_dir = embedded_cache_dir_to_build(uri)
    if cache_dir is None:
        return
    log.info("embedded corpus missing on this node (%s): materializing it under %s", uri, cache_dir)
    data = materialize(cache_dir)
    if not os.path.exists(uri):
        raise ValueError(
            f"input {uri} (embedded corpus) is missing on node {os.uname().nodename} and materializing it there "
            f"built {data.root} instead: the embedded data's source packages differ between the driver and this "
            "node; install the same package versions on every node, or preprocess to shared storage "
            "(jobs/preprocess.py --output s3://...) and pass that"
        )


def _list(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), pa.array(values, type=typ))


class TokenizeFiles:
    """Ray Data actor: input rows `{unit, uri, format, name, size}` -> `CHUNK_SCHEMA` rows (a generator).

    `splits`: the split codes to keep ("train", "eval"); documents of other splits are skipped before
    tokenization (used by the on-the-fly path, which builds one pipeline per split).
    """

    def __init__(
        self,
        *,
        tokenizer_path: str | None,
        max_seq_len: int,
        min_seq_len: int,
        read_options: ReadOptions,
        eval_fraction: float,
        seed: int,
        splits: Sequence[str] = SPLITS,
        min_doc_tokens: int = 0,
    ):
        # One actor per CPU: the tokenizer must not spawn its own thread pool on top (oversubscription).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.tok = DocumentTokenizer(tokenizer_path)
        self.max_seq_len, self.min_seq_len = max_seq_len, min_seq_len
        self.opts = read_options
        self.eval_fraction, self.seed = eval_fraction, seed
        self.keep_split = np.array([s in splits for s in SPLITS])
        self.min_doc_tokens = min_doc_tokens  # length views: documents with fewer content tokens are left out

    def __call__(self, batch: pa.Table | dict[str, Any]) -> Iterator[pa.Table]:
        units = batch.to_pylist() if isinstance(batch, pa.Table) else _rows_of(batch)
        for u in units:
            f = InputFile(
                uri=str(u["uri"]), format=str(u["format"]), name=str(u["name"]), size=int(u["size"])
            )
            # Multi-node: the driver materialized the embedded corpus only on its node.
            ensure_input_on_node(f.uri)
            for k, (chunk, last) in enumerate(_with_last(iter_document_chunks(f, self.opts))):
                yield self.tokenize_chunk(chunk, unit=int(u["unit"]), index=k, last=last, file=f.uri)

    def tokenize_chunk(
        self, chunk: DocChunk, *, unit: int, index: int, last: bool, file: str = ""
    ) -> pa.Table:
        split = np.array(
            [is_eval_document(i, self.eval_fraction, self.seed) for i in chunk.doc_ids], dtype=np.int8
        )  # (D,)
        keep = self.keep_split[split]  # (D,) bool
        texts = [t for t, k in zip(chunk.texts, keep, strict=True) if k]
        doc_split = split[keep]
        flat, doc_len = self.tok.encode(texts)
        below_view = 0
        if self.min_doc_tokens > 0:
            flat, doc_len, doc_split, below_view = keep_long_documents(
                flat, doc_len, doc_split, self.min_doc_tokens
            )
        seg = split_documents(flat, doc_len, self.max_seq_len, self.min_seq_len)
        stats = {
            "file": file,
            "rows": chunk.num_rows,
            "bad_counts": dict(chunk.bad_counts),
            "bad_examples": chunk.bad_examples,
            "dropped": {s: seg.dropped(doc_split == i) for i, s in enumerate(SPLITS)},
            "skipped_file": chunk.skipped_file,
            "other_split_docs": int((~keep).sum()),
            "below_view_length": below_view,
        }
        return pa.Table.from_arrays(
            [
                pa.array([unit], pa.int32()),
                pa.array([index], pa.int32()),
                pa.array([last]),
                _list(seg.tokens, pa.int32()),
                _list(seg.seg_lengths, pa.int32()),
                _list(doc_split[seg.seg_doc], pa.int8()),
                _list(doc_len.astype(np.int32), pa.int32()),
                _list(doc_split, pa.int8()),
                pa.array([json.dumps(stats)]),
            ],
            schema=CHUNK_SCHEMA,
        )


def _with_last(it: Iterator[Any]) -> Iterator[tuple[Any, bool]]:
    prev = next(it)
    for x in it:
        yield prev, False
        prev = x
    yield prev, True


def _rows_of(batch: dict[str, Any]) -> list[dict[str, Any]]:
    n = len(next(iter(batch.values())))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]
