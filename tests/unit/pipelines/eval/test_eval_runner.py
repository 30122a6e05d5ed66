from __future__ import annotations

import json

import pytest

from pipelines.eval import runner
from pipelines.eval.encoders import ModelRef
from pipelines.eval.tasks import ALL_TASKS


def _unit(model, task, seed):
    return runner.Unit(ModelRef(model, "random", "tiny"), task, seed, 0, "")


def test_aggregate_mean_std_and_skips():
    rs = [
        runner.UnitResult(_unit("m", "trec", 0), {"accuracy": 0.5, "macro_f1": 0.25}),
        runner.UnitResult(_unit("m", "trec", 1), {"accuracy": 0.7, "macro_f1": 0.35}),
        runner.UnitResult(_unit("m", "mlm", 0), None, skipped="no MLM head"),
    ]
    table, skipped = runner.aggregate(rs)
    assert table["m"]["trec"]["accuracy"] == pytest.approx(0.6)
    assert table["m"]["trec"]["accuracy_std"] == pytest.approx(0.1)
    assert table["m"]["trec"]["num_seeds"] == 2
    assert skipped == {"m": {"mlm": "no MLM head"}}


def test_publish_replaces_on_success_and_keeps_old_on_failure(tmp_path):
    out = tmp_path / "res"
    runner.publish(out, lambda d: (d / "results.json").write_text("1"))
    assert (out / "results.json").read_text() == "1"

    def boom(d):
        (d / "results.json").write_text("half")
        raise RuntimeError("task failed")

    with pytest.raises(RuntimeError):
        runner.publish(out, boom)
    assert (out / "results.json").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["res"]  # no staging left behind
    runner.publish(out, lambda d: (d / "results.json").write_text("2"))
    assert (out / "results.json").read_text() == "2"


def test_config_errors():
    with pytest.raises(ValueError, match="unknown \\['sst2'\\]"):
        runner.EvalConfig(models=["reference"], tasks=["sst2"])
    with pytest.raises(ValueError, match="at least one --model"):
        runner.evaluate(runner.EvalConfig(models=[]))


def test_tiny_checkpoint_end_to_end_on_all_tasks(tiny_model_dir, tmp_path):
    """A tiny checkpoint through the whole harness (in-process engine, reduced sizes, two seeds)."""
    cfg = runner.EvalConfig(
        models=[str(tiny_model_dir)],
        output=str(tmp_path / "eval"),
        engine="local",
        max_examples=32,
        seeds=[0, 1],
    )
    out = runner.evaluate(cfg)
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res == out["results"]
    m = res[str(tiny_model_dir)]
    assert set(m) == set(ALL_TASKS)
    assert m["polarity"]["num_seeds"] == 2 and m["stsb"]["num_seeds"] == 1
    for task, metric in [("stsb", "spearman"), ("stsb_ft", "spearman"), ("polarity", "accuracy"),
                         ("trec", "macro_f1"), ("retrieval", "ndcg@10"), ("retrieval", "mrr@10"),
                         ("mlm", "accuracy")]:  # fmt: skip
        assert -1.0 <= m[task][metric] <= 1.0, (task, metric)
    assert m["mlm"]["loss"] > 5.0  # an untrained model over a 30k vocabulary: ~ln(30522) = 10.3
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "polarity accuracy" in md and "±" in md
    assert "<table>" in (tmp_path / "eval" / "results.html").read_text()
    run = json.loads((tmp_path / "eval" / "run.json").read_text())
    assert run["data"]["stsb_test"]["sha256"].startswith("affe4592")


def test_settings_without_effect_warn(caplog):
    runner.EvalConfig(models=["reference"], tasks=["stsb"], seeds=[1, 2], engine="local", num_gpus_per_task=1)
    assert "--seeds has no effect" in caplog.text
    assert "--num-gpus-per-task has no effect" in caplog.text


def test_job_reports_one_error_line_and_keeps_previous_output(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "evaluate_job", Path(__file__).resolve().parents[4] / "jobs" / "evaluate.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text("{}")
    rc = job.main(["--model", str(tmp_path / "missing"), "--engine", "local", "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        rc == 2
        and len(err) == 1
        and err[0].startswith("evaluate: error: --model")
        and "does not exist" in err[0]
    )
    assert (out / "results.json").read_text() == "{}"
