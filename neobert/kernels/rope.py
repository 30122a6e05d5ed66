"""Rotary position embeddings (RoPE): the cos/sin tables and the rotation, in plain torch.

Half-split (GPT-NeoX) layout over the full head dim: the pair (i, i + H/2) of every head is rotated by the angle
position * theta^(-2i/H). Used by the encoder blocks (`neobert.model`) for every backend whose attention op does
not apply RoPE itself; `neobert.kernels.rope_triton` is the fused variant of the same math for the `fa4` path.
Shape legend: H = head dim, N = heads.
"""

from __future__ import annotations

import torch
from torch import nn


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
