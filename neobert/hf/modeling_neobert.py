"""NeoBERT for Hugging Face `transformers`: the exported form of a NeoBERT-on-Ray model.

Self-contained on purpose: `jobs/export_hf.py` copies this file and `configuration_neobert.py` next to the
weights and `transformers` loads them with `trust_remote_code=True`, so they import only torch and transformers
(and it stays one file over ~600 lines: the encoder, its attention paths and every head travel together).

The math is the training model's (`neobert/model.py`), restated for padded batches:
- token embeddings only (no absolute positions, no token types), pre-norm blocks
  `x = x + attn(attn_norm(x)); x = x + ffn(ffn_norm(x))`, a final RMSNorm; no biases in the encoder;
- RMSNorm computed in fp32: `x * rsqrt(mean(x^2) + eps) * weight`;
- fused qkv projection, rows [Wq; Wk; Wv], head-major inside each block;
- RoPE, half-split ("rotate_half" / GPT-NeoX) over the full head dim, inv_freq = theta^(-arange(0, H, 2) / H);
- SwiGLU feed-forward: `w_out(silu(x W_gate^T) * (x W_up^T))` with `w_in` rows [W_gate; W_up];
- bidirectional attention restricted to each sequence's real tokens, scale 1/sqrt(H).
Where the training model runs packed variable-length sequences (`cu_seqlens`), this one takes the usual padded
`input_ids (B, S)` + `attention_mask (B, S)`; position ids default to `cumsum(attention_mask) - 1`, so left- and
right-padded batches give the same per-token outputs as the unpadded sequences.

Attention: `NeoBERTModel.forward` picks one of three paths per call, from `config._attn_implementation` (what
`from_pretrained(..., attn_implementation=...)` sets) and `config.unpad_inputs`:
- "eager": explicit `softmax(q k^T / sqrt(H) + key mask) v` (softmax in fp32); the only path that can return the
  attention probabilities, so `output_attentions=True` runs it whatever the implementation (with a warning when
  another one was requested);
- "sdpa" (the default): `F.scaled_dot_product_attention` on the padded batch with a boolean key mask;
- "varlen" (ModernBERT-style unpadded inference): the padding is removed (`unpad_input`: the real tokens of
  all sequences become one packed stream of T tokens with `cu_seqlens`, the training model's layout), every
  layer runs on (T, D), and `pad_output` scatters the result back to (B, S, D) with zeros at padded positions.
  It runs with `flash_attn.flash_attn_varlen_func` (flash-attn) or `torch.nn.attention.varlen.varlen_attn`
  (torch >= 2.10) on CUDA in bf16/fp16: always for `attn_implementation="flash_attention_2"`, and for "sdpa"
  when `config.unpad_inputs` is None (auto) and such a kernel imports. Padding then costs neither attention
  nor feed-forward FLOPs. `unpad_inputs=True` forces the path anywhere: without a usable kernel (CPU, fp32) it
  runs `varlen_attention_reference` (one SDPA call per sequence, exact), which is how the unpad/repad plumbing
  is tested on CPU; `unpad_inputs=False` keeps the padded path.

Shapes: B batch, S sequence, T real (unpadded) tokens, N heads, H head dim, D model dim, F SwiGLU width,
V vocabulary, L labels.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import transformers
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils import logging

from .configuration_neobert import NeoBERTConfig

try:  # transformers >= 5: init functions that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # transformers 4.x
    from torch.nn import init

logger = logging.get_logger(__name__)

_TRANSFORMERS_V5 = int(transformers.__version__.split(".")[0]) >= 5
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")

# (q (T, N, H), k, v, cu_seqlens (B+1,) int32, max_seqlen, scale) -> (T, N, H)
VarlenFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


# ------------------------------------------------------------------------------------------- attention kernels
def varlen_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """Exact varlen attention on any device and dtype: one SDPA call per sequence of the packed stream.
    The reference the CUDA kernels are compared with, and what `unpad_inputs=True` runs without them."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end > start:
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (N, n, H)
            out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(0, 1)
    return out


