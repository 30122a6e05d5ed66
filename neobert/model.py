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

The configuration (`NeoBERTConfig`, presets) is in `neobert.config`; the compute kernels each block runs
(attention backend, fused RoPE, SwiGLU implementation) are chosen once by `neobert.kernels.resolve`.

Shape legend: T = packed tokens, B = batch, S = padded sequence length, D = hidden size, N = heads,
H = head dim, F = SwiGLU hidden size, V = (padded) vocabulary.

State-dict layout (fixed; `neobert/hf` exports against it), L = layer index:
  encoder.embeddings.weight (V_pad, D); encoder.layers.L.{attn_norm, ffn_norm}.weight (D);
  encoder.layers.L.qkv.weight (3D, D) = [Wq; Wk; Wv] head-major; encoder.layers.L.out_proj.weight (D, D);
  encoder.layers.L.w_in.weight (2F, D) = [W_gate; W_up]; encoder.layers.L.w_out.weight (D, F);
  encoder.final_norm.weight (D); decoder.weight (V_pad, D); decoder.bias (V_pad).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from neobert.config import PRESETS, NeoBERTConfig
from neobert.kernels import Kernels, resolve
from neobert.kernels.attention import padded_attention
from neobert.kernels.rope import RotaryEmbedding, apply_rope
from neobert.loss import MaskedLMLoss, MaskedRows
from neobert.packing import PackedMeta, validate_packed_meta

__all__ = [
    "PRESETS",
    "NeoBERT",
    "NeoBERTBlock",
    "NeoBERTConfig",
    "NeoBERTForMLM",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rope",
]


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


class NeoBERTBlock(nn.Module):
    """Pre-norm block: x = x + attn(attn_norm(x)); x = x + ffn(ffn_norm(x)).

    Attributes are flat (qkv, out_proj, w_in, w_out) so the state-dict keys match the fixed export layout.
    """

    def __init__(self, cfg: NeoBERTConfig, kernels: Kernels) -> None:
        """`kernels` (neobert.kernels.resolve): `attn_fn` (q, k, v, meta, scale) is the packed attention;
        `qkv_attn_fn` (qkv, cos, sin, meta, scale), when the backend has one, replaces RoPE + `attn_fn` on the
        packed path (RoPE fused into the kernel op); the SwiGLU feed-forward (x, w_in, w_out) is `packed_ffn_fn`
        on every token of a packed stream, `rows_ffn_fn` when `forward` gets `rows` (the sparse last layer's
        masked rows) and `ffn_fn` on padded batches. They are copied onto the block as attributes, so one block
        can be switched to another path (bench/train_step.py does)."""
        super().__init__()
        D, F_ = cfg.hidden_size, cfg.ffn_hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.attn_fn = kernels.attn_fn
        self.qkv_attn_fn = kernels.qkv_attn_fn
        self.ffn_fn = kernels.ffn_fn
        self.packed_ffn_fn = kernels.packed_ffn_fn
        self.rows_ffn_fn = kernels.rows_ffn_fn
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

    def __init__(self, cfg: NeoBERTConfig, kernels: Kernels | None = None) -> None:
        """`kernels`: the compute functions, `neobert.kernels.resolve(cfg)` (decided once, logged once) unless
        given (tests and benchmarks pass a modified one to force a path)."""
        super().__init__()
        self.config = cfg
        self.kernels = resolve(cfg) if kernels is None else kernels
        self.embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(NeoBERTBlock(cfg, self.kernels) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.reset_parameters()

    @property
    def attn_backend(self) -> str:
        return self.kernels.attn_backend

    @property
    def ffn_backend(self) -> str:
        return self.kernels.ffn_backend

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
        sparse_last_layer: bool = True,
        *,
        kernels: Kernels | None = None,
    ) -> None:
        """`sparse_last_layer`: in the packed `forward`, run the last layer's out_proj/FFN (and the final norm)
        on the masked tokens only, the only rows the loss reads. Same loss and gradients (tested against the
        dense path); ~2% faster for `base` at 20% masking. The padded path is always dense.
        `kernels`: see `NeoBERT`."""
        super().__init__()
        self.sparse_last_layer = sparse_last_layer
        self.config = cfg
        self.encoder = NeoBERT(cfg, kernels)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=True)
        if cfg.tie_word_embeddings:
            self.decoder.weight = self.encoder.embeddings.weight
        else:
            nn.init.normal_(self.decoder.weight, std=cfg.initializer_range)
        nn.init.zeros_(self.decoder.bias)
        self.loss_fn = MaskedLMLoss(chunk_size=loss_chunk_size)

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
