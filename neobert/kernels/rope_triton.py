"""RoPE kernels for the fused `fa4` attention path (Triton, CUDA only).

The `fa4` backend takes the fused QKV projection before RoPE, `qkv (T, 3, N, H)`, and returns the gradient for
it as one tensor, so the rotation and its inverse live next to the attention kernels:

    forward   rope_split(qkv, cos, sin) -> q, k (T, N, H) rotated, contiguous     (v stays a view of qkv)
    backward  FlashAttention-4 writes dq, dk, dv straight into the slices of one dqkv (T, 3, N, H) buffer;
              rope_backward_(dqkv, cos, sin) then un-rotates dq and dk in place.

Against the unfused graph (inductor reads dq, dk, dv and writes a concatenated dqkv) the backward moves 4
instead of 6 (T, D) bf16 tensors per layer. Same math as `neobert.kernels.rope.apply_rope` (half-split /
GPT-NeoX layout, fp32 arithmetic, result rounded to the input dtype):

    y1 = x1 c - x2 s,  y2 = x2 c + x1 s          (c, s = cos/sin of position * inv_freq, one per pair)
    dx1 = dy1 c + dy2 s,  dx2 = dy2 c - dy1 s    (the transpose of the rotation)

`cos`/`sin` are the (T, H) fp32 tables of `RotaryEmbedding` (halves duplicated); only the first half is read.
Shape legend: T = packed tokens, N = heads, H = head dim, H2 = H / 2.
"""

from __future__ import annotations

import functools

import torch

