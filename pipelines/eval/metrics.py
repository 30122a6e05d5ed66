"""Metrics of the evaluation tasks.

Spearman (scipy), accuracy and macro-F1 (scikit-learn) come from their libraries. The ranking metrics are
implemented here once, on a dense (Q, C) score matrix and BEIR-style qrels (per query a {doc index: relevance}
map; relevance > 0 is relevant):

    ranking     candidates sorted by score, descending; ties broken by the LOWER candidate index first (a stable
                sort of -score), so the result never depends on the sort algorithm
    nDCG@k      DCG@k / IDCG@k with DCG = sum_i (2^rel_i - 1) / log2(i + 1) over ranks i = 1..k (the
                trec_eval / BEIR gain); IDCG uses the query's relevances sorted descending
    recall@k    |relevant in top k| / |relevant|
    MRR@k       1 / rank of the first relevant candidate if it is within the top k, else 0

Each is averaged over queries. A query without any relevant candidate is an error (BEIR drops such queries
before scoring; the caller must too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def spearman(pred: Sequence[float], gold: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)).statistic)


def pearson(pred: Sequence[float], gold: Sequence[float]) -> float:
    from scipy.stats import pearsonr

    return float(pearsonr(np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)).statistic)


def classification_metrics(pred: Sequence[int], gold: Sequence[int], num_labels: int) -> dict[str, float]:
    """accuracy and macro-F1 over all `num_labels` classes (a class never predicted counts with F1 = 0)."""
    from sklearn.metrics import accuracy_score, f1_score

    labels = list(range(num_labels))
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, labels=labels, average="macro", zero_division=0)),
    }


def _rankings(scores_QC: np.ndarray, k: int) -> np.ndarray:
    """(Q, min(k, C)) candidate indices in rank order (see the module docstring for ties)."""
    order = np.argsort(-scores_QC, axis=1, kind="stable")
    return order[:, :k]


def _check(scores_QC: np.ndarray, qrels: Sequence[Mapping[int, float]], k: int) -> np.ndarray:
    scores = np.asarray(scores_QC, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(qrels):
        raise ValueError(f"scores must be (Q, C) with Q = len(qrels) = {len(qrels)}, got {scores.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for q, rel in enumerate(qrels):
        if not any(r > 0 for r in rel.values()):
            raise ValueError(f"query {q} has no relevant candidate in its qrels {dict(rel)}; drop it first")
        bad = [d for d in rel if not 0 <= d < scores.shape[1]]
        if bad:
            raise ValueError(f"query {q}: qrels name candidates {bad} outside 0..{scores.shape[1] - 1}")
    return scores


def ranking_metrics(
    scores_QC: np.ndarray, qrels: Sequence[Mapping[int, float]], k: int = 10
) -> dict[str, float]:
    """{"ndcg@k", "recall@k", "mrr@k"} averaged over the queries."""
    scores = _check(scores_QC, qrels, k)
    top = _rankings(scores, k)  # (Q, k)
    discounts = 1.0 / np.log2(np.arange(2, top.shape[1] + 2))  # rank i -> 1 / log2(i + 1)
    ndcg, recall, mrr = [], [], []
    for q, rel in enumerate(qrels):
        gains = np.array([2.0 ** rel.get(int(d), 0.0) - 1.0 for d in top[q]])  # (k,)
        ideal = np.sort(np.array([2.0**r - 1.0 for r in rel.values() if r > 0]))[::-1][: top.shape[1]]
        ndcg.append(float(gains @ discounts[: len(gains)]) / float(ideal @ discounts[: len(ideal)]))
        hit = np.array([rel.get(int(d), 0.0) > 0 for d in top[q]])
        recall.append(hit.sum() / sum(r > 0 for r in rel.values()))
        first = np.flatnonzero(hit)
        mrr.append(1.0 / (first[0] + 1) if len(first) else 0.0)
    return {
        f"ndcg@{k}": float(np.mean(ndcg)),
        f"recall@{k}": float(np.mean(recall)),
        f"mrr@{k}": float(np.mean(mrr)),
    }


def cosine_matrix(a_ND: np.ndarray, b_MD: np.ndarray) -> np.ndarray:
    a = np.asarray(a_ND, dtype=np.float64)
    b = np.asarray(b_MD, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def paired_cosine(a_ND: np.ndarray, b_ND: np.ndarray) -> np.ndarray:
    a = np.asarray(a_ND, dtype=np.float64)
    b = np.asarray(b_ND, dtype=np.float64)
    num = (a * b).sum(1)
    return num / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
