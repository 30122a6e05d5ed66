"""Full NeoBERT training step on one GPU: packed (varlen) vs padded, tokens/s, MFU, recompiles, peak memory.

One step is the shipped `neobert.training.train_step` (what jobs/pretrain.py runs on every worker): forward,
chunked masked-LM loss scaled by the step's masked count, backward, gradient clipping (`--max-grad-norm`, the
pretraining default 1.0), fused AdamW from `neobert.training.build_optimizer`, in bf16 autocast with fp32 weights.
Documents have long-tailed lengths (lognormal, median `--median-len`, capped at `--max-seq-len`); each step's
documents are packed greedily into a static budget of `--tokens-per-step` tokens (the tail is one trailing
padding segment with labels -100, as the training collate does). The padded baseline trains the same model
(same init) on the same documents per step, in micro-batches of `--padded-batch-size` documents padded to
the longest one in the micro-batch (dynamic padding), with gradient accumulation to one optimizer step.

    python bench/train_step.py --variants packed,padded --compile          # the headline comparison
    python bench/train_step.py --variants packed --compile --max-seqlen-mode bucket
    python bench/train_step.py --memory-sweep --compile                    # peak memory table
    python bench/train_step.py --preset tiny --steps 3 --warmup 1 --device cpu   # plumbing check on a CPU

MFU is `neobert.training.model_flops` (non-padding tokens only: 6 * tokens * (encoder linear params) + 6 *
masked * (decoder params) + 12 * layers * hidden * sum(doc_len^2), the attention matmuls) over
`neobert.training.peak_flops` of the device (989 TFLOP/s dense bf16 for an H100; none on a CPU). Flags: see `--help`. Prints one JSON line per result (and appends it to `--json-out`).
The padded variant goes through the same `train_step` (its micro-batches are (B, S) tensors with the attention
mask in place of the packing metadata; `PaddedMLM` routes them to `forward_padded`). The packed variant uses
NeoBERTForMLM's default sparse last layer (~2% less work); the padded path is always dense, so pass
`--dense-last-layer` for a like-for-like packed/padded ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: neobert/ and bench/

from neobert.config import NeoBERTConfig  # noqa: E402
from neobert.kernels import resolve  # noqa: E402
from neobert.kernels.ffn import nvmmh_state  # noqa: E402
from neobert.model import NeoBERTForMLM  # noqa: E402
from neobert.packing import PackedMeta  # noqa: E402
from neobert.training import MicroBatch, build_optimizer, model_flops_for, peak_flops, train_step  # noqa: E402

MASK_ID, PAD_ID = 103, 0


@dataclass
class Step:
    """One step's documents, packed (GPU tensors) and as a list of lengths (for the padded path)."""

    input_ids: torch.Tensor  # (T_budget,)
    labels: torch.Tensor  # (T_budget,) -100 = not masked / padding
    labels_cpu: torch.Tensor  # the same on the CPU (the trainer masks on the CPU, then copies)
    cu_seqlens: torch.Tensor  # (num_docs + 2,) int32: documents + the trailing padding segment
    true_max: int  # longest real document
    lengths: list[int]  # real documents
    num_tokens: int  # non-padding tokens
    num_masked: int
    attn_sq: int  # sum(len^2) over real documents
    padded: list | None = None  # micro-batches for the padded path, built on first use


def make_steps(args, vocab: int, device: torch.device) -> list[Step]:
    rng = np.random.default_rng(args.seed)
    budget, cap = args.tokens_per_step, args.max_seq_len
    steps = []
    pending: list[int] = []
    while len(steps) < args.warmup + args.steps:
        while sum(pending) < budget + cap:
            pending.append(int(np.clip(rng.lognormal(math.log(args.median_len), args.sigma), 16, cap)))
        lengths, used = [], 0
        while pending and used + pending[0] <= budget:
            used += pending[0]
            lengths.append(pending.pop(0))
        ids = rng.integers(1000, vocab, used)
        masked = rng.random(used) < args.mask_prob
        labels = np.where(masked, ids, -100)
        ids = np.where(masked, MASK_ID, ids)
        pad = budget - used
        ids = np.concatenate([ids, np.full(pad, PAD_ID)])
        labels = np.concatenate([labels, np.full(pad, -100)])
        cu = np.concatenate([[0], np.cumsum(lengths)] + ([[budget]] if pad else []))
        steps.append(
            Step(
                input_ids=torch.as_tensor(ids, dtype=torch.long, device=device),
                labels=torch.as_tensor(labels, dtype=torch.long, device=device),
                labels_cpu=torch.as_tensor(labels, dtype=torch.long),
                cu_seqlens=torch.as_tensor(cu, dtype=torch.int32, device=device),
                true_max=max(lengths + ([pad] if pad else [])),
                lengths=lengths,
                num_tokens=used,
                num_masked=int(masked.sum()),
                attn_sq=int(sum(n * n for n in lengths)),
            )
        )
    return steps


