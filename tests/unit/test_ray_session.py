"""pipelines.ray_session.init_ray: the three ways a job joins or starts Ray (a stand-in `ray` module records the
call, so no cluster is needed)."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from pipelines.ray_session import WORKING_DIR_EXCLUDES, init_ray


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    seen: list[dict] = []
    fake = types.ModuleType("ray")
    fake.init = lambda **kw: seen.append(kw)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray", fake)
    # the stand-in has no ray.data: quiet_output (tested on its own below) must not reach the real one
    monkeypatch.setattr("pipelines.ray_session.quiet_output", lambda tty=None: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    return seen


def test_under_ray_job_submit_joins_without_arguments(calls, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert init_ray(None, Path("/repo"), local_num_cpus=8) == "job"
    assert calls == [{}]  # no resources and no runtime env: the submitted job's own env applies


def test_explicit_address_ships_the_checkout(calls, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "http://ignored:8265")  # --address wins
    assert init_ray("ray://head:10001", Path("/repo"), local_num_cpus=8, include_dashboard=False) == "address"
    (kw,) = calls
    assert kw["address"] == "ray://head:10001" and "num_cpus" not in kw and "include_dashboard" not in kw
    assert kw["runtime_env"]["working_dir"] == "/repo"
    assert {".venv", ".git", "outputs", ".device"} <= set(kw["runtime_env"]["excludes"])
    assert kw["runtime_env"]["excludes"] == WORKING_DIR_EXCLUDES


def test_local_instance_puts_the_repo_on_pythonpath(calls) -> None:
    assert init_ray(None, Path("/repo"), local_num_cpus=6, include_dashboard=False) == "local"
    assert calls == [{"address": "local", "num_cpus": 6, "include_dashboard": False}]
    assert os.environ["PYTHONPATH"].split(os.pathsep) == ["/repo", "/elsewhere"]


def test_state_tracking_on_for_local_and_address_modes(calls, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_TRAIN_ENABLE_STATE_TRACKING", raising=False)
    init_ray(None, Path("/repo"))
    assert os.environ["RAY_TRAIN_ENABLE_STATE_TRACKING"] == "1"  # inherited by the local instance
    monkeypatch.delenv("RAY_TRAIN_ENABLE_STATE_TRACKING", raising=False)
    init_ray("auto", Path("/repo"))
    assert calls[-1]["runtime_env"]["env_vars"] == {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}


def test_quiet_output_turns_data_progress_bars_off_without_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.data import DataContext

    from pipelines.ray_session import quiet_output

    ctx = DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    monkeypatch.setattr(ctx, "print_on_execution_start", True)
    monkeypatch.delenv("RAY_DATA_DISABLE_PROGRESS_BARS", raising=False)
    assert quiet_output(tty=True) is True and ctx.enable_progress_bars and ctx.print_on_execution_start
    assert quiet_output(tty=False) is False
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    assert not ctx.enable_progress_bars and not ctx.print_on_execution_start
    monkeypatch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "0")  # the user's explicit choice wins
    assert quiet_output(tty=False) is True and ctx.enable_progress_bars
