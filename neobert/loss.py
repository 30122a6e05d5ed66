"""Chunked masked-LM cross-entropy that never materializes the (T, vocab) logits.

Shape legend: T = packed tokens, M = masked tokens (labels != -100), C = rows in one chunk,
D = hidden size, V = decoder rows (``V_pad``, possibly padded to a multiple of 128),
Vv = ``valid_vocab_size`` (real vocabulary; columns >= Vv are padding).

Algorithm, per call:

1. **Gather.** ``mask = labels != -100``; one device->host sync reads ``[M, min label, max label]``
   together (the masked count is data-dependent: the chunk loop needs it on the host, and the label
   range is validated in the same sync). The masked row indices come from a stable ``argsort`` of
   ``~mask`` (no second sync), and ``hidden_M = hidden.index_select(0, idx)`` (M, D). Unmasked rows
   never reach the decoder (~80% of the decoder FLOPs and memory saved at 20% masking).
2. **Chunk.** A custom ``torch.autograd.Function`` walks the M rows in chunks of ``chunk_size``:
   a. ``logits = hidden_C @ W^T + b`` in the compute dtype (bf16 under autocast): (C, V).
   b. columns >= Vv are filled with ``-inf`` (padding rows of the decoder never win the softmax or
      the argmax, and get exactly zero gradient).
   c. row blocks of at most ``_FP32_BLOCK_ELEMS`` elements are processed in fp32: ``max``/``argmax``
      in one pass, ``x = logits - max`` (upcast fused into the subtraction), ``exp``, ``sum`` ->
      ``loss = log(sum) - (logit[target] - max)`` (= lse - logit[target], all fp32) and
      ``correct = argmax == target`` into per-row (M,) buffers, and the gradient ``softmax - onehot``
      is written back **into the logits buffer** (compute dtype).
   d. ``grad_hidden_C = grad_logits @ W`` (each masked row is final after its own chunk);
      ``grad_W += grad_logits^T @ hidden_C`` and ``grad_b += grad_logits.sum(0)``, accumulated in
      ``accum_dtype`` (fp32 by default).
   e. the chunk's logits buffer is dropped before the next chunk, so only one chunk (plus one fp32
      row block) is ever alive: peak extra memory ~ ``2*C*V`` (bf16 logits) + 64 MiB (fp32 block)
      + the gradient accumulators, independent of T. After the last chunk, ``loss_sum`` and
      ``num_correct`` are the sums of the per-row buffers.
3. **Backward** multiplies the saved gradients by ``grad_output`` (a scalar: the trainer divides
   the loss sum by the global masked count) and casts them to the input dtypes; autograd's
   ``index_select`` backward scatters ``grad_hidden_M`` back into a (T, D) gradient.

Semantics: ``loss_sum`` is the **sum** (fp32) over masked tokens, so dividing by a global masked
count across micro-batches and workers stays exact. ``num_correct`` counts argmax hits over the
valid vocabulary. Zero masked tokens gives ``loss_sum == 0`` still attached to the graph, and zero
(not NaN) gradients.

torch.compile: the masked count M is data-dependent (it sets the number of chunks), so the loss
call is wrapped in ``torch.compiler.disable``: compiling the encoder around it gives one clean
graph break at the loss instead of recompiles for every new M.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, NamedTuple

import torch

from neobert.kernels.ce_triton import ce_rows_, triton_available

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# On CUDA with Triton, step 2b-2c runs as one fused row kernel (neobert/kernels/ce_triton.py); tests flip this hook
# to compare it with the torch version on the same GPU.
_USE_TRITON = True
# Upper bound on the fp32 (rows, V) block in step 2c: 2**24 elements = 64 MiB.
_FP32_BLOCK_ELEMS = 1 << 24


class MaskedRows(NamedTuple):
    """The masked positions of a (T,) label tensor, gathered with the loss's one host sync
    (:meth:`MaskedLMLoss.gather_masked`). Lets a caller run work on the masked rows only (e.g. the last encoder
    layer of `NeoBERTForMLM`) and hand the (M, D) rows to the loss without a second sync."""

    idx: torch.Tensor  # (M,) int64 positions with label != -100, ascending
    target: torch.Tensor  # (M,) int64 labels at those positions, each in [0, valid_vocab_size)
    num_masked: torch.Tensor  # int64 0-dim on the label device (== M)
    count: int  # M on the host

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskedRows:
        """The same rows on `device`. Gathering on the CPU labels (before the batch is copied) and moving the
        result with non_blocking=True from pinned memory is what keeps the training step free of host syncs."""
        idx, target, num = self.idx, self.target, self.num_masked
        if non_blocking and idx.device.type == "cpu" and torch.device(device).type == "cuda":
            idx, target, num = idx.pin_memory(), target.pin_memory(), num.pin_memory()
        return MaskedRows(
            idx.to(device, non_blocking=non_blocking),
            target.to(device, non_blocking=non_blocking),
            num.to(device, non_blocking=non_blocking),
            self.count,
        )


class MLMLossOutput(NamedTuple):
    """Sum-reduced masked-LM loss and its counts (all 0-dim tensors on the input device)."""

    loss_sum: torch.Tensor  # fp32, differentiable: sum of token losses over masked positions
    num_masked: torch.Tensor  # int64: number of labels != -100
    num_correct: torch.Tensor  # int64: masked positions whose argmax (over the valid vocab) == label


def _compute_dtype(device_type: str, hidden: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


@functools.cache
def _fp32_out_addmm_ok(device: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(..., out_dtype=float32)`` works here (CUDA, torch >= 2.8): decided once
    per (device, dtype) by trying it on a 1x1 problem. It lets bf16 chunks accumulate into the fp32
    grad_W without a (V, D) temporary."""
    if not device.startswith("cuda") or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        acc = torch.zeros(1, 1, device=device, dtype=torch.float32)
        a = torch.ones(1, 1, device=device, dtype=dtype)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool(acc.item() == 1.0)
    except (TypeError, RuntimeError, NotImplementedError):
        return False


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Steps 2-3 of the module docstring, on already-gathered masked rows."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden_MD: torch.Tensor,  # (M, D)
        weight_VD: torch.Tensor,  # (V, D)
        bias_V: torch.Tensor | None,  # (V,)
        target_M: torch.Tensor,  # (M,) int64 in [0, Vv)
        chunk_size: int,
        valid_vocab_size: int,
        compute_dtype: torch.dtype,
        accum_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = hidden_MD.device
        M, D = hidden_MD.shape
        V = weight_VD.shape[0]
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = bias_V is not None and ctx.needs_input_grad[2]
        need_any = need_h or need_w or need_b

        with torch.autocast(device.type, enabled=False):  # dtypes are explicit below
            w_VD = weight_VD.to(compute_dtype)
            b_V = bias_V.to(compute_dtype) if bias_V is not None else None
            grad_h_MD = torch.empty(M, D, device=device, dtype=compute_dtype) if need_h else None
            grad_w_VD = torch.zeros(V, D, device=device, dtype=accum_dtype) if need_w else None
            grad_b_V = torch.zeros(V, device=device, dtype=accum_dtype) if need_b else None
            use_out_dtype = (
                need_w and accum_dtype != compute_dtype and _fp32_out_addmm_ok(str(device), compute_dtype)
            )
            use_triton = device.type == "cuda" and _USE_TRITON and triton_available()
            # Per-row results land in (M,) buffers and are reduced once at the end: fewer tiny kernels.
            loss_M = torch.empty(M, device=device, dtype=torch.float32)
            correct_M = torch.empty(M, device=device, dtype=torch.bool)
            # fp32 row blocks bound the fp32 temporary independently of chunk_size (fp32 logits need none).
            block = chunk_size if compute_dtype == torch.float32 else max(1, _FP32_BLOCK_ELEMS // V)
            rows_all = torch.arange(min(block, max(M, 1)), device=device)

            for s in range(0, M, chunk_size):
                e = min(s + chunk_size, M)
                h_CD = hidden_MD[s:e].to(compute_dtype)
                if b_V is not None:
                    logits_CV = torch.addmm(b_V, h_CD, w_VD.t())
                else:
                    logits_CV = h_CD @ w_VD.t()
                if use_triton:  # fused rows: 2 reads + 1 write of the chunk (neobert/kernels/ce_triton.py)
                    ce_rows_(
                        logits_CV, target_M[s:e], loss_M[s:e], correct_M[s:e], valid_vocab_size, need_any
                    )
                elif valid_vocab_size < V:
                    logits_CV[:, valid_vocab_size:] = float("-inf")

                for r0 in range(s, e, block) if not use_triton else ():
                    r1 = min(r0 + block, e)
                    lg_RV = logits_CV[r0 - s : r1 - s]
                    t_R = target_M[r0:r1]
                    rows = rows_all[: r1 - r0]
                    max_R, pred_R = lg_RV.max(dim=-1)  # one pass: max for lse, argmax for accuracy
                    torch.eq(pred_R, t_R, out=correct_M[r0:r1])
                    x_RV = lg_RV - max_R.float().unsqueeze(1)  # (R, V) fp32: promotion fuses the upcast
                    shifted_tgt_R = x_RV[rows, t_R]  # logit[target] - max
                    x_RV.exp_()
                    sum_R = x_RV.sum(dim=-1)
                    # loss = lse - logit[target] = log(sum) - (logit[target] - max)
                    torch.sub(sum_R.log(), shifted_tgt_R, out=loss_M[r0:r1])
                    if need_any:
                        # softmax - onehot = (exp - sum * onehot) / sum, written back in compute dtype
                        x_RV[rows, t_R] -= sum_R
                        torch.div(x_RV, sum_R.unsqueeze(1), out=lg_RV)
                    del x_RV
                g_CV = logits_CV  # now holds d(loss_sum)/d(logits) for the chunk
                if need_h:
                    torch.mm(g_CV, w_VD, out=grad_h_MD[s:e])
                if need_w:
                    if grad_w_VD.dtype == compute_dtype:
                        grad_w_VD.addmm_(g_CV.t(), h_CD)
                    elif use_out_dtype:
                        torch.addmm(grad_w_VD, g_CV.t(), h_CD, out_dtype=accum_dtype, out=grad_w_VD)
                    else:
                        grad_w_VD.add_(g_CV.t() @ h_CD)
                if need_b:
                    grad_b_V.add_(g_CV.sum(dim=0, dtype=accum_dtype))
                del logits_CV, g_CV, h_CD

            loss_sum = loss_M.sum()
            num_correct = correct_M.sum()

        ctx.save_for_backward(grad_h_MD, grad_w_VD, grad_b_V)
        ctx.dtypes = (hidden_MD.dtype, weight_VD.dtype, bias_V.dtype if bias_V is not None else None)
        ctx.mark_non_differentiable(num_correct)
        return loss_sum, num_correct

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_correct: Any) -> tuple:
        grad_h_MD, grad_w_VD, grad_b_V = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        # Out of place: backward(retain_graph=True) twice must give the same answer.
        gh = (grad_h_MD * grad_loss).to(h_dtype) if grad_h_MD is not None else None
        gw = (grad_w_VD * grad_loss).to(w_dtype) if grad_w_VD is not None else None
        gb = (grad_b_V * grad_loss).to(b_dtype) if grad_b_V is not None else None
        return gh, gw, gb, None, None, None, None, None


