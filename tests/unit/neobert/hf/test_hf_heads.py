"""The exported HF model beyond the MLM parity of test_hf_export.py: attention implementations (eager honoured,
unsupported ones refused), the unpadded (varlen) path against the padded one, the token-classification and
question-answering heads through `AutoModelFor...` and `pipeline(...)`.

Tolerances (fp32, CPU): hidden states 1e-5 absolute between attention paths; every assertion reports the max
difference. The CUDA kernel test (bf16) is marked `gpu` and skips without a GPU.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from neobert.checkpoint import save_model_dir
from neobert.hf.export import export_hf
from neobert.model import NeoBERTConfig, NeoBERTForMLM
from pipelines.tokenizer import default_tokenizer_dir

ATOL = 1e-5
LOAD = dict(trust_remote_code=True, local_files_only=True)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_heads")
    cfg = NeoBERTConfig.preset(
        "tiny", num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, attn_backend="sdpa"
    )
    torch.manual_seed(0)
    model = NeoBERTForMLM(cfg)
    with torch.no_grad():  # non-trivial norms so that a path that skips a norm cannot agree by accident
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    save_model_dir(root / "model", model, cfg, kind="mlm")
    export_hf(root / "model", root / "hf", tokenizer_dir=default_tokenizer_dir())
    return root / "hf"


def padded_batch(lengths: list[int], left_pad: bool = False, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    B, S = len(lengths), max(lengths)
    ids, mask = torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long)
    for i, n in enumerate(lengths):
        sl = slice(S - n, S) if left_pad else slice(0, n)
        ids[i, sl], mask[i, sl] = torch.randint(1000, 30522, (n,), generator=g), 1
    return ids, mask


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ---------------------------------------------------------------------------------------- attention paths
def test_eager_is_honoured_and_matches_sdpa(export_dir):
    from transformers import AutoModel

    ids, mask = padded_batch([7, 3, 12, 1])
    keep = mask.bool()
    sdpa = AutoModel.from_pretrained(export_dir, **LOAD).eval()
    eager = AutoModel.from_pretrained(export_dir, attn_implementation="eager", **LOAD).eval()
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    assert eager.attention_path(eager.embeddings(ids), output_attentions=False)[0] == "eager"
    with torch.no_grad():
        want = sdpa(input_ids=ids, attention_mask=mask).last_hidden_state
        got = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    d = maxdiff(got.last_hidden_state[keep], want[keep])
    assert d <= ATOL, f"eager vs sdpa hidden max |diff| {d:.2e}"
    # attention probabilities: one (B, N, S, S) per layer, rows sum to 1, no weight on padded keys
    assert len(got.attentions) == 2 and got.attentions[0].shape == (4, 4, 12, 12)
    probs = got.attentions[1]
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    assert float(probs.masked_select(~keep[:, None, None, :].expand_as(probs)).abs().max()) == 0.0


def test_set_attn_implementation_switches_path(export_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(export_dir, **LOAD).eval()
    x = torch.zeros(1, 2, 32)
    assert model.attention_path(x, output_attentions=False)[0] == "sdpa"
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    assert model.attention_path(x, output_attentions=False)[0] == "eager"


def test_unsupported_attn_implementations_are_refused(export_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(export_dir, **LOAD)
    model.config._attn_implementation_internal = "flex_attention"  # what a registry entry would set
    with pytest.raises(ValueError, match=r"supports attn_implementation in .*'flex_attention'"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long))
    if not torch.cuda.is_available():  # flash_attention_2 needs flash-attn and a GPU: transformers refuses it
        with pytest.raises((ImportError, ValueError), match=r"(?i)flash"):
            AutoModel.from_pretrained(export_dir, attn_implementation="flash_attention_2", **LOAD)


@pytest.mark.parametrize("left_pad", [False, True])
def test_unpadded_path_matches_padded(export_dir, left_pad):
    """unpad_inputs=True on CPU: unpad -> per-sequence SDPA reference -> repad, against the padded SDPA path."""
    from transformers import AutoModel, AutoModelForMaskedLM

    ids, mask = padded_batch([7, 3, 12, 1, 12], left_pad=left_pad)
    keep = mask.bool()
    padded = AutoModel.from_pretrained(export_dir, unpad_inputs=False, **LOAD).eval()
    unpadded = AutoModel.from_pretrained(export_dir, unpad_inputs=True, **LOAD).eval()
    assert unpadded.attention_path(padded.embeddings(ids), output_attentions=False)[0] == "varlen"
    with torch.no_grad():
        want = padded(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got = unpadded(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    d = maxdiff(got.last_hidden_state[keep], want.last_hidden_state[keep])
    assert d <= ATOL, f"unpadded vs padded hidden max |diff| {d:.2e}"
    assert float(got.last_hidden_state[~keep].abs().max()) == 0.0  # padded positions are zeros
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        assert a.shape == b.shape and maxdiff(a[keep], b[keep]) <= ATOL
    # explicit position ids are gathered with the tokens
    pos = (torch.arange(ids.shape[1]) * 2).expand_as(ids)
    with torch.no_grad():
        d_pos = maxdiff(
            unpadded(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[keep],
            padded(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[keep],
        )
    assert d_pos <= ATOL, f"with position_ids max |diff| {d_pos:.2e}"
    # the heads see the repadded layout: MLM logits agree at real tokens, gradients flow through the unpad
    mlm = AutoModelForMaskedLM.from_pretrained(export_dir, unpad_inputs=True, **LOAD)
    ref = AutoModelForMaskedLM.from_pretrained(export_dir, unpad_inputs=False, **LOAD)
    labels = torch.where(keep, ids, torch.full_like(ids, -100))
    out, out_ref = mlm(input_ids=ids, attention_mask=mask, labels=labels), ref(ids, mask, labels=labels)
    assert abs(out.loss.item() - out_ref.loss.item()) <= 1e-5
    out.loss.backward()
    out_ref.loss.backward()
    g, g_ref = mlm.model.layers[0].attention.qkv.weight.grad, ref.model.layers[0].attention.qkv.weight.grad
    assert maxdiff(g, g_ref) <= 1e-5, f"qkv grad max |diff| {maxdiff(g, g_ref):.2e}"


def test_auto_unpad_stays_padded_without_a_kernel(export_dir):
    """auto (unpad_inputs=None) unpads only for CUDA inputs in bf16/fp16 with a kernel; CPU stays padded."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(export_dir, **LOAD)
    assert model.config.unpad_inputs is None
    assert model.attention_path(torch.zeros(1, 2, 32), output_attentions=False) == ("sdpa", None)
    assert model.attention_path(torch.zeros(1, 2, 32, dtype=torch.bfloat16), False) == ("sdpa", None)