BLOCK_T = 32  # tokens per program: 32 x 12 heads x 64 = 24k elements in flight per direction


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rope_split_kernel(
        qkv_ptr,  # (T, 3, N, H), unit stride along H and contiguous (3, N, H) per token
        stride_qkv,  # elements between tokens in qkv
        cos_ptr,  # (T, H) fp32
        sin_ptr,
        stride_cs,
        q_ptr,  # (T, N, H) out, contiguous
        k_ptr,
        T,
        N: tl.constexpr,
        H: tl.constexpr,
        H2P: tl.constexpr,  # next power of two >= H / 2
        BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)[:, None]  # (BLOCK, 1)
        j = tl.arange(0, H2P)[None, :]  # (1, H2P)
        ok = (t < T) & (j < H // 2)
        c = tl.load(cos_ptr + t * stride_cs + j, mask=ok, other=0.0)
        s = tl.load(sin_ptr + t * stride_cs + j, mask=ok, other=0.0)
        for n in tl.static_range(N):  # q heads
            src = qkv_ptr + t * stride_qkv + n * H + j
            x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
            x2 = tl.load(src + H // 2, mask=ok, other=0.0).to(tl.float32)
            dst = q_ptr + t * (N * H) + n * H + j
            tl.store(dst, (x1 * c - x2 * s).to(q_ptr.dtype.element_ty), mask=ok)
            tl.store(dst + H // 2, (x2 * c + x1 * s).to(q_ptr.dtype.element_ty), mask=ok)
        for n in tl.static_range(N):  # k heads
            src = qkv_ptr + t * stride_qkv + (N + n) * H + j
            x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
            x2 = tl.load(src + H // 2, mask=ok, other=0.0).to(tl.float32)
            dst = k_ptr + t * (N * H) + n * H + j
            tl.store(dst, (x1 * c - x2 * s).to(k_ptr.dtype.element_ty), mask=ok)
            tl.store(dst + H // 2, (x2 * c + x1 * s).to(k_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def rope_backward_kernel(
        dqkv_ptr,  # (T, 3, N, H); the q and k slices are un-rotated in place, v is left alone
        stride_dqkv,
        cos_ptr,
        sin_ptr,
        stride_cs,
        T,
        N: tl.constexpr,
        H: tl.constexpr,
        H2P: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)[:, None]
        j = tl.arange(0, H2P)[None, :]
        ok = (t < T) & (j < H // 2)
        c = tl.load(cos_ptr + t * stride_cs + j, mask=ok, other=0.0)
        s = tl.load(sin_ptr + t * stride_cs + j, mask=ok, other=0.0)
        for n in tl.static_range(2 * N):  # the q heads, then the k heads
            p = dqkv_ptr + t * stride_dqkv + n * H + j
            dy1 = tl.load(p, mask=ok, other=0.0).to(tl.float32)
            dy2 = tl.load(p + H // 2, mask=ok, other=0.0).to(tl.float32)
            tl.store(p, (dy1 * c + dy2 * s).to(dqkv_ptr.dtype.element_ty), mask=ok)
            tl.store(p + H // 2, (dy2 * c - dy1 * s).to(dqkv_ptr.dtype.element_ty), mask=ok)

    return rope_split_kernel, rope_backward_kernel


def _check(x_T3NH: torch.Tensor, cos_TH: torch.Tensor, sin_TH: torch.Tensor) -> tuple[int, int, int]:
    T, three, N, H = x_T3NH.shape
    assert three == 3 and H % 2 == 0, x_T3NH.shape
    assert x_T3NH.stride()[1:] == (N * H, H, 1), "qkv must be contiguous per token (T, 3, N, H)"
    assert cos_TH.shape == sin_TH.shape == (T, H) and cos_TH.dtype == sin_TH.dtype == torch.float32
    assert cos_TH.stride() == sin_TH.stride() and cos_TH.stride(1) == 1
    return T, N, H


def rope_split(
    qkv_T3NH: torch.Tensor, cos_TH: torch.Tensor, sin_TH: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (T, N, H), rotated and contiguous, from the pre-RoPE projection qkv (T, 3, N, H).
    Triton on CUDA, the torch reference below elsewhere."""
    _check(qkv_T3NH, cos_TH, sin_TH)
    if not qkv_T3NH.is_cuda:
        return rope_split_torch(qkv_T3NH, cos_TH, sin_TH)
    return _rope_split_triton(qkv_T3NH, cos_TH, sin_TH)


def rope_backward_(dqkv_T3NH: torch.Tensor, cos_TH: torch.Tensor, sin_TH: torch.Tensor) -> torch.Tensor:
    """In place: dqkv[:, 0] and dqkv[:, 1] (gradients w.r.t. the rotated q, k) become the gradients w.r.t. the
    pre-RoPE q, k. dqkv[:, 2] (dv) is untouched. Returns dqkv. Triton on CUDA, the torch reference elsewhere."""
    _check(dqkv_T3NH, cos_TH, sin_TH)
    if not dqkv_T3NH.is_cuda:
        return rope_backward_torch_(dqkv_T3NH, cos_TH, sin_TH)
    return _rope_backward_triton_(dqkv_T3NH, cos_TH, sin_TH)


def _halves(cos_TH: torch.Tensor, sin_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    H2 = cos_TH.shape[1] // 2
    return cos_TH[:, None, :H2], sin_TH[:, None, :H2]  # (T, 1, H2), broadcast over heads


def rope_split_torch(qkv_T3NH, cos_TH, sin_TH) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for `rope_split`: the forward formula of the module docstring on the q and k slices (the tests
    check it against `neobert.kernels.rope.apply_rope`, bit for bit)."""
    c, s = _halves(cos_TH, sin_TH)
    out = []
    for i in (0, 1):
        x1, x2 = qkv_T3NH[:, i].float().chunk(2, dim=-1)
        out.append(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(qkv_T3NH.dtype))
    return out[0], out[1]


def rope_backward_torch_(dqkv_T3NH, cos_TH, sin_TH) -> torch.Tensor:
    """Reference for `rope_backward_` (in place on the q and k slices)."""
    c, s = _halves(cos_TH, sin_TH)
    for i in (0, 1):
        dy1, dy2 = dqkv_T3NH[:, i].float().chunk(2, dim=-1)
        dqkv_T3NH[:, i] = torch.cat((dy1 * c + dy2 * s, dy2 * c - dy1 * s), dim=-1).to(dqkv_T3NH.dtype)
    return dqkv_T3NH


def _rope_split_triton(qkv_T3NH, cos_TH, sin_TH) -> tuple[torch.Tensor, torch.Tensor]:
    T, _, N, H = qkv_T3NH.shape
    q_TNH = qkv_T3NH.new_empty(T, N, H)
    k_TNH = qkv_T3NH.new_empty(T, N, H)
    if T:
        import triton

        _kernels()[0][(triton.cdiv(T, BLOCK_T),)](
            qkv_T3NH, qkv_T3NH.stride(0), cos_TH, sin_TH, cos_TH.stride(0), q_TNH, k_TNH, T,
            N=N, H=H, H2P=triton.next_power_of_2(H // 2), BLOCK=BLOCK_T, num_warps=4,
        )  # fmt: skip
    return q_TNH, k_TNH


def _rope_backward_triton_(dqkv_T3NH, cos_TH, sin_TH) -> torch.Tensor:
    T, _, N, H = dqkv_T3NH.shape
    if T:
        import triton

        _kernels()[1][(triton.cdiv(T, BLOCK_T),)](
            dqkv_T3NH, dqkv_T3NH.stride(0), cos_TH, sin_TH, cos_TH.stride(0), T,
            N=N, H=H, H2P=triton.next_power_of_2(H // 2), BLOCK=BLOCK_T, num_warps=4,
        )  # fmt: skip
    return dqkv_T3NH
