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
        (["--data.shuffle_window_rows", "-1"], "data.shuffle_window_rows must be >= 0"),
        (["--train.global_batch_tokens", "-1"], "global_batch_tokens must be >= 0"),
        (
            ["--data.sources", "[{name: a, path: /x}, {name: a, path: /y}]"],
            "distinct names",
        ),
        (["--data.sources", "[{name: a, path: /x}]", "--data.preprocess.pack_tokens", "8"], "no effect"),
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
    assert build_datasets(cfg) == {"train.train": "train"}  # no eval shards: no eval dataset
    (root / "eval" / "part-00000.parquet").write_bytes(b"")
    assert build_datasets(cfg) == {"train.train": "train", "eval": "eval"}
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


# ----------------------------------------------------------------------------------------------------------------
# train.global_batch_tokens: resolved on the driver; accumulation derived from it
# ----------------------------------------------------------------------------------------------------------------
def _saved(cfg, **train) -> dict:
    """A checkpoint's JSON train state as the runner writes it (only the keys the driver reads)."""
    from neobert.config_io import to_dict

    conf = to_dict(cfg)
    conf["train"].update(train)
    return {"step": 3, "world_size": cfg.scaling.num_workers, "data": None, "config": conf}


def test_global_batch_defaults_to_one_micro_batch_per_worker():
    from pipelines.train.pretrain import resolve_config

    cfg = load_pretrain_config(None, ["--scaling.num_workers", "3", "--train.tokens_per_micro_batch", "1024"])
    assert cfg.train.global_batch_tokens == 0  # unresolved until the driver resolves it
    r = resolve_config(cfg)
    assert r.train.global_batch_tokens == 3 * 1024 and r.num_micro_batches == 1
    assert r.mixture().global_batch_tokens == 3072 and [s.name for s in r.mixture().sources] == ["train"]
    set_ = resolve_config(load_pretrain_config(None, ["--train.global_batch_tokens", "8192"]))
    assert set_.train.global_batch_tokens == 8192 and set_.num_micro_batches == 2  # 16 rows / (2 workers x 4)


def test_resume_keeps_the_checkpoints_global_batch_unless_set():
    from pipelines.train.pretrain import resolve_config

    first = resolve_config(load_pretrain_config(None, ["--scaling.num_workers", "2"]))
    assert first.train.global_batch_tokens == 4096
    saved = _saved(first)
    # Resumed on 1 worker: 0 would mean 2048 on 1 worker; the checkpoint's 4096 wins (2 micro-batches each).
    again = resolve_config(load_pretrain_config(None, ["--scaling.num_workers", "1"]), saved)
    assert again.train.global_batch_tokens == 4096 and again.num_micro_batches == 2
    # Another micro-batch size: same global batch, accumulation follows.
    small = resolve_config(
        load_pretrain_config(None, ["--scaling.num_workers", "1", "--train.tokens_per_micro_batch", "1024"]),
        saved,
    )
    assert small.train.global_batch_tokens == 4096 and small.num_micro_batches == 4
    # A value the user sets wins over the checkpoint's.
    mine = resolve_config(load_pretrain_config(None, ["--train.global_batch_tokens", "8192"]), saved)
    assert mine.train.global_batch_tokens == 8192


def test_global_batch_not_divisible_names_the_keys():
    with pytest.raises(
        ValueError,
        match=r"train\.global_batch_tokens=6144 .*data\.pack_tokens=512 x "
        r"scaling\.num_workers=2 x rows per micro-batch=4.*e\.g\. 4096|8192",
    ):
        load_pretrain_config(None, ["--train.global_batch_tokens", "6144"])
    from pipelines.train.pretrain import resolve_config

    saved = _saved(resolve_config(load_pretrain_config(None, ["--scaling.num_workers", "2"])))
    with pytest.raises(ValueError, match=r"train\.global_batch_tokens=4096.*scaling\.num_workers=3"):
        resolve_config(load_pretrain_config(None, ["--scaling.num_workers", "3"]), saved)


