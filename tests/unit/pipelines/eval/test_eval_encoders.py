from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipelines.eval.encoders import REFERENCE, load_encoder, resolve_model


def test_resolve_model_accepts_every_dir_shape(tiny_model_dir, tmp_path):
    ckpt = resolve_model(str(tiny_model_dir))
    assert ckpt.kind == "neobert" and ckpt.path == str((tiny_model_dir / "model").resolve())
    assert resolve_model(str(tiny_model_dir / "model")).path == ckpt.path
    # a run dir: the newest checkpoint_* by name
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "checkpoint_2026-01-01_00-00-00.000000")
    shutil.copytree(tiny_model_dir, run / "checkpoint_2026-01-02_00-00-00.000000")
    for c in run.iterdir():  # a complete checkpoint also holds its train state
        (c / "train_state.pt").write_bytes(b"")
    assert resolve_model(str(run)).path.endswith("checkpoint_2026-01-02_00-00-00.000000/model")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "neobert"}))
    assert resolve_model(str(hf)).kind == "neobert_hf"
    (hf / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert resolve_model(str(hf)).kind == "hf"
    assert resolve_model(REFERENCE).kind == "hf"
    assert resolve_model("random:tiny").kind == "random"


def test_resolve_model_errors_say_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*pass `reference`"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="is not a NeoBERT model dir.*pass `reference`"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        resolve_model("random:huge")


def test_neobert_encoder_mean_pools_each_text_like_a_single_forward(tiny_model_dir):
    enc = load_encoder(resolve_model(str(tiny_model_dir)), torch.device("cpu"))
    assert enc.mlm is not None and enc.mlm.encoder is enc.backbone
    texts = ["a short one", "a somewhat longer sentence to embed here", "x"]
    batch = enc.embed(texts, max_seq_len=64, batch_size=2)
    assert batch.shape == (3, 64)
    for i, t in enumerate(texts):  # packed batches give each text exactly its own-forward mean
        np.testing.assert_allclose(batch[i], enc.embed([t], max_seq_len=64)[0], atol=1e-5)
    # encode() is differentiable (fine-tuning trains through it)
    enc.encode(texts, 64).sum().backward()
    assert enc.backbone.embeddings.weight.grad is not None


def test_reference_encoder_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from pipelines.eval.encoders import reference_dir

    enc = load_encoder(resolve_model(REFERENCE), torch.device("cpu"))
    texts = ["A man is playing a guitar.", "The cat sits on the mat near the window."]
    ours = enc.embed(texts, max_seq_len=256)
    st = SentenceTransformer(str(reference_dir()), device="cpu").encode(texts, normalize_embeddings=False)
    # the package's pipeline ends with Normalize: compare directions
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    np.testing.assert_allclose(ours, st / np.linalg.norm(st, axis=1, keepdims=True), atol=1e-5)
    assert enc.mlm is None


def test_hf_export_dir_embeds_like_its_model_dir(tiny_model_dir, tmp_path):
    from neobert.hf.export import export_hf
    from pipelines.tokenizer import default_tokenizer_dir

    export_hf(tiny_model_dir, tmp_path / "hf", tokenizer_dir=default_tokenizer_dir(), parity=False)
    ref = resolve_model(str(tmp_path / "hf"))
    assert ref.kind == "neobert_hf"
    texts = ["an exported encoder", "must embed like the training one"]
    a = load_encoder(ref, torch.device("cpu")).embed(texts, max_seq_len=32)
    b = load_encoder(resolve_model(str(tiny_model_dir)), torch.device("cpu")).embed(texts, max_seq_len=32)
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_neobert_encoder_on_cuda_computes_in_bf16_and_matches_cpu():
    """On CUDA the varlen kernels refuse fp32 q/k/v: the encoder runs its NeoBERT model under bf16 autocast (weights
    fp32, as in training) and its embeddings match the fp32 CPU ones up to bf16 rounding."""
    texts = ["a short sentence", "another, slightly longer sentence about the weather today"]
    cpu = load_encoder(resolve_model("random:tiny"), torch.device("cpu")).embed(texts, max_seq_len=64)
    gpu = load_encoder(resolve_model("random:tiny"), torch.device("cuda")).embed(texts, max_seq_len=64)
    cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cos.min() > 0.999, cos
