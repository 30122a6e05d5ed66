"""`NeoBERTConfig`: the model's typed, serializable configuration, and the named size presets.

Kept apart from `neobert.model` so that code which only reads or writes configs (model dirs, the HF config map,
the CLI) does not need the modules. Backend names are validated against the kernel registries
(`neobert.kernels.attention.BACKENDS`, `neobert.kernels.ffn.FFN_BACKENDS`); which backend actually runs is
decided once per model by `neobert.kernels.resolve`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from neobert.kernels.attention import BACKENDS
from neobert.kernels.ffn import FFN_BACKENDS


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
    attn_backend: str = (
        "auto"  # "auto" | "fa4" | "flash_attn" | "torch_varlen" | "sdpa" (kernels/attention.py)
    )
    pad_token_id: int = 0  # [PAD]; its embedding row starts at zero and never receives gradient
    initializer_range: float = 0.02  # std of the normal init (output projections scaled by 1/sqrt(2L))
    fp32_residual: bool = True  # residual stream in fp32 under autocast; False = autocast dtype (~5% faster)
    ffn_backend: str = (
        "auto"  # "auto" | "quack" | "torch": SwiGLU in GEMM epilogues or torch ops (kernels/ffn.py)
    )
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
