"""SwiGLU feed-forward implementations; `neobert.kernels.resolve` picks one per model (like the attention backend).

    x (.., D) -> w_out(silu(x W_gate^T) * (x W_up^T)) (.., D),   w_in.weight = [W_gate; W_up] (2F, D)

    torch   two `nn.Linear` GEMMs (cuBLAS) and the SwiGLU as separate ops, which torch.compile fuses into one
            pointwise kernel per direction. Runs everywhere; the exact reference.
    quack   quack's GEMMs with fused epilogues (`quack.mlp.mlp_func`, package `quack-kernels`, installed with
            flash-attn-4; CuTe-DSL kernels for Hopper/Blackwell, JIT-compiled on first use): the SwiGLU is
            computed in the epilogue of the first GEMM, and its derivative in the epilogue of the backward's
            dX GEMM, so the (T, 2F) gate/up tensor is not read again by a separate pointwise kernel in either
            direction. Same math, bf16 rounding at the same places as the autocast torch path.

`auto` = quack on a GPU of compute capability >= 9.0 when `quack.mlp` imports, else torch. quack runs on CUDA
tensors in bf16/fp16 (under autocast) only; on CPU tensors or in a full-fp32 run the torch path runs instead (a
model built on a GPU machine can still be evaluated on CPU or in fp32).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FFN_BACKENDS = ("quack", "torch")
QUACK_MIN_CAPABILITY = 9

# quack's untuned plain GEMMs (4 of the FFN's 6 per layer: forward w_out, backward dx, dW_in, dW_out) ask
# nvMatmulHeuristics, an optional extra (`quack-kernels[heuristics]`), for a tile config on every call. Without it
# that import fails on every call and, since Python does not cache failed imports, searches all of sys.path
# again: 112 failed imports per step of the base model, the largest avoidable Python cost of the step in the
# host profile of the training step (docs/benchmarks.md). `guard_missing_nvmmh` makes the import fail at once instead; a
# package installed later in the same process stays hidden until `del sys.modules["nvMatmulHeuristics"]`.
GUARD_MISSING_NVMMH = True
NVMMH_MODULE = "nvMatmulHeuristics"

# (x (.., D), w_in: Linear(D, 2F), w_out: Linear(F, D)) -> (.., D)
FfnFn = Callable[[torch.Tensor, nn.Linear, nn.Linear], torch.Tensor]


def swiglu_torch(x: torch.Tensor, w_in: nn.Linear, w_out: nn.Linear) -> torch.Tensor:
    gate, up = w_in(x).chunk(2, dim=-1)  # (.., F) each
    return w_out(F.silu(gate) * up)


def swiglu_quack(x: torch.Tensor, w_in: nn.Linear, w_out: nn.Linear, *, tuned: bool = False) -> torch.Tensor:
    """`tuned`: quack autotunes the tile config of each of its GEMMs at the first call of every new shape (a
    sweep of ~20-40 compiled kernels per GEMM, ~90 s for the base model's six on an H100, kept in quack's disk
    cache) instead of taking its heuristic config. Only for static shapes: a new row count tunes again."""
    half = torch.is_autocast_enabled("cuda") or x.dtype in (torch.bfloat16, torch.float16)
    # quack's kernels: CUDA, bf16/fp16, widths that are multiples of 8 (16 for the gated GEMM), at least one row
    # (the sparse last layer can get a micro-batch without masked tokens); anything else runs the torch ops
    fits = x.shape[-1] % 8 == 0 and w_in.out_features % 16 == 0 and w_out.out_features % 8 == 0
    if not (x.is_cuda and half and fits and x.numel() > 0):
        return swiglu_torch(x, w_in, w_out)
    from quack.mlp import mlp_func

    # concat_layout: w_in rows are [W_gate; W_up] (ours), not quack's default interleaved gate/up columns.
    out = mlp_func(
        x.reshape(-1, x.shape[-1]),  # (N, D): the layout measured and tested; (B, S, D) is flattened
        w_in.weight,
        w_out.weight,
        activation="swiglu",
        concat_layout=True,
        tuned=tuned,
    )
    return out.view(*x.shape[:-1], out.shape[-1])


@functools.cache
def have_quack() -> bool:
    """quack's fused-epilogue MLP importable and a GPU of compute capability >= 9.0 present."""
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= QUACK_MIN_CAPABILITY):
        return False
    try:
        importlib.import_module("quack.mlp")
    except Exception as e:  # not installed, or its CuTe-DSL runtime fails to load
        if not isinstance(e, ModuleNotFoundError):
            log.warning(
                "quack is installed but does not import (%s: %s); SwiGLU FFN uses torch", type(e).__name__, e
            )
        return False
    return True


def resolve_ffn_backend(requested: str = "auto", *, quack_available: bool | None = None) -> str:
    """The FFN implementation `requested` resolves to here; `quack_available` overrides detection (tests)."""
    if requested not in ("auto", *FFN_BACKENDS):
        raise ValueError(f"unknown ffn_backend {requested!r}; choose 'auto' or one of {FFN_BACKENDS}")
    if requested == "torch":
        return "torch"
    available = have_quack() if quack_available is None else quack_available
    if requested == "quack" and not available:
        raise ValueError(
            "ffn_backend 'quack' needs the quack-kernels package (installed with flash-attn-4) and a GPU of "
            "compute capability >= 9.0 (Hopper/Blackwell); use ffn_backend='torch' or 'auto'"
        )
    return "quack" if available else "torch"


def nvmmh_state() -> str:
    """'installed' | 'guarded' (missing, import fails at once) | 'missing' (each quack GEMM searches again)."""
    if NVMMH_MODULE in sys.modules:
        return "guarded" if sys.modules[NVMMH_MODULE] is None else "installed"
    return "installed" if importlib.util.find_spec(NVMMH_MODULE) is not None else "missing"


def guard_missing_nvmmh() -> bool:
    """If nvMatmulHeuristics is not installed, put None under its name in sys.modules (Python's documented
    negative entry: `import` then raises ModuleNotFoundError at once, without searching sys.path). quack then
    falls back to its default GEMM config exactly as before, only without the search. Returns whether the
    entry was set; an installed (or already imported, or already guarded) module is left alone."""
    if nvmmh_state() != "missing":
        return False
    sys.modules[NVMMH_MODULE] = None
    return True


def swiglu_quack_tuned(x: torch.Tensor, w_in: nn.Linear, w_out: nn.Linear) -> torch.Tensor:
    return swiglu_quack(x, w_in, w_out, tuned=True)


def swiglu_ffn_fn(name: str, *, autotune: bool = False) -> FfnFn:
    """The FFN function of backend `name`; `autotune` picks quack's autotuned variant (no effect for torch)."""
    if name not in FFN_BACKENDS:
        raise ValueError(f"unknown ffn backend {name!r}; choose one of {FFN_BACKENDS}")
    if name == "quack":
        return swiglu_quack_tuned if autotune else swiglu_quack
    return swiglu_torch


def build_ffn(requested: str = "auto") -> tuple[str, FfnFn]:
    """Resolve `requested` and return (name, ffn function); installs the nvMatmulHeuristics guard for quack."""
    name = resolve_ffn_backend(requested)
    if name == "quack" and GUARD_MISSING_NVMMH:
        guard_missing_nvmmh()
    return name, swiglu_ffn_fn(name)
