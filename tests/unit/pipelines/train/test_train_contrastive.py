"""Contrastive training pieces without a cluster: source sampling, packing collate, split, eval set, init dirs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.tokenizer import CLS_ID, SEP_ID
from pipelines.train import contrastive_data as ct
from pipelines.train import contrastive_init as ci


def _sampler(sources, **kw):
    args = dict(batch_size=8, world_size=2, alpha=0.5, one_source_per_batch=False, seed=3)
    return ct.SourceSampler(sources, **{**args, **kw})


def test_source_probabilities_follow_rows_to_the_alpha():
    sources = ["a"] * 900 + ["b"] * 100
    s = _sampler(sources, alpha=0.5)
    expected = np.array([30.0, 10.0]) / 40.0  # sqrt(900) : sqrt(100)
    assert np.allclose(s.probs, expected)
    names = np.array(sources)
    picks = np.concatenate([s.global_batch(step) for step in range(400)])
    frac_a = float((names[picks] == "a").mean())
    print(f"alpha=0.5: P(a) expected {expected[0]:.3f}, sampled {frac_a:.3f} over {picks.size} rows")
    assert abs(frac_a - expected[0]) < 0.03
    assert np.allclose(_sampler(sources, alpha=0.0).probs, [0.5, 0.5])
    assert np.allclose(_sampler(sources, alpha=1.0).probs, [0.9, 0.1])


def test_one_source_per_global_batch_and_disjoint_rank_slices():
    sources = ["a"] * 50 + ["b"] * 50 + ["c"] * 20
    s = _sampler(sources, one_source_per_batch=True)
    names = np.array(sources)
    for step in range(50):
        r0, r1 = s.indices(step, 0), s.indices(step, 1)
        assert len(r0) == len(r1) == 8
        assert len(set(names[np.concatenate([r0, r1])])) == 1  # the whole global batch: one source
        assert not set(r0) & set(r1)  # ranks never share a row within a step
        assert np.array_equal(r0, s.indices(step, 0))  # a pure function of (seed, step): resume-exact
    mixed = _sampler(sources)
    assert any(len(set(names[mixed.global_batch(step)])) > 1 for step in range(10))


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
    b = collate(rows, step=0, rank=0)
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