def _flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen, scale):
    try:  # an optional package: transformers' remote-code import check skips imports inside `try`
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package (pip install flash-attn); "
            "or load with the default 'sdpa', which unpads with torch's varlen_attn on CUDA when available"
        ) from e

    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        dropout_p=0.0,
        softmax_scale=scale,
        causal=False,
    )


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, scale):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)


@functools.cache
def cuda_varlen_kernel() -> tuple[str, VarlenFn] | None:
    """The CUDA varlen kernel this environment has, decided once per process: FlashAttention-2 (`flash-attn`)
    when its interface imports, else torch's built-in `varlen_attn` (torch >= 2.10), else None."""
    try:
        if importlib.util.find_spec("flash_attn.flash_attn_interface") is not None:
            return "flash_attn", _flash_attn_varlen
    except (
        ImportError,
        ValueError,
    ):  # a `flash_attn` namespace without the FA2 interface (flash-attn-4 alone)
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return None
    return "torch_varlen", _torch_varlen


class Unpadded(NamedTuple):
    """The real tokens of a padded batch as one packed stream (see `unpad_input`)."""

    indices: torch.Tensor  # (T,) flat indices of the real tokens in (B*S)
    cu_seqlens: torch.Tensor  # (B+1,) int32 sequence boundaries in the stream
    max_seqlen: int  # longest sequence (a host int: the kernels size their grids with it)
    batch: int
    seqlen: int


def unpad_input(keep: torch.Tensor) -> Unpadded:
    """keep (B, S) bool, True = real token -> where the real tokens go in a packed stream. Sequences stay in
    batch order and keep their own token order, so any padding side (left, right, both) unpads the same way."""
    B, S = keep.shape
    seqlens = keep.sum(-1, dtype=torch.int32)  # (B,)
    cu_seqlens = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))  # (B+1,)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()  # (T,)
    return Unpadded(indices, cu_seqlens, int(seqlens.max()) if B else 0, B, S)


def pad_output(x: torch.Tensor, unpadded: Unpadded) -> torch.Tensor:
    """x (T, ...) -> (B, S, ...) with zeros at the padded positions (the inverse of gathering `indices`)."""
    out = x.new_zeros(unpadded.batch * unpadded.seqlen, *x.shape[1:])
    out[unpadded.indices] = x
    return out.view(unpadded.batch, unpadded.seqlen, *x.shape[1:])


class AttentionInputs(NamedTuple):
    """Everything the attention layers need besides the hidden states, built once per forward."""

    path: str  # "eager" | "sdpa" | "varlen"
    cos: torch.Tensor  # (B, 1, S, H) padded, (T, 1, H) varlen; fp32
    sin: torch.Tensor
    key_mask: torch.Tensor | None  # (B, 1, 1, S) bool, True = attend to this key (padded paths)
    cu_seqlens: torch.Tensor | None  # (B+1,) int32 (varlen)
    max_seqlen: int
    varlen_fn: VarlenFn | None


# ---------------------------------------------------------------------------------------------------- modules
class NeoBERTRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (*position_ids.shape, H) in fp32 for half-split RoPE. Computed per call (no buffer), so
    that meta-device loading and `.to(dtype)` never touch the frequencies."""
    # float64 on the CPU then fp32, exactly as the training model builds its table (bitwise-equal frequencies)
    inv_freq = (theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()
    inv_freq = inv_freq.to(position_ids.device)  # (H/2,)
    freqs = position_ids.float()[..., None] * inv_freq  # (..., H/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., H)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, N, S, H) or (T, N, H) rotated in fp32, returned in x's dtype."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v (B, N, S, H), key_mask (B, 1, 1, S) -> out (B, N, S, H), probabilities (B, N, S, S).
    The softmax runs in fp32 (as SDPA's math kernel does), the products in the input dtype."""
    scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, N, S, S)
    scores = scores.masked_fill(~key_mask, torch.finfo(torch.float32).min)
    probs = scores.softmax(dim=-1).to(q.dtype)
    return probs @ v, probs


