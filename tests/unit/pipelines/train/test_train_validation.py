"""In-training validation without a cluster: the `validation:` config section and the routing of result files
into the metric sinks (metrics.jsonl, TensorBoard, MLflow) at the steps they belong to, resumes included."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from pipelines import cli
from pipelines.train.pretrain import load_pretrain_config
from pipelines.train.sinks import MetricSinks, RunFiles
from pipelines.train.validation import RESULTS_DIR, ValidationTracker, results_dir, write_result

REPO = Path(__file__).resolve().parents[4]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- the config section ---------------------------------------------------------------------------------------
def test_section_defaults_off_and_round_trips():
    from neobert.config_io import from_dict, to_dict
    from pipelines.train.pretrain import PretrainConfig

    cfg = load_pretrain_config(None, [])
    assert cfg.validation.every_steps == 0  # off unless asked for
    cfg = load_pretrain_config(
        None,
        ["--validation.every_steps=40", "--validation.tasks=[stsb, mlm]", "--validation.max_examples=64"],
    )
    assert cfg.validation.tasks == ["stsb", "mlm"] and cfg.validation.due(40) and not cfg.validation.due(20)
    assert cfg.validation.due(30, last=True)  # the last checkpoint is always scored
    assert from_dict(PretrainConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (
            ["--validation.tasks=[stsb, glue]"],
            "validation.tasks=['stsb', 'glue']: unknown ['glue']; choose from",
        ),
        (
            ["--validation.every_steps=30"],
            "validation.every_steps=30 must be a multiple of checkpoint.every_steps=20",
        ),
        (
            ["--validation.every_steps=20", "--checkpoint.every_steps=0"],
            "checkpoint.every_steps=0 writes only the last one",
        ),
        (["--validation.max_examples=-1"], "validation.max_examples must be >= 0"),
        (["--validation.num_cpus=0"], "validation.num_cpus must be > 0"),
    ],
)
def test_config_errors_are_one_line_before_ray(argv, fragment, capsys, monkeypatch):
    import importlib

    monkeypatch.chdir(REPO)
    called = []
    spec = importlib.import_module("jobs.pretrain").SPEC
    assert cli.main(spec, lambda c, x: called.append(c), argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain: error: ") and fragment in err, err
    assert len(err.strip().splitlines()) == 1 and not called


# -- routing ------------------------------------------------------------------------------------------------------
HAS = {name: importlib.util.find_spec(name) is not None for name in ("tensorboard", "mlflow")}


@pytest.fixture()
def run(tmp_path, monkeypatch):
    """A run dir with rank 0's sinks: metrics.jsonl, and TensorBoard and a file-based MLflow store where their
    packages are installed (the `tracking` extra)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.x: the file store is opt-in
    cfg = load_pretrain_config(
        None,
        [
            f"--checkpoint.storage_path={tmp_path}",
            "--checkpoint.name=r",
            "--checkpoint.every_steps=5",
            "--validation.every_steps=10",
            f"--logging.tensorboard={str(HAS['tensorboard']).lower()}",
            f"--logging.mlflow_tracking_uri={f'file://{tmp_path}/mlruns' if HAS['mlflow'] else ''}",
        ],
    )
    files = RunFiles(cfg.run_dir)
    sinks = MetricSinks(cfg, files, "neobert-pretrain-test")
    yield cfg, sinks
    sinks.close()


def scores(step: int, spearman: float) -> dict:
    return {
        "step": step,
        "checkpoint": f"checkpoint_{step}",
        "metrics": {"val/stsb/spearman": spearman, "val/mlm/loss": 9.0, "val/step": step, "val/seconds": 3.0},
    }


def test_results_reach_every_sink_at_their_step(run):
    cfg, sinks = run
    tracker = ValidationTracker(cfg.validation, cfg.run_dir, sinks.path)
    tracker.start(0, [])
    tracker.request(10)
    sinks.write(15, {"train/loss": 5.0})
    assert tracker.poll(sinks) == 0  # nothing finished yet
    write_result(results_dir(cfg.run_dir), scores(10, 0.25))
    assert tracker.poll(sinks) == 1
    assert tracker.poll(sinks) == 0  # routed once
    sinks.flush()
    records = read_jsonl(sinks.path)
    val = [r for r in records if "val/stsb/spearman" in r]
    assert [(r["step"], r["val/stsb/spearman"]) for r in val] == [(10, 0.25)]  # at 10, written after step 15

    if HAS["tensorboard"]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        ev = EventAccumulator(str(Path(cfg.run_dir) / "tensorboard"))
        ev.Reload()
        assert [(e.step, round(e.value, 4)) for e in ev.Scalars("val/stsb/spearman")] == [(10, 0.25)]
    if HAS["mlflow"]:
        import mlflow

        run_id = mlflow.active_run().info.run_id
        hist = mlflow.tracking.MlflowClient().get_metric_history(run_id, "val/stsb/spearman")
        assert [(m.step, m.value) for m in hist] == [(10, 0.25)]


