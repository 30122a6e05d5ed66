"""Benchmark the masked-LM loss: peak extra memory and forward+backward time.

    # H100 (the figures in docs/benchmarks.md):
    .venv/bin/python bench/loss.py --out outputs/bench_loss.json
    # CPU smoke check (no memory figures; times are only indicative):
    .venv/bin/python bench/loss.py --device cpu --tokens 4096

Methods (all sum-reduced over masked tokens, hidden (T, D) in --dtype, decoder fp32 params under
bf16 autocast, decoder padded to a multiple of --pad-multiple rows and the padding excluded):
  full_logits     F.linear over all T tokens + F.cross_entropy(ignore_index=-100)
  masked_logits   gather masked rows (nonzero), F.linear + F.cross_entropy on them
  chunked_c<N>    neobert.loss.MaskedLMLoss(chunk_size=N)
  chunked_c<N>_bf16acc   the same with grad_W accumulated in bf16

Memory is ``torch.cuda.max_memory_allocated() - memory_allocated()`` around one forward+backward
(inputs allocated, their .grad freed first, so the new gradients count as extra). Time is the median
of CUDA-event timings of forward+backward after warm-up. Every method's loss, counts and gradients
are compared with masked_logits (``*_rel_err`` = max |diff| / max |reference|).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from neobert.loss import IGNORE_INDEX, MaskedLMLoss  # noqa: E402

GIB = 1024**3
TARGET_EXTRA_GIB = 0.5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=65536, help="T, packed tokens in the micro-batch")
    p.add_argument("--mask-frac", type=float, default=0.2)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=30522, help="real vocabulary size")
    p.add_argument(
        "--pad-multiple", type=int, default=128, help="decoder rows padded to this multiple (0 = off)"
    )
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--chunk-sizes", default="1024,2048,4096,8192")
    p.add_argument("--iters", type=int, default=None, help="timed runs (default 10 on CUDA, 1 on CPU)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed runs first (default 2 on CUDA, 0 on CPU)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-full", action="store_true", help="skip full_logits (needs ~30 GiB at T=65536)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu --tokens 4096 for a smoke check")
    on_cuda = args.device.startswith("cuda")
    args.iters = args.iters if args.iters is not None else (10 if on_cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (2 if on_cuda else 0)
    return args


# ---------------------------------------------------------------- methods: (h, w, b, labels) -> (loss, n, correct)
def full_logits(h, w, b, labels, vv):
    logits = F.linear(h, w, b)[:, :vv]  # (T, Vv): the baseline that materializes everything
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    mask = labels != IGNORE_INDEX
    with torch.no_grad():
        correct = ((logits.argmax(-1) == labels) & mask).sum()
    return loss, mask.sum(), correct


def masked_logits(h, w, b, labels, vv):
    idx = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    logits = F.linear(h.index_select(0, idx), w, b)[:, :vv]  # (M, Vv)
    target = labels.index_select(0, idx)
    loss = F.cross_entropy(logits, target, reduction="sum")
    with torch.no_grad():
        correct = (logits.argmax(-1) == target).sum()
    return loss, torch.tensor(idx.numel()), correct


def chunked(loss_fn: MaskedLMLoss):
    def run(h, w, b, labels, vv):
        out = loss_fn(h, w, b, labels, valid_vocab_size=vv)
        return out.loss_sum, out.num_masked, out.num_correct

    return run


def unfused_rows(loss_fn: MaskedLMLoss):
    import neobert.loss as loss_mod

    def run(h, w, b, labels, vv):
        loss_mod._USE_TRITON = False
        try:
            out = loss_fn(h, w, b, labels, valid_vocab_size=vv)
        finally:
            loss_mod._USE_TRITON = True
        return out.loss_sum, out.num_masked, out.num_correct

    return run


# ---------------------------------------------------------------- measurement
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel_err(got, ref) -> float:
    return (got.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-30)


def measure(name, fn: Callable, tensors, labels, vv, args, device, autocast_ctx, ref=None) -> dict:
    h, w, b = tensors

    def step():
        for t in tensors:
            t.grad = None
        with autocast_ctx():
            loss, n, correct = fn(h, w, b, labels, vv)
        loss.backward()
        return loss, n, correct

    for _ in range(args.warmup):
        step()
    for t in tensors:
        t.grad = None
    _sync(device)
    extra_gib = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    loss, n, correct = step()  # the correctness + memory run
    _sync(device)
    if device.type == "cuda":
        extra_gib = (torch.cuda.max_memory_allocated(device) - base) / GIB
    row = {
        "name": name,
        "loss_sum": float(loss.detach()),
        "num_masked": int(n),
        "num_correct": int(correct),
        "extra_gib": extra_gib,
    }
    grads = [t.grad.detach().clone() if t.grad is not None else None for t in tensors]
    if ref is not None:
        row["loss_rel_err"] = abs(row["loss_sum"] - ref["loss_sum"]) / abs(ref["loss_sum"])
        row["correct_diff"] = row["num_correct"] - ref["num_correct"]
        for key, g, r in zip(["grad_hidden", "grad_weight", "grad_bias"], grads, ref["_grads"], strict=True):
            row[f"{key}_rel_err"] = _rel_err(g, r) if g is not None and r is not None else None
    else:
        row["_grads"] = grads
    del loss, grads

    times = []
    for _ in range(args.iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            times.append((start, end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    _sync(device)
    ms = [s.elapsed_time(e) for s, e in times] if device.type == "cuda" else [t * 1e3 for t in times]
    row["time_ms"] = statistics.median(ms)
    row["time_ms_min"] = min(ms)
    for t in tensors:
        t.grad = None
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    T, D, vv = args.tokens, args.hidden, args.vocab
    V_pad = -(-vv // args.pad_multiple) * args.pad_multiple if args.pad_multiple else vv
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    hidden = torch.randn(T, D, device=device, dtype=dtype).requires_grad_()  # encoder output dtype
    weight = (torch.randn(V_pad, D, device=device) * 0.02).requires_grad_()  # fp32 params (AMP)
    bias = torch.zeros(V_pad, device=device).requires_grad_()
    labels = torch.full((T,), IGNORE_INDEX, dtype=torch.long, device=device)
    mask = torch.rand(T, device=device) < args.mask_frac
    labels[mask] = torch.randint(0, vv, (int(mask.sum()),), device=device)
    with torch.no_grad():  # pull masked hidden states towards their label's decoder row by a random
        # amount, so the loss is mixed (some confident hits, some misses) like a model mid-training
        pull = torch.rand(T, 1, device=device) * 12.0 * mask[:, None]
        w_t = weight[labels.clamp(min=0)]
        hidden += (pull * w_t / w_t.norm(dim=1, keepdim=True)).to(dtype)
    tensors = (hidden, weight, bias)

    def autocast_ctx():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    methods: list[tuple[str, Callable]] = []
    if not args.skip_full:
        methods.append(("full_logits", full_logits))
    methods.append(("masked_logits", masked_logits))
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c]
    for c in chunk_sizes:
        methods.append((f"chunked_c{c}", chunked(MaskedLMLoss(chunk_size=c))))
    if dtype != torch.float32:
        c = 4096 if 4096 in chunk_sizes else chunk_sizes[0]
        loss_fn = MaskedLMLoss(chunk_size=c, accum_dtype=dtype)
        methods.append((f"chunked_c{c}_bf16acc", chunked(loss_fn)))
    if device.type == "cuda":  # the unfused torch rows (what CUDA without Triton runs), for comparison
        methods.append(("chunked_c2048_torchrows", unfused_rows(MaskedLMLoss(chunk_size=2048))))

    # masked_logits is the reference for the error columns: run it first.
    order = sorted(methods, key=lambda m: m[0] != "masked_logits")
    rows: dict[str, dict] = {}
    ref = None
    for name, fn in order:
        rows[name] = measure(name, fn, tensors, labels, vv, args, device, autocast_ctx, ref)
        if ref is None:
            ref = rows[name]
        print(f"  measured {name}: {rows[name]['time_ms']:.2f} ms", file=sys.stderr, flush=True)
    ref.pop("_grads")
    ref.update(loss_rel_err=0.0, correct_diff=0, grad_hidden_rel_err=0.0, grad_weight_rel_err=0.0)
    ref["grad_bias_rel_err"] = 0.0
    results = [rows[name] for name, _ in methods]

    masked_ms = rows["masked_logits"]["time_ms"]
    for r in results:
        if r["name"].startswith("chunked"):
            mem_ok = r["extra_gib"] is None or r["extra_gib"] <= TARGET_EXTRA_GIB
            r["meets_target"] = bool(mem_ok and r["time_ms"] <= masked_ms)
    report = {
        "bench": "masked_lm_loss",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": {
            "tokens": T,
            "num_masked": int(mask.sum()),
            "hidden": D,
            "vocab": vv,
            "padded_vocab": V_pad,
            "dtype": args.dtype,
            "iters": args.iters,
            "warmup": args.warmup,
        },
        "target": {"extra_gib_max": TARGET_EXTRA_GIB, "time": "<= masked_logits"},
        "results": results,
    }
    print_table(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


def print_table(report: dict) -> None:
    cfg = report["config"]
    print(
        f"masked-LM loss | {report['device']} | torch {report['torch']} | T={cfg['tokens']} "
        f"M={cfg['num_masked']} D={cfg['hidden']} V={cfg['vocab']} (pad {cfg['padded_vocab']}) {cfg['dtype']}"
    )
    head = f"{'method':<24}{'time ms':>9}{'extra GiB':>11}{'loss rel':>10}{'dW rel':>9}{'dH rel':>9}{'acc diff':>9}"
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        mem = f"{r['extra_gib']:.3f}" if r["extra_gib"] is not None else "n/a"
        ok = {True: "  ok", False: "  MISS"}.get(r.get("meets_target"), "")
        print(
            f"{r['name']:<24}{r['time_ms']:>9.2f}{mem:>11}{r['loss_rel_err']:>10.1e}"
            f"{r['grad_weight_rel_err']:>9.1e}{r['grad_hidden_rel_err']:>9.1e}{r['correct_diff']:>9d}{ok}"
        )


if __name__ == "__main__":
    main()
