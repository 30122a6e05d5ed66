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
