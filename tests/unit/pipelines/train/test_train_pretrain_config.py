"""PretrainConfig (pipelines.train.pretrain): YAML presets + dotted overrides, validation with actionable errors, pickling (no Ray)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from neobert.config_io import from_dict, to_dict
from neobert.model import NeoBERTConfig
from pipelines.train.pretrain import PretrainConfig, load_pretrain_config

CONFIGS = Path(__file__).resolve().parents[4] / "configs"


def test_default_config_is_tiny_two_cpu_workers():
    cfg = load_pretrain_config()
    assert cfg.model == NeoBERTConfig.preset("tiny")
    assert cfg.scaling.num_workers == 2 and not cfg.scaling.use_gpu
    assert cfg.scaling.resources_per_worker == {"CPU": 0.5}
    assert Path(cfg.checkpoint.storage_path).is_absolute()
    assert cfg.rows_per_micro_batch == cfg.train.tokens_per_micro_batch // cfg.data.pack_tokens


def test_base_gpu_config_inherits_and_expands_preset():
    cfg = load_pretrain_config(CONFIGS / "pretrain_base_1gpu.yaml")
    # bf16 residual and quack autotuned for the static token budget on the GPU config
    assert cfg.model == NeoBERTConfig.preset("base", fp32_residual=False, ffn_autotune=True)
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == 1
    assert cfg.train.tokens_per_micro_batch == 65536 and cfg.data.pack_tokens == 1024
    assert cfg.failure.max_failures == 0 and cfg.logging.eval_every_steps == 100  # own keys win over base


def test_dotted_overrides_reach_model_fields():
    cfg = load_pretrain_config(
        None, ["--model.num_layers", "3", "--train.lr=3e-4", "--scaling.num_workers", "1"]
    )
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 64  # rest of the tiny preset kept
    assert cfg.train.lr == 3e-4 and cfg.scaling.num_workers == 1


def test_round_trip_and_pickle():
    cfg = load_pretrain_config(None, ["--model.num_layers", "3"])
    again = from_dict(PretrainConfig, to_dict(cfg))
    assert again == cfg and pickle.loads(pickle.dumps(cfg)) == cfg


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--train.tokens_per_micro_batch", "100"], "tokens_per_micro_batch=100 < data.pack_tokens=512"),
        (["--data.pack_tokens", "2048", "--train.tokens_per_micro_batch", "4096"], "max_position_embeddings"),
        (["--failure.inject_failure_at_step", "3"], "after the first checkpoint"),
        (
            ["--failure.inject_failure_at_step", "25", "--failure.inject_failure_mode", "kill_in_checkpoint"],
            "needs a checkpoint step",
        ),
        (["--train.warmup_steps", "1000"], "warmup_steps"),
        (["--train.mask_prob", "0"], "mask_prob"),
        (["--trian.lr", "1"], "unknown config key"),
        (["--train.schedule", "step"], "schedule"),
        (["--data.read_ahead_batches", "0"], "read_ahead_batches must be >= 1"),
        (["--data.packed_dir", "x", "--data.preprocess.pack_tokens", "8"], "either data.packed_dir"),
    ],
)
def test_bad_config_is_a_clear_error(argv, match):
    with pytest.raises(ValueError, match=match):
        load_pretrain_config(None, argv)


def test_missing_packed_dir_names_the_fix(tmp_path):
    from pipelines.train.pretrain import build_datasets

    cfg = load_pretrain_config(None, ["--data.packed_dir", str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="jobs/preprocess.py"):
        build_datasets(cfg)


@pytest.mark.parametrize("as_uri", [True, False])
def test_packed_dir_checked_through_pyarrow_filesystem(tmp_path, monkeypatch, as_uri):
    """A URI packed_dir (file:// here; s3:// / gs:// take the same pyarrow path) reaches read_packed unchanged."""
    from pipelines.mlm import packed_io
    from pipelines.train.pretrain import build_datasets

    calls = []
    monkeypatch.setattr(packed_io, "read_packed", lambda path, split: calls.append((path, split)) or split)
    root = tmp_path / "packed"
    packed_dir = f"file://{root}" if as_uri else str(root)
    cfg = load_pretrain_config(None, ["--data.packed_dir", packed_dir, "--data.num_eval_rows", "0"])
    (root / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no train/\*\.parquet.*jobs/preprocess.py"):
        build_datasets(cfg)  # an empty train/ dir is as bad as none
    (root / "train" / "part-00000.parquet").write_bytes(b"")
    (root / "eval").mkdir()
    assert build_datasets(cfg) == {"train": "train"}  # no eval shards: no eval dataset
    (root / "eval" / "part-00000.parquet").write_bytes(b"")
    assert build_datasets(cfg) == {"train": "train", "eval": "eval"}
    assert calls[-2:] == [(packed_dir, "train"), (packed_dir, "eval")]


def test_run_files_for_uri_run_dir_are_staged_and_uploaded(tmp_path, monkeypatch):
    """A URI run dir (file:// here; s3:// and gs:// take the same pyarrow path) never becomes a local `s3:/...`
    dir: files are staged locally, uploaded by sync(), and fetched back into a fresh staging dir on resume."""
    from pipelines.train.sinks import METRICS_FILE, MetricSinks, RunFiles

    monkeypatch.chdir(tmp_path)
    run_dir = f"file://{tmp_path}/storage/run"
    argv = ["--checkpoint.storage_path", f"file://{tmp_path}/storage", "--checkpoint.name", "run"]
    cfg = load_pretrain_config(None, argv)
    assert cfg.run_dir == run_dir
    files = RunFiles(run_dir, staging_root=str(tmp_path / "stage_a"))
    sinks = MetricSinks(cfg, files, "neobert-pretrain")
    sinks.write(5, {"train/loss": 3.0})
    files.path("tensorboard").mkdir()
    (files.path("tensorboard") / "events.out").write_text("ev")
    files.path("data_trace.rank1.jsonl").write_text('{"step": 1}\n')
    assert not (tmp_path / "storage").exists()  # nothing uploaded before sync
    files.sync()
    sinks.close()
    remote = tmp_path / "storage" / "run"
    assert json.loads((remote / METRICS_FILE).read_text())["train/loss"] == 3.0
    assert (remote / "tensorboard" / "events.out").read_text() == "ev"
    assert (remote / "data_trace.rank1.jsonl").exists()
    assert not (tmp_path / "file:").exists() and not any(tmp_path.glob("**/file:*"))
    # Resume on another node: the staging dir is empty, metrics.jsonl comes back from the run dir.
    files_b = RunFiles(run_dir, staging_root=str(tmp_path / "stage_b"))
    sinks_b = MetricSinks(cfg, files_b, "neobert-pretrain")
    sinks_b.write(10, {"train/loss": 2.0})
    files_b.sync()
    steps = [json.loads(ln)["step"] for ln in (remote / METRICS_FILE).read_text().splitlines()]
    assert steps == [5, 10]
    # A local run dir is written in place.
    local = RunFiles(str(tmp_path / "local_run"))
    assert local.path(METRICS_FILE) == tmp_path / "local_run" / METRICS_FILE


def test_missing_logger_package_fails_up_front(monkeypatch):
    import importlib.util

    from pipelines.train.sinks import check_tracking_packages as check_optional_packages

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="tensorboard package"):
        check_optional_packages(load_pretrain_config(None, ["--logging.tensorboard", "true"]))
    with pytest.raises(ValueError, match="mlflow package"):
        check_optional_packages(load_pretrain_config(None, ["--logging.mlflow_tracking_uri", "/tmp/mlruns"]))
    with pytest.raises(ValueError, match=r"wandb package.*\.\[tracking\]"):
        check_optional_packages(load_pretrain_config(None, ["--logging.wandb", "true"]))
    check_optional_packages(load_pretrain_config(None, []))  # nothing enabled: nothing needed


def test_packed_dir_of_another_pack_size_is_refused_on_the_driver_with_both_fixes(tmp_path):
    from pipelines.train.pretrain import check_packed_dir

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "part-00000.parquet").write_bytes(b"")
    cfg = load_pretrain_config(None, ["--data.packed_dir", str(tmp_path)])
    check_packed_dir(cfg)  # no report.json: nothing to compare (the collate checks every row)
    (tmp_path / "report.json").write_text(json.dumps({"config": {"pack_tokens": 8192}}))
    with pytest.raises(
        ValueError, match=r"packed with pack_tokens=8192.*--data.pack_tokens 8192.*--pack-tokens 512"
    ):
        check_packed_dir(cfg)
    (tmp_path / "report.json").write_text(json.dumps({"config": {"pack_tokens": 512}}))
    check_packed_dir(cfg)