def test_resume_check_accepts_world_and_micro_batch_changes_and_refuses_order_changes(tmp_path):
    from pipelines.train.config import ConfigError
    from pipelines.train.data import GlobalStepSource
    from pipelines.train.pretrain import check_pretrain_resume, resolve_config

    base = ["--checkpoint.storage_path", str(tmp_path), "--data.pack_tokens", "64"]
    cfg = resolve_config(load_pretrain_config(None, [*base,
                                                     "--train.tokens_per_micro_batch", "128"]))  # fmt: skip
    # A real data state: the source's position after one global step of 2 workers x 2 rows.
    import pyarrow as pa

    from neobert.schema import PACKED_SCHEMA

    n = 12
    table = pa.table({
        "input_ids": pa.array([[7, 8, 9]] * n, pa.list_(pa.int32())),
        "position_ids": pa.array([[0, 1, 2]] * n, pa.list_(pa.int32())),
        "cu_seqlens": pa.array([[0, 3]] * n, pa.list_(pa.int32())),
        "max_seqlen": pa.array([3] * n, pa.int32()),
        "num_tokens": pa.array([3] * n, pa.int32()),
        "num_segments": pa.array([1] * n, pa.int32()),
    }, schema=PACKED_SCHEMA)  # fmt: skip
    with GlobalStepSource(cfg.mixture(), {"train": lambda e: [table]}, pack_tokens=64,
                          rows_per_micro_batch=2, rank=0, world_size=2) as src:  # fmt: skip
        src.next_step()
        state = src.state_dict()
    saved = {**_saved(cfg), "data": state}
    for argv in (["--scaling.num_workers", "1"], ["--train.tokens_per_micro_batch=64"], []):
        other = resolve_config(
            load_pretrain_config(None, [*base, "--train.tokens_per_micro_batch", "128", *argv]), saved
        )
        check_pretrain_resume(other, saved)  # accepted: the run continues at the next unseen row
    for argv, match in (
        (["--train.seed", "1"], r"seed=0 but the config says 1.*set seed: 0"),
        (["--data.shuffle_window_rows", "8"], r"shuffle_window_rows=1024 but the config says 8"),
        (["--data.sources", "[{name: wiki, path: /x}]"], r"sources \['train'\] differ"),
    ):
        other = resolve_config(
            load_pretrain_config(None, [*base, "--train.tokens_per_micro_batch", "128", *argv]), saved
        )
        with pytest.raises(ConfigError, match=match):
            check_pretrain_resume(other, saved)
    with pytest.raises(ConfigError, match="not a global data order position"):
        check_pretrain_resume(cfg, {**saved, "data": {"kind": "shard", "epoch": 0}})


def test_batch_warmup_config_refusals_name_the_keys_and_a_value_that_works():
    from pipelines.train.pretrain import resolve_config

    def cfg(*argv: str):
        return load_pretrain_config(None, ["--train.global_batch_tokens", "24576", *argv])

    with pytest.raises(
        ValueError, match=r"train\.batch_warmup_start_tokens=4096 and train\.batch_warmup_tokens=0"
    ):
        cfg("--train.batch_warmup_start_tokens", "4096")
    with pytest.raises(
        ValueError,
        match=r"train\.batch_warmup_start_tokens=1000 is not a multiple of data\.pack_tokens=512.*e\.g\. 1024",
    ):
        cfg("--train.batch_warmup_start_tokens", "1000", "--train.batch_warmup_tokens", "10")
    # the start is the granule: 2 workers x 4 rows x 512 tokens = 4096 must divide it (named, with a value that works)
    with pytest.raises(
        ValueError,
        match=r"train\.batch_warmup_start_tokens=2048 .* = 4096 tokens: set train\.batch_warmup_start_tokens to e\.g\. 4096",
    ):
        cfg("--train.batch_warmup_start_tokens", "2048", "--train.batch_warmup_tokens", "10")
    with pytest.raises(ValueError, match=r"smaller than train\.global_batch_tokens=24576 and divide it"):
        cfg("--train.batch_warmup_start_tokens", "24576", "--train.batch_warmup_tokens", "10")
    with pytest.raises(
        ValueError, match=r"train\.batch_warmup_start_tokens=16384 must be smaller .* divide it"
    ):
        cfg("--train.batch_warmup_start_tokens", "16384", "--train.batch_warmup_tokens", "10")
    # elastic 1..3 workers: the start must split over 1, 2 and 3 workers x 4 rows (lcm 6 x 4 x 512 = 12288)
    with pytest.raises(
        ValueError,
        match=r"scaling\.num_workers=\[1, 3\].*\[3\].*e\.g\. train\.batch_warmup_start_tokens=12288",
    ):
        cfg(
            "--train.batch_warmup_start_tokens",
            "8192",
            "--train.batch_warmup_tokens",
            "10",
            "--scaling.num_workers",
            "[1, 3]",
        )
    # a warmup needs an explicit global batch above one micro-batch per worker
    derived = load_pretrain_config(
        None, ["--train.batch_warmup_start_tokens", "4096", "--train.batch_warmup_tokens", "10"]
    )
    with pytest.raises(ValueError, match=r"must be smaller than train\.global_batch_tokens=4096"):
        resolve_config(derived).check_world_sizes()
    ok = cfg("--train.batch_warmup_start_tokens", "4096", "--train.batch_warmup_tokens", str(3 * 4096 * 15))
    ramp = ok.ramp()
    assert [lv[0] for lv in ramp.levels()] == [8, 16, 24, 32, 40, 48] and ramp.steps_per_level == 3
    assert ok.num_micro_batches == 6 and ok.mixture().ramp(512) == ramp  # the data source gets the same ramp
