"""Contrastive triples of the embedded data keep only what `validate_contrastive` would accept, decided with
the validator's own rules (`pipelines.contrastive.rules`)."""

from __future__ import annotations

from collections import Counter

from pipelines.contrastive.rules import compare_key, normalize_text, pair_key


def keep_triple(query: str, positive: str, negative: str, seen: set[bytes], skipped: Counter) -> bool:
    """Skip (and count) a triple that `validate_contrastive` would reject, with its rules (NFC, whitespace
    collapsed, case-folded): positive == query, negative == positive, or a (query, positive) pair seen before.
    The embedded sources then validate with 0 rejected rows."""
    qn, pn, nn = (normalize_text(t) for t in (query, positive, negative))
    q, p, n = (compare_key(t) for t in (qn, pn, nn))
    if p == q:
        skipped["positive_equals_query"] += 1
        return False
    if n == p:
        skipped["negative_equals_positive"] += 1
        return False
    key = pair_key(qn, pn)
    if key in seen:
        skipped["duplicate_pair"] += 1
        return False
    seen.add(key)
    return True
