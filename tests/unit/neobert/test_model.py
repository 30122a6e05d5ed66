"""NeoBERT on CPU: config/presets, fixed state-dict layout, packed == padded parity (values and gradients),
position resets, metadata errors at forward, pad-row independence, MLM loss vs a naive reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neobert import NeoBERT, NeoBERTConfig, NeoBERTForMLM, PackedMeta
from neobert.model import RMSNorm, apply_rope

TOL = 1e-5  # fp32 parity tolerance (max abs diff)
LENGTHS = [5, 3, 7, 1, 12]


@pytest.fixture(scope="module")
def cfg() -> NeoBERTConfig:
    return NeoBERTConfig.preset("tiny", attn_backend="sdpa")


@pytest.fixture(scope="module")
def model(cfg: NeoBERTConfig) -> NeoBERT:
    torch.manual_seed(0)
    return NeoBERT(cfg).eval()


def ids_for(cfg: NeoBERTConfig, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1000, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def test_base_preset_is_neobert_250m() -> None:
    cfg = NeoBERTConfig.preset("base")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (768, 28, 12, 64)
    assert (cfg.intermediate_size, cfg.ffn_hidden_size) == (3072, 2048)
    assert (cfg.vocab_size, cfg.padded_vocab_size, cfg.rms_norm_eps, cfg.rope_theta) == (
        30522,
        30592,
        1e-5,
        1e4,
    )
    assert cfg.tie_word_embeddings is False and cfg.attn_backend == "auto"
    with torch.device("meta"):
        n = sum(p.numel() for p in NeoBERTForMLM(cfg).parameters())
    assert 240e6 < n < 260e6, n
    assert NeoBERTConfig(pad_vocab_to_multiple=0).padded_vocab_size == 30522


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(hidden_size=100, num_heads=12),
        dict(num_layers=0),
        dict(attn_backend="xformers"),
        dict(pad_token_id=-1),
    ],
)
def test_config_validation(kwargs) -> None:
    with pytest.raises(ValueError):
        NeoBERTConfig(**kwargs)
    with pytest.raises(ValueError, match="tiny"):
        NeoBERTConfig.preset("huge")


def test_state_dict_layout(cfg: NeoBERTConfig) -> None:
    D, F_, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.padded_vocab_size
    sd = NeoBERTForMLM(cfg).state_dict()
    expected = {"encoder.embeddings.weight": (V, D), "encoder.final_norm.weight": (D,)}
    expected |= {"decoder.weight": (V, D), "decoder.bias": (V,)}
    for i in range(cfg.num_layers):
        p = f"encoder.layers.{i}."
        expected |= {
            p + "attn_norm.weight": (D,),
            p + "qkv.weight": (3 * D, D),
            p + "out_proj.weight": (D, D),
            p + "ffn_norm.weight": (D,),
            p + "w_in.weight": (2 * F_, D),
            p + "w_out.weight": (D, F_),
        }
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_cuda_backend_on_cpu_fails_at_construction() -> None:
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(ValueError, match="sdpa"):
        NeoBERT(NeoBERTConfig.preset("tiny", attn_backend="torch_varlen"))
    assert NeoBERT(NeoBERTConfig.preset("tiny")).attn_backend == "sdpa"  # auto on CPU


def test_packed_equals_each_document_alone(cfg: NeoBERTConfig, model: NeoBERT) -> None:
    ids = ids_for(cfg, sum(LENGTHS))
    with torch.no_grad():
        packed = model(ids, PackedMeta.from_lengths(LENGTHS))
        alone, o = [], 0
        for n in LENGTHS:
            alone.append(model.forward_padded(ids[o : o + n][None], torch.ones(1, n, dtype=torch.long))[0])
            o += n
    diff = (packed - torch.cat(alone)).abs().max().item()
    print(f"packed vs per-document padded: max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_equals_padded_batch(cfg: NeoBERTConfig, model: NeoBERT, side: str) -> None:
    ids = ids_for(cfg, sum(LENGTHS))
    S = max(LENGTHS)
    batch = torch.zeros(len(LENGTHS), S, dtype=torch.long)
    mask = torch.zeros_like(batch)
    o = 0
    for b, n in enumerate(LENGTHS):
        sl = slice(0, n) if side == "right" else slice(S - n, S)
        batch[b, sl], mask[b, sl] = ids[o : o + n], 1
        o += n
    with torch.no_grad():
        packed = model(ids, PackedMeta.from_lengths(LENGTHS))
        padded = model.forward_padded(batch, mask)[mask.bool()]
    diff = (packed - padded).abs().max().item()
    print(f"packed vs {side}-padded batch: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_gradients_packed_equal_unpacked(cfg: NeoBERTConfig) -> None:
    torch.manual_seed(0)
    model = NeoBERT(cfg)
    ids = ids_for(cfg, sum(LENGTHS))
    w = torch.randn(sum(LENGTHS), cfg.hidden_size)
    (model(ids, PackedMeta.from_lengths(LENGTHS)) * w).sum().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    o = 0
    for n in LENGTHS:  # one document at a time, gradients accumulate
        h = model(ids[o : o + n], PackedMeta.from_lengths([n]))
        (h * w[o : o + n]).sum().backward()
        o += n
    # fp32 gradients are sums over many tokens in a different order: compare relative to each grad's scale
    worst = max(
        ((g_packed[n] - p.grad).abs().max().item() / p.grad.abs().max().item(), n)
        for n, p in model.named_parameters()
        if p.grad.abs().max() > 0
    )
    print(f"grad parity packed vs unpacked: max abs diff / max abs grad {worst[0]:.2e} ({worst[1]})")
    assert worst[0] <= TOL


def test_positions_restart_per_document(cfg: NeoBERTConfig, model: NeoBERT) -> None:
    """A document's output depends on its positions (RoPE): packing it after another document with restarted
    positions gives its stand-alone output; continuing positions would not (and are rejected)."""
    ids = ids_for(cfg, 10)
    meta = PackedMeta.from_lengths([4, 6])
    with torch.no_grad():
        packed = model(ids, meta)[4:]
        alone = model(ids[4:], PackedMeta.from_lengths([6]))
        shifted = PackedMeta(meta.cu_seqlens, meta.max_seqlen, torch.arange(10, dtype=torch.int32))
        from neobert.packing import validate_packed_meta

        with pytest.raises(ValueError, match="restart at 0"):
            validate_packed_meta(shifted, 10)
        # RoPE is relative (a uniform shift changes nothing), so compare against "no positions" instead
        moved = model.layers[0](
            model.embeddings(ids[4:]),
            *model.rotary(torch.zeros(6, dtype=torch.long)),
            PackedMeta.from_lengths([6]),
        )
        same = model.layers[0](
            model.embeddings(ids[4:]), *model.rotary(torch.arange(6)), PackedMeta.from_lengths([6])
        )
    assert (packed - alone).abs().max() <= TOL
    assert (moved - same).abs().max() > 1e-4  # positions matter, so the parity above can fail


@pytest.mark.parametrize(
    ("cu", "max_seqlen", "message"),
    [
        (torch.tensor([0, 5, 8]), 5, "int32"),
        (torch.tensor([1, 5, 8], dtype=torch.int32), 5, "start at 0"),
        (torch.tensor([0, 5, 7], dtype=torch.int32), 5, "end at T"),
        (torch.tensor([0, 5, 5, 8], dtype=torch.int32), 5, "strictly increasing"),
    ],
)
def test_forward_rejects_bad_metadata(cfg, model, cu, max_seqlen, message) -> None:
    pos = torch.cat([torch.arange(5), torch.arange(3)])
    with pytest.raises(ValueError, match=message):
        model(ids_for(cfg, 8), PackedMeta(cu, max_seqlen, pos))


def test_document_longer_than_max_position_embeddings(cfg, model) -> None:
    n = cfg.max_position_embeddings + 1
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(ids_for(cfg, n), PackedMeta.from_lengths([n]))
    # a loose static bound above the limit is fine when every document fits
    meta = PackedMeta.from_lengths([5, 3])._replace(max_seqlen=10 * cfg.max_position_embeddings)
    assert model(ids_for(cfg, 8), meta).shape == (8, cfg.hidden_size)


def test_forward_shape_errors(cfg, model) -> None:
    with pytest.raises(ValueError, match="forward_padded"):
        model(ids_for(cfg, 8).view(2, 4), PackedMeta.from_lengths([8]))
    with pytest.raises(ValueError, match="no tokens"):
        model.forward_padded(ids_for(cfg, 8).view(2, 4), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]))


def test_pad_row_is_irrelevant(cfg: NeoBERTConfig) -> None:
    torch.manual_seed(0)
    model = NeoBERT(cfg)
    assert model.embeddings.weight[cfg.pad_token_id].abs().sum() == 0
    ids = torch.tensor([[2000, 2001, 2002, 0, 0], [3000, 3001, 3002, 3003, 3004]])
    mask = (ids != 0).long()
    with torch.no_grad():
        a = model.forward_padded(ids, mask)
        model.embeddings.weight[cfg.pad_token_id].normal_(std=5.0)
        b = model.forward_padded(ids, mask)
    assert (a[mask.bool()] - b[mask.bool()]).abs().max() <= TOL


def test_rmsnorm_and_rope_conventions() -> None:
    x = torch.randn(3, 8, dtype=torch.float64)
    norm = RMSNorm(8, 1e-5).double()
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.allclose(norm(x), ref)
    # half-split RoPE: pair (i, i + H/2) rotated by pos * theta^(-2i/H)
    H, pos = 8, 3
    q = torch.randn(1, 1, H, dtype=torch.float64)
    inv = 10000.0 ** (-torch.arange(0, H, 2, dtype=torch.float64) / H)
    ang = pos * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()])[None], torch.cat([ang.sin(), ang.sin()])[None]
    got = apply_rope(q, cos, sin)[0, 0]
    a, b = q[0, 0, : H // 2], q[0, 0, H // 2 :]
    expected = torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()])
    assert torch.allclose(got, expected)


def test_mlm_loss_matches_naive_and_padded(cfg: NeoBERTConfig) -> None:
    torch.manual_seed(0)
    mlm = NeoBERTForMLM(cfg)
    ids = ids_for(cfg, sum(LENGTHS))
    labels = torch.full_like(ids, -100)
    labels[::3] = ids[::3]
    out = mlm(ids, PackedMeta.from_lengths(LENGTHS), labels)
    hidden = mlm.encoder(ids, PackedMeta.from_lengths(LENGTHS))
    logits = mlm.logits(hidden)
    assert logits.shape == (sum(LENGTHS), cfg.vocab_size)
    ref = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    print(f"MLM loss vs naive cross-entropy: abs diff {(out.loss_sum - ref).abs().item():.2e}")
    assert torch.allclose(out.loss_sum, ref, atol=1e-4) and int(out.num_masked) == int((labels != -100).sum())
    # padded path, same documents
    S = max(LENGTHS)
    b_ids = torch.zeros(len(LENGTHS), S, dtype=torch.long)
    b_lab = torch.full_like(b_ids, -100)
    mask = torch.zeros_like(b_ids)
    o = 0
    for b, n in enumerate(LENGTHS):
        b_ids[b, :n], b_lab[b, :n], mask[b, :n] = ids[o : o + n], labels[o : o + n], 1
        o += n
    padded = mlm.forward_padded(b_ids, mask, b_lab)
    assert torch.allclose(padded.loss_sum, out.loss_sum, atol=1e-4)


def test_tied_embeddings(cfg: NeoBERTConfig) -> None:
    mlm = NeoBERTForMLM(NeoBERTConfig(**{**cfg.to_dict(), "tie_word_embeddings": True}))
    assert mlm.decoder.weight is mlm.encoder.embeddings.weight


def test_fp32_residual_switch(cfg: NeoBERTConfig) -> None:
    """fp32_residual=False keeps the residual stream in the autocast dtype; without autocast it changes nothing."""
    torch.manual_seed(0)
    a = NeoBERT(cfg)
    b = NeoBERT(NeoBERTConfig(**{**cfg.to_dict(), "fp32_residual": False}))
    b.load_state_dict(a.state_dict())
    ids, meta = ids_for(cfg, 15), PackedMeta.from_lengths([8, 7])
    with torch.no_grad():
        assert torch.equal(a(ids, meta), b(ids, meta))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ha, hb = a(ids, meta), b(ids, meta)
    assert (ha.dtype, hb.dtype) == (torch.float32, torch.bfloat16)
    assert ((hb.float() - ha).norm() / ha.norm()).item() < 5e-2


@pytest.mark.parametrize("every", [3, 1, 0])  # some tokens masked, all masked, none masked
def test_sparse_last_layer_equals_dense(cfg: NeoBERTConfig, every: int) -> None:
    """NeoBERTForMLM's default packed forward runs the last layer's out_proj/FFN on the masked rows only;
    loss, counts and every parameter gradient must equal the dense path (fp32, same weights)."""
    torch.manual_seed(0)
    dense = NeoBERTForMLM(cfg, sparse_last_layer=False)
    sparse = NeoBERTForMLM(cfg)
    sparse.load_state_dict(dense.state_dict())
    assert sparse.sparse_last_layer and not dense.sparse_last_layer
    ids = ids_for(cfg, sum(LENGTHS), seed=3)
    labels = torch.full_like(ids, -100)
    if every:
        labels[1::every] = ids[1::every]
    meta = PackedMeta.from_lengths(LENGTHS)
    outs = []
    for m in (dense, sparse):
        out = m(ids, meta, labels)
        out.loss_sum.backward()
        outs.append((out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (od, gd), (os_, gs) = outs
    assert int(od.num_masked) == int(os_.num_masked) == int((labels != -100).sum())
    assert int(od.num_correct) == int(os_.num_correct)
    assert (od.loss_sum - os_.loss_sum).abs().item() <= 1e-4
    assert gd.keys() == gs.keys()
    worst = max((g - gs[n]).abs().max().item() for n, g in gd.items())
    print(
        f"sparse vs dense last layer (every={every}): loss diff {(od.loss_sum - os_.loss_sum).abs().item():.2e}, max grad diff {worst:.2e}"
    )
    assert worst <= TOL


def test_output_rows_select_hidden_states(cfg: NeoBERTConfig, model: NeoBERT) -> None:
    ids = ids_for(cfg, sum(LENGTHS))
    meta = PackedMeta.from_lengths(LENGTHS)
    rows = torch.tensor([0, 4, 5, 20, 27])
    with torch.no_grad():
        full, part = model(ids, meta), model(ids, meta, output_rows=rows)
    assert part.shape == (5, cfg.hidden_size)
    assert (part - full[rows]).abs().max().item() <= TOL
    block, x = model.layers[0], torch.zeros(2, 4, cfg.hidden_size)
    cos, sin = model.rotary(torch.arange(4).expand(2, 4))
    with pytest.raises(ValueError, match="padded path"):
        block(x, cos, sin, torch.ones(2, 4, dtype=torch.bool), rows)


@pytest.mark.parametrize("sparse", [True, False])
def test_mlm_with_masked_rows_gathered_ahead_matches(sparse: bool) -> None:
    """forward(..., masked=model.masked_rows(labels)) (the trainer's sync-free path) == forward without it."""
    torch.manual_seed(0)
    model = NeoBERTForMLM(NeoBERTConfig.preset("tiny", attn_backend="sdpa"), sparse_last_layer=sparse)
    lengths = [9, 30, 1, 24]
    meta = PackedMeta.from_lengths(lengths)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 1000, (sum(lengths),), generator=g)
    labels = torch.where(torch.rand(sum(lengths), generator=g) < 0.3, ids, -100)
    res = []
    for ahead in (False, True):
        model.zero_grad(set_to_none=True)
        masked = model.masked_rows(labels) if ahead else None
        out = model(ids, meta, labels, masked=masked)
        out.loss_sum.backward()
        res.append((out.loss_sum.detach(), out.num_correct, model.encoder.layers[0].qkv.weight.grad.clone()))
    assert masked.count == int((labels != -100).sum()) > 0
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
    assert torch.equal(res[0][2], res[1][2])
    for wrong in (
        masked._replace(idx=masked.idx.to("meta")),  # another device
        masked._replace(count=sum(lengths) + 1),  # rows of another batch
        masked._replace(idx=masked.idx[:-1]),  # count and rows disagree
    ):
        with pytest.raises(ValueError, match="masked_rows"):
            model(ids, meta, labels, masked=wrong)