def test_resume_routes_each_step_once_and_drops_later_results(run):
    cfg, sinks = run
    rdir = results_dir(cfg.run_dir)
    first = ValidationTracker(cfg.validation, cfg.run_dir, sinks.path)
    first.start(0, [])
    first.request(10)
    write_result(rdir, scores(10, 0.2))
    first.poll(sinks)
    first.request(20)
    saved = first.state()  # what the step-20 checkpoint's train state holds
    first.request(30)
    write_result(
        rdir, scores(30, 0.4)
    )  # a checkpoint the crashed attempt wrote after the one it resumes from
    sinks.write(30, {"train/loss": 4.0})

    # the resumed attempt at step 20: metrics.jsonl is cut back to 20 first (as the runner does)
    sinks.truncate_after(20)
    again = ValidationTracker(cfg.validation, cfg.run_dir, sinks.path)
    again.start(20, saved)
    assert not (Path(rdir) / "step_000000030.json").exists()
    assert again.requested == [10, 20] and again.done == {10: "scored"}
    write_result(rdir, scores(20, 0.3))  # the step-20 validation finishes during the new attempt
    assert again.poll(sinks) == 1
    val = [(r["step"], r["val/stsb/spearman"]) for r in read_jsonl(sinks.path) if "val/stsb/spearman" in r]
    assert val == [(10, 0.2), (20, 0.3)]
    summary = again.finish(sinks, 20, wait=lambda timeout: None)
    assert summary["missing"] == {} and summary["scored"] == 2
    last = read_jsonl(sinks.path)[-1]
    assert last["step"] == 20 and last["val/num_requested"] == 2 and last["val/num_missing"] == 0


def test_failed_and_missing_validations_are_warned_and_counted(run, caplog):
    cfg, sinks = run
    rdir = results_dir(cfg.run_dir)
    tracker = ValidationTracker(cfg.validation, cfg.run_dir, sinks.path)
    tracker.start(0, [])
    for step in (10, 20, 30):
        tracker.request(step)
    write_result(rdir, scores(10, 0.1))
    write_result(rdir, {"step": 20, "checkpoint": "checkpoint_20", "error": "RuntimeError: out of memory"})
    waited = []
    with caplog.at_level(logging.WARNING, logger="neobert.train"):
        summary = tracker.finish(sinks, 30, wait=waited.append)
    assert waited == [cfg.validation.timeout_s + 60.0]  # one outstanding: bounded by Ray's timeout
    assert summary["scored"] == 1 and set(summary["missing"]) == {20, 30}
    text = caplog.text
    assert "validation of the step-20 checkpoint (checkpoint_20) failed: RuntimeError: out of memory" in text
    assert "validation of the step-30 checkpoint reported no val/* metrics: no result: it timed out" in text
    assert "2 of 3 requested checkpoints have no val/* metrics (steps [20, 30])" in text
    last = read_jsonl(sinks.path)[-1]
    assert last["step"] == 30 and last["val/num_missing"] == 2 and last["val/num_requested"] == 3


def test_falling_behind_is_warned_once(run, caplog):
    cfg, sinks = run
    tracker = ValidationTracker(cfg.validation, cfg.run_dir, sinks.path)
    tracker.start(0, [])
    with caplog.at_level(logging.WARNING, logger="neobert.train"):
        for step in (10, 20, 30, 40):
            tracker.request(step)
    assert caplog.text.count("validation falls behind") == 1
    assert "steps [10, 20] still wait" in caplog.text


def test_results_dir_is_inside_the_run_dir():
    assert results_dir("s3://b/runs/x") == f"s3://b/runs/x/{RESULTS_DIR}"
    assert results_dir("/r/x/") == f"/r/x/{RESULTS_DIR}"


def test_validation_config_needs_a_validator_and_points_at_the_run_dir():
    from pipelines.eval.in_training import VALIDATOR, validate_checkpoint
    from pipelines.train.config import ConfigError
    from pipelines.train.validation import validation_config

    off = load_pretrain_config(None, [])
    assert validation_config(off, None) is None
    cfg = load_pretrain_config(None, ["--validation.every_steps=20", "--validation.timeout_s=0"])
    with pytest.raises(ConfigError, match="no validator was given: pass validator="):
        validation_config(cfg, None)
    vc = validation_config(cfg, VALIDATOR)
    assert vc.fn is validate_checkpoint and vc.task_config.timeout_s is None  # 0 = no limit
    assert vc.task_config.fn_kwargs["results_dir"] == f"{cfg.run_dir}/{RESULTS_DIR}"