def test_unpad_input_round_trip():
    from neobert.hf.modeling_neobert import pad_output, unpad_input

    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    u = unpad_input(mask)
    assert u.cu_seqlens.tolist() == [0, 3, 5, 5, 9] and u.cu_seqlens.dtype == torch.int32
    assert u.max_seqlen == 4 and u.indices.tolist() == [1, 2, 3, 4, 5, 12, 13, 14, 15]
    x = torch.randn(4, 4, 3)
    back = pad_output(x.view(16, 3)[u.indices], u)
    assert torch.equal(back[mask], x[mask]) and float(back[~mask].abs().max()) == 0.0


@pytest.mark.gpu
def test_cuda_varlen_kernel_matches_reference(export_dir):
    """bf16 on CUDA: the auto path picks the varlen kernel; compare with the padded SDPA path (bf16 tolerance)."""
    from transformers import AutoModel

    from neobert.hf.modeling_neobert import cuda_varlen_kernel

    if cuda_varlen_kernel() is None:
        pytest.skip("neither flash-attn nor torch.nn.attention.varlen is available")
    ids, mask = padded_batch([7, 3, 12, 1])
    ids, mask, keep = ids.cuda(), mask.cuda(), mask.bool().cuda()
    auto = AutoModel.from_pretrained(export_dir, dtype=torch.bfloat16, **LOAD).cuda().eval()
    padded = (
        AutoModel.from_pretrained(export_dir, dtype=torch.bfloat16, unpad_inputs=False, **LOAD).cuda().eval()
    )
    path, fn = auto.attention_path(auto.embeddings(ids), output_attentions=False)
    assert path == "varlen" and fn is cuda_varlen_kernel()[1]
    with torch.no_grad():
        d = maxdiff(auto(ids, mask).last_hidden_state[keep], padded(ids, mask).last_hidden_state[keep])
    assert d <= 5e-2, f"{cuda_varlen_kernel()[0]} vs padded sdpa (bf16) hidden max |diff| {d:.2e}"


