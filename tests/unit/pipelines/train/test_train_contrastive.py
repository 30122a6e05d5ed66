"""Contrastive training pieces without a cluster: the global pair order, packing collate, split, eval set, init dirs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.tokenizer import CLS_ID, SEP_ID
from pipelines.train import contrastive_data as ct
from pipelines.train import contrastive_init as ci
from pipelines.train.data import row_keys


def _source_rows(name: str, n: int) -> pa.Table:
    return pa.table({
        "query": [f"{name} query {i}" for i in range(n)],
        "positive": [f"{name} passage {i}" for i in range(n)],
        "negatives": [[f"{name} negative {i} {j}" for j in range(3)] for i in range(n)],
        "source": [name] * n,
    })  # fmt: skip


SIZES = {"a": 90, "b": 40, "c": 10}


def _opens(sizes=SIZES, block=7):
    tables = {n: _source_rows(n, k) for n, k in sizes.items()}
    # Arrow batches of `block` rows: what a Ray Data iterator hands over (the order does not depend on it)
    return {
        n: (lambda e, t=t: [t.slice(i, block) for i in range(0, t.num_rows, block)])
        for n, t in tables.items()
    }


@pytest.fixture(scope="module")
def collate():
    return ct.ContrastiveCollate(max_seq_len=16, num_negatives=1, seed=0)


def _pairs(global_batch=12, alpha=0.5, window=16, sizes=SIZES):
    return ct.pair_mixture(sizes, alpha=alpha, global_batch_size=global_batch, shuffle_window_rows=window, seed=5,
                           path="rows", prefetch_steps=0)  # fmt: skip


def _run(collate, world, steps, *, state=None, one_source=False, sizes=SIZES, **kw):
    """Per global step the keys (in order) and per-rank queries over all ranks, and the state after the last."""
    srcs = [ct.ContrastiveStepSource(_pairs(sizes=sizes, **kw), _opens(sizes), collate, rank=r, world_size=world,
                                     one_source_per_batch=one_source, state=state, max_steps=steps)
            for r in range(world)]  # fmt: skip
    out = []
    for _ in range(steps):
        batches = [s.next_step()[0] for s in srcs]
        out.append(np.concatenate([b.row_keys.numpy() for b in batches]).tolist())
    states = [s.state_dict() for s in srcs]
    assert all(st == states[0] for st in states)  # every rank stores the same global position
    for s in srcs:
        s.close()
    return out, states[0]


def test_source_shares_follow_rows_to_the_alpha():
    expected = np.sqrt([90.0, 40.0, 10.0]) / np.sqrt([90.0, 40.0, 10.0]).sum()
    w = ct.source_weights(SIZES, 0.5)
    assert np.allclose([w[n] for n in "abc"], expected)
    assert np.allclose(list(ct.source_weights(SIZES, 0.0).values()), [1 / 3] * 3)
    assert np.allclose(
        [ct.source_weights(SIZES, 1.0)[n] for n in "abc"], [0.64285714, 0.28571429, 0.07142857]
    )
    src = ct.ContrastiveStepSource(_pairs(), _opens(), None, max_steps=None)
    src.collate = lambda rows, keys: rows["source"]  # only the sources of the pairs
    picks = np.concatenate([src.next_step()[0] for _ in range(40)])
    shares = [float((picks == n).mean()) for n in "abc"]
    print(f"alpha=0.5: shares expected {np.round(expected, 3).tolist()}, got {np.round(shares, 3).tolist()}")
    assert (
        np.abs(np.array(shares) - expected).max() < 0.01
    )  # deficit interleaving: within a pair of the share
    assert src.step_stats()["data/pairs/a"] > 0


def test_order_does_not_depend_on_world_size_and_resumes_on_another(collate):
    full, _ = _run(collate, 1, 8)
    assert all(len(step) == 12 for step in full)
    assert len({k for step in full for k in step}) == 96 < sum(SIZES.values())  # no pair twice in an epoch
    for world in (2, 3, 4):
        assert _run(collate, world, 8)[0] == full, world
    for stop, w1, w2 in ((3, 2, 1), (5, 1, 3), (1, 4, 2)):
        head, state = _run(collate, w1, stop)
        tail, _ = _run(collate, w2, 8 - stop, state=json.loads(json.dumps(state)))
        assert head + tail == full, (stop, w1, w2)
    with pytest.raises(ValueError, match="do not split over 5 workers"):
        _run(collate, 5, 1)


def test_epochs_repeat_reshuffled_and_one_source_batches(collate):
    small = {"a": 10, "b": 6}
    steps, _ = _run(collate, 2, 10, sizes=small, global_batch=4, window=4)
    keys = [k for s in steps for k in s]
    assert len(keys) == 40 and len(set(keys)) == 40  # row keys carry the epoch: later epochs are new keys
    one, _ = _run(collate, 2, 30, one_source=True, sizes=small, global_batch=4, window=4)
    a_keys = {k for e in range(20) for k in row_keys("a", e, np.arange(10)).tolist()}
    from_a = [all(k in a_keys for k in step) for step in one]
    assert all(
        f or not any(k in a_keys for k in step) for f, step in zip(from_a, one, strict=True)
    )  # one source
    share = np.mean(from_a)
    expected = ct.source_weights(small, 0.5)["a"]
    assert abs(share - expected) < 0.05, (share, expected)
    resumed = _run(collate, 1, 10, one_source=True, sizes=small, global_batch=4, window=4,
                   state=_run(collate, 2, 20, one_source=True, sizes=small, global_batch=4, window=4)[1])[0]  # fmt: skip
    assert resumed == one[20:]


def test_split_rows_step_matches_the_table_split():
    t = _rows(400)
    train, held = ct.split_rows(t, 0.2)
    got_train = ct.SplitRows(0.2, held_out=False)(t)
    got_held = ct.SplitRows(0.2, held_out=True)(t)
    assert sorted(got_train.column("query").to_pylist()) == sorted(train.column("query").to_pylist())
    assert sorted(got_held.column("query").to_pylist()) == sorted(held.column("query").to_pylist())


def test_hard_negatives_follow_the_row_key_not_the_rank(collate):
    rows = _source_rows("a", 4).to_pydict()
    keys = np.array([11, 12, 13, 14])
    b1 = collate(rows, keys=keys)
    sub = {k: v[2:] for k, v in rows.items()}
    b2 = collate(sub, keys=keys[2:])  # the same rows in another batch (another rank's part)
    assert b1.neg_keys[2:].tolist() == b2.neg_keys.tolist()
    assert b1.row_keys.tolist() == keys.tolist()


def test_pack_token_lists_wraps_and_truncates():
    flat, lengths, num_truncated = ct.pack_token_lists(
        [[5, 6, 7], [8], list(range(1000, 1010))], max_seq_len=6
    )
    assert lengths.tolist() == [5, 3, 6] and num_truncated == 1
    assert flat.tolist() == [
        CLS_ID,
        5,
        6,
        7,
        SEP_ID,
        CLS_ID,
        8,
        SEP_ID,
        CLS_ID,
        1000,
        1001,
        1002,
        1003,
        SEP_ID,
    ]


def test_collate_packs_queries_positives_negatives_in_order():
    collate = ct.ContrastiveCollate(max_seq_len=32, num_negatives=1, seed=0)
    rows = {
        "query": ["who made the heaven", "a river in egypt"],
        "positive": ["god created the heavens", "the nile flows north"],
        "negatives": [["the earth was formless", "darkness was on the deep"], []],
        "source": ["x", "y"],
    }
    b = collate(rows)
    assert b.num_queries == 2 and b.num_negatives == 1  # capped to 1 per row; the 2nd row has none
    assert b.lengths.shape == (5,) and int(b.lengths.sum()) == b.num_tokens
    cu = np.concatenate([[0], np.cumsum(b.lengths.numpy())])
    ids = b.input_ids.numpy()
    assert (ids[cu[:-1]] == CLS_ID).all() and (ids[cu[1:] - 1] == SEP_ID).all()
    tok = collate.tokenize(["god created the heavens"])[0]
    assert ids[cu[2] + 1 : cu[3] - 1].tolist() == tok  # sequence 2 = the first positive
    assert b.pos_keys[0] == ct.text_key("god created the heavens")


def _rows(n: int) -> pa.Table:
    return pa.table(
        {
            "query": [f"query {i}" for i in range(n)],
            "positive": [f"passage {i % (n - 2)}" for i in range(n)],  # two duplicated passages
            "negatives": [[f"negative {i}"] for i in range(n)],
            "source": ["s"] * n,
        }
    )


def test_split_is_stable_and_disjoint():
    t = _rows(400)
    tr1, ev1 = ct.split_rows(t, 0.2)
    shuffled = t.take(pa.array(np.random.default_rng(0).permutation(t.num_rows)))
    tr2, ev2 = ct.split_rows(shuffled, 0.2)  # Ray Data may hand the rows over in any order
    assert ev1.column("query").to_pylist() == ev2.column("query").to_pylist()
    assert tr1.column("query").to_pylist() == tr2.column("query").to_pylist()
    assert not set(tr1.column("query").to_pylist()) & set(ev1.column("query").to_pylist())
    assert tr1.num_rows + ev1.num_rows == 400 and 40 < ev1.num_rows < 120
    with pytest.raises(ValueError, match="both must be non-empty"):
        ct.split_rows(_rows(3), 0.01)
    with pytest.raises(ValueError, match="lack column"):
        ct.split_rows(t.drop(["source"]), 0.2)


def test_eval_set_dedups_corpus():
    queries, corpus, pos = ct.build_eval_set(_rows(10), 0)
    assert len(queries) == 10 and len(corpus) == len(set(corpus)) == 8 + 10
    assert [corpus[i] for i in pos] == [f"passage {i % 8}" for i in range(10)]


def test_resolve_init_errors_and_hf_roundtrip(tmp_path):
    from neobert.checkpoint import resolve_model_dir, save_model_dir
    from neobert.hf.export import export_hf

    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_dir(tmp_path / "nope")
    with pytest.raises(ValueError, match="is not a NeoBERT model dir"):
        resolve_model_dir(tmp_path)
    with pytest.raises(ValueError, match="model.init: .*does not exist"):
        ci.load_init_encoder(tmp_path / "nope")
    from neobert.model import NeoBERT, NeoBERTConfig
    from neobert.packing import PackedMeta
    from pipelines.tokenizer import default_tokenizer_dir

    cfg = NeoBERTConfig.preset("tiny")
    torch.manual_seed(0)
    model = NeoBERT(cfg)
    save_model_dir(tmp_path / "ckpt" / "model", model, cfg, kind="encoder", pooling="mean")
    assert resolve_model_dir(tmp_path / "ckpt") == tmp_path / "ckpt" / "model"
    enc_md, cfg_md, pooling_md = ci.load_init_encoder(tmp_path / "ckpt")  # the model-dir path
    assert cfg_md == cfg and pooling_md == "mean"
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in enc_md.state_dict().items())
    export_hf(tmp_path / "ckpt", tmp_path / "hf", tokenizer_dir=default_tokenizer_dir(), parity=False)
    enc, cfg2, pooling = ci.load_init_encoder(tmp_path / "hf")
    assert cfg2.ffn_hidden_size == cfg.ffn_hidden_size and pooling == "mean"
    meta = PackedMeta.from_lengths([4, 9])
    ids = torch.randint(1000, 2000, (13,))
    diff = (enc(ids, meta) - model(ids, meta)).abs().max().item()
    print(f"HF export -> init encoder: max diff {diff:.2e}")
    assert diff < 1e-5
