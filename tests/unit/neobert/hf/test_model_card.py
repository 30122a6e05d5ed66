"""The generated model card (README.md of an HF export): Hub front matter, architecture, training facts read from
the checkpoint, evaluation scores from the harness's results.json, and the license that follows the data."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml
from safetensors.torch import load_file

from neobert.checkpoint import save_model_dir
from neobert.hf.export import export_hf
from neobert.model import NeoBERT, NeoBERTConfig, NeoBERTForMLM
from pipelines.tokenizer import default_tokenizer_dir

RESULTS = {
    "neobert-tiny": {"glue/sst2": {"accuracy": 0.8125, "f1": 0.79}, "mteb/stsb": {"spearman": 0.4321}},
    "bert-base": {"glue/sst2": {"accuracy": 0.9}},
}


def tiny_cfg() -> NeoBERTConfig:
    return NeoBERTConfig.preset(
        "tiny", num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, attn_backend="sdpa"
    )


def front_matter(card: str) -> dict:
    assert card.startswith("---\n"), card[:80]
    return yaml.safe_load(card.split("---\n")[1])


def pretrain_checkpoint(root, *, inputs: list[str], step: int = 40, world_size: int = 2, **state_keys):
    """A checkpoint dir as jobs/pretrain.py writes it: model/ + train_state.json (with the run config)."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    save_model_dir(root / "model", NeoBERTForMLM(cfg), cfg, kind="mlm", extra={"step": step})
    run_cfg = {
        "data": {"packed_dir": "", "preprocess": {"input": inputs}},
        "train": {"tokens_per_micro_batch": 2048, "global_batch_tokens": 2 * 3 * 2048},
    }
    state = {"step": step, **state_keys, "world_size": world_size, "config": run_cfg}
    (root / "train_state.json").write_text(json.dumps(state))
    return root


