"""Contrastive fine-tuning pieces for NeoBERT sentence embeddings, in pure PyTorch (no Ray here).

A batch holds B queries, their B positives and M hard negatives (any number per query). All 2B+M texts are
packed into ONE flat token stream described by `cu_seqlens` (no padding), encoded once by the varlen encoder,
and pooled per sequence:

    pool_sequences(hidden (T, D), cu_seqlens (S+1,), "mean"|"cls") -> (S, D)

The loss is InfoNCE with in-batch negatives (`info_nce_loss`): every query is scored against all positives and
all hard negatives of the *global* batch (gathered from every worker with `all_gather_with_grad`, whose
backward sums the gradients of every rank into the local rows). `retrieval_metrics` turns a (Q, C) score matrix
into recall@k and MRR@k.

Shape legend: T packed tokens, D model dim, S sequences, B queries (local), P/Bg positives (global),
M hard negatives (local), C candidates (global positives + global negatives).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

Pooling = Literal["mean", "cls"]
POOLING_MODES = ("mean", "cls")


# ----------------------------------------------------------------------------------------------- pooling
def pool_sequences(hidden_TD: torch.Tensor, cu_seqlens: torch.Tensor, mode: Pooling = "mean") -> torch.Tensor:
    """One vector per packed sequence, without a Python loop over sequences.

    mean: segment sum via `index_add_` over per-token segment ids (fp32 accumulation), divided by the lengths.
    cls:  the first token of every sequence (`[CLS]` in our packing), i.e. `hidden[cu_seqlens[:-1]]`.
    Returns (S, D) in fp32 for "mean", the input dtype for "cls".
    """
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {mode!r}")
    cu = cu_seqlens.to(device=hidden_TD.device, dtype=torch.long)
    num_seqs = cu.numel() - 1
    if mode == "cls":
        return hidden_TD[cu[:-1]]  # (S, D)
    lengths_S = cu[1:] - cu[:-1]
    seg_ids_T = torch.repeat_interleave(
        torch.arange(num_seqs, device=hidden_TD.device), lengths_S, output_size=hidden_TD.shape[0]
    )
    sums_SD = hidden_TD.new_zeros((num_seqs, hidden_TD.shape[1]), dtype=torch.float32)
    sums_SD.index_add_(0, seg_ids_T, hidden_TD.float())
    return sums_SD / lengths_S.clamp_min(1).unsqueeze(1).to(torch.float32)


class ContrastiveEncoder(nn.Module):
    """Wraps a varlen encoder (`NeoBERT`: (input_ids (T,), meta) -> (T, D)) and pools one vector per sequence.

    Kept as one module so DDP wraps a single forward; `encoder` keeps the NeoBERT state-dict keys, so
    `ContrastiveEncoder.encoder` is what gets saved as an "encoder" model dir.
    """

    def __init__(self, encoder: nn.Module, pooling: Pooling = "mean"):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling

    def forward(self, input_ids_T: torch.Tensor, meta) -> torch.Tensor:
        hidden_TD = self.encoder(input_ids_T, meta)
        return pool_sequences(hidden_TD, meta.cu_seqlens, self.pooling)  # (S, D)


# ------------------------------------------------------------------------------------ cross-worker gather
def _dist_active(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _gather_counts(counts: tuple[int, ...], device: torch.device, group=None) -> list[list[int]]:
    """Every rank's `counts` in one collective, transposed: result[i][r] = counts[i] of rank r."""
    world = dist.get_world_size(group)
    mine = torch.tensor(counts, dtype=torch.long, device=device)
    out = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out).T.tolist()


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows (ranks may hold different row counts).

    forward: pad to the largest count, `all_gather`, strip the padding -> (sum(sizes), ...).
    backward: every rank holds d(its own loss)/d(all rows); the gradient of the *sum* of all ranks' losses with
    respect to this rank's rows is the all-reduce (SUM) of those, sliced to this rank's rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int, group) -> torch.Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        max_n = max(sizes)
        padded = x.new_zeros((max_n, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def all_gather_with_grad(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """Rows of `x` from every rank, in rank order, differentiable. Identity without an initialized process group.

    `sizes` (row count per rank) is gathered when not given; pass it to save one collective.
    """
    if not _dist_active(group):
        return x
    if sizes is None:
        (sizes,) = _gather_counts((x.shape[0],), x.device, group)
    return _AllGatherWithGrad.apply(x, sizes, dist.get_rank(group), group)


def all_gather_no_grad(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """Like `all_gather_with_grad` for tensors that need no gradient (integer keys)."""
    with torch.no_grad():
        return all_gather_with_grad(x, group, sizes)


# ------------------------------------------------------------------------------------------------- loss
class ContrastiveLossOutput(NamedTuple):
    loss: torch.Tensor  # differentiable scalar; mean over the GLOBAL queries once DDP averages the gradients
    loss_sum: torch.Tensor  # detached sum of the local per-query losses
    num_queries: int  # local
    num_global_queries: int
    num_candidates: int  # global positives + global hard negatives
    num_correct: int  # local queries whose positive scored highest


def info_nce_loss(
    q_BD: torch.Tensor,
    p_BD: torch.Tensor,
    n_MD: torch.Tensor | None = None,
    *,
    temperature: float = 0.05,
    pos_keys_B: torch.Tensor | None = None,
    neg_keys_M: torch.Tensor | None = None,
    gather: bool = True,
    group=None,
) -> ContrastiveLossOutput:
    """InfoNCE over cosine similarities with in-batch and hard negatives, across all workers.

    1. L2-normalise queries, positives and hard negatives (fp32).
    2. If a process group is initialised (and `gather`), all-gather positives and negatives WITH gradients, so
       the candidates are the global batch: C = [P_global; N_global]. Query i of rank r has label
       offset_r + i, where offset_r = number of queries on ranks < r (positives are row-aligned with queries).
    3. logits = q @ C^T / temperature  (B, C); optional false-negative mask: a candidate whose key equals the
       query's positive key (the same text) but is not its label is removed (-inf), so duplicate passages in a
       batch do not act as negatives.
    4. loss_i = -log softmax(logits_i)[label_i]; the returned loss is sum_i loss_i * world / global_queries,
       so that DDP's gradient AVERAGE over ranks equals the gradient of the mean over all global queries, even
       when ranks hold different numbers of queries.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if q_BD.shape != p_BD.shape:
        raise ValueError(f"queries {tuple(q_BD.shape)} and positives {tuple(p_BD.shape)} must be row-aligned")
    device = q_BD.device
    num_q = q_BD.shape[0]
    if n_MD is None:
        n_MD = q_BD.new_zeros((0, q_BD.shape[1]))
    q = F.normalize(q_BD.float(), dim=-1)
    p = F.normalize(p_BD.float(), dim=-1)
    n = F.normalize(n_MD.float(), dim=-1)
    use_dist = gather and _dist_active(group)
    world = dist.get_world_size(group) if use_dist else 1
    if use_dist:
        q_sizes, n_sizes = _gather_counts((num_q, n.shape[0]), device, group)
        rank = dist.get_rank(group)
        offset = sum(q_sizes[:rank])
        p_all = all_gather_with_grad(p, group, q_sizes)  # (Bg, D)
        n_all = all_gather_with_grad(n, group, n_sizes)  # (Mg, D)
        global_q = sum(q_sizes)
    else:
        offset, p_all, n_all, global_q = 0, p, n, num_q
    cands_CD = torch.cat([p_all, n_all])
    logits_BC = q @ cands_CD.T / temperature
    labels_B = torch.arange(num_q, device=device) + offset
    if pos_keys_B is not None:
        if neg_keys_M is None:
            if n_MD.shape[0]:  # a default key would collide with real keys and mask true negatives
                raise ValueError(
                    "info_nce_loss: pos_keys_B was given without neg_keys_M for the "
                    f"{n_MD.shape[0]} hard negatives; pass one key per negative, or neither"
                )
            neg_keys_M = torch.zeros(0, dtype=pos_keys_B.dtype, device=device)
        if use_dist:
            pk_all = all_gather_no_grad(pos_keys_B.to(device), group, q_sizes)
            nk_all = all_gather_no_grad(neg_keys_M.to(device), group, n_sizes)
        else:
            pk_all, nk_all = pos_keys_B.to(device), neg_keys_M.to(device)
        cand_keys_C = torch.cat([pk_all, nk_all])
        dup_BC = cand_keys_C.unsqueeze(0) == pos_keys_B.to(device).unsqueeze(1)
        dup_BC[torch.arange(num_q, device=device), labels_B] = False
        logits_BC = logits_BC.masked_fill(dup_BC, float("-inf"))
    per_query_B = F.cross_entropy(logits_BC, labels_B, reduction="none")
    loss_sum = per_query_B.sum()
    loss = loss_sum * (world / max(global_q, 1))
    num_correct = int((logits_BC.argmax(dim=1) == labels_B).sum().item()) if num_q else 0
    return ContrastiveLossOutput(
        loss=loss,
        loss_sum=loss_sum.detach(),
        num_queries=num_q,
        num_global_queries=global_q,
        num_candidates=cands_CD.shape[0],
        num_correct=num_correct,
    )


# ---------------------------------------------------------------------------------------------- metrics
def retrieval_metrics(
    scores_QC: torch.Tensor, positive_idx_Q: torch.Tensor, ks: tuple[int, ...] = (1, 10), mrr_k: int = 10
) -> dict[str, float]:
    """recall@k and MRR@k for one relevant candidate per query.

    The rank of the positive is the number of candidates scoring >= it (ties count AGAINST the query, so a
    collapsed model that scores everything equally gets the worst rank, not the best).
    """
    if scores_QC.ndim != 2 or positive_idx_Q.shape != (scores_QC.shape[0],):
        raise ValueError(
            f"expected scores (Q, C) and positive_idx (Q,), got {tuple(scores_QC.shape)} and "
            f"{tuple(positive_idx_Q.shape)}"
        )
    if scores_QC.shape[0] == 0:
        raise ValueError("retrieval_metrics needs at least one query")
    pos_idx = positive_idx_Q.to(device=scores_QC.device, dtype=torch.long)
    pos_score_Q = scores_QC.gather(1, pos_idx.unsqueeze(1))  # (Q, 1)
    rank_Q = (scores_QC >= pos_score_Q).sum(dim=1).to(torch.float64)  # 1 = best
    out = {f"recall@{k}": float((rank_Q <= k).double().mean()) for k in ks}
    rr_Q = torch.where(rank_Q <= mrr_k, 1.0 / rank_Q, torch.zeros_like(rank_Q))
    out[f"mrr@{mrr_k}"] = float(rr_Q.mean())
    out["num_queries"] = int(scores_QC.shape[0])
    out["num_candidates"] = int(scores_QC.shape[1])
    return out


def cosine_scores(q_QD: torch.Tensor, c_CD: torch.Tensor) -> torch.Tensor:
    """(Q, C) cosine similarities in fp32."""
    return F.normalize(q_QD.float(), dim=-1) @ F.normalize(c_CD.float(), dim=-1).T
