"""In-training evaluation of the tiny preset on the shared cluster: one in-process pretraining fit (2 CPU workers)
with `validation.every_steps`, Ray Train's `ValidationConfig` scoring the checkpoints in a Ray task, and a worker
crash injected after a validated checkpoint (the restarted attempt resumes from it).

One module-scoped run; the assertions read its metrics.jsonl: every validated checkpoint's `val/*` scores appear
exactly once, at that checkpoint's step, resumed attempt included; the run's last record counts them; and the
validation in the background does not make training wait for data (`data/wait_fraction`, one window per step).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration

PACK = 64
STEPS, EVERY, CRASH, LOG = 50, 10, 15, 5


def write_packed_dir(root, num_rows: int) -> None:
    """A packed dir (train/ Parquet, one document of PACK tokens per row) of random word-piece ids."""
    from neobert.schema import PACKED_SCHEMA

    rng = np.random.default_rng(0)
    ids = [[101, *rng.integers(1000, 30000, PACK - 2).tolist(), 102] for _ in range(num_rows)]
    table = pa.table(
        {
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "position_ids": pa.array([list(range(PACK))] * num_rows, pa.list_(pa.int32())),
            "cu_seqlens": pa.array([[0, PACK]] * num_rows, pa.list_(pa.int32())),
            "max_seqlen": pa.array([PACK] * num_rows, pa.int32()),
            "num_tokens": pa.array([PACK] * num_rows, pa.int32()),
            "num_segments": pa.array([1] * num_rows, pa.int32()),
        },
        schema=PACKED_SCHEMA,
    )
    (root / "train").mkdir(parents=True)
    pq.write_table(table, root / "train" / "part-00000.parquet", row_group_size=64)


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory):
    from pipelines.eval.in_training import VALIDATOR
    from pipelines.train.pretrain import fit, load_pretrain_config

    root = tmp_path_factory.mktemp("val")
    write_packed_dir(root / "packed", 8 * STEPS)
    argv = {
        "data.packed_dir": root / "packed",
        "data.pack_tokens": PACK,
        "train.tokens_per_micro_batch": 4 * PACK,
        "train.num_steps": STEPS,
        "train.warmup_steps": 2,
        "checkpoint.every_steps": EVERY,
        "checkpoint.num_to_keep": 1,  # validated checkpoints are deleted at once: the scores must survive that
        "checkpoint.storage_path": root / "runs",
        "checkpoint.name": "v",
        "logging.every_steps": LOG,  # each window is a ray.train.report (a barrier through Ray's controller)
        "logging.eval_every_steps": 0,
        "logging.num_eval_batches": 0,
        "failure.max_failures": 1,
        "failure.inject_failure_at_step": CRASH,  # the restart resumes from the step-20 checkpoint
        "validation.every_steps": EVERY,
        "validation.tasks": "[stsb, mlm]",
        "validation.max_examples": 16,
        "validation.num_cpus": 0.5,
        "validation.timeout_s": 120,
    }
    cfg = load_pretrain_config(None, [f"--{k}={v}" for k, v in argv.items()])
    t0 = time.perf_counter()
    result = fit(cfg, validator=VALIDATOR)
    seconds = time.perf_counter() - t0
    path = root / "runs" / "v" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(f"fit with validation: {seconds:.1f} s")
    return result, records


def test_scores_land_once_at_their_checkpoints_step(run):
    result, records = run
    assert result.error is None
    val = [r for r in records if "val/stsb/spearman" in r]
    assert sorted(r["step"] for r in val) == list(
        range(EVERY, STEPS + 1, EVERY)
    )  # once each, resume included
    for r in val:
        assert r["val/step"] == r["step"] and r["val/mlm/loss"] > 5 and -1 <= r["val/stsb/spearman"] <= 1
    last = records[-1]
    assert (
        last["step"] == STEPS and last["val/num_requested"] == STEPS // EVERY and last["val/num_missing"] == 0
    )
    # the crash at step 15 really happened and was resumed from step 10: steps 11-15 were trained twice, and
    # metrics.jsonl keeps the resumed attempt's records only
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == list(range(LOG, STEPS + 1, LOG))


def test_background_validation_does_not_make_training_wait_for_data(run):
    """`data/wait_fraction` of the logging windows trained while a validation ran (from its checkpoint's step until
    its scores arrived in metrics.jsonl) stays <= 2% on average. The first window of each attempt is left out on
    both sides: it holds Ray Data's start-up (30-40% on this box with or without validation)."""
    _, records = run
    resumed_at = CRASH - CRASH % EVERY
    first_windows = {LOG, resumed_at + LOG}
    wait = {r["step"]: r["data/wait_fraction"] for r in records if "data/wait_fraction" in r}
    during: set[int] = set()
    for i, r in enumerate(records):
        if "val/stsb/spearman" in r:  # arrived here: every window logged since its step overlapped it
            during |= {x["step"] for x in records[:i] if "data/wait_fraction" in x and x["step"] > r["step"]}
    during -= first_windows
    others = set(wait) - during - first_windows
    mean_during = float(np.mean([wait[s] for s in during])) if during else float("nan")
    mean_others = float(np.mean([wait[s] for s in others])) if others else float("nan")
    print(f"data/wait_fraction: mean {mean_during:.4f} over the {len(during)} windows during a validation, "
          f"{mean_others:.4f} over the {len(others)} others")  # fmt: skip
    assert during, "no training window overlapped a validation: the test no longer measures anything"
    assert mean_during <= 0.02
