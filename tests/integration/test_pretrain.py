"""Pretraining on Ray Train, end to end on the shared local cluster (2 CPU workers, gloo, tiny model).

Three runs share their assertions (each costs ~15-30 s on 2 cores):
  A  10 steps uninterrupted, as a real `ray job submit --working-dir . -- python jobs/pretrain.py` on the
     embedded default corpus tokenized and packed on the fly (reference data order; loss must decrease): the
     session's `pretrain_reference` (conftest.py, shared with test_faults);
  B  in-process fits on the same corpus preprocessed once to Parquet (so the on-the-fly and the preprocessed
     paths must yield the same rows in the same order): 6 steps with a worker crash injected at step 5
     (restart from the step-3 checkpoint, finish at 6), then a re-fit under the same name with num_steps=10
     (resume at step 6, mid-epoch 1).
The train set is capped at 40 packed rows: a global step is 8 rows (2 workers x 1 micro-batch of 4 rows), an
epoch 5 steps, so both restarts land mid-epoch and the run crosses epochs. Every micro-batch's row keys and
rows+masks are fingerprinted (`logging.trace_data`); B's steps after each restart must equal A's steps exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PACK = 128  # the reference run's data.pack_tokens (conftest.PRETRAIN_PACK)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trace(run_dir: Path, rank: int) -> list[dict]:
    return read_jsonl(run_dir / f"data_trace.rank{rank}.jsonl")


def fit(argv: list[str]):
    from pipelines.train.pretrain import fit as fit_pretrain
    from pipelines.train.pretrain import load_pretrain_config

    cfg = load_pretrain_config(None, argv)
    return cfg, fit_pretrain(cfg)


@pytest.fixture(scope="module")
def run_a(pretrain_reference):
    """The uninterrupted reference run, as a real job: `ray job submit --working-dir . -- python jobs/pretrain.py`
    on the embedded default data (tokenized and packed on the fly); shared with test_faults (conftest.py)."""
    return pretrain_reference.run_dir, pretrain_reference.proc


@pytest.fixture(scope="module")
def packed_dir(ray_cluster, pretrain_reference, tmp_path_factory):
    """The same corpus preprocessed once to Parquet, as a real `ray job submit -- python jobs/preprocess.py` on the
    embedded default corpus, so the in-process fits skip tokenization; its rows must come out in the same order
    as the on-the-fly pipeline's."""
    out = tmp_path_factory.mktemp("packed")
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [
        str(ray_bin), "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", str(REPO),
        "--", sys.executable, "jobs/preprocess.py", "--output", str(out), "--pack-tokens", str(PACK),
        "--max-seq-len", str(PACK),
    ]  # fmt: skip
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"report: {out}/report.html" in proc.stdout + proc.stderr
    assert json.loads((out / "report.json").read_text())["splits"]["train"]["packs"] > 40
    return out


@pytest.fixture(scope="module")
def run_b(ray_session, pretrain_reference, packed_dir, tmp_path_factory):
    """In-process fits: 6 steps with a crash injected at step 5, then a re-fit of the same name to 10 steps.

    Storage and packed data are given as file:// URIs: the code path of s3:// / gs:// (pyarrow filesystems;
    metrics.jsonl and data traces staged locally and uploaded at checkpoints and at the end)."""
    storage = tmp_path_factory.mktemp("runs")
    common = {
        "data.packed_dir": f"file://{packed_dir}",
        "logging.num_eval_batches": 0,
        "checkpoint.every_steps": 3,
    }
    cfg, crashed = fit(
        pretrain_reference.overrides(f"file://{storage}", "b", **common, **{"train.num_steps": 6, "failure.inject_failure_at_step": 5,
                                                         "failure.max_failures": 1})
    )  # fmt: skip
    crashed_state = train_state(crashed.checkpoint)  # read now: the re-fit's checkpoints rotate it out
    assert cfg.run_dir == f"file://{storage}/b"
    run_dir = storage / "b"
    after_crash = {r: len(trace(run_dir, r)) for r in (0, 1)}
    _, resumed = fit(pretrain_reference.overrides(storage, "b", **common))
    return run_dir, crashed, crashed_state, resumed, after_crash