class NeoBERTAttention(nn.Module):
    def __init__(self, config: NeoBERTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        N, H = self.num_heads, self.head_dim
        if inputs.path == "varlen":  # x (T, D)
            T, D = x.shape
            q, k, v = self.qkv(x).view(T, 3, N, H).unbind(1)  # (T, N, H)
            q, k = apply_rope(q, inputs.cos, inputs.sin), apply_rope(k, inputs.cos, inputs.sin)
            out = inputs.varlen_fn(q, k, v, inputs.cu_seqlens, inputs.max_seqlen, self.scale)  # (T, N, H)
            return self.out_proj(out.reshape(T, D)), None
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, N, H).permute(2, 0, 3, 1, 4)  # (B, N, S, H)
        q, k = apply_rope(q, inputs.cos, inputs.sin), apply_rope(k, inputs.cos, inputs.sin)
        probs = None
        if inputs.path == "eager":
            out, probs = eager_attention(q, k, v, inputs.key_mask, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.key_mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, S, D)
        return self.out_proj(out), probs


class NeoBERTMLP(nn.Module):
    def __init__(self, config: NeoBERTConfig):
        super().__init__()
        self.w_in = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)  # [W_gate; W_up]
        self.w_out = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)  # (..., F) each
        return self.w_out(F.silu(gate) * up)


class NeoBERTLayer(nn.Module):
    def __init__(self, config: NeoBERTConfig):
        super().__init__()
        self.attn_norm = NeoBERTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = NeoBERTAttention(config)
        self.ffn_norm = NeoBERTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = NeoBERTMLP(config)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs):
        attn, probs = self.attention(self.attn_norm(x), inputs)
        x = x + attn
        x = x + self.mlp(self.ffn_norm(x))
        return x, probs


class NeoBERTPreTrainedModel(PreTrainedModel):
    config_class = NeoBERTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NeoBERTLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True  # flash_attention_2 = the unpadded path on flash-attn's varlen kernel
    _supports_flash_attn_2 = True  # the same flag under its transformers 4.x name

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """`set_attn_implementation` works: `NeoBERTModel.forward` reads `config._attn_implementation` at every
        call (transformers' source heuristic would look for its attention-interface registry instead)."""
        return True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            fresh = not getattr(module.weight, "_is_hf_initialized", False)  # False: loaded from a checkpoint
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
            if fresh and getattr(module, "padding_idx", None) is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, NeoBERTRMSNorm):
            init.ones_(module.weight)


def _check_attn_implementation(impl: str) -> None:
    if impl not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"NeoBERT supports attn_implementation in {ATTN_IMPLEMENTATIONS}, got {impl!r}; use 'sdpa' (the "
            "default, unpadded automatically on CUDA when flash-attn or torch's varlen_attn is available), "
            "'eager' (returns attention probabilities) or 'flash_attention_2' (needs the flash-attn package)"
        )


