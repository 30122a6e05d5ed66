"""Hugging Face `transformers` configuration of an exported NeoBERT-on-Ray encoder.

Self-contained on purpose: `jobs/export_hf.py` copies this file next to the weights and `transformers` loads it
with `trust_remote_code=True`, so it may import only `transformers`.

Differences from the training config (`neobert.model.NeoBERTConfig`):
- `vocab_size` is the real tokenizer vocabulary (30522), never the padded training width (the export slices the
  padded embedding / decoder rows off);
- `intermediate_size` is the SwiGLU width F actually used by the weights (`w_in` has 2*F rows), i.e. the training
  config's `ffn_hidden_size`;
- `num_hidden_layers` / `num_attention_heads` use the usual HF names;
- `unpad_inputs` chooses between padded attention and the unpadded (varlen) path of `modeling_neobert.py`
  (see its docstring): None = unpad on CUDA when flash-attn or torch's `varlen_attn` is available, True =
  always (a per-sequence SDPA reference where no kernel applies), False = never. Results agree either way.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class NeoBERTConfig(PretrainedConfig):
    model_type = "neobert"

    def __init__(
        self,
        vocab_size: int = 30522,  # real vocabulary (embedding and decoder rows)
        hidden_size: int = 768,  # D
        num_hidden_layers: int = 28,
        num_attention_heads: int = 12,  # N; head dim H = D / N
        intermediate_size: int = 2048,  # SwiGLU width F: w_in (2F, D), w_out (D, F)
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 4096,  # longest sequence the model was trained for
        initializer_range: float = 0.02,  # std of the normal init of fresh weights (e.g. a classifier head)
        classifier_pooling: str = "cls",  # "cls" | "mean": sequence representation fed to the classifier
        classifier_dropout: float = 0.0,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = False,  # decoder.weight shares embeddings.weight
        unpad_inputs: bool
        | None = None,  # None = auto: unpadded (varlen) attention on CUDA when a kernel imports
        **kwargs,
    ):
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={hidden_size} must be divisible by num_attention_heads={num_attention_heads}"
            )
        if (hidden_size // num_attention_heads) % 2 != 0:
            raise ValueError(f"head dim {hidden_size // num_attention_heads} must be even for RoPE")
        if unpad_inputs not in (None, True, False):
            raise ValueError(f"unpad_inputs must be true, false or null (auto), got {unpad_inputs!r}")
        if classifier_pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling must be 'cls' or 'mean', got {classifier_pooling!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.classifier_pooling = classifier_pooling
        self.classifier_dropout = classifier_dropout
        self.unpad_inputs = unpad_inputs
        super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
