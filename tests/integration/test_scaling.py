"""DDP and FSDP2 in the training runner on Ray Train (2 CPU workers, gloo, tiny model), and one checkpoint format
that resumes under either strategy.

Five fits share the assertions (one TorchTrainer each; the data is tokenized and packed once and reused):
  ddp   6 steps under DDP (checkpoints at 3 and 6);
  fsdp  6 steps under FSDP2, with a preemption notice injected from step 2 and asynchronous checkpoint upload;
  d2f   3 steps under DDP, then the same run re-fit under FSDP2 up to step 6;
  f2d   3 steps under FSDP2, then the same run re-fit under DDP up to step 6;
  elastic  6 steps on 1 to 2 workers (`scaling.num_workers: [1, 2]`), one worker SIGKILLed at step 5: Ray Train
        restarts the group from the step-3 checkpoint and the run finishes with ddp's steps and tokens.
The LR schedule is constant, so a run stopped at step 3 and continued to 6 follows the uninterrupted one; the
loss of every step (logging.every_steps=1) must match the uninterrupted run of the same data within LOSS_RTOL.
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
        "data.shuffle_buffer_rows": 8,
        "train.tokens_per_micro_batch": 2 * PACK,
        "train.num_micro_batches": 2,
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
    for name, first, second in (("d2f", "ddp", "fsdp2"), ("f2d", "fsdp2", "ddp")):
        run(name, **{"scaling.strategy": first, "train.num_steps": STOP})
        out[name] = run(name, **{"scaling.strategy": second})
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
        assert state["step"] == NUM_STEPS and state["world_size"] == 2
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