def train_state(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        return json.loads((Path(d) / "train_state.json").read_text())


def test_job_submit_trains_loss_decreases_metrics_and_checkpoint(run_a):
    run_dir, proc = run_a
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"run dir: {run_dir}" in out and f"metrics: {run_dir / 'metrics.jsonl'}" in out
    final = out.split("final checkpoint: ")[1].split()[0]
    assert final.startswith(str(run_dir)), final
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10]
    for key in (
        "train/mlm_accuracy",
        "train/tokens_per_s",
        "data/wait_fraction",
        "train/lr",
        "train/grad_norm",
    ):
        assert all(key in r for r in train), key
    assert "train/mfu" not in train[0]  # CPU: no MFU
    first, last = train[0]["train/loss"], train[-1]["train/loss"]
    print(f"train/loss {first:.3f} -> {last:.3f}")
    assert last < first - 0.5, (first, last)
    evals = [r for r in records if "eval/loss" in r]
    assert evals and evals[-1]["step"] == 10 and evals[-1]["eval/loss"] < 10.4  # ln(30522) = 10.33 at init
    state = json.loads((Path(final) / "train_state.json").read_text())
    assert state["step"] == 10 and state["world_size"] == 2
    # 5 global steps of 8 rows per epoch: 2 epochs exactly (the position is global: all 40 rows of epoch 1)
    assert state["data"]["global_step"] == 10 and state["data"]["rows_per_step"] == 8
    assert {k: state["data"]["sources"]["train"][k] for k in ("epoch", "rows_in_epoch", "rows")} == {
        "epoch": 1,
        "rows_in_epoch": 40,
        "rows": 80,
    }
    assert set(torch.load(Path(final) / "train_state.pt", weights_only=False)["rng"]) == {
        "python",
        "numpy",
        "torch",
        "cuda",
    }
    saved_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved_cfg["train"]["num_steps"] == 10 and saved_cfg["checkpoint"]["storage_path"] == str(
        run_dir.parent
    )
    from neobert.checkpoint import load_mlm

    model = load_mlm(final)
    assert model.config.hidden_size == 64
    t0 = trace(run_dir, 0)
    t1 = trace(run_dir, 1)
    assert [r["step"] for r in t0] == [r["step"] for r in t1] == list(range(1, 11))
    # every row of an epoch once: 40 distinct keys per epoch over both ranks (keys name the epoch too)
    keys = [[k for t in (t0, t1) for r in t[5 * e : 5 * e + 5] for k in r["row_keys"]] for e in (0, 1)]
    assert [len(k) for k in keys] == [len(set(k)) for k in keys] == [40, 40] and not set(keys[0]) & set(
        keys[1]
    )
    epoch0, epoch1 = [r["rows_sha"] for r in t0[:5]], [r["rows_sha"] for r in t0[5:]]
    assert len(set(epoch0)) == 5 and not set(epoch0) & set(epoch1), "epoch 1 must reshuffle the rows"
    assert t0[0]["rows_sha"] != t1[0]["rows_sha"], "ranks must see different rows"


def test_injected_failure_recovers_with_exact_data_position(run_a, run_b):
    a_dir = run_a[0]
    run_dir, crashed, crashed_state, _, after_crash = run_b
    assert crashed.error is None
    assert crashed_state["step"] == 6
    for rank in (0, 1):
        got = trace(run_dir, rank)[: after_crash[rank]]
        steps = [r["step"] for r in got]
        assert steps == [1, 2, 3, 4, 5, 4, 5, 6], (
            steps
        )  # crashed after step 5, resumed from the step-3 checkpoint
        ref = {r["step"]: r["sha"] for r in trace(a_dir, rank)}
        assert [r["sha"] for r in got] == [ref[s] for s in steps], (
            f"rank {rank}: data/masks differ after restart"
        )
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps[: steps.index(6) + 1] == [2, 4, 6], (
        steps
    )  # records past the checkpoint were dropped on restart


