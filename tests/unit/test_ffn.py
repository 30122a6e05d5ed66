"""FFN backend resolution (neobert/ffn.py) on CPU; quack vs torch numerics run on the GPU (test_model_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neobert.ffn import build_ffn, resolve_ffn_backend, swiglu_quack, swiglu_torch
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
