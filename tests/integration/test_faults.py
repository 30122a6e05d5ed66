"""Fault injection on the driver: `kill -9` of a running `jobs/pretrain.py` at a seeded random step, then a re-run
of the same command. The re-run resumes from the latest complete checkpoint and ends with the losses and the data
(row + mask fingerprints of every micro-batch) of an uninterrupted run. Worker kills (also during a checkpoint
write) are in test_pretrain.py."""

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
NUM_STEPS = 12


def command(address: str, storage: Path, name: str) -> list[str]:
    keys = {
        "data.pack_tokens": 128,
        "data.num_train_rows": 40,
        "data.num_eval_rows": 8,
        "train.tokens_per_micro_batch": 512,
        "train.num_steps": NUM_STEPS,
        "train.warmup_steps": 2,
        "checkpoint.every_steps": 3,
        "checkpoint.storage_path": str(storage),
        "checkpoint.name": name,
        "logging.every_steps": 1,
        "logging.eval_every_steps": 0,
        "logging.trace_data": True,
    }
    return [
        sys.executable,
        "jobs/pretrain.py",
        "--address",
        address,
        *(f"--{k}={v}" for k, v in keys.items()),
    ]


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


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def test_driver_killed_at_a_random_step_resumes_like_an_uninterrupted_run(ray_cluster, tmp_path):
    storage = tmp_path / "runs"
    run(command(ray_cluster.address, storage, "uninterrupted"))
    reference = storage / "uninterrupted"
    assert sorted(losses(reference)) == list(range(1, NUM_STEPS + 1))

    kill_step = random.Random(SEED).randint(4, NUM_STEPS - 2)
    cmd = command(ray_cluster.address, storage, "killed")
    run_dir = storage / "killed"
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while max(losses(run_dir), default=0) < kill_step:
        assert driver.poll() is None, "the job ended before the kill step"
        assert time.monotonic() < deadline, f"step {kill_step} not reached"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    killed_at = max(losses(run_dir))
    assert killed_at < NUM_STEPS
    traced_before = len(read_jsonl(run_dir / "data_trace.rank0.jsonl"))

    # Ray ends a dead driver's job (its Train controller and workers); the re-run must not race them.
    deadline = time.monotonic() + 60
    last = (run_dir / "metrics.jsonl").stat().st_mtime
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = (run_dir / "metrics.jsonl").stat().st_mtime
        if now == last:
            break
        last = now
    run(cmd)
    # It resumed (a restart from step 0 would trace every step again) ...
    traced_again = len(read_jsonl(run_dir / "data_trace.rank0.jsonl")) - traced_before
    assert traced_again < len(read_jsonl(reference / "data_trace.rank0.jsonl"))

    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-6 * max(1.0, abs(loss)), (step, got[step], loss)
    assert fingerprints(run_dir) == fingerprints(reference)
