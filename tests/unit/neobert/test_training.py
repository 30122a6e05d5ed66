"""neobert.training: masking statistics/determinism, LR schedule, optimizer groups, exact grad accumulation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from neobert.training import (
    IGNORE_INDEX,
    MicroBatch,
    build_optimizer,
    build_scheduler,
    lr_lambda,
    mask_seed,
    mask_tokens,
    model_flops,
    param_groups,
    train_step,
)
from pipelines.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_IDS, VOCAB_SIZE


def sample_ids(n: int = 20000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB_SIZE, (n,), generator=g)
    ids[::50] = CLS_ID
    ids[49::50] = SEP_ID
    ids[-500:] = PAD_ID  # a padding tail
    return ids


def mask(ids, seed=0, **kw):
    return mask_tokens(
        ids,
        generator=torch.Generator().manual_seed(seed),
        mask_id=MASK_ID,
        special_ids=SPECIAL_IDS,
        vocab_size=VOCAB_SIZE,
        **kw,
    )


def test_mask_rate_and_special_tokens_never_masked():
    ids = sample_ids()
    masked, labels = mask(ids)
    special = torch.isin(ids, torch.tensor(SPECIAL_IDS))
    sel = labels != IGNORE_INDEX
    assert not (sel & special).any(), "special tokens (CLS/SEP/PAD) must never be selected"
    rate = sel.sum().item() / (~special).sum().item()
    # Bernoulli(0.2) over ~19k tokens: std ~0.003; 5 sigma bound.
    assert abs(rate - 0.2) < 0.015, rate
    assert torch.equal(labels[sel], ids[sel])
    assert (masked[sel] == MASK_ID).all() and torch.equal(masked[~sel], ids[~sel])


def test_mask_80_10_10_split():
    ids = sample_ids(60000)
    masked, labels = mask(ids, strategy="80_10_10", mask_prob=0.15)
    sel = labels != IGNORE_INDEX
    n = sel.sum().item()
    frac_mask = (masked[sel] == MASK_ID).float().mean().item()
    frac_same = (masked[sel] == ids[sel]).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.03 and abs(frac_same - 0.1) < 0.03, (n, frac_mask, frac_same)
    assert torch.equal(masked[~sel], ids[~sel])


def test_mask_deterministic_and_seed_dependent():
    ids = sample_ids(5000)
    a, la = mask(ids, seed=mask_seed(0, 3, 1, 0))
    b, lb = mask(ids, seed=mask_seed(0, 3, 1, 0))
    c, _ = mask(ids, seed=mask_seed(0, 3, 1, 1))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert len({mask_seed(0, s, r, m) for s in range(5) for r in range(3) for m in range(3)}) == 45


def test_mask_rejects_bad_prob():
    with pytest.raises(ValueError, match="mask_prob"):
        mask(sample_ids(10), mask_prob=1.5)


def test_lr_schedule_shapes():
    kw = dict(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_lambda(0, **kw) == pytest.approx(0.1)
    assert lr_lambda(9, **kw) == pytest.approx(1.0)
    assert lr_lambda(10, **kw) == pytest.approx(1.0)
    assert lr_lambda(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert lr_lambda(110, **kw) == pytest.approx(0.1) and lr_lambda(500, **kw) == pytest.approx(0.1)
    assert lr_lambda(60, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(35, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.75)
    assert lr_lambda(80, schedule="constant", **kw) == 1.0
    vals = [lr_lambda(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(vals)), "decay must be monotone"
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, **kw)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.2) and seen[9] == pytest.approx(2.0) and seen[11] < 2.0


class ToyMLM(nn.Module):
    """Embedding -> linear head with a summed CE, the same call contract as NeoBERTForMLM (meta ignored)."""

    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, meta, labels):
        from types import SimpleNamespace

        logits = self.head(torch.tanh(self.proj(self.norm(self.emb(input_ids)))))
        sel = labels != IGNORE_INDEX
        loss_sum = nn.functional.cross_entropy(logits[sel], labels[sel], reduction="sum")
        return SimpleNamespace(loss_sum=loss_sum, num_correct=(logits[sel].argmax(-1) == labels[sel]).sum())


def make_mb(ids, labels):
    return MicroBatch(ids, labels, None, int((labels != IGNORE_INDEX).sum()), len(ids))


def test_param_groups_exclude_norms_biases_embeddings():
    m = ToyMLM()
    decay, no_decay = param_groups(m, 0.1)
    assert {id(p) for p in decay["params"]} == {id(m.proj.weight), id(m.head.weight)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert id(m.emb.weight) in {id(p) for p in no_decay["params"]}
    assert build_optimizer(m, lr=1e-3).defaults["fused"] in (False, None)  # CPU params: not fused


def test_grad_accumulation_is_exact_token_mean():
    """Micro-batches with very different masked counts + accumulation == one big batch, token-mean."""
    torch.manual_seed(0)
    ref = ToyMLM()
    acc = ToyMLM()
    acc.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(5, 50, (n,), generator=g) for n in (64, 16, 40)]
    labels = []
    for x, p in zip(ids, (0.5, 0.05, 0.2), strict=True):
        lab = torch.where(torch.rand(len(x), generator=g) < p, x, torch.full_like(x, IGNORE_INDEX))
        lab[0] = x[0]  # at least one target each
        labels.append(lab)
    # Reference: one big batch, mean over all masked tokens.
    big_ids, big_lab = torch.cat(ids), torch.cat(labels)
    out = ref(big_ids, None, big_lab)
    (out.loss_sum / (big_lab != IGNORE_INDEX).sum()).backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    # Accumulated: train_step with SGD lr=0 style -> inspect grads before the step via a hook optimizer.
    captured = {}

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            for n, p in acc.named_parameters():
                captured[n] = p.grad.clone()
            return super().step(closure)

    opt = Capture(acc.parameters(), lr=0.0)
    stats = train_step(
        acc, opt, None, [make_mb(i, lab) for i, lab in zip(ids, labels, strict=True)], max_grad_norm=None
    )
    assert int(stats.num_masked_global) == (big_lab != IGNORE_INDEX).sum().item()
    max_diff = max((captured[n] - g).abs().max().item() for n, g in ref_grads.items())
    print(f"max |grad diff| accumulated vs big batch: {max_diff:.3e}")
    assert max_diff < 1e-6
    # The naive per-micro-batch mean differs noticeably (the test can fail).
    naive = ToyMLM()
    naive.load_state_dict(ref.state_dict())
    for i, lab in zip(ids, labels, strict=True):
        o = naive(i, None, lab)
        (o.loss_sum / (lab != IGNORE_INDEX).sum() / len(ids)).backward()
    naive_diff = max((p.grad - ref_grads[n]).abs().max().item() for n, p in naive.named_parameters())
    assert naive_diff > 100 * max(max_diff, 1e-9)


def test_global_count_scaling_across_workers():
    """With a fake all-reduce (2 workers), each worker scales by world/global so DDP's mean gives the token mean."""
    torch.manual_seed(0)
    m = ToyMLM()
    ids = torch.randint(5, 50, (32,))
    lab = torch.where(torch.arange(32) % 4 == 0, ids, torch.full_like(ids, IGNORE_INDEX))
    captured = {}

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            captured["g"] = m.head.bias.grad.clone()

    import neobert.training as tr

    orig = tr.world_size
    tr.world_size = lambda: 2
    try:
        train_step(m, Capture(m.parameters(), lr=0.0), None, [make_mb(ids, lab)], max_grad_norm=None,
                   reduce_count=lambda n: n + 24)  # fmt: skip
    finally:
        tr.world_size = orig
    m.zero_grad()
    (m(ids, None, lab).loss_sum * 2 / (8 + 24)).backward()
    assert torch.allclose(captured["g"], m.head.bias.grad, atol=1e-7)


