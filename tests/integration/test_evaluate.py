"""The evaluation harness on a real local Ray cluster: units as Ray tasks, and in-training validation through
a real TorchTrainer (`ray.train.ValidationConfig`)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture()
def tiny_ckpt(tmp_path):
    import torch

    from neobert.checkpoint import save_model_dir
    from neobert.model import NeoBERTConfig, NeoBERTForMLM

    torch.manual_seed(0)
    model = NeoBERTForMLM(NeoBERTConfig.preset("tiny"))
    save_model_dir(tmp_path / "ckpt" / "model", model, model.config, kind="mlm", extra={"step": 20})
    return tmp_path / "ckpt"


def test_evaluate_on_ray_matches_local_engine(ray_session, tiny_ckpt, tmp_path):
    from pipelines.eval.runner import EvalConfig, evaluate

    common = dict(models=[str(tiny_ckpt), "random:tiny"], tasks=["stsb", "trec", "mlm"], max_examples=32,
                  seeds=[0, 1])  # fmt: skip
    on_ray = evaluate(EvalConfig(**common, engine="ray", output=str(tmp_path / "ray")))
    local = evaluate(EvalConfig(**common, engine="local", output=str(tmp_path / "local")))
    for model in common["models"]:
        for task in common["tasks"]:
            for metric, value in local["results"][model][task].items():
                assert on_ray["results"][model][task][metric] == pytest.approx(value, abs=1e-4), (
                    model,
                    task,
                    metric,
                )
    units = json.loads((tmp_path / "ray" / "run.json").read_text())["units"]
    assert len(units) == 2 * (1 + 2 + 1)  # trec runs per seed, zero-shot tasks once


def test_validation_config_scores_reported_checkpoints(ray_session, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.eval.in_training import InTrainingEvalConfig, build_validation_config, smoke_train_loop

    ev = InTrainingEvalConfig(tasks=["stsb", "mlm"], every_steps=2, max_examples=16, num_cpus=0.5)
    trainer = TorchTrainer(
        smoke_train_loop,
        train_loop_config={
            "eval": json.loads(json.dumps(ev.__dict__)),
            "num_steps": 4,
            "checkpoint_every": 1,
        },
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="val-smoke", storage_path=str(tmp_path)),
        validation_config=build_validation_config(ev),
    )
    result = trainer.fit()
    assert result.error is None
    validated = {m["step"]: m for _, m in result.best_checkpoints if "val/stsb/spearman" in m}
    assert sorted(validated) == [2, 4]  # steps 1 and 3 were reported without validation
    assert all(m["val/step"] == s and m["val/mlm/loss"] > 5 for s, m in validated.items())
