"""Contrastive pieces vs naive references: pooling, InfoNCE (with hard negatives and the duplicate mask),
retrieval metrics on hand-made rankings, and the cross-worker gather with 2 gloo processes."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from neobert.contrastive import (
    ContrastiveEncoder,
    all_gather_with_grad,
    info_nce_loss,
    pool_sequences,
    retrieval_metrics,
)

ATOL = 1e-5


def _naive_pool(hidden, lengths, mode):
    out, start = [], 0
    for n in lengths:
        seg = hidden[start : start + n]
        out.append(seg.mean(0) if mode == "mean" else seg[0])
        start += n
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_pooling_matches_per_sequence_loop(mode):
    g = torch.Generator().manual_seed(0)
    lengths = [3, 1, 7, 2, 5]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    h1 = torch.randn(sum(lengths), 8, generator=g, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    fast = pool_sequences(h1, cu, mode)
    ref = _naive_pool(h2, lengths, mode)
    w = torch.randn_like(ref)
    (fast * w).sum().backward()
    (ref * w).sum().backward()
    diff = (fast - ref).abs().max().item()
    gdiff = (h1.grad - h2.grad).abs().max().item()
    print(f"pool {mode}: max diff {diff:.2e}, grad max diff {gdiff:.2e} (tol {ATOL})")
    assert diff < ATOL and gdiff < ATOL


def test_pooling_rejects_unknown_mode():
    with pytest.raises(ValueError, match="pooling"):
        pool_sequences(torch.zeros(2, 2), torch.tensor([0, 2]), "max")


def test_encoder_wrapper_pools_per_sequence():
    class Enc(torch.nn.Module):
        def forward(self, ids, meta):
            return ids.float().unsqueeze(1).repeat(1, 2)

    class Meta:
        cu_seqlens = torch.tensor([0, 2, 5], dtype=torch.int32)

    out = ContrastiveEncoder(Enc(), "mean")(torch.tensor([1, 3, 2, 4, 6]), Meta())
    assert torch.allclose(out, torch.tensor([[2.0, 2.0], [4.0, 4.0]]))


def _naive_info_nce(q, p, n, temperature, pos_keys=None, neg_keys=None):
    """Per query: candidates = every positive, then every hard negative; -log softmax at its own positive."""
    cands = list(p) + list(n)
    keys = (list(pos_keys) + list(neg_keys)) if pos_keys is not None else None
    losses = []
    for i in range(q.shape[0]):
        logits = []
        for j, c in enumerate(cands):
            if keys is not None and j != i and keys[j] == pos_keys[i]:
                continue  # duplicate of the positive: not a negative
            logits.append((j, F.cosine_similarity(q[i], c, dim=0) / temperature))
        values = torch.stack([v for _, v in logits])
        pos = [k for k, (j, _) in enumerate(logits) if j == i][0]
        losses.append(-(values[pos] - torch.logsumexp(values, 0)))
    return torch.stack(losses).mean()


def _rand_batch(seed, b=5, m=7, d=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g), torch.randn(b, d, generator=g), torch.randn(m, d, generator=g))


@pytest.mark.parametrize("with_negatives", [True, False])
def test_info_nce_matches_naive_reference(with_negatives):
    q, p, n = _rand_batch(1)
    if not with_negatives:
        n = n[:0]
    leaves = [t.clone().requires_grad_(True) for t in (q, p, n)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, p, n)]
    out = info_nce_loss(*leaves, temperature=0.05)
    ref = _naive_info_nce(*ref_leaves, 0.05)
    out.loss.backward()
    ref.backward()
    diff = abs(out.loss.item() - ref.item())
    gdiff = max(
        (a.grad - b.grad).abs().max().item() for a, b in zip(leaves, ref_leaves, strict=True) if a.numel()
    )
    print(f"info_nce: loss {out.loss.item():.4f} vs {ref.item():.4f}, diff {diff:.2e}, grad diff {gdiff:.2e}")
    assert diff < 1e-4 and gdiff < 1e-4
    assert out.num_candidates == q.shape[0] + n.shape[0]


def test_info_nce_duplicate_positive_mask_matches_reference():
    q, p, n = _rand_batch(2)
    p[3] = p[1]  # queries 1 and 3 share a passage; negative 0 is that passage too
    n[0] = p[1]
    pos_keys = torch.tensor([10, 11, 12, 11, 14])
    neg_keys = torch.tensor([11, 20, 21, 22, 23, 24, 25])
    out = info_nce_loss(q, p, n, temperature=0.1, pos_keys_B=pos_keys, neg_keys_M=neg_keys)
    ref = _naive_info_nce(q, p, n, 0.1, pos_keys.tolist(), neg_keys.tolist())
    unmasked = info_nce_loss(q, p, n, temperature=0.1).loss
    print(f"masked loss {out.loss.item():.4f} vs ref {ref.item():.4f}; unmasked {unmasked.item():.4f}")
    assert abs(out.loss.item() - ref.item()) < 1e-4
    assert abs(unmasked.item() - ref.item()) > 1e-3  # the mask changes the result, so the test can fail


def test_info_nce_rejects_bad_input():
    q, p, n = _rand_batch(3)
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(q, p, n, temperature=0.0)
    with pytest.raises(ValueError, match="row-aligned"):
        info_nce_loss(q, p[:2], n)


def test_retrieval_metrics_on_hand_made_rankings():
    # query 0: positive ranked 1st; query 1: 3rd; query 2: 12th (outside top-10); query 3: tie with one other
    scores = torch.zeros(4, 12)
    scores[0] = torch.linspace(1, 0, 12)  # pos idx 0 -> rank 1
    scores[1] = torch.linspace(1, 0, 12)  # pos idx 2 -> rank 3
    scores[2] = torch.linspace(1, 0, 12)  # pos idx 11 -> rank 12
    scores[3] = torch.linspace(1, 0, 12)
    scores[3, 5] = scores[3, 0]  # pos idx 5 ties with the best -> pessimistic rank 2
    m = retrieval_metrics(scores, torch.tensor([0, 2, 11, 5]))
    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@10"] == pytest.approx(3 / 4)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 2) / 4)
    collapsed = retrieval_metrics(torch.ones(3, 20), torch.tensor([0, 1, 2]))
    assert collapsed["recall@10"] == 0.0  # equal scores must not look like a perfect model


# ------------------------------------------------------------------------- 2 gloo processes vs one process
# Rank r holds queries/positives [Q_SPLIT[r]] and negatives [N_SPLIT[r]] of the full batch (unequal sizes).
Q_SPLIT = (slice(0, 3), slice(3, 5))
N_SPLIT = (slice(0, 5), slice(5, 7))


def _gloo_worker(rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist

    # a file store: no port picked in advance that another process on a busy box could take meanwhile
    store = os.path.join(out_dir, "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        q, p, n = _rand_batch(4)
        q = q[Q_SPLIT[rank]].clone().requires_grad_(True)
        p = p[Q_SPLIT[rank]].clone().requires_grad_(True)
        n = n[N_SPLIT[rank]].clone().requires_grad_(True)
        keys = torch.arange(5)[Q_SPLIT[rank]]
        out = info_nce_loss(
            q, p, n, temperature=0.05, pos_keys_B=keys, neg_keys_M=torch.full((n.shape[0],), -1)
        )
        out.loss.backward()
        gathered = all_gather_with_grad(torch.full((rank + 1, 2), float(rank)))
        torch.save(
            {
                "loss": out.loss.detach(),
                "grads": (q.grad, p.grad, n.grad),
                "num_candidates": out.num_candidates,
                "gathered": gathered,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_cross_worker_gather_gradient_equals_full_batch():
    """Each rank's embedding gradient, averaged as DDP does (/world), equals the full-batch gradient."""
    import torch.multiprocessing as mp

    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gloo_worker, args=(world, tmp), nprocs=world, join=True)
        res = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    q, p, n = (t.clone().requires_grad_(True) for t in _rand_batch(4))
    full = info_nce_loss(q, p, n, temperature=0.05)
    full.loss.backward()
    mean_loss = sum(r["loss"] for r in res) / world
    assert abs(mean_loss.item() - full.loss.item()) < 1e-5, (mean_loss, full.loss)
    max_diff = 0.0
    for rank in range(world):
        dq, dp, dn = (g / world for g in res[rank]["grads"])
        max_diff = max(
            max_diff,
            (dq - q.grad[Q_SPLIT[rank]]).abs().max().item(),
            (dp - p.grad[Q_SPLIT[rank]]).abs().max().item(),
            (dn - n.grad[N_SPLIT[rank]]).abs().max().item(),
        )
        assert res[rank]["num_candidates"] == 5 + 7
        assert res[rank]["gathered"].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    print(
        f"2-rank gloo gather: loss {mean_loss.item():.5f} vs {full.loss.item():.5f}, grad max diff {max_diff:.2e}"
    )
    assert max_diff < 1e-5


def test_positive_keys_without_negative_keys_is_refused():
    """A default negative key would collide with real keys and silently mask true hard negatives."""
    import pytest

    from neobert.contrastive import info_nce_loss

    q, p, n = torch.randn(3, 8), torch.randn(3, 8), torch.randn(2, 8)
    keys = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="neg_keys_M"):
        info_nce_loss(q, p, n, pos_keys_B=keys)
    out = info_nce_loss(q, p, None, pos_keys_B=keys)  # no hard negatives: nothing to key
    assert out.num_candidates == 3