class MaskedLMLoss:
    """Sum-reduced masked-LM cross-entropy over the decoder, without (T, V) logits.

    ``accum_dtype`` is the dtype of the grad_W / grad_b accumulators (fp32 default; bf16 saves the fp32 (V, D)
    buffer at some precision cost). On CUDA with Triton the row math runs as one fused kernel
    (neobert/kernels/ce_triton.py), else as torch ops; both are the same algorithm (module docstring). Liger's
    fused linear cross-entropy was measured 3.4x slower on an H100 (docs/benchmarks.md), so it is not offered.
    """

    def __init__(self, chunk_size: int = 2048, *, accum_dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"MaskedLMLoss: chunk_size must be a positive int, got {chunk_size!r}")
        if accum_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"MaskedLMLoss: accum_dtype must be a floating dtype, got {accum_dtype!r}")
        self.chunk_size = chunk_size
        self.accum_dtype = accum_dtype
        log.info(
            "[loss] masked-LM chunked cross-entropy, chunk_size=%d, accum_dtype=%s", chunk_size, accum_dtype
        )

    def __call__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        valid_vocab_size: int | None = None,
        *,
        masked: MaskedRows | None = None,
    ) -> MLMLossOutput:
        """hidden (T, D) with labels (T,) (-100 = not masked); or, with `masked` from :meth:`gather_masked`,
        hidden (M, D) = exactly the masked rows in `masked.idx` order (then `labels` must be `masked.target`)."""
        return self._forward(hidden, weight, bias, labels, valid_vocab_size, masked)

    def gather_masked(
        self, labels_T: torch.Tensor, valid_vocab_size: int | None, num_decoder_rows: int
    ) -> MaskedRows:
        """Step 1 alone: masked positions and targets of labels (T,), with the one host sync (M and the label
        range are read together). Raises ValueError for a label outside [0, valid_vocab_size)."""
        if labels_T.dim() != 1:
            raise ValueError(
                f"masked_lm_loss: labels must be (T,), got {tuple(labels_T.shape)}; pass one label per packed "
                f"token ({IGNORE_INDEX} = not masked)"
            )
        _check_label_dtype(labels_T)
        vv = num_decoder_rows if valid_vocab_size is None else valid_vocab_size
        mask_T = labels_T != IGNORE_INDEX
        labels_or0 = labels_T.masked_fill(~mask_T, 0)
        num_masked = mask_T.sum()  # int64 0-dim, stays on the device
        if labels_T.numel() == 0:
            M, lo, hi = 0, 0, 0
        else:
            M, lo, hi = torch.stack([num_masked, labels_or0.min(), labels_or0.max()]).tolist()
        if M and (lo < 0 or hi >= vv):
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"masked_lm_loss: labels must be {IGNORE_INDEX} (ignored) or a token id in [0, {vv}), "
                f"found {bad}; fix the masking step, or pass valid_vocab_size=<real vocab size> "
                f"(got {valid_vocab_size}, decoder has {num_decoder_rows} rows)"
            )
        # Stable sort puts the masked positions first, in order, without a second sync.
        idx_M = torch.argsort((~mask_T).to(torch.int8), stable=True)[:M]
        return MaskedRows(idx_M, labels_T.index_select(0, idx_M).long(), num_masked, int(M))

    @torch.compiler.disable  # data-dependent masked count: see the module docstring
    def _forward(
        self,
        hidden_TD: torch.Tensor,
        weight_VD: torch.Tensor,
        bias_V: torch.Tensor | None,
        labels_T: torch.Tensor,
        valid_vocab_size: int | None,
        masked: MaskedRows | None,
    ) -> MLMLossOutput:
        if masked is not None and (labels_T is not masked.target or hidden_TD.shape[0] != masked.count):
            raise ValueError(
                f"masked_lm_loss: with masked=MaskedRows(...) pass hidden = the {masked.count} masked rows "
                f"(got {hidden_TD.shape[0]}) and labels = masked.target"
            )
        vv = _check_inputs(hidden_TD, weight_VD, bias_V, labels_T, valid_vocab_size)
        device = hidden_TD.device
        if masked is None:
            # The one host sync (step 1): M sets the chunk loop; the label range is checked with it.
            masked = self.gather_masked(labels_T, valid_vocab_size, weight_VD.shape[0])
            hidden_MD = hidden_TD.index_select(0, masked.idx)
        else:
            hidden_MD = hidden_TD
        target_M, num_masked = masked.target, masked.num_masked
        cdtype = _compute_dtype(device.type, hidden_MD)

        loss_sum, num_correct = _ChunkedLinearCrossEntropy.apply(
            hidden_MD, weight_VD, bias_V, target_M, self.chunk_size, vv, cdtype, self.accum_dtype
        )
        return MLMLossOutput(loss_sum, num_masked, num_correct)


