"""Training-step building blocks for MLM pretraining (pure PyTorch; Ray-free so unit tests run without a cluster).

- `mask_tokens`: per-micro-batch MLM masking from a counter-based seed (seed, step, rank, micro-batch), so a
  resumed run masks exactly like an uninterrupted one without carrying generator state around.
  NeoBERT default: 20% of the non-special tokens -> [MASK]; option "80_10_10" (BERT: of the selected tokens 80%
  [MASK], 10% a random token, 10% unchanged).
- `build_optimizer`: AdamW (fused on CUDA); no weight decay on norms, biases and embeddings.
- `lr_lambda` / `build_scheduler`: linear warmup, then cosine or linear decay to `min_lr_ratio`, or constant.
- `train_step`: gradient accumulation over micro-batches with *exact* token-mean scaling (see its docstring).
- `model_flops` / `peak_flops`: FLOPs of one step (matmuls + attention over the real documents) for MFU.

Shapes: T = packed tokens of one micro-batch (the static token budget), D = model dim, V = vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from neobert.loss import IGNORE_INDEX

MaskStrategy = Literal["mask", "80_10_10"]


# ----------------------------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------------------------
def mask_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A 63-bit seed for the generator of micro-batch `micro` of `step` on `rank` (SplitMix64-style mixing)."""
    x = (
        seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB + micro * 0x2545F491
    ) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 29
    return x & ((1 << 63) - 1)


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    generator: torch.Generator,
    mask_prob: float = 0.2,
    mask_id: int,
    special_ids: Sequence[int],
    vocab_size: int,
    strategy: MaskStrategy = "mask",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select each non-special token with probability `mask_prob` (Bernoulli, like HF's MLM collator).

    input_ids: (T,) integer tensor on the generator's device (CPU in the trainer: masking overlaps the GPU step).
    Returns (masked_input_ids (T,), labels (T,)) where labels hold the original id at selected positions and
    `IGNORE_INDEX` (-100) elsewhere. Special ids (PAD/CLS/SEP/UNK/MASK) are never selected, so padding never
    contributes to the loss. "80_10_10": of the selected tokens 80% -> [MASK], 10% -> a uniformly random
    id in [0, vocab_size), 10% unchanged (the label is the original id in all three cases).
    """
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}; NeoBERT uses 0.2, BERT 0.15")
    if strategy not in ("mask", "80_10_10"):
        raise ValueError(f"masking strategy must be 'mask' or '80_10_10', got {strategy!r}")
    special = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=input_ids.device)
    maskable = ~torch.isin(input_ids, special)  # (T,)
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    selected = maskable & (u < mask_prob)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    if strategy == "mask":
        masked = torch.where(selected, torch.full_like(input_ids, mask_id), input_ids)
    else:
        v = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
        rand_ids = torch.randint(0, vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
        masked = torch.where(selected & (v < 0.8), torch.full_like(input_ids, mask_id), input_ids)
        masked = torch.where(selected & (v >= 0.8) & (v < 0.9), rand_ids.to(input_ids.dtype), masked)
    return masked, labels


# ----------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay for matmul weights; no decay for norms, biases and embeddings.

    A parameter is "no decay" if it is 1-D (norm weights, biases) or belongs to an `nn.Embedding`.
    """
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embedding_params else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW; `fused=None` -> fused kernel iff the parameters live on CUDA."""
    if fused is None:
        fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)


def lr_lambda(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    schedule: Literal["cosine", "linear", "constant"] = "cosine",
    min_lr_ratio: float = 0.1,
) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup to 1 over `warmup_steps`, then decay.

    During warmup the factor is (step + 1) / warmup_steps, so the first step already has a non-zero LR and
    step `warmup_steps - 1` runs at the peak. Decay goes from 1 at `warmup_steps` to `min_lr_ratio` at
    `total_steps` (cosine or linear) and stays there.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    schedule: Literal["cosine", "linear", "constant"] = "cosine",
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    def fn(step: int) -> float:
        return lr_lambda(
            step,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            schedule=schedule,
            min_lr_ratio=min_lr_ratio,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# ----------------------------------------------------------------------------------------------------------------
# The train step
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class MicroBatch:
    """One masked micro-batch on the compute device. `meta` is a `neobert.packing.PackedMeta`."""

    input_ids: torch.Tensor  # (T,)
    labels: torch.Tensor  # (T,) -100 = not a target
    meta: Any
    num_masked: int  # labels != -100, counted on the CPU before the transfer (no device sync)
    num_tokens: int  # real (non-padding) tokens
    masked: Any = None  # neobert.loss.MaskedRows gathered on the CPU (model.masked_rows), or None


@dataclass
class StepStats:
    """Sums over the micro-batches of this worker (device tensors: read them only when logging)."""

    loss_sum: torch.Tensor  # sum of per-token CE over this worker's masked tokens
    num_correct: torch.Tensor
    num_masked_local: int
    num_masked_global: torch.Tensor  # device scalar (reading it syncs: only when logging)
    grad_norm: torch.Tensor  # total norm before clipping
    num_tokens_local: int


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks without a host sync (identity for one rank / no process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient reduction of a non-final accumulation micro-batch: DDP's `no_sync()`, FSDP2's
    `set_requires_gradient_sync(False)`; a no-op for a bare model."""
    no_sync = getattr(model, "no_sync", None)
    set_sync = getattr(model, "set_requires_gradient_sync", None)
    if enabled or (no_sync is None and set_sync is None):
        yield
    elif no_sync is not None:
        with no_sync():
            yield
    else:
        set_sync(False)
        try:
            yield
        finally:
            set_sync(True)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    micro_batches: Sequence[MicroBatch],
    *,
    max_grad_norm: float | None,
    autocast: Callable[[], Any] = nullcontext,
    reduce_count: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum,
) -> StepStats:
    """One optimizer step over `micro_batches` (gradient accumulation), exactly the token mean of the global batch.

    Exact scaling: the objective is sum(CE over every masked token of every micro-batch on every worker) / M,
    M = the GLOBAL masked count. Labels are known before the forward pass, so M is computed up front: the local
    count comes from the CPU-side labels and one tiny all-reduce of an int64 device scalar sums it over
    workers; M stays on the device (no host sync, the CPU keeps running ahead of the GPU). Each micro-batch
    then back-propagates `loss_sum * world_size / M`; DDP averages gradients over
    `world_size` ranks, so the accumulated gradient equals d(sum CE / M). Dividing each micro-batch by its own
    count (the common mistake) over-weights micro-batches with few masked tokens; scaling after the fact would
    need a second pass over the gradients, so counting first is both exact and free.

    `model(input_ids, meta, labels[, masked=mb.masked])` must return an object with `loss_sum` and `num_correct`
    (MLMLossOutput); `masked` is passed when the micro-batch carries CPU-gathered masked rows.
    Gradients are reduced only after the last micro-batch (`gradient_sync`: DDP or FSDP2).
    """
    assert micro_batches, "train_step needs at least one micro-batch"
    device = micro_batches[0].input_ids.device
    local_masked = sum(mb.num_masked for mb in micro_batches)
    global_masked = reduce_count(
        torch.full((), local_masked, dtype=torch.int64, device=device)
    )  # no H2D sync
    scale = world_size() / global_masked.clamp_min(1).to(torch.float32)  # device scalar
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    num_correct = torch.zeros((), device=device, dtype=torch.int64)
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with gradient_sync(model, last), autocast():
            extra = {} if mb.masked is None else {"masked": mb.masked}  # no host sync in the model
            out = model(mb.input_ids, mb.meta, mb.labels, **extra)
        (out.loss_sum.float() * scale).backward()
        loss_sum += out.loss_sum.detach().float()
        num_correct += out.num_correct.detach().to(torch.int64)
    # max_norm=inf measures without clipping; torch's clip handles sharded (DTensor) gradients of FSDP2 too
    clip = max_grad_norm if max_grad_norm is not None and max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor norm; the full value is one all-reduce away
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(
        loss_sum=loss_sum,
        num_correct=num_correct,
        num_masked_local=local_masked,
        num_masked_global=global_masked,
        grad_norm=grad_norm.detach(),
        num_tokens_local=sum(mb.num_tokens for mb in micro_batches),
    )


