"""DDP and FSDP2 in the training runner on Ray Train (CPU workers, gloo, tiny model), one checkpoint format that
resumes under either strategy and on another world size or micro-batch size, with the rows of every global step
unchanged.

Eight fits share the assertions (one TorchTrainer each; the data is tokenized and packed once and reused). A global
step is 8 packed rows (`train.global_batch_tokens` = 8 x PACK); the train set is capped at 20 rows, so step 3 ends
4 rows into epoch 1 and every stop below is mid-epoch:
  ddp   6 steps under DDP on 2 workers, 2 micro-batches of 2 rows each (checkpoints at 3 and 6): the reference;
  fsdp  6 steps under FSDP2, with a preemption notice injected from step 2 and asynchronous checkpoint upload;
  d2f   3 steps under DDP on 2 workers, then the same run re-fit under FSDP2 on 1 worker (4 micro-batches) to 6;
  f2d   3 steps under FSDP2 on 1 worker, then the same run re-fit under DDP on 2 workers up to step 6;
  mb    3 steps at train.tokens_per_micro_batch = 2 x PACK, then re-fit at 4 x PACK (1 micro-batch per worker);
  elastic  6 steps on 1 to 2 workers (`scaling.num_workers: [1, 2]`), one worker SIGKILLed at step 5: Ray Train
        restarts the group from the step-3 checkpoint and the run finishes with ddp's steps and tokens.
The LR schedule is constant, so a run stopped at step 3 and continued to 6 follows the uninterrupted one; the
loss of every step (logging.every_steps=1) must match the uninterrupted run of the same data within LOSS_RTOL, and
the row keys every step trained on (`logging.trace_data`, all ranks and micro-batches in rank order) must equal
the reference's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PACK = 128
NUM_STEPS, STOP = 6, 3
# fp32 on CPU: DDP all-reduces gradients, FSDP2 reduce-scatters them; the sums differ in order only
LOSS_RTOL = 1e-4


def overrides(storage: Path, name: str, **extra) -> list[str]:
    base = {
        "data.pack_tokens": PACK,
        "data.shuffle_window_rows": 8,
        "data.num_train_rows": 20,
        "train.tokens_per_micro_batch": 2 * PACK,
        "train.global_batch_tokens": 8 * PACK,
        "train.num_steps": NUM_STEPS,
        "train.warmup_steps": 0,
        "train.schedule": "constant",
        "train.lr": 3e-3,
        "checkpoint.every_steps": STOP,
        "checkpoint.num_to_keep": 3,
        "checkpoint.storage_path": str(storage),
        "checkpoint.name": name,
        "logging.every_steps": 1,
        "logging.eval_every_steps": 0,
        "logging.num_eval_batches": 3,  # 3 eval batches over 2 ranks: FSDP2 needs the ranks' forwards balanced
        "logging.trace_data": True,
        **extra,
    }
    return [f"--{k}={v}" for k, v in base.items()]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    from pipelines.train.pretrain import build_datasets, fit, load_pretrain_config

    storage = tmp_path_factory.mktemp("scaling")
    cfg0 = load_pretrain_config(None, overrides(storage, "data"))
    datasets = {k: ds.materialize() for k, ds in build_datasets(cfg0).items()}

    def run(name: str, **extra):
        cfg = load_pretrain_config(None, overrides(storage, name, **extra))
        result = fit(cfg, datasets)
        assert result.error is None, result.error
        return result

    out = {
        "ddp": run("ddp", **{"scaling.strategy": "ddp"}),
        "fsdp": run("fsdp", **{"scaling.strategy": "fsdp2", "failure.inject_preemption_at_step": 2,
                               "checkpoint.async_upload": "true"}),
    }  # fmt: skip
    out["elastic"] = run(
        "elastic",
        **{
            "scaling.num_workers": "[1,2]",
            "failure.inject_failure_at_step": 5,
            "failure.inject_failure_mode": "kill",
            "failure.max_failures": 1,
        },
    )
    for name, first, second in (("d2f", ("ddp", 2), ("fsdp2", 1)), ("f2d", ("fsdp2", 1), ("ddp", 2))):
        run(name, **{"scaling.strategy": first[0], "scaling.num_workers": first[1], "train.num_steps": STOP})
        out[name] = run(name, **{"scaling.strategy": second[0], "scaling.num_workers": second[1]})
    run("mb", **{"train.num_steps": STOP})
    # the global batch is the checkpoint's (left unset): 8 rows = 2 workers x 1 micro-batch of 4 rows
    out["mb"] = run("mb", **{"train.tokens_per_micro_batch": 4 * PACK, "train.global_batch_tokens": 0})
    return storage, out


def assert_close(got: dict[int, float], want: dict[int, float], steps) -> None:
    for s in steps:
        assert abs(got[s] - want[s]) <= LOSS_RTOL * abs(want[s]), (s, got[s], want[s])


def test_fsdp2_matches_ddp_step_by_step(runs):
    storage, _ = runs
    ddp, fsdp = losses(storage / "ddp"), losses(storage / "fsdp")
    assert sorted(ddp) == sorted(fsdp) == list(range(1, NUM_STEPS + 1))
    assert ddp[NUM_STEPS] < ddp[1]
    assert_close(fsdp, ddp, range(1, NUM_STEPS + 1))


@pytest.mark.parametrize(("name", "reference"), [("d2f", "ddp"), ("f2d", "fsdp")])
def test_checkpoint_resumes_under_the_other_strategy(runs, name, reference):
    storage, out = runs
    got, want = losses(storage / name), losses(storage / reference)
    assert sorted(got) == list(range(1, NUM_STEPS + 1))
    assert_close(got, want, range(1, NUM_STEPS + 1))
    with out[name].checkpoint.as_directory() as d:
        d = Path(d)
        state = json.loads((d / "train_state.json").read_text())
        assert state["step"] == NUM_STEPS and state["world_size"] == (1 if name == "d2f" else 2)
        assert state["strategy"] == ("fsdp2" if name == "d2f" else "ddp")
        assert (d / "dcp" / ".metadata").is_file() and (d / "model" / "model.safetensors").is_file()
        from neobert.checkpoint import load_mlm

        assert load_mlm(d).config.hidden_size == 64


def test_preemption_notice_writes_one_checkpoint_at_once(runs):
    storage, out = runs
    steps = sorted(
        json.loads((d / "train_state.json").read_text())["step"]
        for d in (storage / "fsdp").glob("checkpoint_*")
        if (d / "train_state.json").is_file()
    )
    assert steps == [2, STOP, NUM_STEPS], steps  # the notice's checkpoint, then the regular ones
    marks = [r for r in records(storage / "fsdp") if "train/preemption_checkpoints" in r]
    assert [(r["step"], r["train/preemption_checkpoints"]) for r in marks] == [(2, 1.0)]
    assert out["fsdp"].checkpoint is not None


def test_elastic_run_survives_a_killed_worker_with_the_planned_steps_and_tokens(runs):
    storage, out = runs
    got, want = records(storage / "elastic"), records(storage / "ddp")
    train = {r["step"]: r for r in got if "train/loss" in r}
    ref = {r["step"]: r for r in want if "train/loss" in r}
    assert sorted(train) == list(range(1, NUM_STEPS + 1))  # steps 4-5 of the killed attempt were truncated
    # the same global batch: the masked tokens of every step, and their sum, equal the uninterrupted run's
    assert [train[s]["train/masked_tokens"] for s in ref] == [ref[s]["train/masked_tokens"] for s in ref]
    assert_close(
        {s: r["train/loss"] for s, r in train.items()}, losses(storage / "ddp"), range(1, NUM_STEPS + 1)
    )
    with out["elastic"].checkpoint.as_directory() as d:
        assert json.loads((Path(d) / "train_state.json").read_text())["step"] == NUM_STEPS


def step_rows(run_dir: Path) -> dict[int, list[int]]:
    """{global step: the row keys it trained on, rank by rank, micro-batch by micro-batch} from the data traces;
    a step traced twice (an attempt that died after it, then a restart) keeps the restart's rows."""
    traces = sorted(run_dir.glob("data_trace.rank*.jsonl"), key=lambda p: int(p.name.split(".")[1][4:]))
    out: dict[int, list[int]] = {}
    for path in traces:
        mine: dict[int, list[int]] = {}
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["micro"] == 0:  # a step's first micro-batch: (again) from the start
                mine[r["step"]] = []
            mine[r["step"]] += r["row_keys"]
        for step, keys in mine.items():
            out.setdefault(step, []).extend(keys)
    return out


