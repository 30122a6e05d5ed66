"""Contrastive data rules: rejection reasons, text normalization and the keys texts are compared by.

Pure functions over strings; this module imports nothing else from `pipelines`, so the validator
(`pipelines.contrastive.validate`) and the builders of the embedded data (`pipelines.embedded`) apply the same rules.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

# Machine-readable rejection reasons -> one-line description (the docs table is generated from the same text).
REASONS: dict[str, str] = {
    "invalid_utf8": "bytes are not valid UTF-8 (or the JSON holds a lone surrogate escape)",
    "malformed_json": "the line is not valid JSON, or not a JSON object",
    "missing_field": "a required field (query / positive) is absent from the record",
    "wrong_type": "number / bool / null / list / object where a string belongs, or a non-string list element",
    "empty_text": "query, positive or a negative is empty or whitespace-only",
    "control_characters": "text contains control characters other than tab / newline / carriage return",
    "positive_equals_query": "positive equals the query (case-insensitive, whitespace-collapsed)",
    "negative_equals_positive": "a negative equals the positive (case-insensitive, whitespace-collapsed)",
    "duplicate_pair": "(query, positive) already seen earlier (same or earlier source); detail names the first",
    "dangling_id": "BEIR: qrels / hard negatives reference a query or corpus id that does not exist",
    "duplicate_id": "BEIR: an `_id` already defined earlier in the same queries / corpus file (first one kept)",
    "malformed_qrels": "BEIR: a qrels line without query-id, corpus-id, integer score",
    "qrel_not_positive": "BEIR: qrels score below min_qrel_score (not a positive pair)",
    "too_long": "a text is longer than max_seq_len tokens (truncation='reject')",
    "negative_count_mismatch": "number of negatives differs from the source's expected count",
}

# Reader markers: rows the readers emit that are not records (counted in the report, never quarantined).
BLANK_LINE = "_blank_line"  # an empty line of a JSONL / qrels file
NUMERIC_IDS = "_numeric_ids"  # BEIR: `_id` numbers normalized to strings; detail = how many

# Unicode category Cc (C0, DEL, C1) minus tab / newline / carriage return
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def compare_key(text: str) -> str:
    """Texts compared for identity / duplicates: whitespace collapsed, case-folded."""
    return " ".join(text.split()).casefold()


def normalize_text(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()


def pair_key(query: str, positive: str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(compare_key(query).encode("utf-8"))
    h.update(b"\x00")
    h.update(compare_key(positive).encode("utf-8"))
    return h.digest()


class RowRejected(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def check_text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise RowRejected("wrong_type", f"{field} is {kind} ({short(value)}), expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RowRejected("invalid_utf8", f"{field} holds a lone surrogate ({short(value)})") from None
    if not value.strip():
        raise RowRejected("empty_text", f"{field} is empty or whitespace-only ({value!r})")
    m = _CONTROL_RE.search(value)
    if m:
        raise RowRejected(
            "control_characters", f"{field} has control character {m.group()!r} at char {m.start()}"
        )
    return normalize_text(value)


def short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."