# ----------------------------------------------------------------------------------------------------------------
# FLOPs / MFU
# ----------------------------------------------------------------------------------------------------------------
def model_flops(
    *,
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    vocab_size: int,
    num_tokens: int,
    sum_sq_seqlens: int,
    num_masked: int,
    training: bool = True,
) -> float:
    """Model FLOPs (fwd+bwd = 3x fwd) of one micro-batch, counting only real work (no padding, no recompute).

    Per layer and token: QKV 2*3*D^2, out-proj 2*D^2, SwiGLU 2*3*D*F. Attention is bidirectional within each
    document: QK^T and PV cost 2*2*len^2*D per document and layer, i.e. 4*D*sum(len_i^2) over the documents.
    The MLM head (D x V) runs only on masked tokens (chunked CE on the selected rows): 2*D*V per masked token.
    """
    d, f = hidden_size, ffn_hidden_size
    dense = num_layers * num_tokens * (2 * 4 * d * d + 2 * 3 * d * f)
    attn = num_layers * 4 * d * sum_sq_seqlens
    head = 2 * d * vocab_size * num_masked
    fwd = dense + attn + head
    return float(3 * fwd if training else fwd)


def model_flops_for(cfg, *, num_tokens: int, sum_sq_seqlens: int, num_masked: int) -> float:
    """`model_flops` of one training micro-batch of the model `cfg` describes (a `NeoBERTConfig`, or any object
    with its `num_layers`, `hidden_size`, `ffn_hidden_size` and `padded_vocab_size`)."""
    return model_flops(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        vocab_size=cfg.padded_vocab_size,
        num_tokens=num_tokens,
        sum_sq_seqlens=sum_sq_seqlens,
        num_masked=num_masked,
    )


_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the CUDA device (None when unknown/CPU: MFU is then not reported)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None
