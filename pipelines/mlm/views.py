"""Length views of a preprocessed corpus: the documents of at least L content tokens, packed on their own.

NeoBERT's second pretraining phase weights long documents; a training phase can do the same by mixing in
`OUTPUT/views/min<L>/` (a packed dir like OUTPUT itself: `{train,eval}/part-*.parquet` + report). Views are
written by `run_preprocess` when `PreprocessConfig.length_views` names them: each view is its own tokenize -> pack
stream whose tokenizer actors keep only documents with `>= L` content tokens ([CLS]/[SEP] not counted), with the
same train/eval split as the main output.
"""

from __future__ import annotations

import json

import numpy as np

from pipelines.io import filesystem_for


def view_name(min_tokens: int) -> str:
    return f"min{min_tokens}"


def view_path(output: str, min_tokens: int) -> str:
    """Where the view of documents with >= `min_tokens` tokens lives under a preprocessing output."""
    return f"{output.rstrip('/')}/views/{view_name(min_tokens)}"


def keep_long_documents(
    flat: np.ndarray, doc_len: np.ndarray, doc_split: np.ndarray, min_tokens: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Drop documents shorter than `min_tokens` from a tokenized chunk.

    flat (sum(doc_len),) tokens of D documents back to back; doc_len (D,); doc_split (D,).
    Returns the kept (flat, doc_len, doc_split) and how many documents were left out."""
    long = doc_len >= min_tokens  # (D,) bool
    return flat[np.repeat(long, doc_len)], doc_len[long], doc_split[long], int((~long).sum())


def length_views(output: str) -> dict[int, str]:
    """{min_tokens: view path} of a finished preprocessing output (from its report.json); {} when it has none."""
    fs, root = filesystem_for(output)
    with fs.open_input_stream(f"{root.rstrip('/')}/report.json") as f:
        report = json.loads(f.read())
    return {
        v["min_doc_tokens"]: view_path(output, v["min_doc_tokens"])
        for v in report.get("length_views", {}).values()
    }