class NeoBERTModel(NeoBERTPreTrainedModel):
    """The encoder: `last_hidden_state (B, S, D)` after the final RMSNorm."""

    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]  # AutoModel on an MLM export drops the MLM head

    def __init__(self, config: NeoBERTConfig):
        super().__init__(config)
        _check_attn_implementation(self.config._attn_implementation or "sdpa")
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(NeoBERTLayer(config) for _ in range(config.num_hidden_layers))
        self.final_norm = NeoBERTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def attention_path(self, x: torch.Tensor, output_attentions: bool) -> tuple[str, VarlenFn | None]:
        """("eager" | "sdpa" | "varlen", the varlen function): see the module docstring."""
        impl = self.config._attn_implementation or "sdpa"
        _check_attn_implementation(impl)
        if output_attentions:
            if impl != "eager":
                logger.warning_once(
                    f"output_attentions=True runs the eager attention path (attn_implementation={impl!r} cannot "
                    "return attention probabilities); load with attn_implementation='eager' to make this explicit"
                )
            return "eager", None
        if impl == "eager":
            return "eager", None
        if impl == "flash_attention_2":
            return "varlen", _flash_attn_varlen
        unpad = getattr(self.config, "unpad_inputs", None)
        if unpad is False:
            return "sdpa", None
        half = x.dtype in (torch.float16, torch.bfloat16) or (x.is_cuda and torch.is_autocast_enabled("cuda"))
        kernel = cuda_varlen_kernel() if x.is_cuda and half else None
        if kernel is not None:
            return "varlen", kernel[1]
        if unpad:
            return "varlen", varlen_attention_reference
        return "sdpa", None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, S)
        attention_mask: torch.Tensor | None = None,  # (B, S), 1 = token, 0 = padding
        position_ids: torch.Tensor | None = None,  # (B, S)
        inputs_embeds: torch.Tensor | None = None,  # (B, S, D)
        token_type_ids: torch.Tensor | None = None,  # accepted for BERT-style tokenizers, ignored
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        output_attentions = bool(output_attentions if output_attentions is not None else False)
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, S) or inputs_embeds (B, S, D)")
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, S, D)
        B, S, _ = x.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=x.device)
        if attention_mask.shape != (B, S):
            raise ValueError(
                f"attention_mask must have shape (batch, seq) = {(B, S)}, got {tuple(attention_mask.shape)}"
            )
        keep = attention_mask.bool()  # (B, S)
        if position_ids is None:  # token index within its own sequence, whichever side the padding is on
            position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        path, varlen_fn = self.attention_path(x, output_attentions)

        unpadded = None
        if path == "varlen":
            unpadded = unpad_input(keep)
            x = x.reshape(B * S, -1)[unpadded.indices]  # (T, D)
            cos, sin = rope_cos_sin(
                position_ids.reshape(-1)[unpadded.indices], head_dim, self.config.rope_theta
            )
            inputs = AttentionInputs(
                path, cos[:, None], sin[:, None], None, unpadded.cu_seqlens, unpadded.max_seqlen, varlen_fn
            )  # cos, sin (T, 1, H)
        else:
            cos, sin = rope_cos_sin(position_ids, head_dim, self.config.rope_theta)  # (B, S, H)
            inputs = AttentionInputs(path, cos[:, None], sin[:, None], keep[:, None, None, :], None, S, None)

        all_hidden = (x,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x, probs = torch.utils.checkpoint.checkpoint(layer, x, inputs, use_reentrant=False)
            else:
                x, probs = layer(x, inputs)
            if output_hidden_states:
                all_hidden = all_hidden + (x,)
            if output_attentions:
                all_attn = all_attn + (probs,)
        x = self.final_norm(x)
        if output_hidden_states:  # HF convention for pre-norm models: the last entry is the normed output
            all_hidden = all_hidden[:-1] + (x,)
        if unpadded is not None:
            x = pad_output(x, unpadded)
            if output_hidden_states:
                all_hidden = tuple(pad_output(h, unpadded) for h in all_hidden)
        if not return_dict:
            return tuple(t for t in (x, all_hidden, all_attn) if t is not None)
        return BaseModelOutput(last_hidden_state=x, hidden_states=all_hidden, attentions=all_attn)


class NeoBERTForMaskedLM(NeoBERTPreTrainedModel):
    """Encoder + linear decoder with bias (no transform layer, as in training): logits (B, S, V)."""

    # transformers 5 maps target -> source; 4.x lists the output embedding. Used only if tie_word_embeddings.
    _tied_weights_keys = (
        {"decoder.weight": "model.embeddings.weight"} if _TRANSFORMERS_V5 else ["decoder.weight"]
    )

    def __init__(self, config: NeoBERTConfig):
        super().__init__(config)
        self.model = NeoBERTModel(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.decoder = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,  # (B, S), -100 = not a prediction target
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.decoder(out.last_hidden_state)  # (B, S, V)
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss(ignore_index=-100)(
                logits.view(-1, logits.size(-1)).float(), labels.view(-1)
            )
        if not return_dict:
            rest = tuple(t for t in (out.hidden_states, out.attentions) if t is not None)
            return ((loss,) if loss is not None else ()) + (logits,) + rest
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


class NeoBERTForSequenceClassification(NeoBERTPreTrainedModel):
    """Encoder + head on the [CLS] token (or the masked mean, `config.classifier_pooling`):
    dropout -> dense -> tanh -> dropout -> classifier. The head is freshly initialised when loading an export."""

    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def __init__(self, config: NeoBERTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = NeoBERTModel(config)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor
        | None = None,  # (B,) class ids / regression targets, or (B, num_labels) multi-label
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        h = out.last_hidden_state  # (B, S, D)
        if self.config.classifier_pooling == "mean" and attention_mask is not None:
            m = attention_mask.to(h.dtype)[..., None]  # (B, S, 1)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        elif self.config.classifier_pooling == "mean":
            pooled = h.mean(1)
        elif attention_mask is not None:  # [CLS] = first real token, whichever side the padding is on
            first = attention_mask.long().argmax(-1)  # (B,)
            pooled = h[torch.arange(h.shape[0], device=h.device), first]
        else:
            pooled = h[:, 0]
        logits = self.classifier(
            self.dropout(torch.tanh(self.dense(self.dropout(pooled))))
        )  # (B, num_labels)

        loss = None
        if labels is not None:
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                loss = MSELoss()(logits.squeeze(-1).float(), labels.float().view(-1))
            elif self.config.problem_type == "single_label_classification":
                loss = CrossEntropyLoss()(logits.view(-1, self.num_labels).float(), labels.view(-1))
            else:
                loss = BCEWithLogitsLoss()(logits.float(), labels.float())
        if not return_dict:
            rest = tuple(t for t in (out.hidden_states, out.attentions) if t is not None)
            return ((loss,) if loss is not None else ()) + (logits,) + rest
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


class NeoBERTForTokenClassification(NeoBERTPreTrainedModel):
    """Encoder + dropout -> linear classifier on every token: logits (B, S, L). The head is freshly initialised
    when loading an export; the loss is cross-entropy over the tokens whose label is not -100."""

    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def __init__(self, config: NeoBERTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = NeoBERTModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,  # (B, S) class ids, -100 = not a target (padding, sub-words)
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TokenClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(self.dropout(out.last_hidden_state))  # (B, S, L)
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss(ignore_index=-100)(
                logits.view(-1, self.num_labels).float(), labels.view(-1).to(logits.device)
            )
        if not return_dict:
            rest = tuple(t for t in (out.hidden_states, out.attentions) if t is not None)
            return ((loss,) if loss is not None else ()) + (logits,) + rest
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )


class NeoBERTForQuestionAnswering(NeoBERTPreTrainedModel):
    """Extractive QA: encoder + linear (D -> 2) on every token, split into start and end logits (B, S) each.
    The loss (when both positions are given) is the mean of the start and end cross-entropies; positions outside
    the sequence are clamped to S and ignored, as in BERT."""

    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def __init__(self, config: NeoBERTConfig):
        super().__init__(config)
        self.num_labels = 2
        self.model = NeoBERTModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,  # (B,) token index of the answer's first token
        end_positions: torch.Tensor | None = None,  # (B,) token index of the answer's last token
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> QuestionAnsweringModelOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        start_logits, end_logits = self.qa_outputs(out.last_hidden_state).unbind(-1)  # (B, S) each
        loss = None
        if (start_positions is None) != (end_positions is None):
            raise ValueError("pass both start_positions and end_positions (B,) for the QA loss, or neither")
        if start_positions is not None:
            S = start_logits.shape[1]
            start = start_positions.view(-1).to(start_logits.device).clamp(0, S)
            end = end_positions.view(-1).to(end_logits.device).clamp(0, S)
            ce = CrossEntropyLoss(ignore_index=S)
            loss = (ce(start_logits.float(), start) + ce(end_logits.float(), end)) / 2
        if not return_dict:
            rest = tuple(t for t in (out.hidden_states, out.attentions) if t is not None)
            return ((loss,) if loss is not None else ()) + (start_logits, end_logits) + rest
        return QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
