"""PretrainConfig: YAML presets + dotted overrides, validation with actionable errors, pickling (no Ray)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from neobert.config_io import from_dict, to_dict
from neobert.model import NeoBERTConfig
from pipelines.pretrain import PretrainConfig, load_pretrain_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_default_config_is_tiny_two_cpu_workers():
    cfg = load_pretrain_config()
    assert cfg.model == NeoBERTConfig.preset("tiny")
    assert cfg.scaling.num_workers == 2 and not cfg.scaling.use_gpu
    assert cfg.scaling.resources_per_worker == {"CPU": 0.5}
    assert Path(cfg.checkpoint.storage_path).is_absolute()
    assert cfg.rows_per_micro_batch == cfg.train.tokens_per_micro_batch // cfg.data.pack_tokens


def test_base_gpu_config_inherits_and_expands_preset():
    cfg = load_pretrain_config(CONFIGS / "pretrain_base_1gpu.yaml")
    assert cfg.model == NeoBERTConfig.preset("base")
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
        (["--train.warmup_steps", "1000"], "warmup_steps"),
        (["--train.mask_prob", "0"], "mask_prob"),
        (["--trian.lr", "1"], "unknown config key"),
        (["--train.schedule", "step"], "schedule"),
        (["--data.packed_dir", "x", "--data.preprocess.pack_tokens", "8"], "either data.packed_dir"),
    ],
)
def test_bad_config_is_a_clear_error(argv, match):
    with pytest.raises(ValueError, match=match):
        load_pretrain_config(None, argv)


def test_missing_packed_dir_names_the_fix(tmp_path):
    from pipelines.pretrain import build_datasets

    cfg = load_pretrain_config(None, ["--data.packed_dir", str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="jobs/preprocess.py"):
        build_datasets(cfg)