def _check_label_dtype(labels: torch.Tensor) -> None:
    if labels.dtype not in (torch.int64, torch.int32, torch.int16):
        raise ValueError(f"masked_lm_loss: labels must be an integer tensor, got {labels.dtype}")


def _check_inputs(hidden, weight, bias, labels, valid_vocab_size) -> int:
    """Shape/dtype checks that need no device sync; returns the effective valid vocab size."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"masked_lm_loss: expected hidden (T, D) and weight (V, D) with the same D, got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}; flatten packed hidden states to (T, D)"
        )
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"masked_lm_loss: labels must be (T,) = ({hidden.shape[0]},) matching hidden, got "
            f"{tuple(labels.shape)}; pass one label per packed token ({IGNORE_INDEX} = not masked)"
        )
    _check_label_dtype(labels)
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"masked_lm_loss: bias must be (V,) = ({weight.shape[0]},) like the decoder rows, got {tuple(bias.shape)}"
        )
    if not (hidden.device == weight.device == labels.device) or (
        bias is not None and bias.device != hidden.device
    ):
        raise ValueError(
            f"masked_lm_loss: all inputs must be on one device, got hidden {hidden.device}, weight "
            f"{weight.device}, labels {labels.device}" + (f", bias {bias.device}" if bias is not None else "")
        )
    V = weight.shape[0]
    vv = V if valid_vocab_size is None else valid_vocab_size
    if isinstance(vv, bool) or not isinstance(vv, int) or not 0 < vv <= V:
        raise ValueError(
            f"masked_lm_loss: valid_vocab_size must be an int in [1, {V}] (the decoder's row count), "
            f"got {valid_vocab_size!r}; pass the real vocabulary size (e.g. 30522), or None"
        )
    return vv
