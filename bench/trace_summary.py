"""Summaries of a torch.profiler trace of training steps: where the GPU time goes and where it idles.

Used by `bench/train_step.py --profile`. From the exported Chrome trace it reports, per step:
  * GPU kernel time by category (GEMM, attention, "triton" = inductor-generated `triton_*` kernels, other, which
    includes hand-written Triton kernels such as the RoPE and loss rows) and the top kernels;
  * idle time between consecutive kernels ("gaps"), in total and the largest gaps with the kernels around them
    (a gap after a host sync or a slow launch shows up here, not in any kernel's time);
  * for copies and uncategorized kernels, the CPU ops that launched them;
  * GEMM shapes with their achieved TFLOP/s (from `aten::mm`/`addmm` input shapes).
"""

from __future__ import annotations

import bisect
import json
import re
from collections import defaultdict
from pathlib import Path

_GEMM = re.compile(r"gemm|nvjet|sm90_xmma|cutlass.*tensorop|cublas", re.I)
_ATTN = re.compile(r"flash|fmha|attention", re.I)


def category(name: str) -> str:
    if _ATTN.search(name):
        return "attention"
    if _GEMM.search(name):
        return "gemm"
    if name.startswith("triton"):
        return "triton"
    return "other"


def kernel_events(events: list[dict]) -> list[dict]:
    ks = [e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and "dur" in e]
    ks.sort(key=lambda e: e["ts"])
    return ks


def launch_sites(events: list[dict], kernels: list[dict], num_steps: int, top: int = 12) -> list[dict]:
    """For copies, memsets and uncategorized kernels: the CPU ops (innermost last) that launched them."""
    runtime = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    ops_by_tid: dict = defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op" and "dur" in e:
            ops_by_tid[e["tid"]].append(e)
    starts = {}
    for tid, ops in ops_by_tid.items():
        ops.sort(key=lambda e: e["ts"])
        starts[tid] = [e["ts"] for e in ops]
    sites: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for k in kernels:
        if category(k["name"]) != "other":
            continue
        rt = runtime.get(k.get("args", {}).get("correlation"))
        chain = "?"
        if rt is not None and rt["tid"] in starts:
            ops, st, t = ops_by_tid[rt["tid"]], starts[rt["tid"]], rt["ts"]
            i = bisect.bisect_right(st, t)
            enclosing = [o for o in ops[max(0, i - 400) : i] if o["ts"] + o["dur"] >= t]
            chain = " > ".join(o["name"][:40] for o in enclosing[-3:]) or "?"
        rec = sites[(k["name"][:50], chain)]
        rec[0] += k["dur"]
        rec[1] += 1
    return [
        {
            "kernel": n,
            "launched_by": c,
            "ms_per_step": v[0] * 1e-3 / num_steps,
            "calls_per_step": v[1] / num_steps,
        }
        for (n, c), v in sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]
    ]


def summarize(trace_path: str | Path, num_steps: int, top: int = 25) -> dict:
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    ks = kernel_events(events)
    if not ks:
        return {"error": "no kernel events in the trace"}
    by_cat: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in ks:
        by_cat[category(e["name"])] += e["dur"]
        rec = by_name[e["name"][:110]]
        rec[0] += e["dur"]
        rec[1] += 1
    gaps = []
    end = ks[0]["ts"] + ks[0]["dur"]
    for prev, nxt in zip(ks, ks[1:], strict=False):
        end = max(end, prev["ts"] + prev["dur"])
        gap = nxt["ts"] - end
        if gap > 0:
            gaps.append((gap, prev["name"][:60], nxt["name"][:60]))
    span = ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]
    gap_total = sum(g for g, _, _ in gaps)
    by_pair: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for g, a, b in gaps:
        if g > 10:  # only gaps over 10 us are attributed; the many ~1-3 us launch gaps are summed below
            by_pair[(a, b)][0] += g
            by_pair[(a, b)][1] += 1
    small = sum(g for g, _, _ in gaps if g <= 10)
    ms = 1e-3 / num_steps
    return {
        "kernels_per_step": len(ks) / num_steps,
        "span_ms_per_step": span * ms,
        "busy_ms_per_step": {k: v * ms for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "gap_ms_per_step": gap_total * ms,
        "gap_ms_per_step_small_le_10us": small * ms,
        "largest_gaps": [
            {"ms_per_step": v[0] * ms, "count_per_step": v[1] / num_steps, "after": a, "before": b}
            for (a, b), v in sorted(by_pair.items(), key=lambda kv: -kv[1][0])[:12]
        ],
        "top_kernels": [
            {"name": n, "ms_per_step": v[0] * ms, "calls_per_step": v[1] / num_steps, "cat": category(n)}
            for n, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
        ],
        "other_kernel_sites": launch_sites(events, ks, num_steps),
    }


def gemm_table(prof, num_steps: int) -> list[dict]:
    """aten::mm / addmm grouped by input shapes (needs record_shapes=True): time and TFLOP/s per shape."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in ("aten::mm", "aten::addmm") or not e.input_shapes:
            continue
        # mm(A, B[, out]) / addmm(bias, A, B, beta, alpha[, out]): A (m, k), B (k, n)
        first = 1 if e.key == "aten::addmm" else 0
        shapes = e.input_shapes[first : first + 2]
        if len(shapes) < 2 or any(not isinstance(s, list) or len(s) != 2 for s in shapes):
            continue
        (m, k), (_, n) = shapes
        dev_us = e.device_time_total
        if dev_us <= 0:
            continue
        flops = 2.0 * m * k * n * e.count
        rows.append(
            {
                "op": e.key,
                "input_shapes": e.input_shapes,
                "mkn": [m, k, n],
                "calls_per_step": e.count / num_steps,
                "ms_per_step": dev_us / 1000 / num_steps,
                "tflops": flops / (dev_us * 1e-6) / 1e12,
            }
        )
    rows.sort(key=lambda r: -r["ms_per_step"])
    return rows
