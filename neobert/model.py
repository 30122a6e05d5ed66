"""NeoBERT: a BERT-style bidirectional encoder with the modern decoder-LM recipe, trained on packed documents.

What differs from BERT (Devlin et al. 2019):
  * RoPE (rotary position embeddings, half-split / GPT-NeoX layout over the full head dim, theta 10000) on q and
    k instead of learned absolute position embeddings; no token-type embeddings; positions restart per document.
  * SwiGLU feed-forward (`w_out(silu(x W_gate^T) * (x W_up^T))`, hidden int(2/3 * 4D) rounded up to 8) instead
    of a GELU MLP.
  * RMSNorm (computed in fp32) instead of LayerNorm, applied pre-norm on attention and FFN, plus a final norm.
  * No biases in the encoder, no dropout; the MLM decoder is a plain `Linear(D, vocab)` with bias (no transform
    layer), untied from the embeddings by default.
  * Deeper and narrower (base: 28 layers x 768), vocabulary rows padded to a multiple of 128 for tensor cores.
  * Trained on packed variable-length batches (no padding, per-document attention via varlen kernels) with
    20% masking (the masking itself lives in the data pipeline; the loss in `neobert.loss`).

Shape legend: T = packed tokens, B = batch, S = padded sequence length, D = hidden size, N = heads,
H = head dim, F = SwiGLU hidden size, V = (padded) vocabulary.

State-dict layout (fixed; `neobert/hf` exports against it), L = layer index:
  encoder.embeddings.weight (V_pad, D); encoder.layers.L.{attn_norm, ffn_norm}.weight (D);
  encoder.layers.L.qkv.weight (3D, D) = [Wq; Wk; Wv] head-major; encoder.layers.L.out_proj.weight (D, D);
  encoder.layers.L.w_in.weight (2F, D) = [W_gate; W_up]; encoder.layers.L.w_out.weight (D, F);
  encoder.final_norm.weight (D); decoder.weight (V_pad, D); decoder.bias (V_pad).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from neobert.attention import BACKENDS, build_attention, fused_rope_attention, padded_attention
from neobert.ffn import FFN_BACKENDS, build_ffn, swiglu_ffn_fn, swiglu_torch
from neobert.loss import MaskedLMLoss, MaskedRows
from neobert.packing import PackedMeta, validate_packed_meta

log = logging.getLogger(__name__)


@dataclass
class NeoBERTConfig:
    vocab_size: int = 30522  # real vocabulary (tokenizer size); logits are sliced to it
    hidden_size: int = 768  # D, model width
    num_layers: int = 28  # encoder blocks
    num_heads: int = 12  # N; head dim H = hidden_size / num_heads
    intermediate_size: int = 3072  # nominal 4D MLP width; SwiGLU uses int(2/3 of it) rounded up to 8
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    max_position_embeddings: int = 4096  # longest document (max_seqlen) the model accepts
    pad_vocab_to_multiple: int = 128  # pad embedding/decoder rows to a multiple of this (0 = off)
    tie_word_embeddings: bool = False  # share decoder.weight with encoder.embeddings.weight
    attn_backend: str = "auto"  # "auto" | "fa4" | "flash_attn" | "torch_varlen" | "sdpa" (attention.py)
    pad_token_id: int = 0  # [PAD]; its embedding row starts at zero and never receives gradient
    initializer_range: float = 0.02  # std of the normal init (output projections scaled by 1/sqrt(2L))
    fp32_residual: bool = True  # residual stream in fp32 under autocast; False = autocast dtype (~5% faster)
    ffn_backend: str = "auto"  # "auto" | "quack" | "torch": SwiGLU in GEMM epilogues or torch ops (ffn.py)
    # quack: autotune its GEMM tiles for the packed path's token count (once per shape and machine, ~90 s for
    # base, disk-cached; +3% tokens/s on an H100). Only with a static token budget per micro-batch (pretraining)
    ffn_autotune: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"NeoBERTConfig.{name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"NeoBERTConfig.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}; "
                f"choose e.g. num_heads={max(1, self.hidden_size // 64)} (head dim 64)"
            )
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got hidden_size/num_heads = {self.head_dim}")
        if self.pad_vocab_to_multiple < 0:
            raise ValueError(
                f"pad_vocab_to_multiple must be >= 0 (0 = off), got {self.pad_vocab_to_multiple}"
            )
        if not (0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(
                f"pad_token_id={self.pad_token_id} must lie in [0, vocab_size={self.vocab_size})"
            )
        if self.attn_backend != "auto" and self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend={self.attn_backend!r}; choose 'auto' or one of {BACKENDS}")
        if not isinstance(self.ffn_autotune, bool):
            raise ValueError(f"NeoBERTConfig.ffn_autotune must be true or false, got {self.ffn_autotune!r}")
        if self.ffn_backend != "auto" and self.ffn_backend not in FFN_BACKENDS:
            raise ValueError(f"ffn_backend={self.ffn_backend!r}; choose 'auto' or one of {FFN_BACKENDS}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0 or self.initializer_range <= 0:
            raise ValueError("rms_norm_eps, rope_theta and initializer_range must be > 0")
        if self.max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings must be >= 1, got {self.max_position_embeddings}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden_size(self) -> int:
        """SwiGLU width: int(2 * intermediate_size / 3) rounded up to a multiple of 8 (3072 -> 2048)."""
        return (int(2 * self.intermediate_size / 3) + 7) // 8 * 8

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to_multiple
        return self.vocab_size if m == 0 else (self.vocab_size + m - 1) // m * m

    @classmethod
    def preset(cls, name: str, **overrides) -> NeoBERTConfig:
        """Named sizes: "tiny" (CPU tests, ~2M params), "small" (~40M), "base" (NeoBERT, ~250M)."""
        if name not in PRESETS:
            raise ValueError(f"unknown NeoBERT preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64, num_layers=2, num_heads=4, intermediate_size=192, max_position_embeddings=1024
    ),
    "small": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_layers=28, num_heads=12, intermediate_size=3072),
}


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables (.., H) for given positions; computed once per forward and shared by all layers."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (H/2,)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)  # not in the state dict

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.float()[..., None] * self.inv_freq  # (.., H/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (.., H)
        return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation: x (.., N, H), cos/sin (.., H) broadcast over heads; fp32 math, input dtype out."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)).to(x.dtype)


class NeoBERTBlock(nn.Module):
    """Pre-norm block: x = x + attn(attn_norm(x)); x = x + ffn(ffn_norm(x)).

    Attributes are flat (qkv, out_proj, w_in, w_out) so the state-dict keys match the fixed export layout.
    """

    def __init__(
        self,
        cfg: NeoBERTConfig,
        attn_fn,
        qkv_attn_fn=None,
        ffn_fn=swiglu_torch,
        *,
        packed_ffn_fn=None,
        rows_ffn_fn=None,
    ) -> None:
        """`attn_fn` (q, k, v, meta, scale) is the packed attention; `qkv_attn_fn` (qkv, cos, sin, meta, scale),
        when the backend has one, replaces RoPE + `attn_fn` on the packed path (RoPE fused into the kernel op);
        `ffn_fn` (x, w_in, w_out) is the SwiGLU feed-forward (neobert/ffn.py). Two variants default to it:
        `packed_ffn_fn` on every token of a packed stream, `rows_ffn_fn` when `forward` gets `rows` (the sparse
        last layer's masked rows)."""
        super().__init__()
        D, F_ = cfg.hidden_size, cfg.ffn_hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.attn_fn = attn_fn
        self.qkv_attn_fn = qkv_attn_fn
        self.ffn_fn = ffn_fn
        self.packed_ffn_fn = ffn_fn if packed_ffn_fn is None else packed_ffn_fn
        self.rows_ffn_fn = ffn_fn if rows_ffn_fn is None else rows_ffn_fn
        self.attn_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.qkv = nn.Linear(D, 3 * D, bias=False)  # fused [Wq; Wk; Wv]: one GEMM instead of three
        self.out_proj = nn.Linear(D, D, bias=False)
        self.ffn_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.w_in = nn.Linear(D, 2 * F_, bias=False)
        self.w_out = nn.Linear(F_, D, bias=False)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        # x (.., D) -> qkv (.., 3, N, H), before RoPE
        return self.qkv(self.attn_norm(x)).unflatten(-1, (3, self.num_heads, self.head_dim))

    @staticmethod
    def _rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # qkv (.., 3, N, H) -> q, k, v (.., N, H) with RoPE on q and k
        q, k, v = qkv.unbind(-3)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _ffn(self, x: torch.Tensor, ffn_fn) -> torch.Tensor:
        return x + ffn_fn(self.ffn_norm(x), self.w_in, self.w_out)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: PackedMeta | torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed: x (T, D), cos/sin (T, H), layout = PackedMeta.
        Padded: x (B, S, D), cos/sin (B, S, H), layout = attention_mask (B, S) bool.
        One `forward` for both so that `compile_layers` covers both paths (one graph per layout).
        `rows` (M,) (packed only): every token still serves as a key/value, but only these rows continue
        after attention (out_proj, FFN), and the block returns (M, D): exact for those rows, ~70% of the
        block's work skipped for the others."""
        qkv = self._qkv(x)  # (T, 3, N, H) | (B, S, 3, N, H)
        ffn_fn = self.ffn_fn
        if isinstance(layout, PackedMeta):
            ffn_fn = self.packed_ffn_fn if rows is None else self.rows_ffn_fn
            if self.qkv_attn_fn is not None:
                attn = self.qkv_attn_fn(qkv, cos, sin, layout, self.scale)  # (T, N, H)
            else:
                attn = self.attn_fn(*self._rope(qkv, cos, sin), layout, self.scale)  # (T, N, H)
            if rows is not None:
                x, attn = x.index_select(0, rows), attn.index_select(0, rows)  # (M, D), (M, N, H)
        else:
            if rows is not None:
                raise ValueError(
                    "NeoBERTBlock: `rows` selects rows of a packed (T, D) stream; the padded path has none"
                )
            q, k, v = (t.transpose(1, 2) for t in self._rope(qkv, cos, sin))  # (B, N, S, H)
            attn = padded_attention(q, k, v, layout, self.scale).transpose(1, 2)  # (B, S, N, H)
        x = x + self.out_proj(attn.flatten(-2))
        return self._ffn(x, ffn_fn)


class NeoBERT(nn.Module):
    """The encoder. `forward(input_ids (T,), meta)` -> (T, D) packed; `forward_padded((B,S), (B,S))` -> (B,S,D)."""

    def __init__(self, cfg: NeoBERTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.attn_backend, attn_fn = build_attention(cfg.attn_backend)  # decided once, logged once
        self.embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        qkv_attn_fn = fused_rope_attention(self.attn_backend)  # fa4: RoPE inside the attention op
        self.ffn_backend, ffn_fn = build_ffn(cfg.ffn_backend)  # decided once, logged once
        # Packed tokens: with ffn_autotune, quack's GEMMs autotuned for the (static) token budget. The sparse last
        # layer's masked rows (~20% of T, a new count every step): the torch FFN, because quack is slower there
        # (13,107 rows on an H100: 2.00 vs 1.54 ms fwd+bwd) and an autotuned GEMM would tune again for each count.
        packed_ffn_fn = swiglu_ffn_fn(self.ffn_backend, autotune=cfg.ffn_autotune)
        if cfg.ffn_autotune and self.ffn_backend != "quack":
            log.warning(
                "ffn_autotune=True has no effect: the FFN backend here is %r (autotuning is quack's; it needs "
                "quack-kernels and a GPU of compute capability >= 9.0)",
                self.ffn_backend,
            )
        self.layers = nn.ModuleList(
            NeoBERTBlock(
                cfg, attn_fn, qkv_attn_fn, ffn_fn, packed_ffn_fn=packed_ffn_fn, rows_ffn_fn=swiglu_torch
            )
            for _ in range(cfg.num_layers)
        )
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.config
        std, out_std = cfg.initializer_range, cfg.initializer_range / math.sqrt(2 * cfg.num_layers)
        nn.init.normal_(self.embeddings.weight, std=std)
        self.embeddings.weight[cfg.pad_token_id].zero_()
        self.embeddings.weight[cfg.vocab_size :].zero_()  # padded rows: never indexed
        for layer in self.layers:
            nn.init.normal_(layer.qkv.weight, std=std)
            nn.init.normal_(layer.w_in.weight, std=std)
            # the two projections that write into the residual stream: std / sqrt(2 * num_layers)
            nn.init.normal_(layer.out_proj.weight, std=out_std)
            nn.init.normal_(layer.w_out.weight, std=out_std)
            layer.attn_norm.weight.fill_(1.0)
            layer.ffn_norm.weight.fill_(1.0)
        self.final_norm.weight.fill_(1.0)

    def compile_layers(self, **compile_kwargs) -> None:
        """torch.compile each block in place (fuses RMSNorm/RoPE/SwiGLU/residuals; attention stays an opaque
        kernel). Per-block compile keeps compile time flat in depth and the eager parts (embedding, checks,
        loss) free to use Python."""
        for layer in self.layers:
            layer.compile(**compile_kwargs)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)  # fp32 (the parameter dtype) even under autocast
        dev = x.device.type
        if not self.config.fp32_residual and torch.is_autocast_enabled(dev):
            x = x.to(torch.get_autocast_dtype(dev))  # the whole residual stream follows this dtype
        return x

    def forward(
        self, input_ids: torch.Tensor, meta: PackedMeta, output_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids (T,), meta: PackedMeta -> hidden (T, D). Value checks of `meta` run when it is on the CPU.

        `output_rows` (M,) int64: return only these rows' hidden states, (M, D) = `hidden[output_rows]`; the
        last layer then runs its out_proj/FFN on those rows only (all tokens are still attended to)."""
        if input_ids.ndim != 1:
            raise ValueError(
                f"packed forward takes input_ids of shape (T,), got {tuple(input_ids.shape)}; "
                f"use forward_padded(input_ids, attention_mask) for (B, S) batches"
            )
        if not torch.compiler.is_compiling():
            # max_seqlen may be a loose static bound, so the length limit is checked on the documents themselves
            # (with the other value checks, i.e. when the metadata is on the CPU)
            validate_packed_meta(meta, input_ids.shape[0], max_position=self.config.max_position_embeddings)
        x = self._embed(input_ids)  # (T, D)
        cos, sin = self.rotary(meta.position_ids)  # (T, H) each
        *body, last = self.layers
        for layer in body:
            x = layer(x, cos, sin, meta)
        if output_rows is None:
            return self.final_norm(last(x, cos, sin, meta))  # (T, D)
        # the number of rows changes every step: one symbolic size for torch.compile, not a graph per M
        # (M = 0 and M = 1 still get one specialized graph each, as any size 0/1 does)
        torch._dynamo.maybe_mark_dynamic(output_rows, 0)
        return self.final_norm(last(x, cos, sin, meta, output_rows))  # (M, D)

    def forward_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids (B, S), attention_mask (B, S) with 1 = token, 0 = padding -> hidden (B, S, D).

        SDPA with a key-padding mask; RoPE positions count real tokens (so left or right padding both work).
        Hidden states at padding positions are computed but meaningless. A row without any token is an error
        (checked when the mask is on the CPU; on the GPU the check would sync, so it is skipped).
        """
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"forward_padded takes input_ids and attention_mask of the same shape (B, S), got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        if attention_mask.device.type == "cpu" and not torch.compiler.is_compiling():  # no GPU sync
            empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
            if empty:
                raise ValueError(
                    f"attention_mask rows {empty[:8]} have no tokens (their attention is undefined); "
                    f"drop empty sequences from the batch"
                )
        mask = attention_mask.bool()
        position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, S)
        x = self._embed(input_ids)  # (B, S, D)
        cos, sin = self.rotary(position_ids)  # (B, S, H)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.final_norm(x)


class NeoBERTForMLM(nn.Module):
    """Encoder + vocabulary projection + chunked masked-LM loss (`neobert.loss.MaskedLMLoss`)."""

    def __init__(
        self,
        cfg: NeoBERTConfig,
        loss_chunk_size: int = 2048,
        loss_backend: str = "auto",
        sparse_last_layer: bool = True,
    ) -> None:
        """`sparse_last_layer`: in the packed `forward`, run the last layer's out_proj/FFN (and the final norm)
        on the masked tokens only, the only rows the loss reads. Same loss and gradients (tested against the
        dense path); ~2% faster for `base` at 20% masking. The padded path is always dense."""
        super().__init__()
        self.sparse_last_layer = sparse_last_layer
        self.config = cfg
        self.encoder = NeoBERT(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=True)
        if cfg.tie_word_embeddings:
            self.decoder.weight = self.encoder.embeddings.weight
        else:
            nn.init.normal_(self.decoder.weight, std=cfg.initializer_range)
        nn.init.zeros_(self.decoder.bias)
        self.loss_fn = MaskedLMLoss(chunk_size=loss_chunk_size, backend=loss_backend)

    @property
    def attn_backend(self) -> str:
        return self.encoder.attn_backend

    def masked_rows(self, labels: torch.Tensor) -> MaskedRows:
        """The masked positions and targets of labels (T,) for `forward(..., masked=)`. Call it on the CPU labels
        before the batch goes to the GPU (then `.to(device, non_blocking=True)`): the count is read on the host
        for free there, so the training step has no host sync at all. Raises ValueError for a bad label."""
        return self.loss_fn.gather_masked(labels, self.config.vocab_size, self.decoder.weight.shape[0])

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: PackedMeta,
        labels: torch.Tensor,
        masked: MaskedRows | None = None,
    ):
        """input_ids (T,), meta, labels (T,) with -100 at unmasked tokens -> MLMLossOutput (summed loss).

        `masked`: `self.masked_rows(labels)`, computed ahead (on the CPU, see there) and on the input device;
        without it the masked positions are gathered here, with one host sync."""
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
        if masked is not None and (
            masked.idx.device != input_ids.device
            or masked.count > input_ids.shape[0]
            or masked.idx.shape[0] != masked.count
        ):
            raise ValueError(
                f"masked rows ({masked.count} rows on {masked.idx.device}) do not belong to this batch of "
                f"{input_ids.shape[0]} tokens on {input_ids.device}; pass "
                f"model.masked_rows(labels_cpu).to(device, non_blocking=True) for the same labels"
            )
        if labels.ndim != 1:
            hidden = self.encoder(input_ids, meta)  # (T, D)
            return self._loss(hidden, labels)
        if masked is None:
            masked = self.masked_rows(labels)  # the one host sync (M is read)
        if self.sparse_last_layer:
            hidden_MD = self.encoder(input_ids, meta, output_rows=masked.idx)  # (M, D)
        else:
            hidden_MD = self.encoder(input_ids, meta).index_select(0, masked.idx)  # (M, D)
        return self.loss_fn(
            hidden_MD,
            self.decoder.weight,
            self.decoder.bias,
            masked.target,
            valid_vocab_size=self.config.vocab_size,
            masked=masked,
        )

    def forward_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        """input_ids/attention_mask/labels (B, S) -> MLMLossOutput; labels must be -100 at padding."""
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
        hidden = self.encoder.forward_padded(input_ids, attention_mask)  # (B, S, D)
        return self._loss(hidden.flatten(0, 1), labels.flatten())

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor):
        return self.loss_fn(
            hidden, self.decoder.weight, self.decoder.bias, labels, valid_vocab_size=self.config.vocab_size
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (.., D) -> logits (.., vocab_size): padded vocabulary columns sliced off."""
        return self.decoder(hidden)[..., : self.config.vocab_size]