def test_grad_clipping_and_norm():
    torch.manual_seed(0)
    m = ToyMLM()
    ids = torch.randint(5, 50, (32,))
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    stats = train_step(m, opt, None, [make_mb(ids, ids.clone())], max_grad_norm=1e-3)
    assert stats.grad_norm.item() > 1e-3  # the pre-clip norm is reported


def test_model_flops_counts_attention_and_head():
    kw = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, vocab_size=1000, training=False)
    base = model_flops(num_tokens=100, sum_sq_seqlens=0, num_masked=0, **kw)
    assert base == 2 * 100 * (8 * 64 * 64 + 6 * 64 * 128)
    attn = model_flops(num_tokens=100, sum_sq_seqlens=100 * 100, num_masked=0, **kw) - base
    assert attn == 2 * 4 * 64 * 100 * 100
    head = model_flops(num_tokens=100, sum_sq_seqlens=0, num_masked=20, **kw) - base
    assert head == 2 * 64 * 1000 * 20
    assert model_flops(num_tokens=100, sum_sq_seqlens=0, num_masked=0, **{**kw, "training": True}) == 3 * base
    assert math.isfinite(base)


def test_grad_accumulation_exact_with_neobert_packed_batches():
    """Real tiny NeoBERTForMLM: two packed micro-batches accumulated == the two streams packed as one batch."""
    from neobert.model import NeoBERTConfig, NeoBERTForMLM
    from neobert.packing import PackedMeta

    cfg = NeoBERTConfig.preset("tiny", num_layers=1, attn_backend="sdpa")
    torch.manual_seed(0)
    ref = NeoBERTForMLM(cfg)
    acc = NeoBERTForMLM(cfg)
    acc.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    docs = [[30, 20], [10, 5, 7]]
    mbs = []
    for i, lens in enumerate(docs):
        ids = torch.randint(1000, 2000, (sum(lens),), generator=g)
        masked, labels = mask(ids, seed=mask_seed(0, 0, 0, i), mask_prob=0.3 if i == 0 else 0.1)
        mbs.append(make_mb(masked, labels))
        mbs[-1].meta = PackedMeta.from_lengths(lens)
    big_meta = PackedMeta.from_lengths([n for lens in docs for n in lens])
    big_ids = torch.cat([mb.input_ids for mb in mbs])
    big_lab = torch.cat([mb.labels for mb in mbs])
    out = ref(big_ids, big_meta, big_lab)
    (out.loss_sum / (big_lab != IGNORE_INDEX).sum()).backward()
    captured = {}

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            captured.update({n: p.grad.clone() for n, p in acc.named_parameters() if p.grad is not None})

    train_step(acc, Capture(acc.parameters(), lr=0.0), None, mbs, max_grad_norm=None)
    max_diff = max(
        (captured[n] - p.grad).abs().max().item() for n, p in ref.named_parameters() if p.grad is not None
    )
    print(f"NeoBERT accumulated vs packed-as-one max |grad diff|: {max_diff:.3e}")
    assert max_diff < 1e-5


