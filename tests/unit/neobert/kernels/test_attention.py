"""Attention backends: resolution (auto, forced, error paths) and the exact `sdpa` reference vs a naive loop."""

from __future__ import annotations

import logging

import pytest
import torch

from neobert.config import NeoBERTConfig
from neobert.kernels import attention
from neobert.kernels.attention import build_attention, force_backend, resolve_backend, sdpa_varlen
from neobert.packing import PackedMeta


@pytest.mark.parametrize(
    ("cuda", "f4", "fa", "tv", "expected"),
    [
        (True, True, True, True, "fa4"),
        (True, True, False, False, "fa4"),
        (True, False, True, True, "flash_attn"),
        (True, False, False, True, "torch_varlen"),
        (True, False, False, False, "sdpa"),
        (False, True, True, True, "sdpa"),
        (False, False, False, False, "sdpa"),
    ],
)
def test_auto_resolution(cuda: bool, f4: bool, fa: bool, tv: bool, expected: str) -> None:
    got = resolve_backend(
        "auto", cuda_available=cuda, fa4_available=f4, flash_attn_available=fa, torch_varlen_available=tv
    )
    assert got == expected


@pytest.mark.parametrize("name", ["fa4", "flash_attn", "torch_varlen"])
def test_cuda_backend_on_cpu_names_the_alternative(name: str) -> None:
    with pytest.raises(ValueError, match="attn_backend='sdpa'"):
        resolve_backend(
            name,
            cuda_available=False,
            fa4_available=True,
            flash_attn_available=True,
            torch_varlen_available=True,
        )


def test_missing_packages_name_the_fix() -> None:
    with pytest.raises(ValueError, match="pip install flash-attn-4"):
        resolve_backend("fa4", cuda_available=True, fa4_available=False)
    with pytest.raises(ValueError, match=r"pip install flash-attn\)"):
        resolve_backend("flash_attn", cuda_available=True, flash_attn_available=False)
    with pytest.raises(ValueError, match="torch >= 2.10"):
        resolve_backend("torch_varlen", cuda_available=True, torch_varlen_available=False)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("xformers")


def _fake_fa4_package(tmp_path, monkeypatch: pytest.MonkeyPatch, interface_src: str) -> None:
    """A `flash_attn/cute/` namespace package (no `flash_attn/__init__.py`, like the flash-attn-4 wheel) on
    sys.path, whose `interface` module runs `interface_src`; a Hopper GPU is faked and the import probe
    is not cached across tests."""
    import sys

    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    (tmp_path / "flash_attn" / "cute" / "interface.py").write_text(interface_src)
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(attention, "_fa4_imports", attention._fa4_imports.__wrapped__)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))


