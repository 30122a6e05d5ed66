"""FFN backend resolution (neobert/kernels/ffn.py) on CPU; quack vs torch numerics run on the GPU (test_model_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neobert.kernels.ffn import build_ffn, resolve_ffn_backend, swiglu_quack, swiglu_torch
from neobert.model import NeoBERT, NeoBERTConfig


def test_resolution_rules() -> None:
    assert resolve_ffn_backend("torch", quack_available=True) == "torch"
    assert resolve_ffn_backend("auto", quack_available=True) == "quack"
    assert resolve_ffn_backend("auto", quack_available=False) == "torch"
    assert resolve_ffn_backend("quack", quack_available=True) == "quack"
    with pytest.raises(ValueError, match="quack-kernels"):
        resolve_ffn_backend("quack", quack_available=False)
    with pytest.raises(ValueError, match="choose 'auto' or one of"):
        resolve_ffn_backend("liger")
    with pytest.raises(ValueError, match="ffn_backend='cutlass'"):
        NeoBERTConfig(ffn_backend="cutlass")


def test_cpu_model_uses_torch_ffn() -> None:
    enc = NeoBERT(NeoBERTConfig.preset("tiny"))
    assert enc.ffn_backend == ("quack" if build_ffn("auto")[0] == "quack" else "torch")
    if not torch.cuda.is_available():
        assert enc.ffn_backend == "torch" and enc.layers[0].ffn_fn is swiglu_torch


def test_swiglu_matches_definition_and_quack_falls_back_on_cpu_tensors() -> None:
    torch.manual_seed(0)
    D, F_ = 16, 24
    w_in, w_out = nn.Linear(D, 2 * F_, bias=False), nn.Linear(F_, D, bias=False)
    x = torch.randn(5, D)
    gate, up = x @ w_in.weight[:F_].T, x @ w_in.weight[F_:].T  # rows [W_gate; W_up]
    expected = (torch.nn.functional.silu(gate) * up) @ w_out.weight.T
    torch.testing.assert_close(swiglu_torch(x, w_in, w_out), expected)
    torch.testing.assert_close(swiglu_quack(x, w_in, w_out), expected)  # CPU tensors: the torch path


def test_missing_nvmmh_is_guarded_so_imports_fail_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """quack asks nvMatmulHeuristics for a config on every plain GEMM; when it is missing the guard turns the
    repeated sys.path search into an immediate ModuleNotFoundError, and leaves an importable module alone."""
    import sys

    import neobert.kernels.ffn as ffn

    name = "neobert_test_missing_nvmmh"  # a module that does not exist anywhere
    monkeypatch.setattr(ffn, "NVMMH_MODULE", name)
    monkeypatch.delitem(sys.modules, name, raising=False)
    assert ffn.nvmmh_state() == "missing"
    assert ffn.guard_missing_nvmmh() is True
    assert sys.modules[name] is None and ffn.nvmmh_state() == "guarded"
    with pytest.raises(ModuleNotFoundError):
        __import__(name)  # answered from sys.modules: no search of sys.path
    assert ffn.guard_missing_nvmmh() is False  # already guarded: nothing to do
    del sys.modules[name]  # (not through monkeypatch, which would put the None back at teardown)

    monkeypatch.setattr(ffn, "NVMMH_MODULE", "json")  # an importable module is never shadowed
    assert ffn.guard_missing_nvmmh() is False
    assert ffn.nvmmh_state() == "installed"
    import json

    assert json.dumps([1]) == "[1]"


def test_build_ffn_guards_nvmmh_only_for_quack(monkeypatch: pytest.MonkeyPatch) -> None:
    import neobert.kernels.ffn as ffn

    calls = []
    monkeypatch.setattr(ffn, "guard_missing_nvmmh", lambda: calls.append(1) or True)
    monkeypatch.setattr(ffn, "have_quack", lambda: True)
    assert ffn.build_ffn("torch")[0] == "torch" and not calls
    assert ffn.build_ffn("quack")[0] == "quack" and calls == [1]
    monkeypatch.setattr(ffn, "GUARD_MISSING_NVMMH", False)
    assert ffn.build_ffn("quack")[0] == "quack" and calls == [1]


@pytest.mark.parametrize("autotune", [False, True])
def test_ffn_variants_per_path(monkeypatch: pytest.MonkeyPatch, autotune: bool) -> None:
    """With quack chosen: every token of a packed stream goes through quack (autotuned with ffn_autotune), the
    sparse last layer's masked rows through the torch FFN (quack is slower there and would re-tune for every
    row count), and padded batches through quack's heuristic configs (their shapes vary: never autotuned)."""
    import neobert.kernels as kernels_mod
    import neobert.kernels.ffn as ffn
    from neobert.packing import PackedMeta

    monkeypatch.setattr(ffn, "have_quack", lambda: True)
    monkeypatch.setattr(ffn, "guard_missing_nvmmh", lambda: False)
    calls: list[str] = []

    def spy(name):
        def wrapped(x, w_in, w_out):
            calls.append(f"{name}:{x.reshape(-1, x.shape[-1]).shape[0]}")
            return swiglu_torch(x, w_in, w_out)

        return wrapped

    def fake_ffn_fn(name, *, autotune=False):
        return spy(name + ("-tuned" if autotune else ""))

    monkeypatch.setattr(ffn, "swiglu_ffn_fn", fake_ffn_fn)
    monkeypatch.setattr(kernels_mod, "swiglu_ffn_fn", fake_ffn_fn)
    monkeypatch.setattr(kernels_mod, "swiglu_torch", spy("torch"))
    cfg = NeoBERTConfig.preset("tiny", ffn_backend="quack", ffn_autotune=autotune)
    enc = NeoBERT(cfg)
    assert enc.ffn_backend == "quack"
    packed = "quack-tuned" if autotune else "quack"
    ids = torch.randint(5, cfg.vocab_size, (12,))
    meta = PackedMeta.from_lengths([5, 7])
    enc(ids, meta, output_rows=torch.tensor([1, 4, 9]))
    assert calls == [f"{packed}:12", "torch:3"]  # block 0 on every token, the last block on 3 rows
    calls.clear()
    enc(ids, meta)
    assert calls == [f"{packed}:12", f"{packed}:12"]  # no rows: the last block runs every token too
    calls.clear()
    enc.forward_padded(ids.view(2, 6), torch.ones(2, 6, dtype=torch.long))
    assert calls == ["quack:12", "quack:12"]  # padded: heuristic configs, never autotuned


