"""Learning-rate schedules and optimizers, from maintained code.

Two families of per-run schedules, selected by `train.schedule`:
- "cosine" | "linear" | "constant": linear warmup over `warmup_steps` ((s + 1) / warmup, so the first step is
  already non-zero), then decay to `min_lr_ratio` at `num_steps` (`neobert.training.build_scheduler`).
- "wsd": warmup-stable-decay through transformers' `get_wsd_schedule` (a torch `LambdaLR`): linear warmup from
  `min_lr_ratio` to 1 over `warmup_steps` (s / warmup), constant for `stable_steps`, then `decay_steps` of
  decay with shape "linear", "cosine" or "1-sqrt" (MiniCPM / ModernBERT / Ettin) down to `min_lr_ratio`, held
  there afterwards.

A recipe chains phases, each with its own `LRSegment` on its own LambdaLR (restarted at the phase's first
step), so the LR at GLOBAL step g is `RecipeLR.lr_at(g)`: the phase holding g, its local step g - offset and
the segment's closed formula (`LRSegment.factor`). That formula is written here independently of the
scheduler objects above, which is what lets a test compare every step of a real run of schedulers with it.

Optimizers (`train.optimizer`): "adamw" (torch; fused on CUDA) or "stable_adamw" (torch-optimi's StableAdamW:
AdamW with AdaFactor-style update clipping per tensor, which ModernBERT uses instead of gradient clipping),
both with `neobert.training.param_groups` (no weight decay on norms, biases and embeddings). The runner builds
both after `parallel.wrap_model` (`build_optimizer(model, ...)`, `build_lr_scheduler(optimizer,
segment_from_train(cfg.train))`), so under FSDP2 they see the sharded parameters.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from neobert.training import build_optimizer as build_adamw
from neobert.training import build_scheduler as build_legacy_scheduler
from neobert.training import param_groups

ScheduleKind = Literal["cosine", "linear", "constant", "wsd"]
DecayShape = Literal["linear", "cosine", "1-sqrt"]
OptimizerName = Literal["adamw", "stable_adamw"]
SCHEDULES = ("cosine", "linear", "constant", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
OPTIMIZERS = ("adamw", "stable_adamw")


@dataclass(frozen=True)
class LRSegment:
    """The LR of one phase (or one plain run) as a function of its local step s in [0, num_steps).

    kind="wsd": warmup, stable, decay (`decay_shape`), then `min_lr_ratio` for the steps left after
    warmup_steps + stable_steps + decay_steps <= num_steps (NeoBERT holds 10% of the peak for its last 100k steps).
    kind="cosine"/"linear": warmup, then decay over the rest of the phase (stable_steps/decay_steps unused: 0).
    kind="constant": warmup, then the peak.
    """

    lr: float  # peak LR
    num_steps: int
    kind: ScheduleKind = "wsd"
    warmup_steps: int = 0
    stable_steps: int = 0
    decay_steps: int = 0
    decay_shape: DecayShape = "cosine"
    min_lr_ratio: float = 0.0  # final LR = lr * min_lr_ratio (wsd: also where its warmup starts)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay shape must be one of {DECAY_SHAPES}, got {self.decay_shape!r}")
        if self.lr <= 0 or self.num_steps < 1:
            raise ValueError(
                f"LR segment needs lr > 0 and num_steps >= 1, got lr={self.lr}, num_steps={self.num_steps}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if min(self.warmup_steps, self.stable_steps, self.decay_steps) < 0:
            raise ValueError("warmup_steps, stable_steps and decay_steps must be >= 0")
        if self.kind == "wsd":
            total = self.warmup_steps + self.stable_steps + self.decay_steps
            if total > self.num_steps:
                raise ValueError(
                    f"wsd: warmup_steps={self.warmup_steps} + stable_steps={self.stable_steps} + decay_steps="
                    f"{self.decay_steps} = {total} exceeds the phase's num_steps={self.num_steps}"
                )
        elif self.warmup_steps > self.num_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} > num_steps={self.num_steps}")

    def factor(self, s: int) -> float:
        """Closed formula of the LR multiplier at local step s (what `build_lr_scheduler` must reproduce)."""
        w = self.warmup_steps
        if self.kind != "wsd":
            if s < w:
                return (s + 1) / w
            if self.kind == "constant":
                return 1.0
            p = min(1.0, (s - w) / max(1, self.num_steps - w))
            d = 0.5 * (1.0 + math.cos(math.pi * p)) if self.kind == "cosine" else 1.0 - p
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * d
        r = self.min_lr_ratio
        if s < w:
            return r + (1.0 - r) * s / w
        if s < w + self.stable_steps:
            return 1.0
        if s < w + self.stable_steps + self.decay_steps:
            p = (s - w - self.stable_steps) / self.decay_steps
            d = {
                "linear": 1.0 - p,
                "cosine": 0.5 * (1.0 + math.cos(math.pi * p)),
                "1-sqrt": 1.0 - math.sqrt(p),
            }
            return r + (1.0 - r) * d[self.decay_shape]
        return r

    def lr_at(self, s: int) -> float:
        return self.lr * self.factor(s)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, seg: LRSegment) -> torch.optim.lr_scheduler.LambdaLR:
    """The LambdaLR of `seg` on `optimizer` (whose groups' `lr` is the peak): transformers' WSD or ours."""
    if seg.kind == "wsd":
        from transformers import get_wsd_schedule

        return get_wsd_schedule(
            optimizer,
            num_warmup_steps=seg.warmup_steps,
            num_decay_steps=seg.decay_steps,
            num_stable_steps=seg.stable_steps,
            warmup_type="linear",
            decay_type=seg.decay_shape,
            min_lr_ratio=seg.min_lr_ratio,
        )
    return build_legacy_scheduler(
        optimizer,
        warmup_steps=seg.warmup_steps,
        total_steps=seg.num_steps,
        schedule=seg.kind,
        min_lr_ratio=seg.min_lr_ratio,
    )


def build_optimizer(
    model: torch.nn.Module,
    name: OptimizerName,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
) -> torch.optim.Optimizer:
    """AdamW (torch) or StableAdamW (torch-optimi), both with `neobert.training.param_groups`."""
    if name == "adamw":
        return build_adamw(model, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if name == "stable_adamw":
        try:
            from optimi import StableAdamW
        except ImportError:
            raise ValueError("train.optimizer=stable_adamw needs `pip install torch-optimi`") from None
        # decouple_lr=False: weight_decay is scaled by the LR like torch's AdamW, so the same config value means
        # the same decay with either optimizer.
        return StableAdamW(
            param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
        )
    raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {name!r}")


def segment_from_train(t: Any) -> LRSegment:
    """The `LRSegment` of a `train` section (`pipelines.train.config.TrainSection`: lr, num_steps, schedule,
    warmup_steps, stable_steps, decay_steps, decay_shape, min_lr_ratio; the wsd fields only count for wsd)."""
    wsd = t.schedule == "wsd"
    return LRSegment(
        lr=t.lr,
        num_steps=t.num_steps,
        kind=t.schedule,
        warmup_steps=t.warmup_steps,
        stable_steps=t.stable_steps if wsd else 0,
        decay_steps=t.decay_steps if wsd else 0,
        decay_shape=t.decay_shape,
        min_lr_ratio=t.min_lr_ratio,
    )


@dataclass(frozen=True)
class RecipeLR:
    """The LR across phases: phase i covers global steps [offsets[i], offsets[i] + segments[i].num_steps)."""

    segments: tuple[LRSegment, ...]

    @property
    def offsets(self) -> list[int]:
        out, acc = [], 0
        for seg in self.segments:
            out.append(acc)
            acc += seg.num_steps
        return out

    @property
    def num_steps(self) -> int:
        return sum(s.num_steps for s in self.segments)

    def phase_of(self, g: int) -> int:
        if not 0 <= g < self.num_steps:
            raise ValueError(f"global step {g} outside the recipe's [0, {self.num_steps})")
        return bisect.bisect_right(self.offsets, g) - 1

    def lr_at(self, g: int) -> float:
        """LR of the optimizer step with 0-based global index g."""
        i = self.phase_of(g)
        return self.segments[i].lr_at(g - self.offsets[i])
