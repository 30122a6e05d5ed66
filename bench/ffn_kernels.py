"""SwiGLU feed-forward alone, forward + backward on one GPU: torch (cuBLAS GEMMs + inductor-fused SwiGLU) vs
quack's fused GEMM epilogues (`quack.mlp.mlp_func`: SwiGLU computed in the first GEMM's epilogue, its derivative
in the epilogue of the backward's dX GEMM), which is what `NeoBERTConfig(ffn_backend="quack")` runs.

    python bench/ffn_kernels.py                      # T = 65,536 tokens, D = 768, F = 2048 (the base preset)
    python bench/ffn_kernels.py --tokens 13107       # the sparse last layer's masked rows

Weights are fp32 parameters under bf16 autocast, as in training. Time = median of `--iters` CUDA-event
timings after warm-up. Errors are relative L2 vs an fp32 reference on the same bf16-rounded inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neobert.kernels.ffn import swiglu_ffn_fn  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--backends", default="torch,quack")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    T, D, Fh = args.tokens, args.hidden, args.ffn
    w_in = torch.nn.Linear(D, 2 * Fh, bias=False, device="cuda")
    w_out = torch.nn.Linear(Fh, D, bias=False, device="cuda")
    torch.nn.init.normal_(w_in.weight, std=0.02)
    torch.nn.init.normal_(w_out.weight, std=0.02)
    x0 = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    g0 = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)

    def ref():
        x = x0.float().requires_grad_()
        wi, wo = (w.weight.detach().bfloat16().float().requires_grad_() for w in (w_in, w_out))
        gate, up = (x @ wi.T).chunk(2, -1)
        out = (F.silu(gate) * up) @ wo.T
        out.backward(g0.float())
        return out, x.grad, wi.grad, wo.grad

    r = ref()
    rows = []
    for name in args.backends.split(","):
        fn = swiglu_ffn_fn(name)
        if name == "torch":
            fn = torch.compile(fn)

        def step(fn=fn):
            x = x0.clone().requires_grad_()
            w_in.weight.grad = w_out.weight.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fn(x, w_in, w_out)
            out.backward(g0)
            return out, x.grad, w_in.weight.grad, w_out.weight.grad

        got = step()
        for _ in range(3):
            step()
        times = []
        for _ in range(args.iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        row = {
            "backend": name,
            "tokens": T,
            "ms_fwd_bwd": statistics.median(times),
            "err_out": rel(got[0], r[0]),
            "err_dx": rel(got[1], r[1]),
            "err_dw_in": rel(got[2], r[2]),
            "err_dw_out": rel(got[3], r[3]),
            "device": torch.cuda.get_device_name(),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json_out:
        with open(args.json_out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