def row_fingerprints(run_dir: Path) -> dict[int, str]:
    """{row key: sha of its tokens + mask} over every rank's trace."""
    out = {}
    for path in run_dir.glob("data_trace.rank*.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out.update(zip(r["row_keys"], r["row_shas"], strict=True))
    return out


@pytest.mark.parametrize("name", ["d2f", "f2d", "mb"])
def test_resume_on_another_world_or_micro_batch_size_trains_the_uninterrupted_rows(runs, name):
    """2 -> 1 and 1 -> 2 workers (and the strategy swapped), and 2 -> 4 rows per micro-batch, each stopped
    mid-epoch: every global step holds the rows of the uninterrupted run in the same order, no row twice, every
    row masked alike, and the loss of every step matches."""
    storage, _ = runs
    ref, got = step_rows(storage / "ddp"), step_rows(storage / name)
    assert sorted(ref) == list(range(1, NUM_STEPS + 1)) and all(len(k) == 8 for k in ref.values())
    assert got == ref
    keys = [k for s in sorted(got) for k in got[s]]
    assert len(keys) == len(set(keys)) == NUM_STEPS * 8  # keys name (source, epoch, position): none twice
    fp = row_fingerprints(storage / name)
    assert fp == {k: v for k, v in row_fingerprints(storage / "ddp").items() if k in fp} and len(fp) == len(
        keys
    )
    assert_close(losses(storage / name), losses(storage / "ddp"), range(1, NUM_STEPS + 1))


def test_resume_that_changes_the_data_order_or_global_batch_is_refused_before_ray(runs):
    """A seed, shuffle window or global batch other than the checkpoint's: one ConfigError on the driver, nothing
    in the run dir touched; through jobs/pretrain.py one `pretrain: error:` line, exit code 2, no Ray started."""
    import os
    import subprocess
    import sys

    from pipelines.train.config import ConfigError
    from pipelines.train.pretrain import load_pretrain_config, prepare_pretrain_run

    storage, _ = runs
    run_dir = storage / "mb"
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    mb = {"train.tokens_per_micro_batch": 4 * PACK}
    for extra, fragment in (
        ({"data.shuffle_window_rows": 4}, "shuffle_window_rows=8 but the config says 4; "),
        (
            {"train.global_batch_tokens": 16 * PACK},
            f"set global_batch_tokens: {8 * PACK} (or leave it unset)",
        ),
    ):
        with pytest.raises(ConfigError, match="cannot resume") as e:
            prepare_pretrain_run(load_pretrain_config(None, overrides(storage, "mb", **mb, **extra)))
        assert fragment in str(e.value) and "\n" not in str(e.value)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "jobs/pretrain.py", "--address", "127.0.0.1:1",  # no cluster there: never reached
         *overrides(storage, "mb", **mb, **{"train.seed": 5})],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2], env=env,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("pretrain: error: ") and "cannot resume" in lines[0], lines
    assert "data order has seed=0 but the config says 5; " in lines[0], lines
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
