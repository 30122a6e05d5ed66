"""Fused row kernel for the chunked masked-LM loss on CUDA (Triton).

For each row of a chunk's logits (C, V) in the compute dtype it does, in two passes over the row and without an
fp32 (C, V) temporary:

    pass 1: online max / sum-exp in fp32 over the valid columns [0, Vv), and argmax (first index on ties)
            -> loss = lse - logit[target], correct = argmax == target
    pass 2: logits[c] <- softmax[c] - onehot[c]   (in place, compute dtype; columns >= Vv get 0)

That is 2 reads + 1 write of the bf16 logits, against ~5 fp32 passes of the unfused torch version. The torch
version stays the reference (CPU, and CUDA without Triton); `tests/unit/neobert/test_loss_gpu.py` compares both.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - triton missing or broken
        return False
    return torch.cuda.is_available()


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def ce_rows_kernel(
        logits_ptr,  # (C, V) compute dtype, overwritten with the gradient when WRITE_GRAD
        stride_row,
        target_ptr,  # (C,) int64
        loss_ptr,  # (C,) fp32 out
        correct_ptr,  # (C,) bool/int8 out
        n_valid,  # Vv
        n_cols,  # V
        BLOCK: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        tgt = tl.load(target_ptr + row)
        offs = tl.arange(0, BLOCK)
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        best_idx = tl.zeros((), tl.int64)
        for start in range(0, n_valid, BLOCK):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
            blk_max = tl.max(x, 0)
            blk_arg = tl.argmax(x, 0).to(tl.int64) + start
            best_idx = tl.where(blk_max > m, blk_arg, best_idx)  # strict: the earlier block wins ties
            m_new = tl.maximum(m, blk_max)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        x_t = tl.load(base + tgt).to(tl.float32)
        tl.store(loss_ptr + row, lse - x_t)
        tl.store(correct_ptr + row, (best_idx == tgt).to(tl.int8))
        if WRITE_GRAD:
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                x = tl.load(base + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
                p = tl.exp(x - lse)
                p = tl.where(cols == tgt, p - 1.0, p)
                tl.store(base + cols, p.to(logits_ptr.dtype.element_ty), mask=cols < n_cols)

    return ce_rows_kernel


def ce_rows_(
    logits_CV: torch.Tensor,  # (C, V) contiguous rows, compute dtype; gradient written in place if write_grad
    target_C: torch.Tensor,  # (C,) int64
    loss_out_C: torch.Tensor,  # (C,) fp32
    correct_out_C: torch.Tensor,  # (C,) bool
    valid_vocab_size: int,
    write_grad: bool,
) -> None:
    C, V = logits_CV.shape
    if C == 0:
        return
    assert logits_CV.stride(1) == 1 and target_C.dtype == torch.int64
    correct_i8 = correct_out_C.view(torch.int8) if correct_out_C.dtype == torch.bool else correct_out_C
    _kernel()[(C,)](
        logits_CV,
        logits_CV.stride(0),
        target_C,
        loss_out_C,
        correct_i8,
        valid_vocab_size,
        V,
        BLOCK=4096,
        WRITE_GRAD=write_grad,
        num_warps=8,
    )