def test_card_of_a_pretraining_checkpoint_with_results_beside_it(tmp_path):
    ckpt = pretrain_checkpoint(tmp_path / "checkpoint_000001", inputs=[])
    (ckpt / "results.json").write_text(json.dumps(RESULTS))
    export_hf(ckpt, tmp_path / "hf", tokenizer_dir=default_tokenizer_dir())
    card = (tmp_path / "hf" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "fill-mask"
    assert meta["license"] == "cc-by-sa-3.0"  # the embedded corpus includes Wikipedia text
    assert {"neobert", "custom_code", "fill-mask"} <= set(meta["tags"]) and meta["language"] == ["en"]
    # architecture from config.json, parameter count from the safetensors headers
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert f"| Layers | {conf['num_hidden_layers']} |" in card and "| Hidden size | 32 |" in card
    n_params = sum(p.numel() for p in load_file(str(tmp_path / "hf" / "model.safetensors")).values())
    assert f"| Parameters | {n_params:,} |" in card
    # training facts: steps and the token budget 40 steps x a global batch of 12288 tokens
    assert (
        "| Optimizer steps | 40 |" in card and f"| Tokens seen | {40 * 2 * 3 * 2048:,} (upper bound" in card
    )
    assert "English Wikipedia" in card and "World English Bible" in card and "public-domain" in card
    # evaluation scores: one row per (task, metric), one column per model, "–" where a model has no score
    assert "| Task | Metric | neobert-tiny | bert-base |" in card
    assert "| glue/sst2 | accuracy | 0.8125 | 0.9 |" in card
    assert "| glue/sst2 | f1 | 0.79 | – |" in card and "| mteb/stsb | spearman | 0.4321 | – |" in card
    assert "reproduces the training model on" in card and "hidden states max |diff|" in card


def test_card_counts_the_recorded_token_budget_of_a_batch_warmup(tmp_path):
    # a run with a batch warmup records its planned budget (less than steps x the full batch): the card uses it
    ckpt = pretrain_checkpoint(tmp_path / "checkpoint_000001", inputs=[], tokens_planned=123_456)
    export_hf(ckpt, tmp_path / "hf", tokenizer_dir=default_tokenizer_dir())
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| Tokens seen | 123,456 (upper bound: the planned token budget" in card


def test_card_of_a_sentence_transformer_with_explicit_results_and_user_data(tmp_path):
    cfg = tiny_cfg()
    enc = NeoBERT(cfg)
    contrastive_cfg = {
        "data": {"input_dir": "/data/my_pairs"},
        "model": {"init": "outputs/pretrain/run/ckpt"},
    }
    extra = {"trained_by": "contrastive", "step": 7, "config": contrastive_cfg}
    save_model_dir(tmp_path / "enc", enc, cfg, kind="encoder", pooling="mean", extra=extra)
    (tmp_path / "scores.json").write_text(json.dumps({"mine": {"retrieval": {"ndcg@10": 0.5}}}))
    export_hf(
        tmp_path / "enc",
        tmp_path / "st",
        tokenizer_dir=default_tokenizer_dir(),
        parity=False,
        eval_results=tmp_path / "scores.json",
    )
    card = (tmp_path / "st" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert meta["license"] == "other"  # user data of unknown license
    assert (
        "/data/my_pairs | unknown" in card and "license of part of the training data is not recorded" in card
    )
    assert (
        "| Initialised from | `outputs/pretrain/run/ckpt` |" in card
        and "| Tokens seen | not recorded |" in card
    )
    assert "| retrieval | ndcg@10 | 0.5 |" in card and "SentenceTransformer(" in card
    assert "| Pooling | mean |" in card and "not run for this export" in card


def test_card_without_results_and_license_override(tmp_path):
    cfg = tiny_cfg()
    save_model_dir(tmp_path / "m", NeoBERTForMLM(cfg), cfg, kind="mlm", extra={"demo": "random init"})
    export_hf(
        tmp_path / "m", tmp_path / "hf", tokenizer_dir=default_tokenizer_dir(), parity=False, license="mit"
    )
    card = (tmp_path / "hf" / "README.md").read_text()
    assert front_matter(card)["license"] == "mit"
    assert "These weights are random" in card and "No evaluation results were given" in card


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"m": {"t": {"acc": "high"}}}, r"\['m'\]\['t'\]\['acc'\]"),
        ({"m": {"t": 0.5}}, r"\['m'\]\['t'\]"),
        ([1, 2], "the top level"),
    ],
)
def test_bad_results_json_fails_before_writing(tmp_path, bad, where):
    cfg = tiny_cfg()
    save_model_dir(tmp_path / "m", NeoBERTForMLM(cfg), cfg, kind="mlm")
    (tmp_path / "results.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=rf"results.json: {where} must be \{{model: "):
        export_hf(
            tmp_path / "m",
            tmp_path / "hf",
            tokenizer_dir=default_tokenizer_dir(),
            eval_results=tmp_path / "results.json",
        )
    assert not (tmp_path / "hf").exists()


def test_export_job_takes_eval_results_and_license(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[4] / "jobs" / "export_hf.py"
    spec = importlib.util.spec_from_file_location("export_hf_job_card", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    cfg = tiny_cfg()
    save_model_dir(tmp_path / "m", NeoBERTForMLM(cfg), cfg, kind="mlm")
    (tmp_path / "r.json").write_text(json.dumps(RESULTS))
    args = [
        str(tmp_path / "m"),
        str(tmp_path / "hf"),
        "--parity",
        "false",
        "--eval-results",
        str(tmp_path / "r.json"),
    ]
    assert job.main([*args, "--license", "apache-2.0"]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert front_matter(card)["license"] == "apache-2.0" and "| mteb/stsb | spearman | 0.4321 | – |" in card
    (tmp_path / "r.json").write_text(json.dumps({"m": []}))
    capsys.readouterr()
    assert job.main([args[0], str(tmp_path / "hf2"), *args[2:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export_hf: error: ") and "['m'] must be" in err[0], err


def test_training_facts_from_a_packed_dir_report_and_a_conversion(tmp_path):
    from neobert.checkpoint import load_model_dir
    from neobert.hf.model_card import card_license, training_facts

    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "report.json").write_text(json.dumps({"config": {"input": ["s3://bucket/corpus/*.jsonl"]}}))
    ckpt = pretrain_checkpoint(tmp_path / "ckpt", inputs=[], step=5, world_size=1)
    state = json.loads((ckpt / "train_state.json").read_text())
    state["config"]["data"]["packed_dir"] = str(packed)
    (ckpt / "train_state.json").write_text(json.dumps(state))
    facts = training_facts(load_model_dir(ckpt))
    assert [d.name for d in facts.data] == ["s3://bucket/corpus/*.jsonl"] and card_license(facts) == "other"
    assert (
        facts.steps == 5 and facts.tokens_seen == 5 * 2 * 3 * 2048
    )  # the global batch, whatever the world size and str(packed) in facts.data_note

    cfg = tiny_cfg()
    save_model_dir(
        tmp_path / "conv", NeoBERTForMLM(cfg), cfg, kind="mlm", extra={"converted_from": "/hub/NeoBERT"}
    )
    conv = training_facts(load_model_dir(tmp_path / "conv"))
    assert "/hub/NeoBERT" in conv.objective and card_license(conv) == "other" and conv.tokens_seen is None
    # counts a caller of save_model_dir recorded take precedence over the estimate
    save_model_dir(
        tmp_path / "rec",
        NeoBERTForMLM(cfg),
        cfg,
        kind="mlm",
        extra={"tokens_seen": 123456, "train_data": [{"name": "my corpus", "license": "cc0-1.0"}]},
    )
    rec = training_facts(load_model_dir(tmp_path / "rec"))
    assert rec.tokens_seen == 123456 and rec.tokens_note == "recorded by the training run"
    assert [(d.name, d.license) for d in rec.data] == [("my corpus", "cc0-1.0")] and card_license(
        rec
    ) == "apache-2.0"