def test_resume_continues_at_next_step_and_unseen_rows(run_a, run_b):
    a_dir = run_a[0]
    run_dir, _, _, resumed, after_crash = run_b
    assert resumed.error is None
    state = train_state(resumed.checkpoint)
    # the uninterrupted run's final position (checked above)
    assert state["step"] == 10 and state["data"]["sources"]["train"]["epoch"] == 1
    assert state["data"]["sources"]["train"]["rows_in_epoch"] == 40
    for rank in (0, 1):
        got = trace(run_dir, rank)[after_crash[rank] :]
        assert [r["step"] for r in got] == [7, 8, 9, 10]
        ref = {r["step"]: (r["sha"], r["row_keys"]) for r in trace(a_dir, rank)}
        assert [(r["sha"], r["row_keys"]) for r in got] == [ref[r["step"]] for r in got], f"rank {rank}"


KILL_SEED = 2026


@pytest.fixture(scope="module")
def run_killed(ray_session, pretrain_reference, packed_dir, tmp_path_factory):
    """The reference run's settings (10 steps) on the packed corpus, with a worker SIGKILLed at a seeded random
    step: once after a step (the last rank) and once while rank 0 writes a checkpoint. Each restarts from the
    latest complete checkpoint (failure.max_failures=1)."""
    import random

    rng = random.Random(KILL_SEED)
    every = 3
    cases = {
        "kill": rng.randint(every + 1, 10),  # any step after the first checkpoint
        "kill_in_checkpoint": rng.choice([6, 9]),  # a checkpoint step after the first one
    }
    storage = tmp_path_factory.mktemp("runs")
    out = {}
    for mode, step in cases.items():
        extra = {
            "data.packed_dir": str(packed_dir), "logging.num_eval_batches": 0, "checkpoint.every_steps": every,
            "failure.max_failures": 1, "failure.inject_failure_at_step": step, "failure.inject_failure_mode": mode,
        }  # fmt: skip
        _, result = fit(pretrain_reference.overrides(storage, mode, **extra))
        out[mode] = (storage / mode, step, result)
    return out


@pytest.mark.parametrize("mode", ["kill", "kill_in_checkpoint"])
def test_sigkilled_worker_resumes_with_the_losses_and_rows_of_an_uninterrupted_run(run_a, run_killed, mode):
    a_dir = run_a[0]
    run_dir, step, result = run_killed[mode]
    assert result.error is None and train_state(result.checkpoint)["step"] == 10
    for rank in (0, 1):
        got = trace(run_dir, rank)
        steps = [r["step"] for r in got]
        # steps 1..k ran (k = the killed step), then the restart resumed from a complete checkpoint c <= k (step k's
        # own only if it was complete before the kill) and ran c+1..10
        assert steps[:step] == list(range(1, step + 1)), (mode, step, steps)
        resumed_at = steps[step] - 1
        assert resumed_at in (3, 6, 9) and step - 3 <= resumed_at <= step, (mode, step, steps)
        if mode == "kill_in_checkpoint":
            assert resumed_at == step - 3, "a checkpoint whose write was killed must not be loaded"
        assert steps[step:] == list(range(resumed_at + 1, 11)), (mode, step, steps)
        ref = {r["step"]: (r["rows_sha"], r["sha"]) for r in trace(a_dir, rank)}
        assert [(r["rows_sha"], r["sha"]) for r in got] == [ref[s] for s in steps], f"{mode} rank {rank}"
    ref_loss = {r["step"]: r["train/loss"] for r in read_jsonl(a_dir / "metrics.jsonl") if "train/loss" in r}
    got_loss = {
        r["step"]: r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r
    }
    assert sorted(got_loss) == sorted(ref_loss) == [2, 4, 6, 8, 10]
    diff = max(abs(got_loss[s] - ref_loss[s]) for s in ref_loss)
    print(f"{mode} at step {step}: max |loss - uninterrupted loss| = {diff:.3g}")
    assert diff < 1e-5, (got_loss, ref_loss)
    # no checkpoint dir of the killed write is left behind, and Ray's snapshot lists every one that is
    from pipelines.train.run_dir import complete_checkpoints

    dirs = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert dirs == complete_checkpoints(str(run_dir)) and len(dirs) <= 2