def max_seqlen_for(step: Step, mode: str, bound: int) -> int:
    if mode == "exact":
        return step.true_max
    if mode == "bucket":  # next power of two >= 128
        return min(bound, max(128, 1 << (step.true_max - 1).bit_length()))
    return bound  # "bound": the configured max_seq_len, one static value


def position_ids_for(cu: torch.Tensor, total: int) -> torch.Tensor:
    # Built on the device without a sync: doc start of every token via searchsorted.
    tok = torch.arange(total, device=cu.device, dtype=torch.int32)
    doc = torch.searchsorted(cu[1:], tok, right=True)
    return tok - cu[doc]


def step_flops(cfg: NeoBERTConfig, step: Step) -> float:
    return model_flops_for(
        cfg, num_tokens=step.num_tokens, sum_sq_seqlens=step.attn_sq, num_masked=step.num_masked
    )


class PaddedMLM(torch.nn.Module):
    """`train_step` calls `model(input_ids, meta, labels)`; for padded (B, S) micro-batches `meta` is the
    attention mask and the call goes to `forward_padded`."""

    def __init__(self, mlm: NeoBERTForMLM) -> None:
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids, attention_mask, labels):
        return self.mlm.forward_padded(input_ids, attention_mask, labels)


def build(cfg: NeoBERTConfig, args, device, *, dynamic: bool = False, fsdp2: bool = False):
    torch.manual_seed(args.seed)
    kernels = resolve(cfg)
    if args.unfused_rope:  # RoPE as its own (inductor-fused) step, attention on q, k, v
        kernels = dataclasses.replace(kernels, qkv_attn_fn=None)
    if args.same_ffn_on_rows:  # the sparse last layer's rows through the packed FFN backend (quack) too
        kernels = dataclasses.replace(kernels, rows_ffn_fn=kernels.ffn_fn)
    model = NeoBERTForMLM(
        cfg,
        loss_chunk_size=args.loss_chunk_size,
        sparse_last_layer=not args.dense_last_layer,
        kernels=kernels,
    ).to(device)
    if args.compile:
        kw = {"mode": args.compile_mode} if args.compile_mode else {}
        model.encoder.compile_layers(dynamic=(args.dynamic or dynamic) or None, **kw)
    if (
        fsdp2
    ):  # as the trainer's runner does: compile, then shard (bf16 all-gather on CUDA), then the optimizer
        from pipelines.train.parallel import wrap_model

        bf16 = torch.bfloat16 if device.type == "cuda" else None
        model = wrap_model(model, strategy="fsdp2", device=device, param_dtype=bf16)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.01)  # fused AdamW on CUDA, as the trainer builds it
    return model, opt


def init_single_process_group(device) -> None:
    """FSDP2 needs a process group, also at world size 1 (what `scaling.strategy: fsdp2` runs on one worker)."""
    import torch.distributed as dist

    if not dist.is_initialized():  # an in-process store: no port, no rendezvous
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def autocast_for(device):
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def shipped_step(model, opt, micro: list[MicroBatch], args, device) -> torch.Tensor:
    """`neobert.training.train_step` on one worker; returns the step's mean masked-LM loss (a device scalar)."""
    stats = train_step(
        model, opt, None, micro, max_grad_norm=args.max_grad_norm or None, autocast=autocast_for(device)
    )
    return stats.loss_sum / max(stats.num_masked_local, 1)


