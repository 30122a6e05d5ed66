"""Each metric against a naive reference on small hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.eval import metrics as M


def _ranks(x):
    """Average ranks (1-based), ties share the mean rank."""
    x = list(x)
    return [sum(v < xi for v in x) + (sum(v == xi for v in x) + 1) / 2 for xi in x]


def _naive_pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_spearman_and_pearson_match_naive_formulas():
    pred = [0.1, 0.4, 0.4, 0.9, 0.3, 0.7]
    gold = [1.0, 2.5, 2.0, 4.8, 0.5, 4.8]
    assert M.spearman(pred, gold) == pytest.approx(_naive_pearson(_ranks(pred), _ranks(gold)), abs=1e-12)
    assert M.pearson(pred, gold) == pytest.approx(_naive_pearson(pred, gold), abs=1e-12)
    assert M.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_accuracy_and_macro_f1_match_naive_counts():
    gold = [0, 0, 1, 1, 2, 2, 2]
    pred = [0, 1, 1, 1, 2, 0, 0]
    f1s = []
    for c in range(4):  # class 3 never occurs nor is predicted: counts with F1 = 0
        tp = sum(p == c and g == c for p, g in zip(pred, gold, strict=True))
        fp = sum(p == c and g != c for p, g in zip(pred, gold, strict=True))
        fn = sum(p != c and g == c for p, g in zip(pred, gold, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    out = M.classification_metrics(pred, gold, num_labels=4)
    assert out["accuracy"] == pytest.approx(4 / 7)
    assert out["macro_f1"] == pytest.approx(sum(f1s) / 4)


def _naive_ranking(scores, qrels, k):
    nd, rc, rr = [], [], []
    for q, rel in enumerate(qrels):
        order = sorted(range(len(scores[q])), key=lambda d: (-scores[q][d], d))[:k]
        dcg = sum((2 ** rel.get(d, 0) - 1) / math.log2(i + 2) for i, d in enumerate(order))
        ideal = sorted((r for r in rel.values() if r > 0), reverse=True)[:k]
        idcg = sum((2**r - 1) / math.log2(i + 2) for i, r in enumerate(ideal))
        nd.append(dcg / idcg)
        relevant = {d for d, r in rel.items() if r > 0}
        rc.append(len(relevant & set(order)) / len(relevant))
        first = next((i for i, d in enumerate(order) if d in relevant), None)
        rr.append(0.0 if first is None else 1 / (first + 1))
    return {f"ndcg@{k}": np.mean(nd), f"recall@{k}": np.mean(rc), f"mrr@{k}": np.mean(rr)}


def test_ranking_metrics_match_naive_reference_with_grades_and_ties():
    scores = np.array(
        [
            [0.9, 0.1, 0.5, 0.5, 0.3],  # a tie between candidates 2 and 3: the lower index ranks first
            [0.2, 0.8, 0.1, 0.7, 0.0],
            [0.0, 0.1, 0.2, 0.3, 0.4],  # the relevant one is last: outside k=3
        ]
    )
    qrels = [{3: 2, 0: 1}, {3: 1, 4: 2, 1: 0}, {0: 1}]
    for k in (1, 3, 5):
        ours = M.ranking_metrics(scores, qrels, k=k)
        ref = _naive_ranking(scores.tolist(), qrels, k)
        for key, value in ref.items():
            assert ours[key] == pytest.approx(value, abs=1e-12), (k, key)


def test_ranking_metrics_hand_computed_values():
    # one query, relevant doc at rank 2 of 3: nDCG = (1/log2 3) / 1, recall 1, MRR 1/2
    out = M.ranking_metrics(np.array([[0.9, 0.5, 0.1]]), [{1: 1}], k=10)
    assert out == pytest.approx({"ndcg@10": 1 / math.log2(3), "recall@10": 1.0, "mrr@10": 0.5})


def test_ranking_metrics_reject_bad_qrels():
    with pytest.raises(ValueError, match="no relevant candidate"):
        M.ranking_metrics(np.zeros((1, 3)), [{0: 0}])
    with pytest.raises(ValueError, match="outside"):
        M.ranking_metrics(np.zeros((1, 3)), [{5: 1}])
    with pytest.raises(ValueError, match="Q = len"):
        M.ranking_metrics(np.zeros((2, 3)), [{0: 1}])


def test_cosines_match_naive():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0]])
    assert M.paired_cosine(a, b) == pytest.approx([0.0, 1.0])
    assert M.cosine_matrix(a, b) == pytest.approx(np.array([[0.0, math.sqrt(0.5)], [math.sqrt(0.5), 1.0]]))
