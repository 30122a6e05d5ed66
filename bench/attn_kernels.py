"""Varlen attention kernels alone: fwd+bwd time and error vs the fp32 `sdpa` reference (one GPU).

    python bench/attn_kernels.py --backends torch_varlen --tokens 65536

Documents: lognormal lengths (median 300, sigma 0.8, capped at --max-seq-len), q/k/v (T, 12, 64) bf16.
Error: ||out - ref|| / ||ref|| against fp32 `sdpa_varlen` on the first --check-tokens tokens (fresh inputs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neobert.kernels.attention import build_attention, sdpa_varlen  # noqa: E402
from neobert.packing import PackedMeta  # noqa: E402


def lengths_for(tokens: int, max_len: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while sum(out) < tokens:
        out.append(int(np.clip(rng.lognormal(math.log(300), 0.8), 16, max_len)))
    out[-1] -= sum(out) - tokens
    return [n for n in out if n > 0]


def time_fwd_bwd(fn, q, k, v, meta, scale, reps: int) -> float:
    g = torch.randn_like(q)
    for _ in range(3):
        fn(q, k, v, meta, scale).backward(g)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(q, k, v, meta, scale).backward(g)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backends", default="torch_varlen")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--check-tokens", type=int, default=16384)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    N, H = 12, 64
    scale = H**-0.5
    lens = lengths_for(args.tokens, args.max_seq_len, 0)
    meta = PackedMeta.from_lengths(lens, device="cuda")._replace(max_seqlen=args.max_seq_len)
    sq = sum(n * n for n in lens)
    flops = 3 * 4 * sq * N * H  # fwd 4*len^2*N*H, bwd 2x fwd
    lens_c = lengths_for(args.check_tokens, args.max_seq_len, 1)
    meta_c = PackedMeta.from_lengths(lens_c, device="cuda")
    Tc = sum(lens_c)
    results = []
    for name in args.backends.split(","):
        row = {"backend": name, "tokens": args.tokens, "docs": len(lens)}
        try:
            _, fn = build_attention(name)
            # error check on fresh inputs, fwd and bwd
            qc, kc, vc = (torch.randn(Tc, N, H, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            gc = torch.randn(Tc, N, H, device="cuda", dtype=torch.bfloat16)
            outs = {}
            for tag, f, dt in (("ref", sdpa_varlen, torch.float32), ("got", fn, torch.bfloat16)):
                leaves = [t.to(dt).requires_grad_() for t in (qc, kc, vc)]
                o = f(*leaves, meta_c, scale)
                o.backward(gc.to(dt))
                outs[tag] = [o.detach().float()] + [t.grad.float() for t in leaves]
            row["rel_err"] = {
                w: ((g - r).norm() / r.norm()).item()
                for w, g, r in zip(["out", "dq", "dk", "dv"], outs["got"], outs["ref"], strict=True)
            }
            q, k, v = (
                torch.randn(args.tokens, N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(3)
            )
            ms = time_fwd_bwd(fn, q, k, v, meta, scale, args.reps)
            row.update(ms_fwd_bwd=ms, tflops=flops / ms / 1e9)
        except Exception as e:  # report and go on: this is a survey of kernels
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.json_out:
        with open(args.json_out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
