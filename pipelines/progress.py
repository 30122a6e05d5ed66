"""One human-readable progress line per logging window (rank 0), built from the window's metrics.

    step 20/60 (33%) | loss 7.412 | 12.3k tok/s | mfu 41.2% | 0:41 elapsed | ETA 1:22

Pure functions, no I/O: the training runner calls `progress_line(...)` once per logging window and logs the
result; metric names are the slash-namespaced ones the runner reports (`train/loss`, `train/tokens_per_s`,
`train/mfu`, `eval/loss`). The ETA extrapolates the pace of the steps run by this attempt (a resumed run does
not count the steps it skipped) and is left out until one step has finished.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def format_duration(seconds: float) -> str:
    """`75` -> "1:15", `3725` -> "1:02:05", `90061` -> "1d 1:01:01"; negative or non-finite -> "?"."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    hms = f"{hours}:{minutes:02d}:{s:02d}" if hours or days else f"{minutes}:{s:02d}"
    return f"{days}d {hms}" if days else hms


def format_rate(x: float) -> str:
    """A count per second with an SI suffix and 3 significant digits: 950 -> "950", 12_345 -> "12.3k"."""
    if not math.isfinite(x):
        return "?"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def eta_seconds(step: int, num_steps: int, elapsed_s: float, start_step: int = 0) -> float | None:
    """Seconds left at the pace of the steps this attempt ran (`start_step`: where it resumed); None when no
    step has run yet."""
    done = step - start_step
    if done <= 0 or elapsed_s <= 0:
        return None
    return max(num_steps - step, 0) * elapsed_s / done


def progress_line(
    step: int,
    num_steps: int,
    metrics: Mapping[str, float],
    elapsed_s: float,
    *,
    start_step: int = 0,
) -> str:
    """The progress line for `step` of `num_steps` (see the module docstring); metrics that are absent are
    left out, so the same function serves pretraining and contrastive training."""
    if num_steps < 1 or step < 0:
        raise ValueError(f"progress_line needs num_steps >= 1 and step >= 0, got step={step}/{num_steps}")
    width = len(str(num_steps))
    parts = [f"step {step:>{width}d}/{num_steps} ({100 * step / num_steps:3.0f}%)"]
    if "train/loss" in metrics:
        parts.append(f"loss {metrics['train/loss']:.4f}")
    if "eval/loss" in metrics:
        parts.append(f"eval loss {metrics['eval/loss']:.4f}")
    if "train/tokens_per_s" in metrics:
        parts.append(f"{format_rate(metrics['train/tokens_per_s'])} tok/s")
    if "train/mfu" in metrics:
        parts.append(f"mfu {100 * metrics['train/mfu']:.1f}%")
    parts.append(f"{format_duration(elapsed_s)} elapsed")
    eta = eta_seconds(step, num_steps, elapsed_s, start_step)
    if eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)