def test_train_step_passes_cpu_gathered_masked_rows_to_the_model():
    """MicroBatch.masked (NeoBERTForMLM.masked_rows on the CPU labels, what the trainer does) reaches the model
    as `masked=` and gives the same step as letting the model gather (which syncs on a GPU)."""
    from neobert.model import NeoBERTConfig, NeoBERTForMLM
    from neobert.packing import PackedMeta

    torch.manual_seed(0)
    cfg = NeoBERTConfig.preset("tiny", attn_backend="sdpa")
    models = [NeoBERTForMLM(cfg), NeoBERTForMLM(cfg)]
    models[1].load_state_dict(models[0].state_dict())
    lengths = [12, 30, 22]
    meta = PackedMeta.from_lengths(lengths)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(5, 1000, (sum(lengths),), generator=g)
    labels = torch.where(torch.rand(len(ids), generator=g) < 0.25, ids, torch.full_like(ids, IGNORE_INDEX))
    calls = []
    stats = []
    for with_masked, m in zip((False, True), models, strict=True):
        masked = m.masked_rows(labels).to("cpu", non_blocking=True) if with_masked else None
        forward = m.forward
        m.forward = lambda *a, _f=forward, **kw: calls.append(kw.get("masked")) or _f(*a, **kw)
        mb = MicroBatch(ids, labels, meta, int((labels != IGNORE_INDEX).sum()), len(ids), masked=masked)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        stats.append(train_step(m, opt, None, [mb], max_grad_norm=1.0))
    assert calls[0] is None and calls[1] is not None and calls[1].count == int((labels != IGNORE_INDEX).sum())
    assert torch.equal(stats[0].loss_sum, stats[1].loss_sum)
    for p0, p1 in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p0, p1)  # the same update


def test_bench_train_step_runs_the_shipped_step_on_cpu(tmp_path, monkeypatch):
    """bench/train_step.py measures `train_step` itself: a tiny CPU run of both variants. Same init, same documents
    and the same exact token-mean objective, so packed and padded must report the same loss after their steps."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "bench" / "train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    assert bench.train_step is __import__("neobert.training").training.train_step
    out = tmp_path / "bench.jsonl"
    import torch.distributed as dist

    try:
        bench.main(
            [
                "--preset",
                "tiny",
                "--device",
                "cpu",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--tokens-per-step",
                "256",
            ]
            + [
                "--max-seq-len",
                "64",
                "--median-len",
                "24",
                "--padded-batch-size",
                "4",
                "--json-out",
                str(out),
            ]
            + ["--variants", "packed,padded,fsdp2"]
        )
    finally:
        if dist.is_initialized():  # the fsdp2 variant's world-size-1 group
            dist.destroy_process_group()
    rows = {r.get("variant", "ratio"): r for r in map(json.loads, out.read_text().splitlines())}
    packed, padded = rows["packed"], rows["padded"]
    # FSDP2 at world size 1 (fp32 on a CPU) runs the same arithmetic as the plain step: the same loss every step
    assert len(rows["fsdp2"]["losses"]) == len(packed["losses"]) == 3
    assert rows["fsdp2"]["losses"] == packed["losses"]
    assert packed["steps"] == padded["steps"] == 2 and packed["mfu"] is None  # no peak FLOP/s on a CPU
    assert packed["tokens_per_s"] > 0 and packed["max_grad_norm"] == 1.0
    diff = abs(packed["final_loss"] - padded["final_loss"])
    print(f"packed vs padded loss after 3 steps: {packed['final_loss']:.6f} vs {padded['final_loss']:.6f}")
    assert diff <= 1e-4 * abs(padded["final_loss"]), diff


def test_bench_padded_micro_batches_keep_every_document(monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "bench" / "train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    lengths = [51, 16, 16, 16, 64, 29, 19, 16, 20]
    groups = bench.micro_batches(lengths, 4)
    assert groups == [[51, 16, 16, 16], [64, 29, 19, 16, 20]]  # a last group of one joins the previous one
    assert bench.micro_batches([5, 6], 4) == [[5, 6]] and bench.micro_batches([5], 4) == [[5]]