def packed_micro_batch(model, step: Step, args, device) -> MicroBatch:
    meta = PackedMeta(
        step.cu_seqlens,
        max_seqlen_for(step, args.max_seqlen_mode, args.max_seq_len),
        position_ids_for(step.cu_seqlens, step.input_ids.shape[0]),
    )
    if args.compile:
        torch._dynamo.mark_dynamic(meta.cu_seqlens, 0)  # num_docs varies per step: one symbolic dim
    masked = None
    if not args.device_masked:  # as the trainer does: masked rows gathered on the CPU, copied without a sync
        masked = model.masked_rows(step.labels_cpu).to(device, non_blocking=device.type == "cuda")
    return MicroBatch(step.input_ids, step.labels, meta, step.num_masked, step.num_tokens, masked)


def packed_step(model, opt, step: Step, args, device, marks: list | None = None) -> torch.Tensor:
    """One training step; `marks` (host-overhead probe) gets (phase, perf_counter, CUDA event) after each phase:
    forward (a forward hook), backward incl. gradient clipping (an optimizer pre-step hook), optimizer."""

    def mark(phase: str) -> None:
        if marks is not None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append((phase, time.perf_counter(), ev))

    hooks = []
    if marks is not None:
        hooks = [
            model.register_forward_hook(lambda *_: mark("forward")),
            opt.register_step_pre_hook(lambda *_: mark("backward")),
        ]
    mark("start")
    try:
        loss = shipped_step(model, opt, [packed_micro_batch(model, step, args, device)], args, device)
    finally:
        for h in hooks:
            h.remove()
    mark("optimizer")
    return loss.detach()


