"""HF export round trip and the original-NeoBERT import, each checked numerically (CPU, fp32).

Tolerances: hidden states and sentence embeddings 1e-5, MLM logits 1e-4 (absolute); every assertion reports the
max difference. The converter test builds a random model in the ORIGINAL layout (interleaved per-head qkv,
complex / adjacent-pair RoPE, packed SwiGLU w12, decoder with bias) and runs a small reference implementation of
the original forward written from its documented semantics (chandar-lab/NeoBERT `model.py`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below must work without the network

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from neobert.checkpoint import load_mlm, save_model_dir
from neobert.contrastive import pool_sequences
from neobert.hf.config_map import from_original_config
from neobert.hf.convert_original import convert_original, convert_original_state_dict
from neobert.hf.export import ParityError, check_parity, export_hf
from neobert.hf.keymap import hf_to_training
from neobert.model import NeoBERT, NeoBERTConfig, NeoBERTForMLM
from neobert.packing import PackedMeta
from pipelines.tokenizer import default_tokenizer_dir, load_tokenizer

ATOL, LOGITS_ATOL = 1e-5, 1e-4
REPO = Path(__file__).resolve().parents[4]
LENGTHS = [7, 3, 12, 1]  # padded batch (4, 12) vs packed stream of 23 tokens


def tiny_cfg(**kw) -> NeoBERTConfig:
    return NeoBERTConfig.preset("tiny", num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, **kw)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (norm weights, decoder bias) so that a swapped key cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def packed_and_padded(lengths, vocab: int, seed: int = 1, left_pad: bool = False, low: int = 1000):
    g = torch.Generator().manual_seed(seed)
    ids_T = torch.randint(low, vocab, (sum(lengths),), generator=g)
    B, S = len(lengths), max(lengths)
    ids, mask = torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long)
    o = 0
    for i, n in enumerate(lengths):
        sl = slice(S - n, S) if left_pad else slice(0, n)
        ids[i, sl], mask[i, sl] = ids_T[o : o + n], 1
        o += n
    return ids_T, PackedMeta.from_lengths(lengths), ids, mask


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ---------------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def mlm_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_mlm")
    cfg = tiny_cfg(attn_backend="sdpa")
    model = NeoBERTForMLM(cfg)
    randomize(model)
    save_model_dir(root / "ckpt" / "model", model, cfg, kind="mlm")  # a training checkpoint holding model/
    report = export_hf(root / "ckpt", root / "hf", tokenizer_dir=default_tokenizer_dir())
    return model.eval(), cfg, root / "hf", report


def test_export_writes_loadable_dir_with_real_vocab(mlm_export):
    model, cfg, out, report = mlm_export
    assert report.parity_checked and report.max_abs_diff_hidden <= ATOL, report
    assert report.max_abs_diff_logits <= LOGITS_ATOL, report
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "neobert" and conf["architectures"] == ["NeoBERTForMaskedLM"]
    assert conf["auto_map"]["AutoModelForMaskedLM"] == "modeling_neobert.NeoBERTForMaskedLM"
    assert conf["vocab_size"] == 30522 and cfg.padded_vocab_size > 30522  # padded rows sliced off
    sd = load_file(str(out / "model.safetensors"))
    assert sd["model.embeddings.weight"].shape == (30522, 32) and sd["decoder.bias"].shape == (30522,)
    for name in ("configuration_neobert.py", "modeling_neobert.py", "tokenizer.json", "vocab.txt"):
        assert (out / name).exists(), name
    # the key map inverts: HF weights -> training layout (vocab rows zero-padded back to V_pad)
    back = hf_to_training(sd, num_layers=cfg.num_layers, padded_vocab_size=cfg.padded_vocab_size)
    ref = {k: v for k, v in model.state_dict().items() if not k.startswith("loss_fn")}
    assert set(back) == set(ref)
    for k, v in back.items():
        assert v.shape == ref[k].shape and torch.equal(v[:30522], ref[k][:30522]), k


@pytest.mark.parametrize("left_pad", [False, True])
def test_automodel_matches_training_varlen(mlm_export, left_pad):
    from transformers import AutoModel, AutoModelForMaskedLM

    model, cfg, out, _ = mlm_export
    ids_T, meta, ids, mask = packed_and_padded(LENGTHS, cfg.vocab_size, left_pad=left_pad)
    kw = dict(trust_remote_code=True, local_files_only=True)
    with torch.no_grad():
        ref_hidden = model.encoder(ids_T, meta)  # (T, D)
        ref_logits = model.logits(ref_hidden)  # (T, 30522)
        hidden = (
            AutoModel.from_pretrained(out, **kw).eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        )
        mlm = AutoModelForMaskedLM.from_pretrained(out, **kw).eval()
        logits = mlm(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    d_h, d_l = maxdiff(hidden[keep], ref_hidden), maxdiff(logits[keep], ref_logits)
    assert d_h <= ATOL, f"hidden max |diff| {d_h:.2e}"
    # loading must not re-initialise anything, not even the [PAD] row (randomize() made it non-zero)
    assert torch.equal(mlm.model.embeddings.weight, model.encoder.embeddings.weight[:30522])
    assert torch.equal(mlm.decoder.bias, model.decoder.bias[:30522])
    assert d_l <= LOGITS_ATOL, f"logits max |diff| {d_l:.2e}"
    # the eager path (output_attentions) computes the same thing and returns row-stochastic probabilities
    with torch.no_grad():
        eager = mlm(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert maxdiff(eager.logits[keep], ref_logits) <= LOGITS_ATOL
    assert len(eager.attentions) == cfg.num_layers and len(eager.hidden_states) == cfg.num_layers + 1
    assert maxdiff(eager.hidden_states[-1][keep], ref_hidden) <= ATOL  # last entry = final-normed output
    assert torch.allclose(eager.attentions[0].sum(-1), torch.ones(()), atol=1e-5)
    # MLM loss runs and is finite
    labels = torch.where(keep, ids, torch.full_like(ids, -100))
    assert torch.isfinite(mlm(input_ids=ids, attention_mask=mask, labels=labels).loss)


def test_tokenizer_loads_offline_without_fixed_padding(mlm_export):
    from transformers import AutoTokenizer

    *_, out, _ = mlm_export
    tok = AutoTokenizer.from_pretrained(out)
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)  # ~360 tokens > the old 128
    enc = tok(text)
    assert enc["input_ids"] == load_tokenizer().encode(text).ids and len(enc["input_ids"]) > 128
    short = tok(["hello world", "a longer sentence than the first one"], padding=True)
    assert len(short["input_ids"][0]) == len(short["input_ids"][1]) < 128  # pads to the longest, not to 128
    assert "token_type_ids" not in short
    assert tok.pad_token_id == 0 and tok.mask_token_id == 103 and tok.model_max_length == 1024


def test_parity_check_fails_on_corrupted_export(mlm_export, tmp_path):
    import shutil

    from neobert.checkpoint import load_model_dir
    from neobert.hf.export import ExportReport

    model, cfg, out, _ = mlm_export
    bad = tmp_path / "hf_bad"
    shutil.copytree(out, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.mlp.w_out.weight"] = sd["model.layers.1.mlp.w_out.weight"] * 1.01  # a 1% error
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    md = load_model_dir(out.parent / "ckpt")
    report = ExportReport(str(bad), str(md.path), "mlm", "NeoBERTForMaskedLM", False, False)
    with pytest.raises(ParityError, match=r"hidden states max \|diff\|"):
        check_parity(md, bad, default_tokenizer_dir(), report, sentences=["a short sentence", "and another"])


def test_sequence_classification_head_loads_and_trains(mlm_export):
    from transformers import AutoModelForSequenceClassification

    *_, out, _ = mlm_export
    clf = AutoModelForSequenceClassification.from_pretrained(
        out, num_labels=3, trust_remote_code=True, local_files_only=True
    )
    _, _, ids, mask = packed_and_padded(LENGTHS, 30522)
    res = clf(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1, 0]))
    assert res.logits.shape == (4, 3) and torch.isfinite(res.loss)
    res.loss.backward()
    assert clf.classifier.weight.grad is not None
    assert clf.model.layers[0].attention.qkv.weight.grad is not None
    saved = load_file(
        str(out / "model.safetensors")
    )  # the encoder came from the export, only the head is new
    assert torch.equal(clf.model.layers[0].attention.qkv.weight, saved["model.layers.0.attention.qkv.weight"])
    assert torch.equal(clf.model.embeddings.weight, saved["model.embeddings.weight"])


def test_tied_embeddings_export_and_job_cli(tmp_path, capsys):
    """A tied-embedding model through the job entrypoint (positional args + dotted overrides)."""
    import importlib.util

    from transformers import AutoModelForMaskedLM

    spec = importlib.util.spec_from_file_location("export_hf_job", REPO / "jobs" / "export_hf.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    cfg = tiny_cfg(tie_word_embeddings=True)
    model = NeoBERTForMLM(cfg)
    randomize(model, seed=7)
    save_model_dir(tmp_path / "tied", model, cfg, kind="mlm")
    assert job.main([str(tmp_path / "tied"), str(tmp_path / "hf"), "--atol", "1e-5"]) == 0
    report = json.loads((tmp_path / "hf" / "neobert_export.json").read_text())
    assert report["parity_checked"] and report["max_abs_diff_logits"] <= LOGITS_ATOL, report
    mlm = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, local_files_only=True)
    assert mlm.config.tie_word_embeddings
    assert mlm.decoder.weight.data_ptr() == mlm.model.embeddings.weight.data_ptr()
    capsys.readouterr()
    assert job.main([str(tmp_path / "tied"), str(tmp_path / "hf")]) == 2  # bad input: a message, no traceback
    assert "not empty" in capsys.readouterr().err
    assert job.main([str(tmp_path / "missing"), str(tmp_path / "hf2")]) == 2
    assert "is not a NeoBERT model dir" in capsys.readouterr().err


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_contrastive_export_is_a_sentence_transformer(tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    cfg = tiny_cfg(attn_backend="sdpa")
    enc = NeoBERT(cfg)
    randomize(enc, seed=3)
    save_model_dir(tmp_path / "enc", enc, cfg, kind="encoder", pooling=pooling)
    report = export_hf(tmp_path / "enc", tmp_path / "st", tokenizer_dir=default_tokenizer_dir())
    assert report.sentence_transformers and report.max_abs_diff_sentence_embedding <= ATOL, report
    pool_cfg = json.loads((tmp_path / "st" / "1_Pooling" / "config.json").read_text())
    assert pool_cfg[f"pooling_mode_{'mean_tokens' if pooling == 'mean' else 'cls_token'}"]

    sentences = [
        "Contrastive fine-tuning of NeoBERT.",
        "Short.",
        "A third sentence, somewhat longer than the rest.",
    ]
    st = SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True, device="cpu")
    got = torch.as_tensor(st.encode(sentences, batch_size=3))
    ids = [load_tokenizer().encode(s).ids for s in sentences]
    meta = PackedMeta.from_lengths([len(x) for x in ids])
    with torch.no_grad():
        want = pool_sequences(enc.eval()(torch.tensor(sum(ids, [])), meta), meta.cu_seqlens, pooling)
    d = maxdiff(got, want)
    assert d <= ATOL, f"sentence embedding max |diff| {d:.2e}"


# ------------------------------------------------------------------------------ original NeoBERT import
def original_state_dict(cfg: NeoBERTConfig, vocab: int, seed: int = 0, prefix: str = "model.") -> dict:
    """Random weights in the published layout (see neobert/hf/convert_original.py for the key list)."""
    g = torch.Generator().manual_seed(seed)
    D, F_ = cfg.hidden_size, cfg.ffn_hidden_size

    def r(*shape, scale=0.2):
        return scale * torch.randn(*shape, generator=g)

    sd = {f"{prefix}encoder.weight": r(vocab, D), f"{prefix}layer_norm.weight": 1 + r(D)}
    for L in range(cfg.num_layers):
        p = f"{prefix}transformer_encoder.{L}."
        sd |= {
            p + "attention_norm.weight": 1 + r(D),
            p + "qkv.weight": r(3 * D, D),
            p + "wo.weight": r(D, D),
            p + "ffn_norm.weight": 1 + r(D),
            p + "ffn.w12.weight": r(2 * F_, D),
            p + "ffn.w3.weight": r(D, F_),
        }
    sd |= {"decoder.weight": r(vocab, D), "decoder.bias": r(vocab, scale=0.5)}
    return sd


def original_forward(sd: dict, cfg: NeoBERTConfig, ids: torch.Tensor, mask: torch.Tensor):
    """The original NeoBERT forward on a right-padded batch, written from its semantics: qkv output viewed as
    (B, S, heads, 3*head_dim) and chunked; LLaMA complex RoPE on adjacent pairs (positions 0..S-1);
    xformers SwiGLU (x1, x2 = w12(x).chunk(2); silu(x1) * x2; w3); nn.RMSNorm; SDPA with a boolean key mask."""
    B, S = ids.shape
    D, N = cfg.hidden_size, cfg.num_heads
    H = D // N

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    freqs = 1.0 / (10000.0 ** (torch.arange(0, H, 2)[: H // 2].float() / H))
    freqs_cis = torch.polar(torch.ones(S, H // 2), torch.outer(torch.arange(S).float(), freqs))  # (S, H/2)

    def rope(x):  # (B, S, N, H)
        xc = torch.view_as_complex(x.float().reshape(B, S, N, H // 2, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    x = sd["model.encoder.weight"][ids]
    key_mask = mask.bool()[:, None, None, :]
    for L in range(cfg.num_layers):
        p = f"model.transformer_encoder.{L}."
        h = rms(x, sd[p + "attention_norm.weight"])
        q, k, v = (h @ sd[p + "qkv.weight"].T).view(B, S, N, 3 * H).chunk(3, dim=-1)
        q, k = rope(q), rope(k)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask
        )
        x = x + a.transpose(1, 2).reshape(B, S, D) @ sd[p + "wo.weight"].T
        x1, x2 = (rms(x, sd[p + "ffn_norm.weight"]) @ sd[p + "ffn.w12.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(x1) * x2) @ sd[p + "ffn.w3.weight"].T
    x = rms(x, sd["model.layer_norm.weight"])
    return x, x @ sd["decoder.weight"].T + sd["decoder.bias"]


ORIG_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "dim_head": 8,
    "intermediate_size": 64,  # SwiGLU width int(2*64/3)=42 -> 48
    "norm_eps": 1e-5,
    "vocab_size": 300,
    "max_length": 64,
    "pad_token_id": 0,
    "model_type": "neobert",
}


def test_convert_original_matches_reference_forward(tmp_path):
    cfg = from_original_config(ORIG_CONFIG, attn_backend="sdpa")
    assert cfg.ffn_hidden_size == 48 and cfg.padded_vocab_size == 384
    orig = original_state_dict(cfg, vocab=300)
    (tmp_path / "orig").mkdir()
    (tmp_path / "orig" / "config.json").write_text(json.dumps(ORIG_CONFIG))
    save_file(orig, str(tmp_path / "orig" / "model.safetensors"))
    convert_original(tmp_path / "orig", tmp_path / "ours")
    model = load_mlm(tmp_path / "ours").eval()

    lengths = [9, 4, 13]
    ids_T, meta, ids, mask = packed_and_padded(lengths, 300, seed=5, low=1)
    with torch.no_grad():
        ref_h, ref_logits = original_forward(orig, cfg, ids, mask)
        h = model.encoder(ids_T, meta)
        logits = model.logits(h)
    keep = mask.bool()
    d_h, d_l = maxdiff(h, ref_h[keep]), maxdiff(logits, ref_logits[keep])
    assert d_h <= ATOL, f"converted hidden max |diff| {d_h:.2e}"
    assert d_l <= LOGITS_ATOL, f"converted logits max |diff| {d_l:.2e}"


def test_convert_original_needs_the_rope_permutation(monkeypatch):
    """Negative control: without the per-head row permutation (pair RoPE != half-split RoPE) outputs differ."""
    import neobert.hf.convert_original as co

    cfg = from_original_config(ORIG_CONFIG, attn_backend="sdpa")
    orig = original_state_dict(cfg, vocab=300)
    monkeypatch.setattr(co, "rope_pair_to_half_permutation", lambda H: torch.arange(H))
    model = NeoBERTForMLM(cfg).eval()
    model.load_state_dict(convert_original_state_dict(orig, cfg))
    ids_T, meta, ids, mask = packed_and_padded([9, 4], 300, seed=5, low=1)
    with torch.no_grad():
        ref_h, _ = original_forward(orig, cfg, ids, mask)
        d = maxdiff(model.encoder(ids_T, meta), ref_h[mask.bool()])
    assert d > 1e-3, f"identity permutation should break parity, max |diff| only {d:.2e}"


def test_convert_original_rejects_wrong_layout():
    cfg = from_original_config(ORIG_CONFIG)
    orig = original_state_dict(cfg, vocab=300)
    orig["model.transformer_encoder.0.attn.wq.weight"] = orig.pop("model.transformer_encoder.0.wo.weight")
    with pytest.raises(ValueError, match="missing .*wo.weight.*unexpected .*attn.wq"):
        convert_original_state_dict(orig, cfg)


def test_export_job_picks_the_newest_complete_checkpoint_by_name(tmp_path):
    """jobs/export_hf.py without CHECKPOINT: the newest complete checkpoint over all storages, by Ray's timestamped
    name (a copied run dir has fresh file times), skipping a checkpoint cut off mid-write."""
    import importlib.util
    import os

    from neobert.checkpoint import TRAIN_STATE_FILE

    spec = importlib.util.spec_from_file_location("export_hf_job", REPO / "jobs" / "export_hf.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    cfg = tiny_cfg()
    model = NeoBERTForMLM(cfg)
    storages = (tmp_path / "pretrain", tmp_path / "demo")
    assert job.newest_pretrain_checkpoint(storages) is None
    made = {}
    for storage, name in [(0, "2026-01-02_00-00-00.000001"), (1, "2026-01-01_00-00-00.000001"), (1, "2026-01-03_00-00-00.000001")]:  # fmt: skip
        ckpt = storages[storage] / "run" / f"checkpoint_{name}"
        save_model_dir(ckpt / "model", model, cfg)
        (ckpt / TRAIN_STATE_FILE).write_bytes(b"state")
        made[name] = ckpt
    os.utime(made["2026-01-01_00-00-00.000001"] / "model" / "neobert_config.json", (4e9, 4e9))  # newest mtime
    assert job.newest_pretrain_checkpoint(storages) == made["2026-01-03_00-00-00.000001"] / "model"
    (made["2026-01-03_00-00-00.000001"] / TRAIN_STATE_FILE).unlink()  # incomplete now: skipped
    assert job.newest_pretrain_checkpoint(storages) == made["2026-01-02_00-00-00.000001"] / "model"


def test_load_hf_encoder_refuses_a_truncated_export(tmp_path):
    from neobert.hf.export import load_hf_encoder
    from pipelines.tokenizer import default_tokenizer_dir

    cfg = tiny_cfg()
    save_model_dir(tmp_path / "m", NeoBERT(cfg), cfg, kind="encoder", pooling="mean")
    export_hf(tmp_path / "m", tmp_path / "hf", tokenizer_dir=default_tokenizer_dir(), parity=False)
    enc, cfg2, pooling = load_hf_encoder(tmp_path / "hf")
    assert cfg2.ffn_hidden_size == cfg.ffn_hidden_size and pooling == "mean"
    f = tmp_path / "hf" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(ValueError, match=r"model.safetensors cannot be read .*re-export"):
        load_hf_encoder(tmp_path / "hf")
