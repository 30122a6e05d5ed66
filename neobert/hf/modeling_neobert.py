"""NeoBERT for Hugging Face `transformers`: the exported form of a NeoBERT-on-Ray model.

Self-contained on purpose: `jobs/export_hf.py` copies this file and `configuration_neobert.py` next to the
weights and `transformers` loads them with `trust_remote_code=True`, so they import only torch and transformers.

The math is the training model's (`neobert/model.py`), restated for padded batches:
- token embeddings only (no absolute positions, no token types), pre-norm blocks
  `x = x + attn(attn_norm(x)); x = x + ffn(ffn_norm(x))`, a final RMSNorm; no biases in the encoder;
- RMSNorm computed in fp32: `x * rsqrt(mean(x^2) + eps) * weight`;
- fused qkv projection, rows [Wq; Wk; Wv], head-major inside each block;
- RoPE, half-split ("rotate_half" / GPT-NeoX) over the full head dim, inv_freq = theta^(-arange(0, H, 2) / H);
- SwiGLU feed-forward: `w_out(silu(x W_gate^T) * (x W_up^T))` with `w_in` rows [W_gate; W_up];
- attention is bidirectional SDPA with a key padding mask (scale 1/sqrt(H)); with `output_attentions=True` an
  eager path computes the same thing and returns the probabilities.
Where the training model runs packed variable-length sequences (`cu_seqlens`), this one takes the usual padded
`input_ids (B, S)` + `attention_mask (B, S)`; position ids default to `cumsum(attention_mask) - 1`, so left- and
right-padded batches give the same per-token outputs as the unpadded sequences.

Shapes: B batch, S sequence, N heads, H head dim, D model dim, F SwiGLU width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import transformers
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

from .configuration_neobert import NeoBERTConfig

try:  # transformers >= 5: init functions that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # transformers 4.x
    from torch.nn import init

_TRANSFORMERS_V5 = int(transformers.__version__.split(".")[0]) >= 5


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
    """cos, sin of shape (B, 1, S, H) in fp32 for half-split RoPE. Computed per call (no buffer), so that meta-device
    loading and `.to(dtype)` never touch the frequencies."""
    # float64 on the CPU then fp32, exactly as the training model builds its table (bitwise-equal frequencies)
    inv_freq = (theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()
    inv_freq = inv_freq.to(position_ids.device)  # (H/2,)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, S, H/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, S, H)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, N, S, H) rotated in fp32, returned in x's dtype."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class NeoBERTAttention(nn.Module):
    def __init__(self, config: NeoBERTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, S, D)
        key_mask: torch.Tensor,  # (B, 1, 1, S) bool, True = attend to this key
        cos: torch.Tensor,  # (B, 1, S, H)
        sin: torch.Tensor,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, S, D = x.shape
        q, k, v = (
            self.qkv(x).view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # (B, N, S, H)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        probs = None
        if output_attentions:
            scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5  # (B, N, S, S)
            scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(dim=-1)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, N, S, H)
        out = out.transpose(1, 2).reshape(B, S, D)
        return self.out_proj(out), probs


class NeoBERTMLP(nn.Module):
    def __init__(self, config: NeoBERTConfig):
        super().__init__()
        self.w_in = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)  # [W_gate; W_up]
        self.w_out = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)  # (B, S, F) each
        return self.w_out(F.silu(gate) * up)


class NeoBERTLayer(nn.Module):
    def __init__(self, config: NeoBERTConfig):
        super().__init__()
        self.attn_norm = NeoBERTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = NeoBERTAttention(config)
        self.ffn_norm = NeoBERTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = NeoBERTMLP(config)

    def forward(self, x, key_mask, cos, sin, output_attentions: bool = False):
        attn, probs = self.attention(self.attn_norm(x), key_mask, cos, sin, output_attentions)
        x = x + attn
        x = x + self.mlp(self.ffn_norm(x))
        return x, probs


class NeoBERTPreTrainedModel(PreTrainedModel):
    config_class = NeoBERTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NeoBERTLayer"]
    _supports_sdpa = True

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


class NeoBERTModel(NeoBERTPreTrainedModel):
    """The encoder: `last_hidden_state (B, S, D)` after the final RMSNorm."""

    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]  # AutoModel on an MLM export drops the MLM head

    def __init__(self, config: NeoBERTConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(NeoBERTLayer(config) for _ in range(config.num_hidden_layers))
        self.final_norm = NeoBERTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

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
        cos, sin = rope_cos_sin(
            position_ids, self.config.hidden_size // self.config.num_attention_heads, self.config.rope_theta
        )
        key_mask = keep[:, None, None, :]  # (B, 1, 1, S)

        all_hidden = (x,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x, probs = torch.utils.checkpoint.checkpoint(
                    layer, x, key_mask, cos, sin, output_attentions, use_reentrant=False
                )
            else:
                x, probs = layer(x, key_mask, cos, sin, output_attentions)
            if output_hidden_states:
                all_hidden = all_hidden + (x,)
            if output_attentions:
                all_attn = all_attn + (probs,)
        x = self.final_norm(x)
        if output_hidden_states:  # HF convention for pre-norm models: the last entry is the normed output
            all_hidden = all_hidden[:-1] + (x,)
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