def test_fa4_namespace_alone_is_not_flash_attn_2(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flash-attn-4 wheel installs `flash_attn/cute/` without `flash_attn/__init__.py`: a namespace package.
    That must count as FA4 (when a Hopper GPU is present), never as the FA2 `flash_attn` backend whose
    `from flash_attn import flash_attn_varlen_func` would fail at the first forward."""
    _fake_fa4_package(tmp_path, monkeypatch, "")
    assert attention._has_module("flash_attn.cute")
    assert not attention.have_flash_attn()
    assert attention.have_fa4()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # A100: no FA4 backward
    assert not attention.have_fa4()


def test_fa4_ops_trace_with_fake_tensors() -> None:
    """The FA4 custom ops' fake kernels give torch.compile the right shapes without the package or a GPU:
    forward (T,N,H) -> out (T,N,H) + lse (N,T) fp32; backward -> dq, dk, dv like q, k, v."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(37, 4, 64, dtype=torch.bfloat16)
        kv = torch.empty(37, 3, 4, 64, dtype=torch.bfloat16)  # strided k, v views, as the model passes them
        k, v = kv[:, 1], kv[:, 2]
        cu = torch.tensor([0, 30, 37], dtype=torch.int32)
        out, lse = torch.ops.neobert.fa4_varlen_fwd(q, k, v, cu, 30, 0.125)
        assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
        assert lse.shape == (4, 37) and lse.dtype == torch.float32
        dq, dk, dv = torch.ops.neobert.fa4_varlen_bwd(out, q, k, v, out, lse, cu, 30, 0.125)
        assert dq.shape == dk.shape == dv.shape == q.shape and dk.is_contiguous()


def test_explicit_choice_is_kept() -> None:
    assert resolve_backend("sdpa", cuda_available=True, flash_attn_available=True) == "sdpa"
    assert resolve_backend("torch_varlen", cuda_available=True, torch_varlen_available=True) == "torch_varlen"


def test_force_backend_hook_overrides_auto_only() -> None:
    with force_backend("torch_varlen"):
        # auto -> forced name, and the forced name still passes the availability checks
        assert resolve_backend("auto", cuda_available=True, torch_varlen_available=True) == "torch_varlen"
        with pytest.raises(ValueError, match="sdpa"):
            resolve_backend("auto", cuda_available=False)
        assert resolve_backend("sdpa", cuda_available=True) == "sdpa"
    assert resolve_backend("auto", cuda_available=False) == "sdpa"  # restored
    with pytest.raises(ValueError), force_backend("nope"):
        pass


def test_resolve_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    import neobert.kernels as kernels_mod

    kernels_mod._logged.clear()
    cfg = NeoBERTConfig.preset("tiny", attn_backend="sdpa", ffn_backend="torch")
    with caplog.at_level(logging.INFO, logger="neobert.kernels"):
        for _ in range(3):
            k = kernels_mod.resolve(cfg)
    assert k.attn_backend == "sdpa" and k.attn_fn is sdpa_varlen and k.qkv_attn_fn is None
    assert build_attention("sdpa") == ("sdpa", sdpa_varlen)
    assert sum("attention backend: sdpa" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("fn", [attention._fa4, attention._torch_varlen, attention._flash_attn])
def test_cuda_kernels_reject_cpu_tensors(fn) -> None:
    if fn is attention._flash_attn and not attention.have_flash_attn():
        pytest.skip("flash-attn not installed (its import comes first)")
    q = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="attn_backend='sdpa'"):
        fn(q, q, q, PackedMeta.from_lengths([4]), 0.5)


def naive_varlen(q, k, v, lengths, scale):
    """Reference: one explicit softmax(QK^T)V per document (Python loop)."""
    out, o = [], 0
    for n in lengths:
        qs, ks, vs = (t[o : o + n].transpose(0, 1) for t in (q, k, v))  # (N, n, H)
        p = torch.softmax(qs @ ks.transpose(-1, -2) * scale, dim=-1)
        out.append((p @ vs).transpose(0, 1))
        o += n
    return torch.cat(out)


@pytest.mark.parametrize("bound", [None, 64])
def test_sdpa_varlen_matches_naive_per_document(bound: int | None) -> None:
    torch.manual_seed(0)
    lengths = [1, 9, 4, 17, 2]
    meta = PackedMeta.from_lengths(lengths)
    if bound:
        meta = meta._replace(max_seqlen=bound)  # a static upper bound must not change the result
    T, N, H = sum(lengths), 3, 8
    q, k, v = (torch.randn(T, N, H, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.randn(T, N, H, dtype=torch.float64)
    got = sdpa_varlen(q, k, v, meta, H**-0.5)
    grads = torch.autograd.grad(got, (q, k, v), g)
    ref = naive_varlen(q, k, v, lengths, H**-0.5)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    diff = (got - ref).abs().max().item()
    gdiff = max((a - b).abs().max().item() for a, b in zip(grads, ref_grads, strict=True))
    print(f"sdpa_varlen vs naive: max abs diff out {diff:.2e}, grads {gdiff:.2e}")
    assert diff <= 1e-10 and gdiff <= 1e-10


def test_sdpa_varlen_keeps_documents_apart() -> None:
    """Changing document 2 must not change the output of documents 1 and 3."""
    torch.manual_seed(0)
    lengths = [5, 6, 7]
    meta = PackedMeta.from_lengths(lengths)
    q, k, v = (torch.randn(18, 2, 4) for _ in range(3))
    a = sdpa_varlen(q, k, v, meta, 0.5)
    k2, v2 = k.clone(), v.clone()
    k2[5:11] += 3.0
    v2[5:11] -= 2.0
    b = sdpa_varlen(q, k2, v2, meta, 0.5)
    assert torch.equal(a[:5], b[:5]) and torch.equal(a[11:], b[11:])
    assert not torch.allclose(a[5:11], b[5:11])


def test_fa4_that_does_not_import_is_not_available(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files present but the package failing to import (e.g. a CuTe runtime that does not load) -> `auto` must
    not pick fa4; and explicit non-FA4 requests never probe FA4 (which would initialize CUDA)."""
    _fake_fa4_package(tmp_path, monkeypatch, "raise OSError('libcute_dsl_runtime.so')")
    assert not attention.have_fa4()
    assert resolve_backend("auto", cuda_available=True, torch_varlen_available=True) == "torch_varlen"

    def boom(*a):
        raise AssertionError("FA4 probed for an explicit non-FA4 backend")

    monkeypatch.setattr(attention, "have_fa4", boom)
    assert resolve_backend("sdpa", cuda_available=True) == "sdpa"
    assert resolve_backend("torch_varlen", cuda_available=True, torch_varlen_available=True) == "torch_varlen"
