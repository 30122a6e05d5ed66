"""CUDA checks of the masked-LM loss: torch chunked vs a naive reference in bf16 and fp32, and the
bounded-memory property. Skipped without CUDA.

Tolerances: fp32 loss/grads 1e-4 relative (cuBLAS may split K differently per shape); bf16 loss 1e-3
relative, grads 3e-2 relative (one bf16 rounding of the logits gradient), argmax counts within 1%
(bf16 logits from differently shaped GEMMs may break ties differently).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neobert.loss import IGNORE_INDEX, MaskedLMLoss

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _make(T=4096, D=256, vv=5000, pad=128, frac=0.2, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    V = -(-vv // pad) * pad
    hidden = torch.randn(T, D, device=DEV, generator=g)
    weight = torch.randn(V, D, device=DEV, generator=g) * 0.05
    bias = torch.randn(V, device=DEV, generator=g) * 0.1
    labels = torch.full((T,), IGNORE_INDEX, dtype=torch.long, device=DEV)
    mask = torch.rand(T, device=DEV, generator=g) < frac
    labels[mask] = torch.randint(0, vv, (int(mask.sum()),), device=DEV, generator=g)
    with torch.no_grad():  # make about half the masked tokens predictable so accuracy is informative
        hidden += (
            8.0 * (torch.rand(T, 1, device=DEV, generator=g) * mask[:, None]) * weight[labels.clamp(min=0)]
        )
    return hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), labels, vv


def _naive(hidden, weight, bias, labels, vv):
    logits = F.linear(hidden, weight, bias)[:, :vv]
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    mask = labels != IGNORE_INDEX
    correct = ((logits.argmax(-1) == labels) & mask).sum()
    return loss, int(mask.sum()), int(correct)


def _rel(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()


def _run(fn, tensors):
    loss, n, correct = fn()
    grads = torch.autograd.grad(loss, tensors)
    return float(loss.detach()), int(n), int(correct), grads


def _compare(name, got, ref, loss_rtol, grad_rtol, acc_tol):
    loss, n, correct, grads = got
    r_loss, r_n, r_correct, r_grads = ref
    assert n == r_n, f"{name}: num_masked {n} != {r_n}"
    assert abs(loss - r_loss) <= loss_rtol * abs(r_loss), f"{name}: loss {loss} vs {r_loss}"
    assert abs(correct - r_correct) <= acc_tol * n, f"{name}: num_correct {correct} vs {r_correct} of {n}"
    assert 0 < r_correct < n, f"fixture should give some hits and some misses, got {r_correct}/{n}"
    for gname, g, r in zip(["hidden", "weight", "bias"], grads, r_grads, strict=True):
        err = _rel(g, r)
        assert err <= grad_rtol, f"{name}: grad_{gname} max rel diff {err:.2e} > {grad_rtol}"


def test_torch_chunked_vs_naive_fp32():
    h, w, b, labels, vv = _make()
    tensors = [h, w, b]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        loss_fn = MaskedLMLoss(chunk_size=300)
        got = _run(lambda: loss_fn(h, w, b, labels, valid_vocab_size=vv), tensors)
        ref = _run(lambda: _naive(h, w, b, labels, vv), tensors)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    _compare("torch fp32", got, ref, loss_rtol=1e-5, grad_rtol=1e-4, acc_tol=0.005)


@pytest.mark.parametrize("accum_dtype", [torch.float32, torch.bfloat16])
def test_torch_chunked_vs_naive_bf16_autocast(accum_dtype):
    h, w, b, labels, vv = _make(seed=1)
    h_bf16 = h.detach().to(torch.bfloat16).requires_grad_()  # the encoder's output dtype under autocast
    tensors = [h_bf16, w, b]
    loss_fn = MaskedLMLoss(chunk_size=512, accum_dtype=accum_dtype)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = _run(lambda: loss_fn(h_bf16, w, b, labels, valid_vocab_size=vv), tensors)
        ref = _run(lambda: _naive(h_bf16, w, b, labels, vv), tensors)
    assert got[3][0].dtype == torch.bfloat16 and got[3][1].dtype == torch.float32
    _compare(f"torch bf16 accum={accum_dtype}", got, ref, loss_rtol=1e-3, grad_rtol=3e-2, acc_tol=0.01)


def test_peak_memory_is_bounded_by_one_chunk():
    """T=32768, D=256, V=30592 bf16: the full logits alone would be 2 GiB; one chunk of 1024 is ~60 MiB."""
    T, D, vv = 32768, 256, 30522
    h, w, b, labels, vv = _make(T=T, D=D, vv=vv, seed=3)
    h_bf16 = h.detach().to(torch.bfloat16).requires_grad_()
    del h
    loss_fn = MaskedLMLoss(chunk_size=1024)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_fn(h_bf16, w, b, labels, valid_vocab_size=vv).loss_sum.backward()  # warm-up (cuBLAS workspace)
    h_bf16.grad = w.grad = b.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = loss_fn(h_bf16, w, b, labels, valid_vocab_size=vv)
    out.loss_sum.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    V = w.shape[0]
    # budget: bf16 chunk logits + 64 MiB fp32 block + grad_W fp32 (accumulator and returned copy) +
    # bf16 weight copy + grads of hidden (T, D) and gathered rows + slack for small tensors
    budget = 2 * 1024 * V + (64 << 20) + 2 * 4 * V * D + 2 * V * D + 2 * 2 * T * D + (32 << 20)
    assert extra <= budget, f"peak extra {extra / 2**20:.1f} MiB > budget {budget / 2**20:.1f} MiB"
    assert extra < 2 * T * V, "peak extra memory reached the size of the full bf16 logits"


def test_one_host_sync_per_call():
    """Step 1 of the algorithm promises exactly one device->host sync (the masked count)."""
    import warnings

    h, w, b, labels, vv = _make(seed=4)
    loss_fn = MaskedLMLoss(chunk_size=256)
    loss_fn(h, w, b, labels, valid_vocab_size=vv).loss_sum.backward()  # warm-up: one-time capability probe
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = loss_fn(h, w, b, labels, valid_vocab_size=vv)
            out.loss_sum.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [  # torch also warns that the debug mode itself is a prototype: not a sync
        str(x.message) for x in caught if "synchroniz" in str(x.message) and "prototype" not in str(x.message)
    ]
    assert len(syncs) <= 1, f"expected one host sync per call, saw {len(syncs)}: {syncs[:3]}"


@pytest.mark.parametrize("vv", [30522, 30592])
def test_triton_rows_match_torch_rows_bf16(vv):
    """The fused Triton row kernel (CUDA default) against the unfused torch rows on the same GPU, bf16."""
    import neobert.loss as loss_mod
    from neobert.kernels.ce_triton import triton_available

    if not triton_available():
        pytest.skip("triton not importable")
    h, w, b, labels, vv = _make(T=8192, D=256, vv=vv, seed=5)
    h_bf16 = h.detach().to(torch.bfloat16).requires_grad_()
    tensors = [h_bf16, w, b]
    loss_fn = MaskedLMLoss(chunk_size=1000)
    results = {}
    for use in (True, False):
        loss_mod._USE_TRITON = use
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                results[use] = _run(lambda: loss_fn(h_bf16, w, b, labels, valid_vocab_size=vv), tensors)
        finally:
            loss_mod._USE_TRITON = True
    _compare(
        "triton vs torch rows", results[True], results[False], loss_rtol=1e-4, grad_rtol=1e-2, acc_tol=0.002
    )