def test_ffn_autotune_must_be_bool_and_warns_where_it_does_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="ffn_autotune"):
        NeoBERTConfig.preset("tiny", ffn_autotune="yes")
    with caplog.at_level("WARNING", logger="neobert.kernels"):
        enc = NeoBERT(NeoBERTConfig.preset("tiny", ffn_autotune=True))  # CPU: the torch FFN
    assert enc.ffn_backend == "torch" and enc.layers[0].packed_ffn_fn is swiglu_torch
    assert "ffn_autotune=True has no effect" in caplog.text


def test_ffn_fn_lookup() -> None:
    from neobert.kernels.ffn import swiglu_ffn_fn, swiglu_quack_tuned

    assert swiglu_ffn_fn("quack") is swiglu_quack
    assert swiglu_ffn_fn("quack", autotune=True) is swiglu_quack_tuned
    assert swiglu_ffn_fn("torch", autotune=True) is swiglu_torch
    with pytest.raises(ValueError, match="unknown ffn backend"):
        swiglu_ffn_fn("cublas")


@pytest.mark.parametrize("fn_name, tuned", [("swiglu_quack", False), ("swiglu_quack_tuned", True)])
def test_quack_call_passes_tuned_and_concat_layout(
    monkeypatch: pytest.MonkeyPatch, fn_name: str, tuned: bool
):
    """What reaches quack.mlp.mlp_func: a fake module stands in for quack, a tensor subclass for a CUDA tensor."""
    import sys
    import types

    import neobert.kernels.ffn as ffn

    seen = {}

    def mlp_func(x, w1, w2, **kw):
        seen.update(kw, x_shape=tuple(x.shape), w1=w1, w2=w2)
        return torch.zeros(x.shape[0], w2.shape[0], dtype=x.dtype)

    fake = types.ModuleType("quack.mlp")
    fake.mlp_func = mlp_func
    monkeypatch.setitem(sys.modules, "quack", types.ModuleType("quack"))
    monkeypatch.setitem(sys.modules, "quack.mlp", fake)

    class LooksCuda(torch.Tensor):
        @property
        def is_cuda(self):  # only the dispatch check in swiglu_quack reads it
            return True

    w_in, w_out = nn.Linear(64, 64, bias=False), nn.Linear(32, 64, bias=False)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16).as_subclass(LooksCuda)
    out = getattr(ffn, fn_name)(x, w_in, w_out)
    assert seen["tuned"] is tuned and seen["concat_layout"] is True and seen["activation"] == "swiglu"
    assert seen["x_shape"] == (6, 64) and seen["w1"] is w_in.weight and seen["w2"] is w_out.weight
    assert tuple(out.shape) == (2, 3, 64)
