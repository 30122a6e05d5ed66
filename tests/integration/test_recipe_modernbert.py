"""The ModernBERT-style tiny recipe end to end: `python jobs/pretrain.py --config modernbert_style_tiny.yaml`
(the job's recipe path, a driver process joining the shared cluster), all three phases under FSDP2 with
StableAdamW, phase 1 with its batch-size warmup (8 -> 16 -> 24 rows of 64 tokens, 2 steps per level).

One run (module fixture, about a minute on 2 idle cores: three Ray Train fits). Checked from metrics.jsonl, the
per-rank data traces and the checkpoints:
  - the global batch of every phase-1 step is the ramp's (rows in the traces of both ranks, micro-batches per rank,
    train/global_batch_tokens in the metrics); a resume inside the ramp (on any world size) is covered without Ray
    by tests/unit/pipelines/train/test_train_data.py;
  - the LR of every step equals the recipe's schedule, across the three phases;
  - losses are finite and fall from phase 1 to the decay phase;
  - each phase's final checkpoint has its theta and max positions, was written under FSDP2 with StableAdamW, and
    accounts `tokens_planned` = BatchRamp.tokens_through(steps) (also phases.json and the model card's source).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "recipes" / "modernbert_style_tiny.yaml"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def data_root(recipe_data):
    return recipe_data


def recipe_args(storage: Path, data_root: Path) -> list[str]:
    return [
        "--config", str(RECIPE), "--storage_path", str(storage), "--data_root", str(data_root),
        "--pretrain.scaling.strategy", "fsdp2",
        "--pretrain.logging.trace_data", "true",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(ray_cluster, data_root, tmp_path_factory):
    from pipelines.train.recipe import load_recipe

    storage = tmp_path_factory.mktemp("mb-runs")
    args = recipe_args(storage, data_root)
    cmd = [sys.executable, "jobs/pretrain.py", "--address", ray_cluster.address, *args]
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    recipe = load_recipe(RECIPE, args[2:])  # the same recipe as the job resolved it (minus --config)
    from pipelines.train.recipe import expand_recipe

    return recipe, expand_recipe(recipe), proc.stdout + proc.stderr


def test_phase_one_follows_the_batch_warmup(run):
    _, plans, log = run
    p1 = plans[0]
    ramp = p1.ramp
    assert ramp.enabled and [ramp.rows(s) for s in range(p1.num_steps)] == [8, 8, 16, 16, 24, 24]
    assert "batch warmup over 4 steps" in log  # the startup line names the ramp
    run_dir = Path(p1.run_dir)
    traces = [r for rank in (0, 1) for r in read_jsonl(run_dir / f"data_trace.rank{rank}.jsonl")]
    steps = range(1, p1.num_steps + 1)  # the traces count steps from 1
    # every step's rows over both ranks and all micro-batches = the ramp's
    assert {s: sum(r["rows"] for r in traces if r["step"] == s) for s in steps} == {
        s: ramp.rows(s - 1) for s in steps
    }
    # per rank rows(s) / (2 workers x 4 rows per micro-batch) micro-batches: 1, 1, 2, 2, 3, 3
    for rank in (0, 1):
        recs = read_jsonl(run_dir / f"data_trace.rank{rank}.jsonl")
        assert [sum(1 for r in recs if r["step"] == s) for s in steps] == [1, 1, 2, 2, 3, 3]
    # no row twice: the ramp cuts one global order into steps
    keys = [k for r in traces for k in r["row_keys"]]
    assert len(keys) == len(set(keys)) == ramp.tokens_through(p1.num_steps) // 64
    # the metrics name each step's budget
    metrics = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/global_batch_tokens" in r]
    assert {r["step"]: r["train/global_batch_tokens"] for r in metrics} == {
        s: ramp.tokens(s - 1) for s in range(1, p1.num_steps + 1)
    }


def test_lr_losses_checkpoints_and_token_accounting_of_every_phase(run):
    from neobert.checkpoint import latest_checkpoint
    from pipelines.train.recipe import SUMMARY_FILE, recipe_lr

    recipe, plans, _ = run
    assert [p.num_steps for p in plans] == [6, 4, 3]
    root = Path(recipe.dir)
    records = read_jsonl(root / "metrics.jsonl")
    train = [r for r in records if "train/lr" in r]
    assert [r["global_step"] for r in train] == list(range(1, 14))
    lr = recipe_lr(plans)
    for r in train:  # warmup, stable, then the 1-sqrt decay phase: the recipe's formula at every step
        assert r["train/lr"] == pytest.approx(lr.lr_at(r["global_step"] - 1), rel=1e-6, abs=1e-12), r
    losses = [r["train/loss"] for r in train]
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses

    summary = json.loads((root / SUMMARY_FILE).read_text())
    want = [(10000.0, 64), (160000.0, 128), (160000.0, 128)]
    for plan, s, (theta, positions) in zip(plans, summary, want, strict=True):
        ckpt = latest_checkpoint(plan.run_dir)
        model = json.loads((ckpt / "model" / "neobert_config.json").read_text())["model"]
        assert (model["rope_theta"], model["max_position_embeddings"]) == (theta, positions), plan.name
        state = json.loads((ckpt / "train_state.json").read_text())
        assert state["strategy"] == "fsdp2" and state["config"]["train"]["optimizer"] == "stable_adamw"
        planned = plan.ramp.tokens_through(plan.num_steps)
        assert state["step"] == plan.num_steps and state["tokens_planned"] == planned, plan.name
        assert s["tokens_planned"] == planned and 0 < s["tokens"] <= planned, s
    # phase 1's budget follows the ramp: 2 x 512 + 2 x 1,024 + 2 x 1,536 tokens, less than 6 full steps
    assert summary[0]["tokens_planned"] == 6144 < 6 * plans[0].global_batch_tokens