def micro_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Consecutive groups of `size` documents; a last group of one joins the previous group, because a batch
    dimension of 1 is specialized by torch.compile (one more graph mid-run)."""
    groups = [lengths[i : i + size] for i in range(0, len(lengths), size)]
    if len(groups) > 1 and len(groups[-1]) == 1:
        last = (
            groups.pop()
        )  # (not `groups[-2] = groups[-2] + groups.pop()`: the target is indexed after the pop)
        groups[-1] = groups[-1] + last
    return groups


def padded_batches(step: Step, args, device) -> list[tuple]:
    """The step's documents as micro-batches (ids, mask, labels) of shape (B, S), S = longest in the batch, each
    with its masked and real token counts (counted on the host).
    Built once before timing: a pageable host->device copy inside the loop would stall the GPU queue."""
    if step.padded is None:
        ids, labels = step.input_ids.cpu().numpy(), step.labels.cpu().numpy()
        out, o = [], 0
        for lens in micro_batches(step.lengths, args.padded_batch_size):
            lens = np.asarray(lens)
            S = (
                -(-int(lens.max()) // 8) * 8
            )  # pad to a multiple of 8 (HF pad_to_multiple_of=8; no S % 8 guard)
            starts = o + np.concatenate([[0], np.cumsum(lens)[:-1]])
            valid = np.arange(S)[None, :] < lens[:, None]  # (B, S)
            idx = np.where(valid, starts[:, None] + np.arange(S)[None, :], 0)
            b_ids = np.where(valid, ids[idx], PAD_ID)
            b_lab = np.where(valid, labels[idx], -100)
            tensors = tuple(torch.as_tensor(a, device=device) for a in (b_ids, valid.astype(np.int64), b_lab))
            out.append((*tensors, int((b_lab != -100).sum()), int(lens.sum())))
            o += int(lens.sum())
        step.padded = out
    return step.padded


def padded_step(model, opt, step: Step, args, device) -> torch.Tensor:
    micro = [
        MicroBatch(b_ids, b_lab, mask, n_masked, int(lens_sum))
        for b_ids, mask, b_lab, n_masked, lens_sum in padded_batches(step, args, device)
    ]
    return shipped_step(PaddedMLM(model), opt, micro, args, device).detach()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_variant(variant: str, cfg: NeoBERTConfig, steps: list[Step], args, device) -> dict:
    if variant == "fsdp2":
        init_single_process_group(device)
    # padded: (B, S) vary per micro-batch; fsdp2: the packed step on the FSDP2-sharded model (world size 1)
    model, opt = build(cfg, args, device, dynamic=variant == "padded", fsdp2=variant == "fsdp2")
    fn = padded_step if variant == "padded" else packed_step
    if variant == "padded":
        for s in steps:
            padded_batches(s, args, device)
        if (
            args.compile
        ):  # compile the small-batch graph too (inductor guards on B*S size), outside the timing
            b_ids = steps[0].input_ids[:32].view(2, 16)
            with autocast_for(device)():
                model.forward_padded(b_ids, torch.ones_like(b_ids), b_ids).loss_sum.backward()
            opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    graphs_at_start = graph_count()
    t0 = time.perf_counter()
    warm_losses = [fn(model, opt, s, args, device) for s in steps[: args.warmup]]
    sync(device)
    warm_s = time.perf_counter() - t0
    graphs_before = graph_count()
    graphs_in_warmup = graphs_before - graphs_at_start
    syncs = sync_sites = None
    if args.check_syncs and device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            fn(model, opt, steps[args.warmup], args, device)
            torch.cuda.set_sync_debug_mode("default")
        # torch also warns once that the debug mode is a "prototype feature": that notice is not a sync
        hits = [w for w in caught if "synchroniz" in str(w.message) and "prototype" not in str(w.message)]
        syncs = len(hits)
        sync_sites = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in hits})
        sync(device)
    timed = steps[args.warmup :]
    t0 = time.perf_counter()
    losses = [fn(model, opt, s, args, device) for s in timed]
    sync(device)
    dt = time.perf_counter() - t0
    tokens = sum(s.num_tokens for s in timed)
    flops = sum(step_flops(cfg, s) for s in timed)
    peak = peak_flops(device)
    res = {
        "variant": variant,
        "backend": "sdpa-padded" if variant == "padded" else model.attn_backend,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "sparse_last_layer": not args.dense_last_layer,
        "fused_rope": model.encoder.layers[0].qkv_attn_fn is not None,
        "host_masked": variant != "padded" and not args.device_masked,
        "ffn_backend": model.encoder.ffn_backend,
        "quack_tuned": args.quack_tuned,
        "packed_ffn": model.encoder.layers[0].packed_ffn_fn.__name__,
        "rows_ffn": model.encoder.layers[-1].rows_ffn_fn.__name__,
        "nvmmh": nvmmh_state() if model.encoder.ffn_backend == "quack" else None,
        "max_seqlen_mode": args.max_seqlen_mode if variant != "padded" else None,
        "tokens_per_step": args.tokens_per_step,
        "max_seq_len": args.max_seq_len,
        "steps": len(timed),
        "step_ms": 1000 * dt / len(timed),
        "tokens_per_s": tokens / dt,
        "mfu": flops / dt / peak if peak else None,
        "max_grad_norm": args.max_grad_norm,
        "tflops": flops / dt / 1e12,
        "padding_frac": (
            1 - tokens / (len(timed) * args.tokens_per_step)
            if variant != "padded"
            else _pad_frac(timed, args)
        ),
        "warmup_s": warm_s,
        "new_graphs_in_timed_loop": graph_count() - graphs_before,
        "host_syncs_per_step": syncs,
        "sync_sites": sync_sites,
        "graphs_in_warmup": graphs_in_warmup,
        "bf16_residual": args.bf16_residual,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "final_loss": float(losses[-1]),
        "losses": [round(float(x), 5) for x in warm_losses + losses],  # every step, warm-up included
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    if args.profile and device.type == "cuda":
        res["profile"] = profile(fn, model, opt, timed[:3], args, device, variant)
    if args.host_profile and device.type == "cuda" and variant == "packed":
        res["host"] = host_profile(model, opt, timed[:3], args, device)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def _pad_frac(timed: list[Step], args) -> float:
    real = padded = 0
    for s in timed:
        for lens in micro_batches(s.lengths, args.padded_batch_size):
            real += sum(lens)
            padded += -(-max(lens) // 8) * 8 * len(lens)
    return 1 - real / padded


def profile(fn, model, opt, steps, args, device, variant) -> dict:
    """torch.profiler over `steps`: top ops by device time, kernel categories, idle gaps, GEMM rates."""
    import tempfile

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from bench.trace_summary import gemm_table, summarize

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for s in steps:
            fn(model, opt, s, args, device)
        sync(device)
    if args.profile_out:
        Path(args.profile_out).parent.mkdir(parents=True, exist_ok=True)
        table = prof.key_averages().table(
            sort_by="self_device_time_total", row_limit=40, max_name_column_width=90
        )
        Path(f"{args.profile_out}.{variant}.txt").write_text(table)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        summary = summarize(trace, len(steps))
    summary["gemms"] = gemm_table(prof, len(steps))[:16]
    if args.profile_out:
        Path(f"{args.profile_out}.{variant}.summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def host_profile(model, opt, steps: list[Step], args, device) -> dict:
    """Is the step host-bound? Per phase (forward / backward / optimizer): the CPU time to enqueue it, measured
    while a long spin kernel holds the GPU so the CPU never waits on it, and the GPU time of the same phase
    fully fed (CUDA events; the queue was filled while the GPU spun). Then cProfile over the same steps: the
    Python functions that cost the host most, written to `--host-profile PREFIX.txt`."""
    import cProfile
    import io
    import pstats

    phases = ("forward", "backward", "optimizer")
    host = {p: [] for p in phases}
    gpu = {p: [] for p in phases}
    for s in steps:
        sync(device)
        torch.cuda._sleep(int(2e9))  # ~1 s of spinning on the GPU: the CPU enqueues the whole step meanwhile
        marks: list = []
        packed_step(model, opt, s, args, device, marks)
        sync(device)
        for (_, t0, e0), (name, t1, e1) in zip(marks, marks[1:], strict=False):
            host[name].append(1000 * (t1 - t0))
            gpu[name].append(e0.elapsed_time(e1))
    out = {
        "host_ms": {p: float(np.median(host[p])) for p in phases},
        "gpu_fed_ms": {p: float(np.median(gpu[p])) for p in phases},
    }
    prof = cProfile.Profile()
    sync(device)
    prof.enable()
    for s in steps:
        packed_step(model, opt, s, args, device)
    sync(device)
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(45)
    st.sort_stats("cumulative").print_stats(70)
    Path(args.host_profile).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.host_profile}.txt").write_text(buf.getvalue())
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:15]  # (file, line, fn) -> (cc, nc, tt, ct, ..)
    out["top_tottime_ms_per_step"] = [
        [f"{Path(k[0]).name}:{k[1]}:{k[2]}", round(1000 * v[2] / len(steps), 2), v[1] // len(steps)]
        for k, v in rows
    ]
    return out


def memory_sweep(cfg: NeoBERTConfig, args, device) -> list[dict]:
    rows = []
    for max_len in args.sweep_max_seq_len:
        for tokens in args.sweep_tokens:
            a = argparse.Namespace(**{**vars(args), "tokens_per_step": tokens, "max_seq_len": max_len})
            a.warmup, a.steps = 1, 2
            a.median_len = args.median_len * max_len / 1024  # longer documents where the cap allows them
            row = {
                "tokens_per_step": tokens,
                "max_seq_len": max_len,
                "compile": args.compile,
                "backend": args.backend,
            }
            try:
                steps = make_steps(a, cfg.vocab_size, device)
                model, opt = build(cfg, a, device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for s in steps:
                    packed_step(model, opt, s, a, device)
                sync(device)
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                row["step_ms_incl_warmup"] = 1000 * (time.perf_counter() - t0) / len(steps)
            except torch.OutOfMemoryError:
                row["peak_mem_gib"] = "OOM"
            finally:
                model = opt = steps = None
                gc.collect()
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def fsdp2_comparison(ddp: dict, fsdp2: dict) -> dict:
    """FSDP2 at world size 1 against the plain step (what DDP runs on one worker): overhead and loss parity."""
    diffs = [abs(a - b) for a, b in zip(ddp["losses"], fsdp2["losses"], strict=True)]
    return {
        "fsdp2_over_ddp_tokens_per_s": fsdp2["tokens_per_s"] / ddp["tokens_per_s"],
        "fsdp2_overhead": 1 - fsdp2["tokens_per_s"] / ddp["tokens_per_s"],
        "loss_steps": len(diffs),
        "max_abs_loss_diff": max(diffs),
        "final_loss_diff": diffs[-1],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base", choices=["tiny", "small", "base"])
    p.add_argument(
        "--backend", default="auto", help="attention backend: auto | fa4 | flash_attn | torch_varlen | sdpa"
    )
    p.add_argument(
        "--ffn-backend", default="auto", help="SwiGLU FFN: auto | quack | torch (neobert/kernels/ffn.py)"
    )
    p.add_argument(
        "--quack-tuned",
        action="store_true",
        help="NeoBERTConfig(ffn_autotune=True): quack autotunes its FFN GEMMs for the token budget (~90 s once)",
    )
    p.add_argument(
        "--no-nvmmh-guard",
        action="store_true",
        help="quack FFN without nvMatmulHeuristics: let every GEMM retry the failed import (no guard)",
    )
    p.add_argument(
        "--same-ffn-on-rows",
        action="store_true",
        help="the sparse last layer's masked rows through the model's FFN backend too (quack) instead of the "
        "torch FFN",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile every encoder block")
    p.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: none)",
    )
    p.add_argument(
        "--dynamic", action="store_true", help="compile with dynamic=True (else automatic dynamic)"
    )
    p.add_argument(
        "--variants",
        default="packed,padded",
        help="comma list of packed, padded, fsdp2 (the packed step on an FSDP2-sharded model, world size 1); "
        "same documents and initialisation for all",
    )
    p.add_argument("--max-seqlen-mode", default="bound", choices=["bound", "bucket", "exact"])
    p.add_argument("--tokens-per-step", type=int, default=65536)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--median-len", type=float, default=300.0)
    p.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of document lengths")
    p.add_argument("--mask-prob", type=float, default=0.2)
    p.add_argument("--padded-batch-size", type=int, default=32, help="documents per padded micro-batch")
    p.add_argument("--loss-chunk-size", type=int, default=4096)
    p.add_argument(
        "--max-grad-norm",
        type=float,
        default=1.0,
        help="gradient clipping of train_step (the pretraining default; 0 = off, the norm is still computed)",
    )
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--dense-last-layer",
        action="store_true",
        help="NeoBERTForMLM(sparse_last_layer=False): last layer's FFN on every token (the old path)",
    )
    p.add_argument("--bf16-residual", action="store_true", help="NeoBERTConfig(fp32_residual=False)")
    p.add_argument(
        "--device-masked",
        action="store_true",
        help="gather the masked rows from the GPU labels inside the model (one host sync per step) instead of on "
        "the CPU labels before the copy (what the trainer does)",
    )
    p.add_argument(
        "--unfused-rope",
        action="store_true",
        help="fa4: RoPE as a separate step instead of inside the attention op",
    )
    p.add_argument(
        "--check-syncs", action="store_true", help="count host syncs in one step (cuda sync debug)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler over 3 steps; kernel/gap/GEMM summary in the JSON",
    )
    p.add_argument("--profile-out", default=None, help="write the profiler table to PREFIX.<variant>.txt")
    p.add_argument(
        "--host-profile",
        default=None,
        metavar="PREFIX",
        help="host (CPU) time vs fully-fed GPU time per phase, and a cProfile of 3 steps to PREFIX.txt",
    )
    p.add_argument("--memory-sweep", action="store_true")
    p.add_argument("--sweep-tokens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--sweep-max-seq-len", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--json-out", default=None, help="append result JSON lines here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    import neobert.kernels.ffn

    neobert.kernels.ffn.GUARD_MISSING_NVMMH = not args.no_nvmmh_guard
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = NeoBERTConfig.preset(
        args.preset,
        attn_backend=args.backend,
        max_position_embeddings=max(8192, args.max_seq_len),
        fp32_residual=not args.bf16_residual,
        ffn_backend=args.ffn_backend,
        ffn_autotune=args.quack_tuned,
    )
    results = []
    if args.memory_sweep:
        results = memory_sweep(cfg, args, device)
    else:
        steps = make_steps(args, cfg.vocab_size, device)
        for variant in args.variants.split(","):
            try:
                res = run_variant(variant, cfg, steps, args, device)
            except torch.OutOfMemoryError:
                res = {"variant": variant, "error": "OOM", "tokens_per_step": args.tokens_per_step}
                torch.cuda.empty_cache()
            print(json.dumps(res), flush=True)
            results.append(res)
        by = {r["variant"]: r for r in results if "error" not in r}
        if "packed" in by and "padded" in by:
            ratio = by["packed"]["tokens_per_s"] / by["padded"]["tokens_per_s"]
            print(json.dumps({"packed_over_padded": ratio}), flush=True)
            results.append({"packed_over_padded": ratio, "compile": args.compile})
        if "packed" in by and "fsdp2" in by:
            results.append(fsdp2_comparison(by["packed"], by["fsdp2"]))
            print(json.dumps(results[-1]), flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
