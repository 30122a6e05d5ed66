"""HF config <-> training config translation (neobert/hf/config_map.py), both directions."""

from __future__ import annotations

import dataclasses

import pytest

from neobert.config import PRESETS, NeoBERTConfig
from neobert.hf.config_map import from_hf_config, from_original_config, to_hf_config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_training_hf_training_round_trip(preset: str) -> None:
    from neobert.hf.configuration_neobert import NeoBERTConfig as HFConfig

    cfg = NeoBERTConfig.preset(preset, rope_theta=5e5, rms_norm_eps=1e-6, tie_word_embeddings=True)
    hf = HFConfig(**to_hf_config(cfg, kind="mlm", pooling="mean"))
    assert hf.intermediate_size == cfg.ffn_hidden_size and hf.classifier_pooling == "mean"
    back = from_hf_config(hf.to_dict())
    # the nominal width is not stored, only F: it comes back as 3F/2, which gives the same F
    assert back.ffn_hidden_size == cfg.ffn_hidden_size
    assert dataclasses.replace(back, intermediate_size=cfg.intermediate_size) == cfg


def test_encoder_export_is_untied_and_unknown_pooling_falls_back_to_cls() -> None:
    cfg = NeoBERTConfig.preset("tiny", tie_word_embeddings=True)
    hf = to_hf_config(cfg, kind="encoder", pooling="max")
    assert hf["tie_word_embeddings"] is False and hf["classifier_pooling"] == "cls"


def test_from_hf_config_errors_name_the_file_and_fix() -> None:
    good = dict(to_hf_config(NeoBERTConfig.preset("tiny")), model_type="neobert")
    with pytest.raises(ValueError, match=r"x/config.json: model_type='bert'.*jobs/export_hf.py"):
        from_hf_config({**good, "model_type": "bert"}, source="x/config.json")
    with pytest.raises(ValueError, match=r"missing \['num_hidden_layers'\]"):
        from_hf_config({k: v for k, v in good.items() if k != "num_hidden_layers"})
    with pytest.raises(ValueError, match="intermediate_size=100 cannot be expressed"):
        from_hf_config({**good, "intermediate_size": 100})
    assert from_hf_config(good, attn_backend="sdpa").attn_backend == "sdpa"  # training-only overrides


def test_from_original_config_defaults_and_refusals() -> None:
    cfg = from_original_config({})
    base = NeoBERTConfig.preset("base")
    assert (cfg.hidden_size, cfg.num_layers, cfg.ffn_hidden_size) == (768, 28, base.ffn_hidden_size)
    assert from_original_config({"max_length": 1024}).max_position_embeddings == 1024
    with pytest.raises(ValueError, match="published NeoBERT variant"):
        from_original_config({"ngpt": True})
