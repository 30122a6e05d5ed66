"""The harness against known numbers: the reference model's published MTEB score, and chance levels."""

from __future__ import annotations

import pytest
import torch

from pipelines.eval.encoders import REFERENCE, load_encoder, resolve_model
from pipelines.eval.tasks import load_recipes, run_task

# MTEB results for sentence-transformers/all-MiniLM-L6-v2 on STSBenchmark (test, cosine Spearman), from
# github.com/embeddings-benchmark/results results/sentence-transformers__all-MiniLM-L6-v2/
# 8b3219a92973c328a8e22fadcfa821b5dc75636a/STSBenchmark.json (see docs/evaluation.md).
MTEB_STSB_SPEARMAN = 0.8203247283076371


@pytest.fixture(scope="module")
def reference():
    return load_encoder(resolve_model(REFERENCE), torch.device("cpu"))


@pytest.mark.slow
def test_reference_reproduces_published_mteb_stsb(reference):
    out = run_task("stsb", reference, load_recipes(), seed=0)  # the full test split: 1,379 pairs
    assert out["num_pairs"] == 1379
    assert out["spearman"] == pytest.approx(MTEB_STSB_SPEARMAN, abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("task,near_chance,margin", [("polarity", 0.65, 0.1), ("trec", 0.4, 0.25)])
def test_random_init_near_chance_reference_well_above(reference, task, near_chance, margin):
    """128 train / 128 test examples, one seed. Chance: polarity 0.5 (0.55 majority), trec 0.24 majority
    (ENTY); a random-init model's mean-pooled random embeddings still carry a little lexical signal."""
    from pipelines.eval.encoders import fresh_copy

    recipes = load_recipes()
    rand = run_task(task, load_encoder(resolve_model("random:tiny"), torch.device("cpu")), recipes, seed=0,
                    max_examples=128)  # fmt: skip
    ref = run_task(task, fresh_copy(reference), recipes, seed=0, max_examples=128)
    assert rand["accuracy"] < near_chance, rand
    assert ref["accuracy"] > rand["accuracy"] + margin, (ref, rand)
