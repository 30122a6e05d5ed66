from __future__ import annotations

import pytest

from pipelines.eval.in_training import InTrainingEvalConfig, build_validation_config, validate_checkpoint


def test_validate_checkpoint_scores_a_checkpoint_dir(tiny_model_dir):
    from ray.train import Checkpoint

    cfg = InTrainingEvalConfig(tasks=["stsb", "trec", "mlm"], every_steps=10, max_examples=32)
    scores = validate_checkpoint(Checkpoint.from_directory(str(tiny_model_dir)), **cfg.fn_kwargs())
    assert scores["val/step"] == 20
    assert {"val/stsb/spearman", "val/trec/accuracy", "val/trec/macro_f1", "val/mlm/loss"} <= set(scores)
    assert all(isinstance(v, float | int) for v in scores.values())


def test_build_validation_config():
    from ray.train import ValidationConfig

    assert build_validation_config(InTrainingEvalConfig()) is None  # every_steps=0: off
    vc = build_validation_config(
        InTrainingEvalConfig(tasks=["mlm"], every_steps=5, max_examples=8, timeout_s=60)
    )
    assert isinstance(vc, ValidationConfig) and vc.fn is validate_checkpoint
    assert vc.task_config.fn_kwargs == {"tasks": ["mlm"], "max_examples": 8, "seeds": [0]}
    assert vc.task_config.timeout_s == 60


def test_config_checks_and_due():
    cfg = InTrainingEvalConfig(every_steps=5)
    assert cfg.due(10) and not cfg.due(7)
    assert not InTrainingEvalConfig().due(10)
    with pytest.raises(ValueError, match="unknown \\['glue'\\]"):
        InTrainingEvalConfig(tasks=["glue"])


def test_validate_checkpoint_writes_a_result_file_and_records_errors(tiny_model_dir, tmp_path):
    import json
    import shutil

    from ray.train import Checkpoint

    out = tmp_path / "validation"
    scores = validate_checkpoint(
        Checkpoint.from_directory(str(tiny_model_dir)), tasks=["stsb"], max_examples=16, seeds=[0],
        results_dir=str(out),
    )  # fmt: skip
    rec = json.loads((out / "step_000000020.json").read_text())
    assert rec == {"step": 20, "checkpoint": tiny_model_dir.name, "metrics": scores}
    assert sorted(p.name for p in out.iterdir()) == ["step_000000020.json"]  # nothing left aside

    broken = tmp_path / "checkpoint_broken"
    shutil.copytree(tiny_model_dir, broken)
    for f in (broken / "model").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(Exception):  # noqa: B017  (whatever the loader raises is re-raised for Ray to record)
        validate_checkpoint(
            Checkpoint.from_directory(str(broken)),
            tasks=["stsb"],
            max_examples=16,
            seeds=[0],
            results_dir=str(out),
        )
    rec = json.loads((out / "step_000000020.json").read_text())
    assert rec["checkpoint"] == "checkpoint_broken" and rec["error"] and "metrics" not in rec
