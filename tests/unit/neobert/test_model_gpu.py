"""CUDA varlen backends vs the exact `sdpa` reference, in bf16, forward and backward (skipped without CUDA).

Tolerance: bf16 operands carry ~3 significant digits, so each backend is compared with an fp32 reference
computed from the same bf16 inputs by relative L2 error ||out - ref|| / ||ref||. The CUDA kernel must be within
1e-2 and no worse than 2x the error of the bf16 `sdpa` path itself (+1e-3). The max abs diff is printed.
"""

from __future__ import annotations

import pytest
import torch

from neobert.kernels.attention import build_attention, have_fa4, have_flash_attn, sdpa_varlen
from neobert.kernels.ffn import have_quack
from neobert.model import NeoBERT, NeoBERTConfig
from neobert.packing import PackedMeta

pytestmark = pytest.mark.gpu

CUDA_BACKENDS = (
    ["torch_varlen"] + (["flash_attn"] if have_flash_attn() else []) + (["fa4"] if have_fa4() else [])
)
LENGTHS = [1, 17, 300, 64, 1024, 5, 513]  # includes a length-1 doc and non-multiples of the tile sizes


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_attention_kernel_matches_sdpa_reference_bf16(backend: str) -> None:
    torch.manual_seed(0)
    meta = PackedMeta.from_lengths(LENGTHS, device="cuda")
    T, N, H = sum(LENGTHS), 12, 64
    q, k, v = (
        torch.randn(T, N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    grad_out = torch.randn(T, N, H, device="cuda", dtype=torch.bfloat16)
    scale = H**-0.5
    name, fn = build_attention(backend)
    assert name == backend

    def run(f, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = f(*leaves, meta, scale)
        out.backward(grad_out.to(dtype))
        return out.detach(), [t.grad for t in leaves]

    ref_out, ref_grads = run(sdpa_varlen, torch.float32)
    bf_out, bf_grads = run(sdpa_varlen, torch.bfloat16)
    k_out, k_grads = run(fn, torch.bfloat16)
    assert torch.isfinite(k_out).all()
    for what, got, base, ref in [("out", k_out, bf_out, ref_out)] + [
        (f"d{n}", g, b, r) for n, g, b, r in zip("qkv", k_grads, bf_grads, ref_grads, strict=True)
    ]:
        err, base_err = rel(got, ref), rel(base, ref)
        print(
            f"{backend} {what}: rel err {err:.2e} (bf16 sdpa {base_err:.2e}), max abs {(got.float() - ref).abs().max():.2e}"
        )
        assert err <= 1e-2 and err <= 2 * base_err + 1e-3, (what, err, base_err)


@pytest.mark.parametrize("fp32_residual", [True, False])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_model_forward_backward_matches_sdpa_bf16(backend: str, fp32_residual: bool) -> None:
    """Whole encoder (4 layers, head dim 64) with the kernel vs with `sdpa`, same weights, bf16 autocast."""
    lengths = [7, 130, 64, 1, 250]
    meta = PackedMeta.from_lengths(lengths, device="cuda")
    cfg = NeoBERTConfig(
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        intermediate_size=768,
        attn_backend="sdpa",
        fp32_residual=fp32_residual,
    )
    torch.manual_seed(0)
    ref = NeoBERT(cfg).cuda()
    fast = NeoBERT(NeoBERTConfig(**{**cfg.to_dict(), "attn_backend": backend})).cuda()
    fast.load_state_dict(ref.state_dict())
    assert (ref.attn_backend, fast.attn_backend) == ("sdpa", backend)
    ids = torch.randint(1000, cfg.vocab_size, (sum(lengths),), device="cuda")
    target = torch.randn(sum(lengths), cfg.hidden_size, device="cuda")

    def run(model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = model(ids, meta)
        (h.float() * target).sum().backward()
        return h.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters()}

    h_ref, g_ref = run(ref)
    h_fast, g_fast = run(fast)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        out_dtype = fast(ids, meta).dtype  # final_norm returns the residual-stream dtype
    assert out_dtype == (torch.float32 if fp32_residual else torch.bfloat16)
    print(
        f"{backend} fp32_residual={fp32_residual} hidden: rel err {rel(h_fast, h_ref):.2e}, max abs {(h_fast - h_ref).abs().max():.2e}"
    )
    assert rel(h_fast, h_ref) <= 2e-2
    worst = max((rel(g_fast[n], g_ref[n]), n) for n in g_ref if g_ref[n].norm() > 0)
    print(f"{backend} worst grad rel err {worst[0]:.2e} ({worst[1]})")
    assert worst[0] <= 5e-2, worst


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_kernel_under_compile_matches_eager_without_recompiles(backend: str) -> None:
    """A compiled block gives the eager result (forward, and parameter gradients on one layout), and new doc
    layouts with a static max_seqlen bound and a dynamic num_docs do not add graphs."""
    from torch._dynamo.utils import counters

    cfg = NeoBERTConfig(
        hidden_size=256, num_layers=2, num_heads=4, intermediate_size=768, attn_backend=backend
    )
    torch.manual_seed(0)
    model = NeoBERT(cfg).cuda()
    T = 1024
    layouts = [[300, 200, 524], [1024], [100] * 10 + [24], [512, 512]]
    ids = torch.randint(1000, cfg.vocab_size, (T,), device="cuda")
    eager = []
    for lengths in layouts:
        meta = PackedMeta.from_lengths(lengths, device="cuda")._replace(max_seqlen=1024)
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            eager.append(model(ids, meta).float())

    def grads(lengths):
        model.zero_grad(set_to_none=True)
        meta = PackedMeta.from_lengths(lengths, device="cuda")._replace(max_seqlen=1024)
        torch._dynamo.mark_dynamic(meta.cu_seqlens, 0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(ids, meta).float().square().mean().backward()
        return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_grads = grads(layouts[0])
    torch._dynamo.reset()
    model.compile_layers()
    compiled_grads = grads(layouts[0])
    worst = max((rel(compiled_grads[n], g), n) for n, g in eager_grads.items() if g.norm() > 0)
    print(f"{backend} compiled vs eager worst grad rel err {worst[0]:.2e} ({worst[1]})")
    assert worst[0] <= 2e-2, worst
    graphs = []
    for lengths, ref in zip(layouts, eager, strict=True):
        meta = PackedMeta.from_lengths(lengths, device="cuda")._replace(max_seqlen=1024)
        torch._dynamo.mark_dynamic(meta.cu_seqlens, 0)
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            out = model(ids, meta).float()
        print(f"layout {lengths[:3]}...: rel err compiled vs eager {rel(out, ref):.2e}")
        assert rel(out, ref) <= 1e-2
        graphs.append(int(counters["stats"]["unique_graphs"]))
    assert graphs[-1] == graphs[0], f"recompiled on new layouts: unique graphs {graphs}"


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_sparse_last_layer_matches_dense_compiled_bf16(backend: str) -> None:
    """NeoBERTForMLM's sparse last layer (default) vs the dense path on the GPU, both compiled, bf16 autocast:
    same masked count, loss within 1e-2 relative, parameter gradients within 2e-2, and new masked counts or
    document layouts add no graph after the first sparse step."""
    from torch._dynamo.utils import counters

    from neobert.model import NeoBERTForMLM

    cfg = NeoBERTConfig(
        hidden_size=256, num_layers=3, num_heads=4, intermediate_size=768, attn_backend=backend
    )
    torch.manual_seed(0)
    dense = NeoBERTForMLM(cfg, sparse_last_layer=False).cuda()
    sparse = NeoBERTForMLM(cfg).cuda()
    sparse.load_state_dict(dense.state_dict())
    torch._dynamo.reset()
    for m in (dense, sparse):
        m.encoder.compile_layers()
    T = 1024
    gen = torch.Generator().manual_seed(1)
    graphs = []
    for step, lengths in enumerate([[300, 200, 524], [100] * 10 + [24], [512, 512]]):
        ids = torch.randint(1000, cfg.vocab_size, (T,), generator=gen).cuda()
        labels = torch.where(torch.rand(T, generator=gen).cuda() < 0.15 + 0.05 * step, ids, -100)
        meta = PackedMeta.from_lengths(lengths, device="cuda")._replace(max_seqlen=1024)
        torch._dynamo.mark_dynamic(meta.cu_seqlens, 0)
        res = []
        for m in (dense, sparse):
            m.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = m(ids, meta, labels)
            out.loss_sum.backward()
            res.append((out, {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}))
        (od, gd), (os_, gs) = res
        assert int(od.num_masked) == int(os_.num_masked) > 0
        loss_err = abs(od.loss_sum.item() - os_.loss_sum.item()) / od.loss_sum.item()
        worst = max((rel(gs[n], g), n) for n, g in gd.items() if g.norm() > 0)
        print(
            f"{backend} step {step}: loss rel diff {loss_err:.2e}, worst grad rel diff {worst[0]:.2e} ({worst[1]})"
        )
        assert loss_err <= 1e-2 and worst[0] <= 2e-2, (loss_err, worst)
        graphs.append(int(counters["stats"]["unique_graphs"]))
    assert graphs[-1] == graphs[0], f"recompiled on new layouts / masked counts: unique graphs {graphs}"


def test_rope_triton_kernels_match_torch_reference() -> None:
    """neobert/kernels/rope_triton.py on CUDA vs its torch reference: fp32 within 1e-6, bf16 within one bf16 ulp."""
    from neobert.kernels import rope_triton
    from neobert.model import RotaryEmbedding

    meta = PackedMeta.from_lengths(LENGTHS, device="cuda")
    T, N, H = sum(LENGTHS), 12, 64
    cos, sin = RotaryEmbedding(H, 10000.0).cuda()(meta.position_ids)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2**-7)):
        qkv = torch.randn(T, 3, N, H, device="cuda").to(dtype)
        got = rope_triton.rope_split(qkv, cos, sin)
        ref = rope_triton.rope_split_torch(qkv, cos, sin)
        g = torch.randn(T, 3, N, H, device="cuda").to(dtype)
        got_b = rope_triton.rope_backward_(g.clone(), cos, sin)
        ref_b = rope_triton.rope_backward_torch_(g.clone(), cos, sin)
        assert torch.equal(got_b[:, 2], g[:, 2])
        for what, a, b in [("q", got[0], ref[0]), ("k", got[1], ref[1]), ("dqkv", got_b, ref_b)]:
            err = ((a.float() - b.float()).abs() / b.float().abs().clamp_min(1)).max().item()
            print(f"rope triton vs torch {dtype} {what}: max rel diff {err:.1e}")
            assert err <= tol, (dtype, what, err)


@pytest.mark.skipif(not have_fa4(), reason="flash-attn-4 not installed or GPU older than SM90")
def test_fa4_fused_rope_matches_unfused_bf16() -> None:
    """The fa4 op with RoPE inside (dq/dk/dv written into slices of dqkv, RoPE undone in place) vs RoPE + the
    plain fa4 op: same output and d(qkv) up to bf16 rounding of the rotated q/k (rel <= 5e-3 vs each other),
    eager and compiled, on a layout with a length-1 document and lengths that are not tile multiples."""
    from neobert.kernels.attention import _fa4_qkv
    from neobert.model import RotaryEmbedding, apply_rope

    meta = PackedMeta.from_lengths(LENGTHS, device="cuda")._replace(max_seqlen=1024)
    T, N, H = sum(LENGTHS), 12, 64
    cos, sin = RotaryEmbedding(H, 10000.0).cuda()(meta.position_ids)
    qkv = torch.randn(T, 3 * N * H, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(T, N, H, device="cuda", dtype=torch.bfloat16)
    _, plain_attn = build_attention("fa4")

    def unfused(x):
        q, k, v = x.unflatten(-1, (3, N, H)).unbind(1)
        return plain_attn(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, meta, H**-0.5)

    def fused(x):
        return _fa4_qkv(x.unflatten(-1, (3, N, H)), cos, sin, meta, H**-0.5)

    res = {}
    for name, fn in [("unfused", unfused), ("fused", fused), ("fused compiled", torch.compile(fused))]:
        x = qkv.clone().requires_grad_()
        out = fn(x)
        out.backward(g)
        res[name] = (out.float(), x.grad.float())
    for name in ("fused", "fused compiled"):
        e_out, e_grad = rel(res[name][0], res["unfused"][0]), rel(res[name][1], res["unfused"][1])
        print(f"fa4 {name} vs unfused: out rel {e_out:.1e}, d(qkv) rel {e_grad:.1e}")
        assert e_out <= 5e-3 and e_grad <= 5e-3, (name, e_out, e_grad)


@pytest.mark.skipif(not have_quack(), reason="quack-kernels not installed or GPU older than SM90")
@pytest.mark.parametrize("compiled", [False, True])
def test_quack_ffn_matches_torch_ffn_bf16(compiled: bool) -> None:
    """The whole MLM model with ffn_backend='quack' (SwiGLU in GEMM epilogues) vs 'torch', same weights, bf16
    autocast, sparse last layer (so the FFN also runs on a varying number of masked rows): loss within 1e-2
    relative, parameter gradients within 2e-2, and (compiled) no new graph for new layouts / masked counts."""
    from torch._dynamo.utils import counters

    from neobert.model import NeoBERTForMLM

    base = dict(hidden_size=256, num_layers=3, num_heads=4, intermediate_size=768, fp32_residual=False)
    torch.manual_seed(0)
    ref = NeoBERTForMLM(NeoBERTConfig(**base, ffn_backend="torch")).cuda()
    fast = NeoBERTForMLM(NeoBERTConfig(**base, ffn_backend="quack")).cuda()
    fast.load_state_dict(ref.state_dict())
    assert fast.encoder.ffn_backend == "quack"
    if compiled:
        torch._dynamo.reset()
        for m in (ref, fast):
            m.encoder.compile_layers()
    T, gen, graphs = 1024, torch.Generator().manual_seed(1), []
    for step, lengths in enumerate([[300, 200, 524], [100] * 10 + [24], [512, 512]]):
        ids = torch.randint(1000, 30000, (T,), generator=gen).cuda()
        labels = torch.where(torch.rand(T, generator=gen).cuda() < 0.15 + 0.05 * step, ids, -100)
        meta = PackedMeta.from_lengths(lengths, device="cuda")._replace(max_seqlen=1024)
        torch._dynamo.mark_dynamic(meta.cu_seqlens, 0)
        res = []
        for m in (ref, fast):
            m.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = m(ids, meta, labels)
            out.loss_sum.backward()
            res.append(
                (
                    out.loss_sum.item(),
                    {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None},
                )
            )
        (l_ref, g_ref), (l_fast, g_fast) = res
        loss_err = abs(l_ref - l_fast) / abs(l_ref)
        worst = max((rel(g_fast[n], g), n) for n, g in g_ref.items() if g.norm() > 0)
        print(
            f"quack ffn (compiled={compiled}) step {step}: loss rel diff {loss_err:.2e}, worst grad {worst[0]:.2e} ({worst[1]})"
        )
        assert loss_err <= 1e-2 and worst[0] <= 2e-2, (loss_err, worst)
        graphs.append(int(counters["stats"]["unique_graphs"]))
    if compiled:
        assert graphs[-1] == graphs[0], f"recompiled on new layouts / masked counts: unique graphs {graphs}"
