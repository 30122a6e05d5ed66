"""The RoPE-fused `fa4` attention op (neobert/kernels/attention.py `fa4_qkv_varlen_*`, neobert/kernels/rope_triton.py) on CPU.

FlashAttention-4 itself needs a Hopper GPU (tests/unit/test_model_gpu.py covers it there); here its two raw calls
are replaced by an exact fp32 per-document reference with the same contract (forward returns out and lse; the
backward writes into the dq/dk/dv buffers it is given, which are strided slices of one dqkv tensor). That checks
the op's plumbing: RoPE in the forward, dq/dk/dv landing in the right slices, RoPE undone in place, the autograd
registration, and the fake kernels under torch.compile. The Triton RoPE kernels are checked against the torch
reference under Triton's CPU interpreter when triton is installed (it is not in CI; always on the GPU machine).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from neobert.kernels import attention, rope_triton
from neobert.kernels.attention import sdpa_varlen
from neobert.kernels.rope import RotaryEmbedding, apply_rope
from neobert.model import NeoBERT, NeoBERTConfig
from neobert.packing import PackedMeta

LENGTHS = [5, 1, 17, 9]
T, N, H = sum(LENGTHS), 3, 16


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    meta = PackedMeta.from_lengths(LENGTHS)
    qkv = torch.randn(T, 3, N, H, generator=g, dtype=torch.float32).to(dtype)
    cos, sin = RotaryEmbedding(H, 10000.0)(meta.position_ids)
    return qkv, cos, sin, meta


def _naive_attention(q, k, v, cu, scale):
    """Per-document softmax attention in fp32: out (T, N, H), lse (N, T)."""
    outs, lses = [], []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        s = torch.einsum("qnh,knh->nqk", q[a:b].float(), k[a:b].float()) * scale  # (N, L, L)
        lses.append(torch.logsumexp(s, -1))  # (N, L)
        outs.append(torch.einsum("nqk,knh->qnh", s.softmax(-1), v[a:b].float()))
    return torch.cat(outs).to(q.dtype), torch.cat(lses, 1)


def _fake_fa4_forward(q, k, v, cu_seqlens, max_seqlen, scale):
    assert max_seqlen >= int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return _naive_attention(q, k, v, cu_seqlens, scale)


def _fake_fa4_backward_into(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dq, dk, dv):
    """Analytic attention backward from the saved out and lse (what FA4 does, per document, in fp32)."""
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        qf, kf, vf, of, gf = (t[a:b].float() for t in (q, k, v, out, dout))
        p = (torch.einsum("qnh,knh->nqk", qf, kf) * scale - lse[:, a:b, None]).exp()  # (N, L, L)
        dp = torch.einsum("qnh,knh->nqk", gf, vf)
        ds = p * (dp - (gf * of).sum(-1).T[:, :, None])  # (N, L, L)
        dv[a:b] = torch.einsum("nqk,qnh->knh", p, gf)  # into the caller's (possibly strided) buffers
        dq[a:b] = torch.einsum("nqk,knh->qnh", ds, kf) * scale
        dk[a:b] = torch.einsum("nqk,qnh->knh", ds, qf) * scale


@pytest.fixture
def fake_fa4(monkeypatch):
    monkeypatch.setattr(attention, "_fa4_forward", _fake_fa4_forward)
    monkeypatch.setattr(attention, "_fa4_backward_into", _fake_fa4_backward_into)


def _unfused(qkv, cos, sin, meta, scale):
    q, k, v = qkv.unbind(1)
    return sdpa_varlen(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, meta, scale)


def _fused(qkv, cos, sin, meta, scale):
    # the op itself (the public `_fa4_qkv` wrapper refuses CPU tensors)
    return torch.ops.neobert.fa4_qkv_varlen_fwd(qkv, cos, sin, meta.cu_seqlens, meta.max_seqlen, scale)[0]


def test_rope_torch_reference_matches_apply_rope() -> None:
    qkv, cos, sin, _ = _inputs()
    q, k = rope_triton.rope_split_torch(qkv, cos, sin)
    for got, which in ((q, 0), (k, 1)):
        diff = (got - apply_rope(qkv[:, which], cos, sin)).abs().max().item()
        print(f"rope_split vs apply_rope ({'qk'[which]}): max abs diff {diff:.1e}")
        assert diff <= 1e-6
    # backward: the in-place un-rotation equals autograd through apply_rope (v untouched)
    x = qkv.clone().requires_grad_()
    y = torch.stack([apply_rope(x[:, 0], cos, sin), apply_rope(x[:, 1], cos, sin), x[:, 2]], 1)
    g = torch.randn_like(y)
    y.backward(g)
    d = rope_triton.rope_backward_(g.clone(), cos, sin)
    diff = (d - x.grad).abs().max().item()
    print(f"rope_backward_ vs autograd: max abs diff {diff:.1e}")
    assert diff <= 1e-6


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_rope_triton_kernels_match_torch_reference_interpreted(monkeypatch) -> None:
    """The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (exact in fp32, <= 1 bf16 ulp in bf16)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rope_triton._kernels.cache_clear()
    try:
        for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2**-6)):
            qkv, cos, sin, _ = _inputs(dtype)
            qkv = qkv * 2  # values up to ~8: one bf16 ulp there is 2**-4; most are below 2 (ulp 2**-7)
            for got, ref in zip(
                rope_triton._rope_split_triton(qkv, cos, sin),
                rope_triton.rope_split_torch(qkv, cos, sin),
                strict=True,
            ):
                ulps = ((got.float() - ref.float()).abs() / ref.float().abs().clamp_min(1)).max().item()
                assert ulps <= tol, (dtype, ulps)
            g = torch.randn(T, 3, N, H).to(dtype)
            got = rope_triton._rope_backward_triton_(g.clone(), cos, sin)
            ref = rope_triton.rope_backward_torch_(g.clone(), cos, sin)
            assert torch.equal(got[:, 2], g[:, 2])  # dv untouched
            err = ((got.float() - ref.float()).abs() / ref.float().abs().clamp_min(1)).max().item()
            print(f"triton (interpreted) vs torch rope, {dtype}: split ok, backward rel {err:.1e}")
            assert err <= tol
    finally:
        rope_triton._kernels.cache_clear()


