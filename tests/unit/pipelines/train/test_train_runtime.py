"""The shared training runtime without a Ray cluster: one set of config keys for both jobs, the run dir the driver
prepares (config.yaml, incomplete checkpoints, resume checks), non-retried config errors, metric sinks, and
row-keyed masking."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from neobert.config_io import to_dict
from pipelines.train import config as tc
from pipelines.train import run_dir as rd
from pipelines.train.config import ConfigError
from pipelines.train.contrastive import ContrastiveConfig, load_contrastive_config
from pipelines.train.pretrain import (
    PretrainConfig,
    PretrainRunner,
    load_pretrain_config,
    prepare_pretrain_run,
)
from pipelines.train.runner import prepare_run, run_worker
from pipelines.train.sinks import METRICS_FILE, MetricSinks, RunFiles

SHARED = ("train", "checkpoint", "scaling", "failure", "logging")


def keys(section) -> set[str]:
    return {f.name for f in dataclasses.fields(section)}


def test_both_jobs_use_the_same_keys_for_the_shared_settings():
    p, c = load_pretrain_config(), load_contrastive_config()
    for name in SHARED:
        base = keys(getattr(tc.TrainJobConfig(), name))
        assert base <= keys(getattr(p, name)) and base <= keys(getattr(c, name)), name
    for key in ("num_steps", "lr", "warmup_steps", "schedule", "min_lr_ratio", "weight_decay", "beta1", "beta2",
                "eps", "max_grad_norm", "seed", "precision", "compile"):  # fmt: skip
        assert key in keys(p.train) and key in keys(c.train), key
    # the drifted names of older configs are gone from both
    for old in ("max_steps", "log_every", "checkpoint_every", "grad_clip", "fail_at_step"):
        assert old not in keys(p.train) | keys(c.train)
    assert not hasattr(c, "run")
    assert p.run_dir.endswith("/neobert-tiny") and c.run_dir.endswith("/contrastive-tiny")


@pytest.mark.parametrize("load", [load_pretrain_config, load_contrastive_config])
def test_max_failures_below_minus_one_is_refused(load):
    with pytest.raises(ValueError, match=r"failure.max_failures must be >= -1.*got -5"):
        load(None, ["--failure.max_failures", "-5"])
    assert load(None, ["--failure.max_failures", "-1"]).failure.max_failures == -1


@pytest.mark.parametrize("load", [load_pretrain_config, load_contrastive_config])
def test_relative_storage_path_resolves_to_absolute(load, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load(None, ["--checkpoint.storage_path", "out/runs"])
    assert cfg.checkpoint.storage_path == str(tmp_path / "out" / "runs")
    assert tc.resolve_storage_path("s3://bucket/runs") == "s3://bucket/runs"


def fake_checkpoint(
    run: Path, name: str, data: dict | None, world_size: int = 2, listed: bool = True
) -> Path:
    d = run / name
    (d / "model").mkdir(parents=True)
    if data is not None:
        meta = {"step": 3, "data": data, "world_size": world_size,
                "config": {"train": {"global_batch_tokens": 8 * 512}}}  # fmt: skip
        (d / rd.TRAIN_STATE_JSON).write_text(json.dumps(meta))
    if listed:
        snap = run / rd.SNAPSHOT_FILE
        state = json.loads(snap.read_text()) if snap.exists() else {"checkpoint_results": []}
        state["checkpoint_results"].append({"checkpoint_dir_name": name, "metrics": {}})
        snap.write_text(json.dumps(state))
    return d


def data_state(**order):
    """A `GlobalStepSource.state_dict()` 3 global steps of 8 rows into the default single source."""
    return {
        "version": 1, "global_step": 3, "rows_per_step": 8,
        "order": {"seed": 0, "shuffle_window_rows": 1024, "sources": ["train"], **order},
        "sources": {"train": {"epoch": 0, "rows_in_epoch": 24, "tokens": 9000, "rows": 24, "exhausted": False}},
    }  # fmt: skip


def test_prepare_run_writes_config_yaml_and_removes_incomplete_checkpoints(tmp_path):
    cfg = load_pretrain_config(None, ["--checkpoint.storage_path", str(tmp_path), "--checkpoint.name", "r"])
    run = tmp_path / "r"
    fake_checkpoint(run, "checkpoint_2026-01-01_00-00-02.000000", data_state())
    fake_checkpoint(run, "checkpoint_2026-01-01_00-00-01.000000", data_state())
    killed = fake_checkpoint(
        run, "checkpoint_2026-01-01_00-00-03.000000", None, listed=False
    )  # a killed write
    assert rd.latest_checkpoint(run) == str(run / "checkpoint_2026-01-01_00-00-02.000000")  # by name
    resolved = prepare_pretrain_run(cfg)
    assert not killed.exists()
    assert sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir()) == [
        "checkpoint_2026-01-01_00-00-01.000000",
        "checkpoint_2026-01-01_00-00-02.000000",
    ]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved == to_dict(resolved) and saved["checkpoint"]["name"] == "r"
    assert saved["train"]["global_batch_tokens"] == 2 * 2048  # resolved on the driver


def test_contrastive_run_dir_gets_config_yaml(tmp_path):
    cfg = load_contrastive_config(
        None, ["--checkpoint.storage_path", str(tmp_path), "--model.init", "random:tiny"]
    )
    prepare_run(cfg)
    assert (
        yaml.safe_load((tmp_path / "contrastive-tiny" / "config.yaml").read_text())["model"]["init"]
        == "random:tiny"
    )


def test_resume_on_another_world_or_micro_batch_size_is_accepted_and_an_order_change_refused(tmp_path):
    base = ["--checkpoint.storage_path", str(tmp_path), "--checkpoint.name", "r", "--train.tokens_per_micro_batch",
            "2048", "--data.pack_tokens", "512"]  # fmt: skip
    fake_checkpoint(tmp_path / "r", "checkpoint_2026-01-01_00-00-01.000000", data_state())
    for argv in (["--scaling.num_workers", "1"], ["--train.tokens_per_micro_batch", "1024"], [],
                 ["--scaling.num_workers", "[1, 2]"], ["--train.global_batch_tokens", "4096"]):  # fmt: skip
        resolved = prepare_pretrain_run(load_pretrain_config(None, base + argv))
        assert resolved.train.global_batch_tokens == 4096  # the checkpoint's: 8 rows of 512
    for argv, match in (
        (["--train.seed", "3"], r"seed=0 but the config says 3.*set seed: 0"),
        (["--data.shuffle_window_rows", "64"], r"shuffle_window_rows=1024 but the config says 64"),
        (["--train.global_batch_tokens", "8192"], r"global step is 8 rows .* set global_batch_tokens: 4096"),
        (["--scaling.num_workers", "[1, 3]"], r"does not split over \[3\] workers"),
    ):
        with pytest.raises(ConfigError, match=match) as e:
            prepare_pretrain_run(load_pretrain_config(None, base + argv))
        assert "\n" not in str(e.value)  # one line


class FailingRunner:
    """A runner whose run() raises a ConfigError, as a worker that finds a broken data contract would."""

    built = 0

    def __init__(self, cfg):
        FailingRunner.built += 1

    def run(self):
        raise ConfigError("data.pack_tokens=512 but the rows hold 8192 tokens: pass --data.pack_tokens 8192")


def test_worker_config_error_is_recorded_and_never_retried(tmp_path):
    cfg = load_pretrain_config(None, ["--checkpoint.storage_path", str(tmp_path), "--checkpoint.name", "r"])
    with pytest.raises(ConfigError):
        run_worker(FailingRunner, PretrainConfig, to_dict(cfg))
    assert FailingRunner.built == 1
    # a restarted attempt (FailureConfig) ends at once: the runner is not even built
    run_worker(FailingRunner, PretrainConfig, to_dict(cfg))
    assert FailingRunner.built == 1
    with pytest.raises(ConfigError, match="--data.pack_tokens 8192"):  # the driver reports it, once
        rd.raise_recorded_config_error(cfg.run_dir)
    rd.raise_recorded_config_error(cfg.run_dir)  # cleared


# -- sinks ---------------------------------------------------------------------------------------------------------
def sink_config(tmp_path, *argv):
    return load_pretrain_config(
        None, ["--checkpoint.storage_path", str(tmp_path), "--checkpoint.name", "run", *argv]
    )


def test_metrics_jsonl_is_always_written_and_truncated_on_resume(tmp_path):
    cfg = sink_config(tmp_path)
    sinks = MetricSinks(cfg, RunFiles(cfg.run_dir), "neobert-pretrain")
    for step in (5, 10, 15):
        sinks.write(step, {"train/loss": 10.0 / step})
    sinks.truncate_after(10)
    sinks.close()
    records = [json.loads(ln) for ln in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10] and records[0]["train/loss"] == 2.0


def needs(package):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"{package} is not installed")


@needs("tensorboard")
def test_tensorboard_sink_writes_events(tmp_path):
    cfg = sink_config(tmp_path, "--logging.tensorboard", "true")
    sinks = MetricSinks(cfg, RunFiles(cfg.run_dir), "neobert-pretrain")
    sinks.write(1, {"train/loss": 3.0})
    sinks.close()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


@needs("mlflow")
def test_mlflow_sink_keeps_slash_names_and_the_run_name(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.x: the file store is opt-in

    cfg = sink_config(tmp_path, "--logging.mlflow_tracking_uri", f"file://{tmp_path}/mlruns")
    sinks = MetricSinks(cfg, RunFiles(cfg.run_dir), "neobert-pretrain")
    sinks.write(1, {"train/loss": 3.0})
    run_id = mlflow.active_run().info.run_id
    sinks.close()
    run = mlflow.get_run(run_id)
    assert run.info.run_name == "run" and run.data.metrics == {"train/loss": 3.0}


@needs("wandb")
def test_wandb_sink_runs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = sink_config(tmp_path, "--logging.wandb", "true")
    sinks = MetricSinks(cfg, RunFiles(cfg.run_dir), "neobert-pretrain")
    assert sinks.wandb.name == "run"
    sinks.write(1, {"train/loss": 3.0})
    sinks.close()
    assert list((tmp_path / "run" / "wandb").glob("**/offline-run-*"))


# -- row-keyed masking ---------------------------------------------------------------------------------------------
def mask_runner(seed: int = 0) -> PretrainRunner:
    runner = PretrainRunner.__new__(PretrainRunner)  # the masking needs only the config
    runner.cfg = load_pretrain_config(None, ["--train.seed", str(seed), "--data.pack_tokens", "64",
                                             "--train.tokens_per_micro_batch", "256"])  # fmt: skip
    return runner


def row_masks(runner, table, groups, keys):
    """{row key: (masked ids, labels)} when the rows of `table` are collated in `groups` (lists of row indices)."""
    from pipelines.train.collate import collate_packed

    out = {}
    for group in groups:
        batch = collate_packed(table.take(group), 256).with_row_keys([keys[i] for i in group])
        ids, labels = runner.mask(batch)
        off = batch.row_offsets.tolist()
        for j, i in enumerate(group):
            out[keys[i]] = (ids[off[j] : off[j + 1]].tolist(), labels[off[j] : off[j + 1]].tolist())
        assert (labels[off[-1] :] == -100).all()  # padding is never a target
    return out


def _packed(n_rows: int):
    from test_train_collate import packed_table  # the collate tests' packed-row builder (same folder)

    return packed_table([[5 + 3 * r, 20 - r] for r in range(n_rows)])


def test_row_masks_are_independent_of_micro_batch_layout():
    table, keys = _packed(4), [11, 7, 99, 3]
    runner = mask_runner()
    one = row_masks(runner, table, [[0, 1, 2, 3]], keys)
    two = row_masks(runner, table, [[2, 0], [3, 1]], keys)  # other grouping, other order
    assert one == two
    assert any(lab != -100 for _, labels in one.values() for lab in labels)
    # another key (or another seed) gives another mask for the same row
    other = row_masks(runner, table, [[0, 1, 2, 3]], [12, 8, 100, 4])
    assert [other[k][1] for k in (12, 8, 100, 4)] != [one[k][1] for k in keys]
    assert row_masks(mask_runner(seed=1), table, [[0, 1, 2, 3]], keys) != one


def test_unset_row_keys_are_an_internal_error():
    from pipelines.train.collate import collate_packed

    with pytest.raises(AssertionError, match="row_keys unset"):
        mask_runner().mask(collate_packed(_packed(1), 256))
    assert torch.equal(collate_packed(_packed(2), 256).row_keys, torch.tensor([-1, -1]))


def test_configs_pickle_and_round_trip():
    import pickle

    from neobert.config_io import from_dict

    for cfg in (load_pretrain_config(), load_contrastive_config()):
        assert from_dict(type(cfg), to_dict(cfg)) == cfg and pickle.loads(pickle.dumps(cfg)) == cfg
    assert isinstance(load_contrastive_config(), ContrastiveConfig)


@pytest.mark.parametrize(
    ("mode", "rank", "step", "resumed", "due"),
    [
        ("raise", 1, 6, False, {"raise"}),
        ("kill", 1, 6, False, {"kill"}),
        ("kill", 0, 6, False, set()),  # the last rank fails, not rank 0
        ("kill_in_checkpoint", 0, 6, False, {"kill_in_checkpoint"}),  # rank 0 writes the checkpoint
        ("kill_in_checkpoint", 1, 6, False, set()),
        ("raise", 1, 5, False, set()),
        ("raise", 1, 6, True, set()),  # a resumed attempt never fails again
    ],
)
def test_failure_injection_rule_is_one_for_every_job(tmp_path, mode, rank, step, resumed, due):
    from pipelines.train.runner import TrainRunner

    fake_checkpoint(tmp_path / "r", "checkpoint_2026-01-01_00-00-01.000000", data_state())  # a registered one
    argv = ["--checkpoint.storage_path", str(tmp_path), "--checkpoint.name", "r", "--failure.inject_failure_at_step", "6", "--failure.inject_failure_mode", mode,
            "--checkpoint.every_steps", "3", "--train.num_steps", "10"]  # fmt: skip
    for cfg in (load_pretrain_config(None, argv), load_contrastive_config(None, argv)):
        runner = TrainRunner.__new__(TrainRunner)
        runner.cfg, runner.rank, runner.world, runner.step, runner.resumed = cfg, rank, 2, step, resumed
        assert {m for m in ("raise", "kill", "kill_in_checkpoint") if runner.injecting(m)} == due


def test_mlflow_file_store_is_refused_on_the_driver_with_the_fixes(monkeypatch, tmp_path):
    """MLflow 3 refuses a directory as tracking URI: the driver says so, with the fixes, before Ray starts."""
    mlflow = pytest.importorskip("mlflow")
    from pipelines.train.sinks import check_mlflow_store

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    if int(mlflow.__version__.split(".")[0]) < 3:
        pytest.skip("MLflow < 3 still takes a file store")
    with pytest.raises(ValueError, match=r"sqlite:///.*mlflow\.db.*MLFLOW_ALLOW_FILE_STORE=true"):
        check_mlflow_store(f"file://{tmp_path}")
    check_mlflow_store(f"sqlite:///{tmp_path}/mlflow.db")  # a database is fine
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_mlflow_store(str(tmp_path))  # the user opted in
