"""Compute kernels of the encoder, and `resolve(cfg)`: the one place that decides which of them a model runs.

    attention.py    varlen attention backends (fa4, flash_attn, torch_varlen, sdpa) and the FA4 custom ops,
                    including the RoPE-fused FA4 entry point
    rope.py         RoPE tables and rotation in plain torch (the reference every backend agrees with)
    rope_triton.py  the Triton RoPE split / in-place backward of the fused `fa4` path (own torch reference)
    ffn.py          SwiGLU feed-forward implementations (quack fused epilogues, torch)
    ce_triton.py    the fused row kernel of the chunked masked-LM loss (used by `neobert.loss`)

`resolve(cfg)` turns the config's requests (`attn_backend`, `ffn_backend`, `ffn_autotune`) into a `Kernels`
object holding the chosen functions, logs the choice once per process, and warns when a setting has no effect.
The model receives that object at construction and never dispatches by name again. Tests force a path with
`attention.force_backend(...)`, an explicit backend name in the config, or by passing their own `Kernels`
(e.g. `dataclasses.replace(resolve(cfg), qkv_attn_fn=None)`) to `NeoBERT(cfg, kernels=...)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from neobert.kernels.attention import AttnFn, QkvAttnFn, build_attention, fused_rope_attention
from neobert.kernels.ffn import FfnFn, build_ffn, swiglu_ffn_fn, swiglu_torch

if TYPE_CHECKING:
    from neobert.config import NeoBERTConfig

log = logging.getLogger(__name__)

_logged: set[tuple] = set()


@dataclass(frozen=True)
class Kernels:
    """The resolved compute functions of one model (shared by all its blocks)."""

    attn_backend: str  # resolved attention backend name (attention.BACKENDS)
    attn_fn: AttnFn  # packed attention on rotated q, k, v
    qkv_attn_fn: QkvAttnFn | None  # RoPE fused into the attention op (fa4 only); None = rope + attn_fn
    ffn_backend: str  # resolved FFN backend name (ffn.FFN_BACKENDS)
    ffn_fn: FfnFn  # padded batches: shapes vary, never autotuned
    packed_ffn_fn: FfnFn  # every token of a packed stream (autotuned with ffn_autotune)
    rows_ffn_fn: FfnFn  # the sparse last layer's masked rows

    def describe(self) -> str:
        rope = "fused RoPE" if self.qkv_attn_fn is not None else "RoPE separate"
        return (
            f"attention backend: {self.attn_backend} ({rope}); ffn backend: {self.ffn_backend} (packed "
            f"{_name(self.packed_ffn_fn)}, masked rows {_name(self.rows_ffn_fn)})"
        )


def _name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def resolve(cfg: NeoBERTConfig) -> Kernels:
    """The kernels `cfg` asks for, as available on this machine (ValueError when an explicit request cannot run)."""
    attn_backend, attn_fn = build_attention(cfg.attn_backend)
    ffn_backend, ffn_fn = build_ffn(cfg.ffn_backend)
    if cfg.ffn_autotune and ffn_backend != "quack":
        log.warning(
            "ffn_autotune=True has no effect: the FFN backend here is %r (autotuning is quack's; it needs "
            "quack-kernels and a GPU of compute capability >= 9.0)",
            ffn_backend,
        )
    kernels = Kernels(
        attn_backend=attn_backend,
        attn_fn=attn_fn,
        qkv_attn_fn=fused_rope_attention(attn_backend),  # fa4: RoPE inside the attention op
        ffn_backend=ffn_backend,
        ffn_fn=ffn_fn,
        # Packed tokens: with ffn_autotune, quack's GEMMs autotuned for the (static) token budget. The sparse last
        # layer's masked rows (~20% of T, a new count every step): the torch FFN, because quack is slower there
        # (13,107 rows on an H100: 2.00 vs 1.54 ms fwd+bwd) and an autotuned GEMM would tune again for each count.
        packed_ffn_fn=swiglu_ffn_fn(ffn_backend, autotune=cfg.ffn_autotune),
        rows_ffn_fn=swiglu_torch,
    )
    key = (cfg.attn_backend, cfg.ffn_backend, cfg.ffn_autotune, kernels.describe())
    if key not in _logged:
        _logged.add(key)
        log.info("%s (requested attn %r, ffn %r)", kernels.describe(), cfg.attn_backend, cfg.ffn_backend)
    return kernels


__all__ = ["Kernels", "resolve"]
