"""Fault injection on the driver: `kill -9` of a running `jobs/pretrain.py` at a seeded random step, then a re-run
of the same command. The re-run resumes from the latest complete checkpoint and ends with the losses and the data
(row + mask fingerprints of every micro-batch) of the uninterrupted run: the session's `pretrain_reference`
(conftest.py), whose settings the killed run takes with a checkpoint every 3 steps. Worker kills (also during a
checkpoint write) are in test_pretrain.py."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SEED = 20261204  # the kill step is drawn from it: a failure reproduces
NUM_STEPS = 10  # the reference run's train.num_steps


def read_jsonl(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r}


def fingerprints(run_dir: Path) -> set[tuple]:
    """(step, rank, micro, sha) of every micro-batch the completed steps trained on."""
    out = set()
    for rank in (0, 1):
        for r in read_jsonl(run_dir / f"data_trace.rank{rank}.jsonl"):
            out.add((r["step"], rank, r.get("micro"), r["sha"]))
    return out


def traced_step(run_dir: Path) -> int:
    """The last step rank 0 has trained (its data trace gets the micro-batches of every step once it is done)."""
    return max((r["step"] for r in read_jsonl(run_dir / "data_trace.rank0.jsonl")), default=0)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def wait_until_the_job_of_a_dead_driver_is_gone(dashboard_url: str, driver_pid: int, timeout: float) -> None:
    """Ray ends the job of a dead driver (its Train controller and workers); wait until every actor of that job is
    dead and its process has exited, so that nothing of the killed run writes into the run dir any more."""
    from ray.util.state import list_actors, list_jobs

    deadline = time.monotonic() + timeout
    while True:
        jobs = [
            j.job_id
            for j in list_jobs(address=dashboard_url, raise_on_missing_output=False)
            if j.driver_info is not None and str(j.driver_info.pid) == str(driver_pid)
        ]
        assert len(jobs) == 1, jobs
        actors = list_actors(
            address=dashboard_url,
            filters=[("job_id", "=", jobs[0])],
            limit=1000,
            raise_on_missing_output=False,
        )
        assert actors, "the killed driver's job started no actors"
        running = [a for a in actors if a.state != "DEAD" or (a.pid and process_exists(a.pid))]
        if not running:
            return
        assert time.monotonic() < deadline, f"the killed driver's actors still run: {running}"
        time.sleep(0.2)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def test_driver_killed_at_a_random_step_resumes_like_an_uninterrupted_run(
    ray_cluster, pretrain_reference, tmp_path
):
    reference = pretrain_reference.run_dir
    assert pretrain_reference.proc.returncode == 0, (
        pretrain_reference.proc.stdout + pretrain_reference.proc.stderr
    )[-4000:]
    assert sorted(losses(reference)) == list(range(2, NUM_STEPS + 1, 2))

    kill_step = random.Random(SEED).randint(4, NUM_STEPS - 2)
    cmd = [sys.executable, "jobs/pretrain.py", "--address", ray_cluster.address,
           *pretrain_reference.overrides(tmp_path / "runs", "killed", **{"checkpoint.every_steps": 3})]  # fmt: skip
    run_dir = tmp_path / "runs" / "killed"
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while traced_step(run_dir) < kill_step:
        assert driver.poll() is None, "the job ended before the kill step"
        assert time.monotonic() < deadline, f"step {kill_step} not reached"
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    wait_until_the_job_of_a_dead_driver_is_gone(ray_cluster.dashboard_url, driver.pid, timeout=60)
    killed_at = traced_step(run_dir)
    assert killed_at < NUM_STEPS
    traced_before = len(read_jsonl(run_dir / "data_trace.rank0.jsonl"))

    run(cmd)
    # It resumed (a restart from step 0 would trace every step again) ...
    traced_again = len(read_jsonl(run_dir / "data_trace.rank0.jsonl")) - traced_before
    assert traced_again < len(read_jsonl(reference / "data_trace.rank0.jsonl"))

    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-6 * max(1.0, abs(loss)), (step, got[step], loss)
    assert fingerprints(run_dir) == fingerprints(reference)
