"""Variable-length (packed) attention backends; `neobert.kernels.resolve` picks one per model and logs it once.

Every backend computes bidirectional softmax attention restricted to each document of a packed stream:

    q, k, v (T, N, H)  ->  out (T, N, H)       T = packed tokens, N = heads, H = head dim

    fa4           FlashAttention-4's CuTe-DSL kernels, `flash_attn.cute` (package `flash-attn-4`; Hopper/Blackwell,
                  i.e. compute capability >= 9.0, bf16/fp16), wrapped as torch custom ops so torch.compile
                  keeps them opaque in the graph
    flash_attn    `flash_attn.flash_attn_varlen_func` (package `flash-attn`, FlashAttention-2; CUDA, bf16/fp16)
    torch_varlen  `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 kernel inside torch >= 2.10;
                  CUDA, bf16/fp16, no extra install)
    sdpa          exact reference for CPU and tests: documents are scattered into a padded
                  (num_docs, max_seqlen) view, one `scaled_dot_product_attention` call with a key-padding mask,
                  then gathered back. No Python loop over documents, no (T, T) mask.

`auto` picks fa4 on a GPU of compute capability >= 9.0 when `flash_attn.cute` imports, else flash_attn when it
imports and CUDA is available, else torch_varlen on CUDA, else sdpa.
Tests force a backend with `force_backend("sdpa")` (a context manager) or `NeoBERTConfig(attn_backend=...)`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from neobert.packing import PackedMeta

log = logging.getLogger(__name__)

BACKENDS = ("fa4", "flash_attn", "torch_varlen", "sdpa")
CUDA_BACKENDS = ("fa4", "flash_attn", "torch_varlen")
FA4_MIN_CAPABILITY = 9  # flash_attn.cute's backward kernels exist for SM90 and newer only

# (q (T,N,H), k (T,N,H), v (T,N,H), meta, scale) -> (T,N,H)
AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PackedMeta, float], torch.Tensor]
# (qkv (T,3,N,H) before RoPE, cos (T,H), sin (T,H), meta, scale) -> (T,N,H): RoPE fused into the attention op
QkvAttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PackedMeta, float], torch.Tensor]

_forced: str | None = None


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Test hook: inside the block, `auto` resolves to `name` (explicit requests are unaffected)."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that fails to import
        return False


def have_flash_attn() -> bool:
    """FlashAttention-2 (`flash-attn`). The `flash-attn-4` wheel alone installs a bare `flash_attn` namespace
    holding only `flash_attn.cute`, so the FA2 interface module itself is what is looked for."""
    return _has_module("flash_attn.flash_attn_interface")


def have_fa4() -> bool:
    """FlashAttention-4's CuTe kernels (`flash-attn-4`) importable and a GPU of compute capability >= 9.0.

    The package is really imported (once): files present but a CuTe-DSL runtime that does not load (missing or
    mismatched `nvidia-cutlass-dsl` libs) count as "not available", with a warning, so `auto` falls back to
    the next backend instead of failing at the first forward."""
    if not _has_module("flash_attn.cute"):
        return False
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= FA4_MIN_CAPABILITY):
        return False
    return _fa4_imports()


@functools.cache
def _fa4_imports() -> bool:
    try:
        importlib.import_module("flash_attn.cute.interface")
    except Exception as e:  # ImportError, or the CuTe runtime failing to load its shared libraries
        log.warning(
            "flash_attn.cute is installed but does not import (%s: %s); FA4 not used", type(e).__name__, e
        )
        return False
    return True


def have_torch_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(
    requested: str = "auto",
    *,
    cuda_available: bool | None = None,
    flash_attn_available: bool | None = None,
    torch_varlen_available: bool | None = None,
    fa4_available: bool | None = None,
) -> str:
    """The backend name `requested` resolves to on this machine. The keyword flags override detection (tests)."""
    if requested == "auto" and _forced is not None:
        requested = _forced
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    fa = have_flash_attn() if flash_attn_available is None else flash_attn_available
    tv = have_torch_varlen() if torch_varlen_available is None else torch_varlen_available
    # probing FA4 initializes CUDA (device capability): only when FA4 could be the answer
    f4 = fa4_available if fa4_available is not None else cuda and requested in ("auto", "fa4") and have_fa4()
    if requested == "auto":
        if cuda and f4:
            return "fa4"
        elif cuda and fa:
            return "flash_attn"
        elif cuda and tv:
            return "torch_varlen"
        else:
            return "sdpa"
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose 'auto' or one of {BACKENDS}")
    if requested in CUDA_BACKENDS and not cuda:
        raise ValueError(
            f"attention backend {requested!r} needs a CUDA GPU but none is available; use "
            f"attn_backend='sdpa' (exact CPU reference) or 'auto'"
        )
    if requested == "fa4" and not f4:
        raise ValueError(
            "attention backend 'fa4' needs the flash-attn-4 package (pip install flash-attn-4, which brings "
            "nvidia-cutlass-dsl) and a GPU of compute capability >= 9.0 (Hopper/Blackwell); use "
            "attn_backend='torch_varlen' (built into torch >= 2.10) or 'auto'"
        )
    if requested == "flash_attn" and not fa:
        raise ValueError(
            "attention backend 'flash_attn' needs the flash-attn package (pip install flash-attn); "
            "use attn_backend='torch_varlen' (built into torch >= 2.10) or 'auto'"
        )
    if requested == "torch_varlen" and not tv:
        raise ValueError(
            f"attention backend 'torch_varlen' needs torch.nn.attention.varlen (torch >= 2.10), this is "
            f"torch {torch.__version__}; upgrade torch, install flash-attn, or use attn_backend='sdpa'"
        )
    return requested


def build_attention(requested: str = "auto") -> tuple[str, AttnFn]:
    """Resolve `requested` and return (name, attention function)."""
    name = resolve_backend(requested)
    fn = {"fa4": _fa4, "flash_attn": _flash_attn, "torch_varlen": _torch_varlen, "sdpa": sdpa_varlen}[name]
    if name == "fa4":
        # flash-attn-4 b36 warns once per kernel compile that an internal argument is not a JIT argument; that
        # is upstream noise (nothing to fix on the caller's side), so it is filtered here.
        warnings.filterwarnings("ignore", message=r"Argument aux_data .*JitArgument", category=UserWarning)
    return name, fn


def fused_rope_attention(name: str) -> QkvAttnFn | None:
    """The RoPE-fused entry point of backend `name` (a resolved name), or None where RoPE stays a separate step.

    Only `fa4` has one (its RoPE kernels are Triton, which ships with CUDA builds of torch). It saves the
    concatenation pass of the backward (see neobert/kernels/rope_triton.py); the encoder uses it when it exists."""
    if name != "fa4":
        return None
    from neobert.kernels.ce_triton import triton_available

    return _fa4_qkv if triton_available() else None


def _check_cuda_half(q: torch.Tensor, name: str) -> None:
    if q.device.type != "cuda":
        raise ValueError(
            f"attention backend {name!r} runs on CUDA tensors, got {q.device}; move the model and batch to "
            f"the GPU or build the model with attn_backend='sdpa'"
        )
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"attention backend {name!r} needs bf16/fp16 q/k/v, got {q.dtype}; run under "
            f"torch.autocast('cuda', dtype=torch.bfloat16) or use attn_backend='sdpa'"
        )


def _flash_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PackedMeta, scale: float
) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    _check_cuda_half(q, "flash_attn")
    cu, s = meta.cu_seqlens, meta.max_seqlen
    return flash_attn_varlen_func(q, k, v, cu, cu, s, s, dropout_p=0.0, softmax_scale=scale, causal=False)


def _fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PackedMeta, scale: float) -> torch.Tensor:
    _check_cuda_half(q, "fa4")
    out, _ = torch.ops.neobert.fa4_varlen_fwd(q, k, v, meta.cu_seqlens, meta.max_seqlen, scale)
    return out


# FlashAttention-4 as torch custom ops: torch.compile sees one opaque node per direction (the CuTe kernels are
# JIT-compiled by flash_attn.cute itself on first use, once per head dim / dtype). q, k, v (T, N, H) with a
# unit last stride; lse (N, T) fp32 is kept for the backward.
def _fa4_forward(q, k, v, cu_seqlens, max_seqlen: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd

    res = _flash_attn_fwd(
        q,
        k,
        v,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        softmax_scale=scale,
        causal=False,
        return_lse=True,
    )
    return res[0], res[1]  # out (T, N, H), lse (N, T)


def _fa4_backward_into(
    dout, q, k, v, out, lse, cu_seqlens, max_seqlen: int, scale: float, dq, dk, dv
) -> None:
    """FlashAttention-4 backward writing into dq, dk, dv (T, N, H), which may be strided views (unit last stride)."""
    from flash_attn.cute.interface import _flash_attn_bwd

    _flash_attn_bwd(
        q,
        k,
        v,
        out,
        dout.contiguous(),
        lse,
        scale,
        False,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        dq=dq,
        dk=dk,
        dv=dv,
    )


@torch.library.custom_op("neobert::fa4_varlen_fwd", mutates_args=())
def _fa4_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fa4_forward(q, k, v, cu_seqlens, max_seqlen, scale)


@_fa4_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    T, N, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (N, T), dtype=torch.float32
    )


@torch.library.custom_op("neobert::fa4_varlen_bwd", mutates_args=())
def _fa4_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    _fa4_backward_into(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dq, dk, dv)
    return dq, dk, dv


@_fa4_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _fa4_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _fa4_backward(ctx, dout, _dlse):
    if dout is None:  # the output was not used
        return None, None, None, None, None, None
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = torch.ops.neobert.fa4_varlen_bwd(
        dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale
    )
    return dq, dk, dv, None, None, None


_fa4_fwd_op.register_autograd(_fa4_backward, setup_context=_fa4_setup_context)


# The fused `fa4` path used by the encoder blocks: RoPE in and out of the attention op (rope_triton.py).
# Input is the pre-RoPE fused projection qkv (T, 3, N, H); the backward returns d(qkv) as one tensor, with
# FlashAttention-4 writing dq/dk/dv straight into its slices and RoPE undone in place (no concatenation pass).
# q, k (rotated) are extra outputs only so that the backward can reuse them; they carry no gradient.
@torch.library.custom_op("neobert::fa4_qkv_varlen_fwd", mutates_args=())
def _fa4_qkv_fwd_op(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from neobert.kernels.rope_triton import rope_split

    q, k = rope_split(qkv, cos, sin)  # (T, N, H) each, rotated
    out, lse = _fa4_forward(q, k, qkv[:, 2], cu_seqlens, max_seqlen, scale)
    return out, lse, q, k


@_fa4_qkv_fwd_op.register_fake
def _(qkv, cos, sin, cu_seqlens, max_seqlen, scale):
    T, _, N, H = qkv.shape
    out, q, k = (qkv.new_empty((T, N, H)) for _ in range(3))
    return out, qkv.new_empty((N, T), dtype=torch.float32), q, k


@torch.library.custom_op("neobert::fa4_qkv_varlen_bwd", mutates_args=())
def _fa4_qkv_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> torch.Tensor:
    from neobert.kernels.rope_triton import rope_backward_

    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)  # (T, 3, N, H)
    v = qkv[:, 2]
    _fa4_backward_into(
        dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dqkv[:, 0], dqkv[:, 1], dqkv[:, 2]
    )
    return rope_backward_(dqkv, cos, sin)


@_fa4_qkv_bwd_op.register_fake
def _(dout, q, k, qkv, out, lse, cos, sin, cu_seqlens, max_seqlen, scale):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _fa4_qkv_setup_context(ctx, inputs, output) -> None:
    qkv, cos, sin, cu_seqlens, max_seqlen, scale = inputs
    out, lse, q, k = output
    ctx.mark_non_differentiable(lse, q, k)
    ctx.set_materialize_grads(False)  # no zero-filled (T, N, H) gradients for q, k, lse: 3 passes saved
    ctx.save_for_backward(q, k, qkv, out, lse, cos, sin, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _fa4_qkv_backward(ctx, dout, _dlse, _dq, _dk):
    if dout is None:  # the output was not used
        return None, None, None, None, None, None
    q, k, qkv, out, lse, cos, sin, cu_seqlens = ctx.saved_tensors
    dqkv = torch.ops.neobert.fa4_qkv_varlen_bwd(
        dout, q, k, qkv, out, lse, cos, sin, cu_seqlens, ctx.max_seqlen, ctx.scale
    )
    return dqkv, None, None, None, None, None


_fa4_qkv_fwd_op.register_autograd(_fa4_qkv_backward, setup_context=_fa4_qkv_setup_context)


def _fa4_qkv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: PackedMeta, scale: float
) -> torch.Tensor:
    """RoPE + FlashAttention-4 on the fused projection: qkv (T, 3, N, H) pre-RoPE, cos/sin (T, H) -> (T, N, H)."""
    _check_cuda_half(qkv, "fa4")
    out, _, _, _ = torch.ops.neobert.fa4_qkv_varlen_fwd(
        qkv, cos, sin, meta.cu_seqlens, meta.max_seqlen, scale
    )
    return out


def _torch_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PackedMeta, scale: float
) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    _check_cuda_half(q, "torch_varlen")
    cu, s = meta.cu_seqlens, meta.max_seqlen
    return varlen_attn(q, k, v, cu, cu, s, s, scale=scale)


def sdpa_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PackedMeta, scale: float
) -> torch.Tensor:
    """Exact block-diagonal attention: pad documents to (num_docs, S=max_seqlen), one SDPA call, gather back.

    Memory is O(num_docs * S^2) per head for the scores (math kernel); meant for CPU, tests and as a reference.
    """
    T, N, H = q.shape
    cu = meta.cu_seqlens.long()  # (B+1,)  B = num_docs
    B, S = cu.shape[0] - 1, meta.max_seqlen
    tok = torch.arange(T, device=q.device)
    doc = torch.searchsorted(cu[1:], tok, right=True)  # (T,) document of each token
    local = tok - cu[doc]  # (T,) position inside its document
    lengths = cu[1:] - cu[:-1]  # (B,)
    key_ok = torch.arange(S, device=q.device)[None, :] < lengths[:, None]  # (B, S)

    def to_padded(x: torch.Tensor) -> torch.Tensor:  # (T,N,H) -> (B,N,S,H)
        return x.new_zeros(B, S, N, H).index_put((doc, local), x).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        to_padded(q), to_padded(k), to_padded(v), attn_mask=key_ok[:, None, None, :], scale=scale
    )  # (B,N,S,H)
    return out.transpose(1, 2)[doc, local]  # (T,N,H)


def padded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Padded-batch attention: q, k, v (B, N, S, H), attention_mask (B, S) with 1 = real token -> (B, N, S, H)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_mask.bool()[:, None, None, :], scale=scale
    )