# ------------------------------------------------------------------------------------------------------ heads
def test_config_auto_map_lists_every_head(export_dir):
    auto_map = json.loads((export_dir / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForTokenClassification"] == "modeling_neobert.NeoBERTForTokenClassification"
    assert auto_map["AutoModelForQuestionAnswering"] == "modeling_neobert.NeoBERTForQuestionAnswering"


def test_token_classification_head_loss_and_training_step(export_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(export_dir, num_labels=5, **LOAD)
    assert type(model).__name__ == "NeoBERTForTokenClassification"
    saved = load_file(str(export_dir / "model.safetensors"))  # encoder from the export, head fresh
    assert torch.equal(model.model.layers[1].mlp.w_out.weight, saved["model.layers.1.mlp.w_out.weight"])
    ids, mask = padded_batch([6, 4])
    labels = torch.randint(0, 5, ids.shape).masked_fill(~mask.bool(), -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 6, 5)
    keep = labels != -100  # the loss is the mean cross-entropy over labelled tokens only
    want = torch.nn.functional.cross_entropy(out.logits[keep], labels[keep])
    assert abs(out.loss.item() - want.item()) <= 1e-6
    out.loss.backward()
    assert model.classifier.weight.grad is not None and model.model.embeddings.weight.grad is not None
    loss, logits = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert torch.equal(logits, out.logits)


def test_question_answering_head_loss(export_dir):
    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_pretrained(export_dir, **LOAD).eval()
    assert type(model).__name__ == "NeoBERTForQuestionAnswering"
    ids, mask = padded_batch([9, 5])
    start, end = torch.tensor([2, 1]), torch.tensor([4, 99])  # 99: outside the sequence -> ignored
    out = model(input_ids=ids, attention_mask=mask, start_positions=start, end_positions=end)
    assert out.start_logits.shape == out.end_logits.shape == (2, 9)
    ce = torch.nn.functional.cross_entropy
    want = (ce(out.start_logits, start) + ce(out.end_logits[:1], end[:1])) / 2
    assert abs(out.loss.item() - want.item()) <= 1e-6
    assert model(input_ids=ids, attention_mask=mask).loss is None
    with pytest.raises(ValueError, match="both start_positions and end_positions"):
        model(input_ids=ids, attention_mask=mask, start_positions=start)


def test_token_classification_pipeline(export_dir):
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(export_dir, **LOAD)
    labels = {0: "O", 1: "B-PER", 2: "I-PER"}
    model = AutoModelForTokenClassification.from_pretrained(
        export_dir, id2label=labels, label2id={v: k for k, v in labels.items()}, **LOAD
    )
    ner = pipeline("token-classification", model=model, tokenizer=tok, device="cpu")
    text = "Ada Lovelace wrote the first program."
    ents = ner(text)
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits[0, 1:-1].argmax(-1)  # without [CLS] / [SEP]
    # the default aggregation ("none") lists every word piece not predicted "O", in order, with its offsets
    assert [e["entity"] for e in ents] == [labels[int(p)] for p in pred if int(p) != 0]
    for e in ents:
        assert text[e["start"] : e["end"]].lower() == e["word"].removeprefix("##")


def extract_answer(model, tok, question: str, context: str) -> tuple[str, int, int]:
    """The best-scoring span inside the context (start <= end), as the QA pipeline of transformers 4 did."""
    enc = tok(question, context, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")[0]
    in_context = torch.tensor([s == 1 for s in enc.sequence_ids(0)])
    with torch.no_grad():
        out = model(**enc)
    start = out.start_logits[0].masked_fill(~in_context, float("-inf"))
    end = out.end_logits[0].masked_fill(~in_context, float("-inf"))
    S = start.shape[0]
    ordered = torch.ones(S, S, dtype=torch.bool).triu()  # start <= end
    scores = (start[:, None] + end[None, :]).masked_fill(~ordered, float("-inf"))  # (S, S)
    s, e = divmod(int(scores.argmax()), scores.shape[1])
    a, b = int(offsets[s][0]), int(offsets[e][1])
    return context[a:b], a, b


def test_question_answering_span_extraction_and_pipeline(export_dir):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, pipeline
    from transformers.pipelines import SUPPORTED_TASKS

    tok = AutoTokenizer.from_pretrained(export_dir, **LOAD)
    model = AutoModelForQuestionAnswering.from_pretrained(export_dir, **LOAD).eval()
    context = "NeoBERT was trained with Ray Train on packed sequences."
    answer, a, b = extract_answer(model, tok, "What was NeoBERT trained with?", context)
    assert 0 <= a < b <= len(context) and answer == context[a:b] and answer.strip()
    if "question-answering" not in SUPPORTED_TASKS:
        pytest.skip("this transformers version removed the question-answering pipeline (transformers 5)")
    got = pipeline("question-answering", model=model, tokenizer=tok, device="cpu")(
        question="What was NeoBERT trained with?", context=context
    )
    assert got["answer"] == context[got["start"] : got["end"]] and 0.0 <= got["score"] <= 1.0
