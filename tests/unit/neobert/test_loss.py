"""CPU parity of the chunked masked-LM loss against a naive full-logits reference (fp32).

Tolerance: loss and gradients within 1e-5 relative (max |diff| / max |ref|); counts exact.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from neobert.loss import IGNORE_INDEX, MaskedLMLoss, MLMLossOutput

RTOL = 1e-5


def _loss(hidden, weight, bias, labels, chunk_size=2048, valid_vocab_size=None) -> MLMLossOutput:
    return MaskedLMLoss(chunk_size=chunk_size)(
        hidden, weight, bias, labels, valid_vocab_size=valid_vocab_size
    )


def _make(T=64, D=24, V=48, frac=0.3, seed=0, bias=True, vv=None, all_masked=False, none_masked=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g, requires_grad=True)
    weight = (torch.randn(V, D, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_() if bias else None
    labels = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
    if all_masked:
        mask = torch.ones(T, dtype=torch.bool)
    elif none_masked:
        mask = torch.zeros(T, dtype=torch.bool)
    else:
        mask = torch.rand(T, generator=g) < frac
    labels[mask] = torch.randint(0, vv or V, (int(mask.sum()),), generator=g)
    return hidden, weight, b, labels


def _reference(hidden, weight, bias, labels, vv=None):
    """Naive: full (T, V) logits, slice the valid vocab, CE with sum reduction, argmax count."""
    logits = F.linear(hidden, weight, bias)
    if vv is not None:
        logits = logits[:, :vv]
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    mask = labels != IGNORE_INDEX
    correct = (logits.argmax(-1) == labels)[mask].sum()
    return loss, int(mask.sum()), int(correct)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None], allow_unused=False)


def _assert_close(name, got, ref, rtol=RTOL):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    diff = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
    scale = max(ref.double().abs().max().item() if ref.numel() else 0.0, 1e-12)
    assert diff <= rtol * scale + 1e-12, f"{name}: max|diff|={diff:.3e} > {rtol:g} * max|ref|={scale:.3e}"


def _check_parity(hidden, weight, bias, labels, chunk_size, vv=None):
    out = _loss(hidden, weight, bias, labels, chunk_size=chunk_size, valid_vocab_size=vv)
    assert isinstance(out, MLMLossOutput)
    ref_loss, ref_n, ref_correct = _reference(hidden, weight, bias, labels, vv)
    assert int(out.num_masked) == ref_n
    assert int(out.num_correct) == ref_correct, (
        f"num_correct {int(out.num_correct)} != reference {ref_correct}"
    )
    assert out.loss_sum.dtype == torch.float32 and out.loss_sum.dim() == 0
    _assert_close("loss_sum", out.loss_sum.detach(), ref_loss.detach())
    params = [hidden, weight, bias]
    got = _grads(out.loss_sum, params)
    ref = _grads(ref_loss, params)
    for name, g, r in zip(["grad_hidden", "grad_weight", "grad_bias"], got, ref, strict=False):
        _assert_close(name, g, r)
    return out, got


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 4096])  # 3 and 7 do not divide the masked count (20)
@pytest.mark.parametrize("bias", [True, False])
def test_parity_vs_full_logits(chunk_size, bias):
    hidden, weight, b, labels = _make(bias=bias)
    n = int((labels != IGNORE_INDEX).sum())
    assert n % 3 and n % 7, f"fixture should give a masked count not divisible by 3 or 7, got {n}"
    _check_parity(hidden, weight, b, labels, chunk_size)


def test_large_logits_stay_finite():
    """Logits of +-hundreds: exp(target - max) underflows to 0 in fp32; the loss must not become inf."""
    hidden, weight, b, labels = _make(seed=9)
    with torch.no_grad():
        weight.mul_(60.0)
    _check_parity(hidden, weight, b, labels, chunk_size=6)


def test_all_masked():
    hidden, weight, b, labels = _make(T=33, all_masked=True)
    out, _ = _check_parity(hidden, weight, b, labels, chunk_size=8)
    assert int(out.num_masked) == 33


def test_no_masked_tokens_zero_loss_zero_grads():
    hidden, weight, b, labels = _make(none_masked=True)
    out = _loss(hidden, weight, b, labels, chunk_size=4)
    assert out.loss_sum.requires_grad, "loss_sum must stay attached to the graph with zero masked tokens"
    assert float(out.loss_sum.detach()) == 0.0 and int(out.num_masked) == 0 and int(out.num_correct) == 0
    (out.loss_sum / out.num_masked.clamp(min=1)).backward()
    for name, t in [("hidden", hidden), ("weight", weight), ("bias", b)]:
        assert t.grad is not None, f"{name}.grad is None"
        assert torch.isfinite(t.grad).all() and not t.grad.any(), f"{name}.grad must be all zeros"


def test_empty_batch():
    hidden, weight, b, _ = _make()
    out = _loss(hidden[:0], weight, b, torch.empty(0, dtype=torch.long))
    assert float(out.loss_sum.detach()) == 0.0 and int(out.num_masked) == 0


def test_valid_vocab_size_excludes_padded_columns():
    V_pad, vv = 64, 50
    hidden, weight, b, labels = _make(V=V_pad, vv=vv)
    with torch.no_grad():  # padded columns would win every argmax and dominate the softmax if not masked
        b[vv:] = 100.0
        mask = labels != IGNORE_INDEX
        hits = mask & (torch.arange(labels.numel()) % 2 == 0)  # half the masked labels = the valid argmax
        labels[hits] = F.linear(hidden, weight, b)[:, :vv].argmax(-1)[hits]
    _, (g_h, g_w, g_b) = _check_parity(hidden, weight, b, labels, chunk_size=6, vv=vv)
    assert not g_w[vv:].any() and not g_b[vv:].any(), "padded decoder rows must get exactly zero gradient"
    out = _loss(hidden, weight, b, labels, valid_vocab_size=vv)
    assert int(out.num_correct) >= int(hits.sum()) > 0, "argmax must ignore the padded columns"


def test_grad_output_scaling_and_retain_graph():
    hidden, weight, b, labels = _make(seed=3)
    out = _loss(hidden, weight, b, labels, chunk_size=4)
    scaled = out.loss_sum / 7.0
    g1 = torch.autograd.grad(scaled, [hidden, weight, b], retain_graph=True)
    g2 = torch.autograd.grad(scaled, [hidden, weight, b])
    ref_loss, _, _ = _reference(hidden, weight, b, labels)
    ref = torch.autograd.grad(ref_loss / 7.0, [hidden, weight, b])
    for name, a, c, r in zip(["hidden", "weight", "bias"], g1, g2, ref, strict=True):
        _assert_close(f"grad_{name} (1st backward)", a, r)
        assert torch.equal(a, c), f"grad_{name}: a second backward with retain_graph differs"


def test_partial_requires_grad_and_no_grad():
    hidden, weight, b, labels = _make(seed=4)
    ref_loss, _, _ = _reference(hidden, weight, b, labels)
    weight.requires_grad_(False)  # frozen decoder: only hidden gets a gradient
    b.requires_grad_(False)
    out = _loss(hidden, weight, b, labels, chunk_size=3)
    (g_h,) = torch.autograd.grad(out.loss_sum, [hidden])
    _assert_close("grad_hidden (frozen decoder)", g_h, torch.autograd.grad(ref_loss, [hidden])[0])
    hidden_frozen = hidden.detach()  # frozen encoder: only the decoder gets gradients
    weight.requires_grad_(True)
    b.requires_grad_(True)
    out = _loss(hidden_frozen, weight, b, labels, chunk_size=3)
    got = torch.autograd.grad(out.loss_sum, [weight, b])
    ref_loss2, _, _ = _reference(hidden_frozen, weight, b, labels)
    for name, g, r in zip(["weight", "bias"], got, torch.autograd.grad(ref_loss2, [weight, b]), strict=True):
        _assert_close(f"grad_{name} (frozen encoder)", g, r)
    with torch.no_grad():  # eval: no gradient work at all
        out = _loss(hidden, weight, b, labels, chunk_size=3)
    assert not out.loss_sum.requires_grad
    _assert_close("loss_sum (no_grad)", out.loss_sum, ref_loss.detach())


def test_bf16_autocast_cpu_smoke():
    hidden, weight, b, labels = _make(T=96, D=32, V=80, seed=5)
    ref_loss, ref_n, _ = _reference(hidden, weight, b, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MaskedLMLoss(chunk_size=8)(hidden, weight, b, labels, valid_vocab_size=None)
    assert out.loss_sum.dtype == torch.float32 and int(out.num_masked) == ref_n
    loss, ref = float(out.loss_sum.detach()), float(ref_loss.detach())
    rel = abs(loss - ref) / ref
    assert rel < 2e-2, (
        f"bf16 loss_sum {float(out.loss_sum):.4f} vs fp32 {float(ref_loss):.4f} (rel {rel:.2e})"
    )
    out.loss_sum.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    for t in (hidden, weight, b):
        assert torch.isfinite(t.grad).all()
    _assert_close(
        "grad_weight (bf16 vs fp32)", weight.grad, torch.autograd.grad(ref_loss, [weight])[0], rtol=5e-2
    )


def test_bf16_accum_dtype_option():
    hidden, weight, b, labels = _make(seed=6)
    out = MaskedLMLoss(chunk_size=4, accum_dtype=torch.bfloat16)(hidden, weight, b, labels)
    (g_w,) = torch.autograd.grad(out.loss_sum, [weight])
    ref_loss, _, _ = _reference(hidden, weight, b, labels)
    _assert_close(
        "grad_weight (bf16 accumulation)", g_w, torch.autograd.grad(ref_loss, [weight])[0], rtol=2e-2
    )


def test_under_torch_compile():
    hidden, weight, b, labels = _make(seed=7)
    loss_fn = MaskedLMLoss(chunk_size=5)

    def step(h):
        return loss_fn(torch.tanh(h) * 2.0, weight, b, labels).loss_sum

    got = torch.compile(step, backend="eager")(hidden)
    ref_loss, _, _ = _reference(torch.tanh(hidden) * 2.0, weight, b, labels)
    _assert_close("loss_sum (compiled caller)", got.detach(), ref_loss.detach())


def test_loss_pickles():
    import pickle

    loss_fn = MaskedLMLoss(chunk_size=8, accum_dtype=torch.bfloat16)
    clone = pickle.loads(pickle.dumps(loss_fn))  # it rides inside the model across the Ray boundary
    assert (clone.chunk_size, clone.accum_dtype) == (8, torch.bfloat16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"labels_value": 48}, r"token id in \[0, 48\)"),
        ({"labels_value": -5}, r"found -5"),
        ({"vv": 49}, r"valid_vocab_size must be an int in \[1, 48\]"),
        ({"labels_shape": 10}, r"labels must be \(T,\)"),
    ],
)
def test_bad_input_errors(kwargs, match):
    hidden, weight, b, labels = _make()
    if "labels_value" in kwargs:
        labels[0] = kwargs["labels_value"]
    if "labels_shape" in kwargs:
        labels = labels[: kwargs["labels_shape"]]
    with pytest.raises(ValueError, match=match):
        _loss(hidden, weight, b, labels, valid_vocab_size=kwargs.get("vv"))


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="chunk_size"):
        MaskedLMLoss(chunk_size=0)
    with pytest.raises(ValueError, match="accum_dtype must be a floating dtype"):
        MaskedLMLoss(accum_dtype=torch.int64)


def test_bench_main_cpu_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_loss", Path(__file__).parents[3] / "bench" / "loss.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    main = bench.main

    out = tmp_path / "loss_bench.json"
    report = main(
        ["--device", "cpu", "--tokens", "512", "--hidden", "32", "--vocab", "250", "--chunk-sizes", "16,40"]
        + ["--iters", "1", "--warmup", "0", "--out", str(out)]
    )
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    names = [r["name"] for r in data["results"]]
    assert names[:2] == ["full_logits", "masked_logits"] and "chunked_c16" in names and "chunked_c40" in names
    for r in data["results"]:
        assert r["time_ms"] > 0 and r["num_masked"] == data["results"][0]["num_masked"]
        assert r["loss_rel_err"] < 1e-2 and r["grad_weight_rel_err"] < 5e-2, r


def test_pre_gathered_rows_skip_the_gather_and_are_checked() -> None:
    """`masked=` hands the loss the already-gathered (M, D) rows: same result as the (T, D) call, and a
    mismatch between rows and MaskedRows is refused with the fix."""
    torch.manual_seed(0)
    T, D, V = 40, 16, 50
    hidden = torch.randn(T, D)
    w, b = torch.randn(V, D), torch.randn(V)
    labels = torch.full((T,), -100)
    labels[::4] = torch.randint(0, V, (10,))
    fn = MaskedLMLoss(chunk_size=4)
    ref = fn(hidden, w, b, labels)
    masked = fn.gather_masked(labels, None, V)
    assert masked.count == 10 and masked.idx.tolist() == list(range(0, T, 4))
    got = fn(hidden[masked.idx], w, b, masked.target, masked=masked)
    assert torch.allclose(got.loss_sum, ref.loss_sum) and int(got.num_correct) == int(ref.num_correct)
    with pytest.raises(ValueError, match="masked rows"):
        fn(hidden, w, b, masked.target, masked=masked)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        fn.gather_masked(torch.tensor([-100, 50]), None, V)
    with pytest.raises(ValueError, match="integer tensor"):
        fn.gather_masked(torch.tensor([-100.0, 5.0]), None, V)
