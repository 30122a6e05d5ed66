"""pipelines/progress.py: the per-window progress line (step/total, loss, tokens/s, ETA)."""

from __future__ import annotations

import math

import pytest

from pipelines.progress import eta_seconds, format_duration, format_rate, progress_line


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 75, 3725, 90061)] == [
        "0:00",
        "0:59",
        "1:15",
        "1:02:05",
        "1d 1:01:01",
    ]
    assert format_duration(-1) == "?" and format_duration(math.inf) == "?"


def test_format_rate():
    assert [format_rate(x) for x in (0, 950, 12_345, 2_500_000, 3.1e9)] == [
        "0",
        "950",
        "12.3k",
        "2.5M",
        "3.1G",
    ]
    assert format_rate(math.nan) == "?"


def test_eta_uses_the_pace_of_this_attempt():
    assert eta_seconds(20, 60, 40.0) == pytest.approx(80.0)  # 2 s/step, 40 steps left
    assert eta_seconds(30, 60, 20.0, start_step=20) == pytest.approx(60.0)  # resumed at 20: 10 steps in 20 s
    assert eta_seconds(20, 60, 40.0, start_step=20) is None  # nothing run yet
    assert eta_seconds(70, 60, 10.0) == 0.0


def test_progress_line_full_and_partial():
    line = progress_line(
        20, 60, {"train/loss": 7.41234, "train/tokens_per_s": 12_345.0, "train/mfu": 0.4123}, 41.0
    )
    assert line == "step 20/60 ( 33%) | loss 7.4123 | 12.3k tok/s | mfu 41.2% | 0:41 elapsed | ETA 1:22"
    line = progress_line(5, 200, {"train/loss": 2.5, "eval/loss": 2.7}, 10.0, start_step=0)
    assert line == "step   5/200 (  2%) | loss 2.5000 | eval loss 2.7000 | 0:10 elapsed | ETA 6:30"
    assert progress_line(0, 10, {}, 0.0) == "step  0/10 (  0%) | 0:00 elapsed"


def test_progress_line_rejects_nonsense():
    with pytest.raises(ValueError, match="num_steps >= 1"):
        progress_line(1, 0, {}, 1.0)
