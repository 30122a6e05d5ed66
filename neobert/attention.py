"""Variable-length (packed) attention backends, resolved once per model by `build_attention` and logged once.

Every backend computes bidirectional softmax attention restricted to each document of a packed stream:

    q, k, v (T, N, H)  ->  out (T, N, H)       T = packed tokens, N = heads, H = head dim

    flash_attn    `flash_attn.flash_attn_varlen_func` (package `flash-attn`; CUDA, bf16/fp16)
    torch_varlen  `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 kernel inside torch >= 2.10;
                  CUDA, bf16/fp16, no extra install)
    sdpa          exact reference for CPU and tests: documents are scattered into a padded
                  (num_docs, max_seqlen) view, one `scaled_dot_product_attention` call with a key-padding mask,
                  then gathered back. No Python loop over documents, no (T, T) mask.

`auto` picks flash_attn if it imports and CUDA is available, else torch_varlen on CUDA, else sdpa.
Tests force a backend with `force_backend("sdpa")` (a context manager) or `NeoBERTConfig(attn_backend=...)`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from neobert.packing import PackedMeta

log = logging.getLogger(__name__)

BACKENDS = ("flash_attn", "torch_varlen", "sdpa")
CUDA_BACKENDS = ("flash_attn", "torch_varlen")

# (q (T,N,H), k (T,N,H), v (T,N,H), meta, scale) -> (T,N,H)
AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PackedMeta, float], torch.Tensor]

_forced: str | None = None
_logged: set[tuple[str, str]] = set()


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


def have_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


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
) -> str:
    """The backend name `requested` resolves to on this machine. The keyword flags override detection (tests)."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    fa = have_flash_attn() if flash_attn_available is None else flash_attn_available
    tv = have_torch_varlen() if torch_varlen_available is None else torch_varlen_available
    if requested == "auto":
        if _forced is not None:
            requested = _forced
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
    """Resolve `requested` once and return (name, attention function). Logs the choice once per process."""
    name = resolve_backend(requested)
    fn = {"flash_attn": _flash_attn, "torch_varlen": _torch_varlen, "sdpa": sdpa_varlen}[name]
    if (requested, name) not in _logged:
        _logged.add((requested, name))
        log.info("attention backend: %s (requested %r)", name, requested)
    return name, fn


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
