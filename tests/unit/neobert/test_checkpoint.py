import json
import os
from pathlib import Path

import pytest
import torch

from neobert.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    TRAIN_STATE_FILE,
    clean_state_dict,
    encoder_state_dict,
    latest_checkpoint,
    load_encoder,
    load_mlm,
    load_model_dir,
    resolve_model_dir,
    save_model_dir,
)
from neobert.model import NeoBERTConfig, NeoBERTForMLM
from neobert.packing import PackedMeta


def _model():
    torch.manual_seed(0)
    return NeoBERTForMLM(NeoBERTConfig.preset("tiny"))


def test_mlm_round_trip_gives_identical_outputs(tmp_path):
    model = _model().eval()
    save_model_dir(tmp_path / "m", model, NeoBERTConfig.preset("tiny"))
    loaded = load_mlm(tmp_path / "m").eval()
    ids = torch.randint(5, 1000, (12,))
    meta = PackedMeta.from_lengths([5, 7])
    with torch.no_grad():
        diff = (model.encoder(ids, meta) - loaded.encoder(ids, meta)).abs().max().item()
    assert diff == 0.0, diff


def test_wrapped_model_keys_are_clean_and_checkpoint_subdir_resolves(tmp_path):
    model = _model()
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    assert clean_state_dict(state).keys() == model.state_dict().keys()
    save_model_dir(tmp_path / "ckpt" / "model", model, NeoBERTConfig.preset("tiny"))
    assert resolve_model_dir(tmp_path / "ckpt") == tmp_path / "ckpt" / "model"


def test_encoder_dir_holds_only_encoder_and_refuses_mlm_load(tmp_path):
    model = _model()
    save_model_dir(
        tmp_path / "e", model.encoder, NeoBERTConfig.preset("tiny"), kind="encoder", pooling="mean"
    )
    md = load_model_dir(tmp_path / "e")
    assert md.kind == "encoder" and md.pooling == "mean"
    assert all(k.startswith("encoder.") for k in md.state_dict)
    enc = load_encoder(tmp_path / "e")
    assert set(enc.state_dict()) == {k.removeprefix("encoder.") for k in md.state_dict}
    with pytest.raises(ValueError, match="load_encoder"):
        load_mlm(tmp_path / "e")


def test_bad_dirs_have_actionable_errors(tmp_path):
    with pytest.raises(ValueError, match="not a NeoBERT model dir"):
        resolve_model_dir(tmp_path)
    save_model_dir(tmp_path / "m", _model(), NeoBERTConfig.preset("tiny"))
    meta = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    meta["format"] = 99
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 99"):
        load_model_dir(tmp_path / "m")


def test_loaded_model_dirs_do_not_autotune(tmp_path):
    """ffn_autotune belongs to the pretraining run (static token budget): config.json records it, but what loads
    the dir (fine-tuning, evaluation, export) gets it off, so varying token counts never re-tune quack's GEMMs."""
    cfg = NeoBERTConfig.preset("tiny", ffn_autotune=True)
    torch.manual_seed(0)
    save_model_dir(tmp_path / "m", NeoBERTForMLM(cfg), cfg)
    assert json.loads((tmp_path / "m" / CONFIG_FILE).read_text())["model"]["ffn_autotune"] is True
    assert load_model_dir(tmp_path / "m").cfg.ffn_autotune is False
    assert load_encoder(tmp_path / "m").config.ffn_autotune is False
    assert load_mlm(tmp_path / "m").config.ffn_autotune is False


def _checkpoint(run: Path, name: str, model, *, train_state: bool = True) -> Path:
    ckpt = run / f"checkpoint_{name}"
    save_model_dir(ckpt / "model", model, NeoBERTConfig.preset("tiny"))
    if train_state:
        (ckpt / TRAIN_STATE_FILE).write_bytes(b"state")
    return ckpt


def test_latest_checkpoint_orders_by_name_not_mtime_and_skips_incomplete(tmp_path):
    model = _model()
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None and latest_checkpoint(tmp_path) is None
    old = _checkpoint(run, "2026-01-01_00-00-00.000001", model)
    new = _checkpoint(run, "2026-01-02_00-00-00.000001", model)
    os.utime(old / "model" / MODEL_FILE, (2e9, 2e9))  # the older checkpoint touched last (a copy, a sync)
    os.utime(old, (2e9, 2e9))
    assert latest_checkpoint(run) == new
    assert latest_checkpoint(tmp_path) == new  # a storage dir holding run dirs
    assert resolve_model_dir(run) == new / "model"
    # newer but incomplete: no train state / a truncated safetensors file -> skipped
    _checkpoint(run, "2026-01-03_00-00-00.000001", model, train_state=False)
    cut = _checkpoint(run, "2026-01-04_00-00-00.000001", model)
    data = (cut / "model" / MODEL_FILE).read_bytes()
    (cut / "model" / MODEL_FILE).write_bytes(data[: len(data) // 2])
    assert latest_checkpoint(run) == new


def test_truncated_model_dir_names_the_file_and_the_fix(tmp_path):
    save_model_dir(tmp_path / "ckpt" / "model", _model(), NeoBERTConfig.preset("tiny"))
    f = tmp_path / "ckpt" / "model" / MODEL_FILE
    f.write_bytes(f.read_bytes()[:-100])
    for path in (tmp_path / "ckpt", tmp_path / "ckpt" / "model"):
        with pytest.raises(ValueError, match=rf"{MODEL_FILE}: .*truncated.*earlier checkpoint"):
            load_model_dir(path)
    f.write_bytes(b"\x01")  # not even a header
    with pytest.raises(ValueError, match="unreadable header"):
        load_encoder(tmp_path / "ckpt")


def test_run_dir_with_only_incomplete_checkpoints_says_so(tmp_path):
    _checkpoint(tmp_path / "run", "2026-01-01_00-00-00.000001", _model(), train_state=False)
    with pytest.raises(ValueError, match=rf"all incomplete .*lacks {TRAIN_STATE_FILE}"):
        resolve_model_dir(tmp_path / "run")


def test_hf_export_dir_resolves_to_itself_and_is_refused_by_load_model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / MODEL_FILE).write_bytes(b"")
    assert resolve_model_dir(tmp_path) == tmp_path
    with pytest.raises(ValueError, match="load_hf_encoder"):
        load_model_dir(tmp_path)


def test_encoder_state_dict_strips_only_encoder_keys():
    sd = {"encoder.layers.0.qkv.weight": 1, "decoder.weight": 2, "encoder.final_norm.weight": 3}
    assert encoder_state_dict(sd) == {"layers.0.qkv.weight": 1, "final_norm.weight": 3}
