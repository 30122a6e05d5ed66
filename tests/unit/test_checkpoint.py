import json

import pytest
import torch

from neobert.checkpoint import (
    CONFIG_FILE,
    clean_state_dict,
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
    with pytest.raises(FileNotFoundError, match="not a NeoBERT model dir"):
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
