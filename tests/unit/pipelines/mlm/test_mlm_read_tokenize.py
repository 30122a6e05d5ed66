"""Readers (JSONL, Parquet, text, HF save_to_disk, URIs), bad input, segmenting, the tokenizer actor and the
packer actor called directly (no Ray cluster)."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neobert.config_io import from_dict, to_dict, to_yaml
from neobert.schema import validate_packed_table
from pipelines.io import resolve_inputs
from pipelines.mlm.pack import PackChunks
from pipelines.mlm.preprocess import PreprocessConfig
from pipelines.mlm.read import BadInputError, ReadOptions, is_eval_document, iter_document_chunks
from pipelines.mlm.tokenize import (
    SPLITS,
    DocumentTokenizer,
    TokenizeFiles,
    embedded_cache_dir_to_build,
    ensure_input_on_node,
    split_documents,
)
from pipelines.tokenizer import CLS_ID, SEP_ID, load_tokenizer

DOCS = [
    {"id": "a", "text": "The quick brown fox jumps over the lazy dog. " * 40},
    {"id": "b", "text": "Packing documents into fixed-size rows keeps accelerators busy."},
    {"id": "c", "text": "Short."},
]


def _jsonl(path: Path, rows: list, raw_lines: list[bytes] = ()) -> Path:
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"".join(raw_lines)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _read(path, **kw):
    f = resolve_inputs([str(path)])
    assert len(f) == 1
    chunks = list(iter_document_chunks(f[0], ReadOptions(**kw)))
    return chunks, [i for c in chunks for i in c.doc_ids], [t for c in chunks for t in c.texts]


# ---------------------------------------------------------------------------------------------- readers


def test_jsonl_ids_from_column_and_from_row(tmp_path):
    _, ids, texts = _read(_jsonl(tmp_path / "x.jsonl", DOCS))
    assert ids == ["a", "b", "c"] and texts[1] == DOCS[1]["text"]
    _, ids, _ = _read(_jsonl(tmp_path / "y.jsonl.gz", [{"text": d["text"]} for d in DOCS]))
    assert ids == ["y.jsonl.gz:0", "y.jsonl.gz:1", "y.jsonl.gz:2"]


def test_parquet_and_hf_save_to_disk(tmp_path):
    pq.write_table(
        pa.table({"body": [d["text"] for d in DOCS], "id": ["p", "q", "r"]}), tmp_path / "x.parquet"
    )
    _, ids, texts = _read(tmp_path / "x.parquet", text_column="body")
    assert ids == ["p", "q", "r"] and texts[0] == DOCS[0]["text"]

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": [d["text"] for d in DOCS]}).save_to_disk(str(tmp_path / "hf"))
    files = resolve_inputs([str(tmp_path / "hf")])
    assert [f.format for f in files] == ["hf_arrow"]
    _, ids, texts = _read(tmp_path / "hf")
    assert texts == [d["text"] for d in DOCS] and ids[0].startswith("hf/data-") and ids[0].endswith(":0")
    chunks, ids, _ = _read(tmp_path / "hf", text_column="body", on_bad_row="skip")  # every row counted
    assert ids == [] and chunks[0].num_rows == chunks[0].bad_counts["missing_text_column"] == len(DOCS)


@pytest.mark.parametrize(
    "mode,expect",
    [("paragraph", ["a\nb", "c", "d"]), ("line", ["a", "b", "c", "d"]), ("file", ["a\nb\n\nc\n\n\nd"])],
)
def test_plain_text_modes(tmp_path, mode, expect):
    p = tmp_path / "t.txt"
    p.write_text("a\nb\n\nc\n\n\nd\n")
    _, _, texts = _read(p, text_split=mode)
    assert texts == expect


def test_resolve_dir_glob_uri_and_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    _jsonl(tmp_path / "sub" / "b.jsonl", DOCS)
    _jsonl(tmp_path / "a.jsonl", DOCS)
    (tmp_path / "README.md").write_text("ignored in a directory scan")
    assert [f.name for f in resolve_inputs([str(tmp_path)])] == ["a.jsonl", "sub/b.jsonl"]
    assert [f.name for f in resolve_inputs([str(tmp_path / "*.jsonl")])] == ["a.jsonl"]
    uri = resolve_inputs([f"file://{tmp_path}/a.jsonl"])[0]
    assert uri.uri == f"file://{tmp_path}/a.jsonl" and _read(uri.uri)[1] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="does not exist"):
        resolve_inputs([str(tmp_path / "nope.jsonl")])
    with pytest.raises(ValueError, match="unsupported extension"):
        resolve_inputs([str(tmp_path / "README.md")])
    with pytest.raises(ValueError, match="matched no files"):
        resolve_inputs([str(tmp_path / "*.parquet")])


def test_missing_text_column_names_file_and_columns(tmp_path):
    pq.write_table(pa.table({"content": ["x"], "id": ["1"]}), tmp_path / "x.parquet")
    with pytest.raises(
        BadInputError, match=r"x\.parquet has no text column 'text'; its columns are \['content', 'id'\]"
    ):
        _read(tmp_path / "x.parquet")
    chunks, ids, _ = _read(tmp_path / "x.parquet", on_bad_row="skip")
    assert ids == [] and chunks[0].bad_counts["missing_text_column"] == 1
    _jsonl(tmp_path / "y.jsonl", [{"body": "x"}])
    with pytest.raises(BadInputError, match=r"y\.jsonl, row 1.*no key 'text'; the row has keys \['body'\]"):
        _read(tmp_path / "y.jsonl")


BAD_LINES = [
    (b'{"text": "\xff\xfe broken"}\n', "invalid_utf8"),
    (b"{not json}\n", "malformed_json"),
    (b'{"text": 42}\n', "non_string_text"),
    (b'{"text": null}\n', "null_text"),
    (b'{"text": "   "}\n', "empty_text"),
    (b'{"text": "lone \\udc80 surrogate"}\n', "invalid_utf8"),
    (b'["a list"]\n', "malformed_json"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_bad_rows_error_or_counted(tmp_path, line, reason):
    p = _jsonl(tmp_path / "x.jsonl", DOCS[:1], [line])
    with pytest.raises(BadInputError, match=rf"x\.jsonl, row 2, field 'text': {reason}.*--on-bad-row skip"):
        _read(p)
    chunks, ids, _ = _read(p, on_bad_row="skip")
    assert ids == ["a"]
    assert sum(c.bad_counts[reason] for c in chunks) == 1 and sum(c.num_rows for c in chunks) == 2
    assert chunks[-1].bad_examples[0]["row"] == 2  # 1-based, as the error message says


def test_unreadable_file(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(BadInputError, match=r"cannot read parquet file .*x\.parquet"):
        _read(tmp_path / "x.parquet")
    chunks, _, _ = _read(tmp_path / "x.parquet", on_bad_row="skip")
    assert chunks[0].skipped_file["reason"] == "unreadable_file"


def test_chunking_is_bounded(tmp_path):
    p = _jsonl(tmp_path / "x.jsonl", [{"text": f"doc {i}"} for i in range(25)])
    chunks, ids, _ = _read(p, chunk_docs=10)
    assert [len(c.doc_ids) for c in chunks] == [10, 10, 5] and len(set(ids)) == 25


def test_eval_split_is_stable_hash():
    ids = [f"doc{i}" for i in range(20000)]
    a = [is_eval_document(i, 0.1, 0) for i in ids]
    assert a == [is_eval_document(i, 0.1, 0) for i in ids]
    assert 0.09 < np.mean(a) < 0.11
    assert a != [is_eval_document(i, 0.1, 1) for i in ids]  # the seed salts the hash
    assert not any(is_eval_document(i, 0.0, 0) for i in ids)


# ---------------------------------------------------------------------------------------------- segmenting


def _naive_split(docs: list[list[int]], max_len: int, min_len: int):
    segs, dropped = [], {"short_document": 0, "short_tail": 0}
    for d in docs:
        pieces = [d[i : i + max_len - 2] for i in range(0, len(d), max_len - 2)]
        if not pieces:  # tokenized to nothing: dropped and counted, never silently lost
            dropped["short_document"] += 1
        for p in pieces:
            if len(p) + 2 < min_len:
                dropped["short_tail" if len(pieces) > 1 else "short_document"] += 1
            else:
                segs.append([CLS_ID, *p, SEP_ID])
    return segs, dropped


@given(
    lens=st.lists(st.integers(0, 60), max_size=30),
    max_len=st.integers(3, 20),
    min_frac=st.floats(0, 1),
)
@settings(max_examples=80, deadline=None)
def test_split_documents_vs_naive(lens, max_len, min_frac):
    min_len = max(1, int(min_frac * max_len))
    docs, start = [], 1000
    for n in lens:
        docs.append(list(range(start, start + n)))
        start += n
    flat = np.array([t for d in docs for t in d], dtype=np.int32)
    out = split_documents(flat, np.array(lens), max_len, min_len)
    segs, dropped = _naive_split(docs, max_len, min_len)
    bounds = np.concatenate([[0], np.cumsum(out.seg_lengths)])
    assert [out.tokens[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)] == segs
    assert {k: v["segments"] for k, v in out.dropped().items()} == dropped
    assert all(len(s) <= max_len for s in segs)


def test_long_document_split_into_consecutive_segments():
    tok = DocumentTokenizer()
    flat, lens = tok.encode([DOCS[0]["text"]])
    out = split_documents(flat, lens, 64, 16)
    content = np.concatenate(
        [out.tokens[a + 1 : b - 1] for a, b in zip(*_bounds(out.seg_lengths), strict=True)]
    )
    n_kept = len(content)
    assert np.array_equal(content, flat[:n_kept])  # consecutive, in order, nothing skipped but the tail
    assert (out.seg_lengths[:-1] == 64).all()
    dropped = out.dropped()["short_tail"]["tokens"]
    assert n_kept + dropped == len(flat)


def _bounds(lengths):
    b = np.concatenate([[0], np.cumsum(lengths)])
    return b[:-1], b[1:]


# ---------------------------------------------------------------------------------------------- actors, no Ray


def _tokenize_file(path, splits=SPLITS, eval_fraction=0.34, **opts):
    f = resolve_inputs([str(path)])[0]
    actor = TokenizeFiles(
        tokenizer_path=None,
        max_seq_len=32,
        min_seq_len=4,
        read_options=ReadOptions(**opts),
        eval_fraction=eval_fraction,
        seed=0,
        splits=splits,
    )
    units = pa.table({"unit": [0], "uri": [f.uri], "format": [f.format], "name": [f.name], "size": [f.size]})
    return list(actor(units))


def test_tokenize_files_matches_tokenizer(tmp_path):
    p = _jsonl(tmp_path / "x.jsonl", DOCS)
    rows = _tokenize_file(p, chunk_docs=2)
    assert [(r["chunk"][0].as_py(), r["last"][0].as_py()) for r in rows] == [(0, False), (1, True)]
    tok = load_tokenizer()
    want = [tok.encode(d["text"], add_special_tokens=False).ids for d in DOCS]
    got_lens = [n for r in rows for n in r["doc_lengths"][0].as_py()]
    assert got_lens == [len(w) for w in want]
    toks = [t for r in rows for t in r["tokens"][0].as_py()]
    assert toks[:32] == [CLS_ID, *want[0][:30], SEP_ID]
    split = [s for r in rows for s in r["doc_split"][0].as_py()]
    assert split == [int(is_eval_document(d["id"], 0.34, 0)) for d in DOCS]
    again = _tokenize_file(p, chunk_docs=2)
    assert all(a.equals(b) for a, b in zip(rows, again, strict=True))


def test_tokenize_files_keeps_only_requested_split(tmp_path):
    p = _jsonl(tmp_path / "x.jsonl", [{"id": f"d{i}", "text": f"document number {i}"} for i in range(50)])
    rows = _tokenize_file(p, splits=("eval",), eval_fraction=0.3)
    kept = [s for r in rows for s in r["doc_split"][0].as_py()]
    other = sum(json.loads(r["stats_json"][0].as_py())["other_split_docs"] for r in rows)
    assert kept and set(kept) == {1} and len(kept) + other == 50


def _packer(tmp_path, out=True):
    return PackChunks(
        num_units=1,
        pack_tokens=64,
        max_seq_len=32,
        buffer_segments=16,
        close_fill=0.9,
        rows_per_shard=3,
        splits=SPLITS,
        output_uri=str(tmp_path / "out") if out else None,
    )


def test_pack_chunks_writes_valid_deterministic_shards(tmp_path):
    docs = [{"id": f"d{i}", "text": " ".join(f"w{j}" for j in range(i % 40 + 1))} for i in range(120)]
    rows = _tokenize_file(_jsonl(tmp_path / "x.jsonl", docs), chunk_docs=16)
    digests = []
    for _ in range(2):
        packer = _packer(tmp_path)
        results = [t for r in rows for t in packer(r)]
        meta = pa.concat_tables(results).to_pylist()
        stats = json.loads(meta[-1]["stats_json"])
        shards = sorted((tmp_path / "out").rglob("*.parquet"))
        for s in shards:
            validate_packed_table(
                pq.read_table(s), source=str(s), pack_tokens=64, max_seq_len=32, check_version=True
            )
        splits = stats["splits"].values()
        assert sum(v["documents"] for v in splits) == 120
        assert sum(v["tokens"] for v in splits) == sum(m["num_tokens"] for m in meta[:-1])
        digests.append({s.name + s.parent.name: hashlib.sha256(s.read_bytes()).hexdigest() for s in shards})
        for s in shards:
            s.unlink()
    assert digests[0] == digests[1] and len(digests[0]) >= 3
    # a different batching of the same chunk rows gives the same bytes
    packer = _packer(tmp_path)
    list(packer(pa.concat_tables(rows)))
    again = {
        s.name + s.parent.name: hashlib.sha256(s.read_bytes()).hexdigest()
        for s in (tmp_path / "out").rglob("*.parquet")
    }
    assert again == digests[0]


def test_pack_chunks_rejects_out_of_order(tmp_path):
    docs = [{"id": f"d{i}", "text": "word " * 30} for i in range(40)]
    rows = _tokenize_file(_jsonl(tmp_path / "x.jsonl", docs), chunk_docs=8)
    packer = _packer(tmp_path, out=False)
    with pytest.raises(RuntimeError, match="expected \\(0, 0\\)"):
        list(packer(rows[1]))


def test_pack_chunks_validation_policy(tmp_path, monkeypatch):
    """validate_shards="first" fully validates shard 0 of each split, bound-checks the rest; "all" every shard;
    the bytes written are the same either way, and the cheap check names file, row and field."""
    import pipelines.mlm.pack as pp

    docs = [{"id": f"d{i}", "text": " ".join(f"w{j}" for j in range(i % 40 + 1))} for i in range(120)]
    rows = _tokenize_file(_jsonl(tmp_path / "x.jsonl", docs), chunk_docs=16)
    full, digests = [], []
    monkeypatch.setattr(pp, "validate_packed_table", lambda t, source, **kw: full.append(source))
    for policy in ("first", "all"):
        full.clear()
        packer = _packer(tmp_path)
        packer.validate_all = policy == "all"
        meta = [m for r in rows for t in packer(r) for m in t.to_pylist()]
        shards = [m["path"] for m in meta if m["shard"] >= 0]
        first = [m["path"] for m in meta if m["shard"] == 0]
        assert len(shards) > len(first) >= 1
        assert sorted(full) == sorted(first if policy == "first" else shards)
        digests.append({p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in shards})
    assert digests[0] == digests[1]
    t = pq.read_table(shards[-1])
    bad = t.set_column(
        t.schema.get_field_index("num_tokens"), "num_tokens", pa.array([0] * t.num_rows, pa.int32())
    )
    with pytest.raises(ValueError, match=r"shard\.parquet, row 0, field 'num_tokens': value 0"):
        pp._check_pack_bounds(bad, "shard.parquet", pack_tokens=64, max_seq_len=32)
    pp._check_pack_bounds(t, "ok", pack_tokens=64, max_seq_len=32)


# ---------------------------------------------------------------------------------------------- config


def test_config_validation_and_yaml_round_trip():
    cfg = PreprocessConfig(input=["a.jsonl"], max_seq_len=512, pack_tokens=4096)
    assert from_dict(PreprocessConfig, to_dict(cfg)) == cfg and "max_seq_len: 512" in to_yaml(cfg)
    for kw, msg in [
        ({"pack_tokens": 100}, "pack_tokens"),
        ({"min_seq_len": 2000}, "min_seq_len"),
        ({"eval_fraction": 0.9}, "eval_fraction"),
        ({"on_bad_row": "ignore"}, "on_bad_row"),
        ({"compression": "rar"}, "compression"),
        ({"rows_per_shard": 10**6}, "rows_per_shard"),
        ({"validate_shards": "none"}, "validate_shards"),
    ]:
        with pytest.raises(ValueError, match=msg):
            PreprocessConfig(**kw)


def test_tokenizer_path_option(tmp_path):
    from pipelines.tokenizer import default_tokenizer_dir

    texts = [d["text"] for d in DOCS]
    a = DocumentTokenizer(str(default_tokenizer_dir() / "tokenizer.json")).encode(texts)
    b = DocumentTokenizer(None).encode(texts)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DocumentTokenizer(str(tmp_path / "missing.json"))


def test_embedded_corpus_rebuilt_on_a_node_that_lacks_it(tmp_path):
    """Multi-node: the driver materialized the embedded corpus on its node only; a read actor elsewhere rebuilds
    it (same key -> same path) when, and only when, an input under <cache>/embedded-<key>/ is missing."""
    from pipelines.embedded import materialize

    present = _jsonl(tmp_path / "x.jsonl", DOCS)
    assert embedded_cache_dir_to_build(str(present)) is None  # present: nothing to do
    assert (
        embedded_cache_dir_to_build(str(tmp_path / "missing.jsonl")) is None
    )  # not embedded: reader reports
    assert embedded_cache_dir_to_build("s3://bucket/embedded-0123456789ab/mlm/wikipedia.jsonl") is None
    cache = tmp_path / "node_cache"
    missing = cache / "embedded-0123456789ab" / "mlm" / "wikipedia.jsonl"
    assert embedded_cache_dir_to_build(str(missing)) == cache
    assert embedded_cache_dir_to_build(str(cache / "embedded-xyz" / "mlm" / "w.jsonl")) is None

    data = materialize(cache)
    target = str(data.mlm_files[0])
    import shutil

    shutil.rmtree(cache)  # what another node sees
    assert embedded_cache_dir_to_build(target) == cache
    ensure_input_on_node(target)
    assert Path(target).exists() and embedded_cache_dir_to_build(target) is None
    # A different key (different package versions on this node) is a clear error, not a silent skip.
    with pytest.raises(ValueError, match="source packages differ.*same package versions"):
        ensure_input_on_node(str(cache / "embedded-0123456789ab" / "mlm" / "wikipedia.jsonl"))


def test_document_without_tokens_is_counted_as_dropped():
    """Zero-width / control characters pass the reader's empty check but tokenize to nothing: counted, not lost."""
    tok = DocumentTokenizer()
    flat, lens = tok.encode(["\u200b\ufeff", "a real sentence with enough tokens to be kept"])
    assert lens[0] == 0
    out = split_documents(flat, lens, max_seq_len=32, min_seq_len=3)
    assert out.dropped()["short_document"] == {"segments": 1, "tokens": 0}
    assert out.dropped(np.array([False, True]))["short_document"]["segments"] == 0