def test_fused_op_matches_rope_then_attention(fake_fa4) -> None:
    qkv, cos, sin, meta = _inputs()
    scale = 1 / math.sqrt(H)
    g = torch.randn(T, N, H, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (_unfused, _fused):
        x = qkv.clone().requires_grad_()
        out = fn(x, cos, sin, meta, scale)
        out.backward(g)
        results.append((out.detach(), x.grad))
    (ref_out, ref_grad), (out, grad) = results
    d_out, d_grad = (out - ref_out).abs().max().item(), (grad - ref_grad).abs().max().item()
    print(f"fused RoPE+attention vs unfused: out {d_out:.1e}, d(qkv) {d_grad:.1e}")
    assert d_out <= 1e-5 and d_grad <= 1e-5
    assert ref_grad[:, 2].abs().sum() > 0 and grad[:, 0].abs().sum() > 0  # every slice got a gradient


def test_fused_op_under_compile_matches_eager(fake_fa4) -> None:
    """aot_eager runs the fake kernels (shapes), the autograd registration and the real ops, no recompiles."""
    torch._dynamo.reset()
    scale = 1 / math.sqrt(H)
    compiled = torch.compile(_fused, backend="aot_eager", fullgraph=True)
    for seed in (0, 1):
        qkv, cos, sin, meta = _inputs(seed=seed)
        grads = []
        for fn in (_fused, compiled):
            x = qkv.clone().requires_grad_()
            fn(x, cos, sin, meta, scale).sum().backward()
            grads.append(x.grad)
        assert (grads[0] - grads[1]).abs().max().item() <= 1e-6


def test_encoder_with_fused_rope_path_matches_plain(fake_fa4) -> None:
    """The block's fused branch (qkv_attn_fn) gives the same encoder output and gradients as RoPE + attention."""
    cfg = NeoBERTConfig.preset("tiny", attn_backend="sdpa")
    torch.manual_seed(0)
    plain = NeoBERT(cfg)
    fused = NeoBERT(cfg)
    fused.load_state_dict(plain.state_dict())
    for block in fused.layers:
        block.qkv_attn_fn = _fused
    lengths = [7, 30, 1, 12]
    meta = PackedMeta.from_lengths(lengths)
    ids = torch.randint(1, cfg.vocab_size, (sum(lengths),), generator=torch.Generator().manual_seed(2))
    outs = []
    for enc in (plain, fused):
        h = enc(ids, meta)
        h.square().mean().backward()
        outs.append((h.detach(), enc.layers[0].qkv.weight.grad))
    d_h = (outs[0][0] - outs[1][0]).abs().max().item()
    d_w = (outs[0][1] - outs[1][1]).abs().max().item()
    print(f"encoder fused vs plain: hidden {d_h:.1e}, qkv.weight grad {d_w:.1e}")
    assert d_h <= 1e-5 and d_w <= 1e-6


def test_fused_rope_attention_only_for_fa4() -> None:
    assert attention.fused_rope_attention("sdpa") is None
    assert attention.fused_rope_attention("torch_varlen") is None
    assert NeoBERT(NeoBERTConfig.preset("tiny", attn_backend="sdpa")).layers[0].qkv_attn_fn is None
