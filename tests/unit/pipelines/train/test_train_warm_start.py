"""Warm starts: an HF export continues with the exported weights (its MLM loss on a batch equals the loss of the
model the runner builds from it, and of the transformers model), run-dir resolution to the latest checkpoint,
optimizer-state carry-over through the checkpoint's sharded state, and the architecture check."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from neobert.checkpoint import TRAIN_STATE_FILE, save_model_dir
from neobert.config import NeoBERTConfig
from neobert.hf.export import export_hf
from neobert.model import NeoBERTForMLM
from neobert.packing import PackedMeta
from pipelines.tokenizer import default_tokenizer_dir
from pipelines.train import parallel
from pipelines.train.run_dir import TRAIN_STATE_JSON
from pipelines.train.schedule import build_optimizer
from pipelines.train.warm_start import (
    check_compatible,
    check_warm_start,
    load_optimizer_state,
    load_weights,
    resolve_warm_start,
)

LENGTHS = [9, 5, 14]


def tiny_cfg(**kw) -> NeoBERTConfig:
    base = dict(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, attn_backend="sdpa")
    return NeoBERTConfig.preset("tiny", **{**base, **kw})


def random_model(cfg: NeoBERTConfig, seed: int) -> NeoBERTForMLM:
    torch.manual_seed(seed)
    model = NeoBERTForMLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial norms and biases: a dropped key cannot go unnoticed
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def batch(vocab: int):
    """A packed batch with every third token masked (labels -100 elsewhere), and its padded twin."""
    g = torch.Generator().manual_seed(3)
    ids_T = torch.randint(1000, vocab, (sum(LENGTHS),), generator=g)
    labels_T = torch.full_like(ids_T, -100)
    labels_T[::3] = ids_T[::3]
    ids_T = torch.where(labels_T != -100, torch.full_like(ids_T, 4), ids_T)  # [MASK] = 4
    B, S = len(LENGTHS), max(LENGTHS)
    ids, mask, labels = (torch.zeros(B, S, dtype=torch.long) for _ in range(3))
    labels.fill_(-100)
    o = 0
    for i, n in enumerate(LENGTHS):
        ids[i, :n], mask[i, :n], labels[i, :n] = ids_T[o : o + n], 1, labels_T[o : o + n]
        o += n
    return ids_T, labels_T, PackedMeta.from_lengths(LENGTHS), ids, mask, labels


def mlm_loss(model: NeoBERTForMLM, ids_T, labels_T, meta) -> float:
    with torch.no_grad():
        out = model(ids_T, meta, labels_T)
    return float(out.loss_sum) / int(out.num_masked)


def write_checkpoint(d, model, cfg, step, optimizer, name="adamw"):
    """A training checkpoint as the runner writes it: model/, dcp/ (model + optimizer), train state."""
    save_model_dir(d / "model", model, cfg, kind="mlm", extra={"step": step})
    parallel.save_sharded(d / parallel.DCP_DIR, model, optimizer)
    (d / TRAIN_STATE_JSON).write_text(json.dumps({"step": step, "config": {"train": {"optimizer": name}}}))
    torch.save({}, d / TRAIN_STATE_FILE)


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    cfg = tiny_cfg()
    model = random_model(cfg, seed=0)
    save_model_dir(root / "ckpt" / "model", model, cfg, kind="mlm")
    export_hf(root / "ckpt", root / "hf", tokenizer_dir=default_tokenizer_dir())
    return root / "hf", cfg, model


def test_warm_start_from_hf_export_continues_with_the_exported_weights(hf_export):
    from transformers import AutoModelForMaskedLM

    hf_dir, cfg, exported = hf_export
    # the run: its own theta (a context-extension phase may change it) and another seed, then the warm start
    run_cfg = dataclasses.replace(cfg, rope_theta=cfg.rope_theta)
    model = random_model(run_cfg, seed=1)
    src = check_warm_start(hf_dir, run_cfg, with_optimizer=False)
    assert src.kind == "hf_export" and src.checkpoint is None
    load_weights(src, model)
    ids_T, labels_T, meta, ids, mask, labels = batch(cfg.vocab_size)
    step0_loss = mlm_loss(model, ids_T, labels_T, meta)
    with torch.no_grad():
        hf = AutoModelForMaskedLM.from_pretrained(
            hf_dir, trust_remote_code=True, local_files_only=True
        ).eval()
        hf_loss = float(hf(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert step0_loss == pytest.approx(hf_loss, abs=1e-4), (step0_loss, hf_loss)
    assert step0_loss == pytest.approx(mlm_loss(exported, ids_T, labels_T, meta), abs=1e-6)
    # the check has teeth: the same model without the warm start has another loss
    assert abs(mlm_loss(random_model(run_cfg, seed=1), ids_T, labels_T, meta) - hf_loss) > 1e-2


def test_architecture_must_match_phase_fields_may_differ(hf_export):
    hf_dir, cfg, _ = hf_export
    longer = dataclasses.replace(cfg, rope_theta=160_000.0, max_position_embeddings=8192, attn_backend="auto")
    check_compatible(cfg, longer)  # context extension: allowed
    check_warm_start(hf_dir, longer, with_optimizer=False)
    with pytest.raises(ValueError, match=r"model.num_layers=3 but the warm-start source has 2"):
        check_warm_start(hf_dir, tiny_cfg(num_layers=3), with_optimizer=False)
    with pytest.raises(ValueError, match=r"holds no optimizer state"):
        check_warm_start(hf_dir, cfg, with_optimizer=True)
    with pytest.raises(ValueError, match="model.hidden_size"):
        check_compatible(cfg, dataclasses.replace(cfg, hidden_size=64, num_heads=4))


def test_run_dir_resolves_to_latest_checkpoint_and_carries_optimizer_state(tmp_path):
    cfg = tiny_cfg()
    old, new = random_model(cfg, seed=5), random_model(cfg, seed=6)
    opt_old = build_optimizer(old, "adamw", lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95), eps=1e-8)
    opt = build_optimizer(new, "adamw", lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95), eps=1e-8)
    ids_T, labels_T, meta, *_ = batch(cfg.vocab_size)
    new.train()
    new(ids_T, meta, labels_T).loss_sum.backward()
    opt.step()
    run = tmp_path / "run"
    write_checkpoint(run / "checkpoint_2026-01-01_00-00-10", old, cfg, step=10, optimizer=opt_old)
    write_checkpoint(run / "checkpoint_2026-01-01_00-00-20", new, cfg, step=20, optimizer=opt)  # newest name
    src = check_warm_start(run, cfg, with_optimizer=True, optimizer="adamw")
    assert src.kind == "checkpoint" and src.checkpoint.name == "checkpoint_2026-01-01_00-00-20"

    model = random_model(cfg, seed=7)
    load_weights(src, model)
    for a, b in zip(model.state_dict().values(), new.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    opt2 = build_optimizer(model, "adamw", lr=5e-4, weight_decay=0.01, betas=(0.9, 0.95), eps=1e-8)
    load_optimizer_state(src, model, opt2)
    moments = [opt2.state[p]["exp_avg"] for p in model.parameters() if p in opt2.state]
    assert moments and all(m.abs().sum() > 0 for m in moments)
    assert [g["lr"] for g in opt2.param_groups] == [5e-4, 5e-4]  # the LR stays this run's

    with pytest.raises(ValueError, match="trained with train.optimizer=adamw"):
        check_warm_start(run, cfg, with_optimizer=True, optimizer="stable_adamw")


def test_model_dir_without_checkpoint_cannot_carry_optimizer(hf_export, tmp_path):
    _, cfg, model = hf_export
    save_model_dir(tmp_path / "m", model, cfg, kind="mlm")
    src = check_warm_start(tmp_path / "m", cfg, with_optimizer=False)
    assert src.kind == "model_dir"
    with pytest.raises(ValueError, match="holds no optimizer state"):
        check_warm_start(tmp_path / "m", cfg, with_optimizer=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"train.init_from: .* is not a NeoBERT model dir"):
        resolve_warm_start(tmp_path / "empty")
    with pytest.raises(ValueError, match="is not a directory"):
        resolve_warm_start(tmp_path / "missing")


def test_encoder_only_source_keeps_the_decoder_init(tmp_path):
    cfg = tiny_cfg()
    enc = random_model(cfg, seed=8)
    save_model_dir(tmp_path / "enc", enc, cfg, kind="encoder")
    model = random_model(cfg, seed=9)
    decoder = model.decoder.weight.clone()
    load_weights(resolve_warm_start(tmp_path / "enc"), model)
    assert torch.equal(model.encoder.embeddings.weight, enc.encoder.embeddings.weight)
    assert torch.equal(model.decoder.weight, decoder)


def test_stable_adamw_state_carries_over(tmp_path):
    """StableAdamW (torch-optimi) through the same sharded save / load as AdamW (the ModernBERT-style recipe)."""
    cfg = tiny_cfg()
    src_model = random_model(cfg, seed=10)
    opt = build_optimizer(src_model, "stable_adamw", lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98), eps=1e-6)
    ids_T, labels_T, meta, *_ = batch(cfg.vocab_size)
    src_model.train()
    src_model(ids_T, meta, labels_T).loss_sum.backward()
    opt.step()
    write_checkpoint(tmp_path / "checkpoint_2026-01-01_00-00-00", src_model, cfg, 1, opt, name="stable_adamw")
    src = check_warm_start(tmp_path, cfg, with_optimizer=True, optimizer="stable_adamw")
    model = random_model(cfg, seed=11)
    load_weights(src, model)
    opt2 = build_optimizer(model, "stable_adamw", lr=3e-4, weight_decay=0.01, betas=(0.9, 0.98), eps=1e-6)
    load_optimizer_state(src, model, opt2)
    for p_new, p_old in zip(model.parameters(), src_model.parameters(), strict=True):
        for key, value in opt.state[p_old].items():
            got = opt2.state[p_new][key]
            assert (
                (got is None) if value is None else torch.equal(torch.as_tensor(got), torch.as_tensor(value))
            ), key
    assert {g["lr"] for g in opt2.param_groups} == {3e-4}


def test_published_neobert_layout_warm_starts_like_its_converted_model_dir(tmp_path):
    """A dir in the chandar-lab/NeoBERT layout is told apart from an HF export by its keys and read through
    neobert.hf.convert_original: the same weights as the model dir `convert_original` writes."""
    from safetensors.torch import save_file

    from neobert.checkpoint import load_model_dir
    from neobert.hf.config_map import from_original_config
    from neobert.hf.convert_original import convert_original
    from tests.unit.neobert.hf.test_hf_export import ORIG_CONFIG, original_state_dict

    cfg = from_original_config(ORIG_CONFIG, attn_backend="sdpa")
    (tmp_path / "orig").mkdir()
    (tmp_path / "orig" / "config.json").write_text(json.dumps(ORIG_CONFIG))
    save_file(original_state_dict(cfg, vocab=300), str(tmp_path / "orig" / "model.safetensors"))
    src = check_warm_start(tmp_path / "orig", dataclasses.replace(cfg, rope_theta=1e6), with_optimizer=False)
    assert src.kind == "original" and src.checkpoint is None
    ref = load_model_dir(convert_original(tmp_path / "orig", tmp_path / "ours")).state_dict
    assert src.state_dict.keys() == ref.keys()
    assert all(torch.equal(src.state_dict[k], ref[k]) for k in ref)
