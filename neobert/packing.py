"""Packing metadata for the variable-length (packed) forward: one typed object, built in one place
(`PackedMeta.from_lengths`), validated in one function (`validate_packed_meta`).

A packed batch is one flat token stream of T tokens holding whole documents back to back, no padding:

    input_ids     (T,)              token ids
    cu_seqlens    (num_docs + 1,)   int32, starts at 0, strictly increasing, ends at T (document boundaries)
    max_seqlen    int               an upper bound on the longest document (a Python int, never read off the GPU)
    position_ids  (T,)              restarts at 0 at every document start (RoPE positions)

`PackedMeta` is passed unchanged from the data loader through every layer. `max_seqlen` is a Python int on
purpose: the varlen kernels need it on the host, and reading it off a GPU tensor (`.item()`) would sync the
host with the device every step. It may be larger than the true longest document (a static bound keeps
`torch.compile` from recompiling); it must not be smaller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

_FIX = "build the metadata with PackedMeta.from_lengths(lengths) or re-run jobs/preprocess.py"


class PackedMeta(NamedTuple):
    """Document boundaries of a packed token stream. Fields are documented in the module docstring."""

    cu_seqlens: torch.Tensor  # (num_docs + 1,) int32
    max_seqlen: int
    position_ids: torch.Tensor  # (T,) int32 or int64

    @classmethod
    def from_lengths(
        cls, lengths: Sequence[int] | torch.Tensor, device: torch.device | str | None = None
    ) -> PackedMeta:
        """Metadata for documents of the given lengths packed in order (built on the CPU, validated, then
        moved to `device`)."""
        lens = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1)
        if lens.numel() == 0:
            raise ValueError(f"from_lengths needs at least one document length, got {list(lengths)!r}")
        if bool((lens <= 0).any()):
            raise ValueError(
                f"document lengths must all be >= 1, got {lens.tolist()}; drop empty documents before packing"
            )
        cu = torch.zeros(lens.numel() + 1, dtype=torch.int64)
        torch.cumsum(lens, 0, out=cu[1:])
        total = int(cu[-1])
        if total > torch.iinfo(torch.int32).max:
            raise ValueError(f"{total} tokens do not fit int32 cu_seqlens; pack fewer tokens per batch")
        doc_start = torch.repeat_interleave(cu[:-1], lens)  # (T,)
        position_ids = (torch.arange(total, dtype=torch.int64) - doc_start).to(torch.int32)
        meta = cls(cu.to(torch.int32), int(lens.max()), position_ids)
        validate_packed_meta(meta, total)
        return meta if device is None else meta.to(device)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedMeta:
        """The same metadata on `device` (`max_seqlen` stays a Python int)."""
        return PackedMeta(
            self.cu_seqlens.to(device, non_blocking=non_blocking),
            self.max_seqlen,
            self.position_ids.to(device, non_blocking=non_blocking),
        )

    @property
    def num_docs(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def num_tokens(self) -> int:
        return self.position_ids.shape[0]


def validate_packed_meta(
    meta: PackedMeta, num_tokens: int, *, check_values: bool | None = None, max_position: int | None = None
) -> None:
    """Raise ValueError unless `meta` describes a packed stream of `num_tokens` tokens.

    Structural checks (types, dtypes, shapes, `max_seqlen`) never touch tensor values and always run.
    Value checks (starts at 0, ends at T, strictly increasing, `max_seqlen` >= longest document, positions
    restart at 0, and with `max_position` no document longer than it) read the tensors; by default they run only when `cu_seqlens` is on the CPU, so that the GPU
    hot path never syncs. Validate on the CPU side of the loader (or pass `check_values=True`) to cover them.
    """
    if not isinstance(meta, PackedMeta):
        raise ValueError(f"expected a PackedMeta, got {type(meta).__name__}; {_FIX}")
    cu, pos, max_seqlen = meta.cu_seqlens, meta.position_ids, meta.max_seqlen
    if not isinstance(cu, torch.Tensor) or not isinstance(pos, torch.Tensor):
        raise ValueError(
            f"cu_seqlens and position_ids must be torch tensors, got {type(cu).__name__} and "
            f"{type(pos).__name__}; {_FIX}"
        )
    if cu.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens must be int32 (the varlen kernels require it), got {cu.dtype}; "
            f"use cu_seqlens.to(torch.int32) or {_FIX}"
        )
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least 2 entries (num_docs + 1), got shape {tuple(cu.shape)}; {_FIX}"
        )
    if pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"position_ids must be int32 or int64, got {pos.dtype}; {_FIX}")
    if pos.ndim != 1 or pos.shape[0] != num_tokens:
        raise ValueError(
            f"position_ids must have shape (T,) = ({num_tokens},) like input_ids, got {tuple(pos.shape)}; {_FIX}"
        )
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(
            f"max_seqlen must be a positive Python int (not a tensor: reading it off the GPU syncs), "
            f"got {max_seqlen!r}; {_FIX}"
        )
    if cu.device != pos.device:
        raise ValueError(f"cu_seqlens is on {cu.device} but position_ids on {pos.device}; move both together")
    if check_values is None:
        check_values = cu.device.type == "cpu"
    if not check_values:
        return
    cu64 = cu.detach().to("cpu", torch.int64)
    if int(cu64[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu64[0])} (cu_seqlens={_head(cu64)}); {_FIX}")
    if int(cu64[-1]) != num_tokens:
        raise ValueError(
            f"cu_seqlens must end at T = len(input_ids) = {num_tokens}, got {int(cu64[-1])} "
            f"(cu_seqlens={_head(cu64)}); {_FIX}"
        )
    lens = cu64[1:] - cu64[:-1]
    bad = (lens <= 0).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"cu_seqlens must be strictly increasing (no empty documents), but cu_seqlens[{i}]={int(cu64[i])} "
            f">= cu_seqlens[{i + 1}]={int(cu64[i + 1])}; {_FIX}"
        )
    longest = int(lens.max())
    if max_seqlen < longest:
        raise ValueError(
            f"max_seqlen={max_seqlen} is smaller than the longest document ({longest} tokens); the varlen "
            f"kernels would read out of bounds. Pass max_seqlen >= {longest}"
        )
    if max_position is not None and longest > max_position:
        raise ValueError(
            f"a document of {longest} tokens exceeds max_position_embeddings={max_position}; cap documents at "
            f"the model's length when packing (max_seq_len) or raise NeoBERTConfig.max_position_embeddings"
        )
    doc_start = torch.repeat_interleave(cu64[:-1], lens)
    expected = torch.arange(num_tokens, dtype=torch.int64) - doc_start
    wrong = (pos.detach().to("cpu", torch.int64) != expected).nonzero()
    if wrong.numel():
        t = int(wrong[0])
        raise ValueError(
            f"position_ids must restart at 0 at every document start: token {t} has position "
            f"{int(pos[t])}, expected {int(expected[t])}; {_FIX}"
        )


def _head(x: torch.Tensor, n: int = 8) -> str:
    vals = x.tolist()
    return str(vals) if len(vals) <= n else f"[{', '.join(map(str, vals[:n]))}, ...] ({len(vals)} entries)"
