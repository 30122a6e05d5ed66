"""Print the benchmark JSON lines written by bench/train_step.py as short tables (markdown)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    rows = [
        json.loads(line)
        for p in paths
        if Path(p).exists()
        for line in Path(p).read_text().splitlines()
        if line
    ]
    for r in rows:
        if "error" in r and "variant" in r:
            print(f"{r['variant']} at {r['tokens_per_step']} tokens/step: {r['error']}")
    runs = [r for r in rows if "variant" in r and "error" not in r]
    if runs:
        print(
            "| variant | backend | compile | max_seqlen | tokens/s | MFU | step ms | pad frac | syncs/step | new graphs | peak GiB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in runs:
            print(
                f"| {r['variant']} | {r['backend']} | {r['compile']} | {r['max_seqlen_mode']} | {r['tokens_per_s']:,.0f} "
                f"| {100 * r['mfu']:.1f}% | {r['step_ms']:.1f} | {r['padding_frac']:.2f} | {r['host_syncs_per_step']} "
                f"| {r['new_graphs_in_timed_loop']} | {r['peak_mem_gib']:.1f} |"
            )
    for r in rows:
        if "packed_over_padded" in r:
            print(f"packed/padded (compile={r['compile']}): {r['packed_over_padded']:.2f}x")
    for r in runs:
        for k in r.get("profile", [])[:10]:
            print(f"  [{r['variant']}] {k['ms_per_step']:7.2f} ms {100 * k['frac']:5.1f}%  {k['name']}")
    for r in rows:
        if "ms_fwd_bwd" in r or ("docs" in r and "error" in r):
            err = r.get("rel_err") or {}
            print(
                f"attn {r['backend']}: {r.get('ms_fwd_bwd', float('nan')):.2f} ms fwd+bwd, "
                f"{r.get('tflops', float('nan')):.0f} TFLOP/s, rel err "
                + ", ".join(f"{k} {v:.1e}" for k, v in err.items())
                + (f"  ERROR {r['error']}" if "error" in r else "")
            )
    mem = [r for r in rows if "peak_mem_gib" in r and "variant" not in r]
    if mem:
        print("| max_seq_len | tokens/step | peak GiB |")
        print("|---|---|---|")
        for r in mem:
            v = r["peak_mem_gib"]
            print(
                f"| {r['max_seq_len']} | {r['tokens_per_step']} | {v if isinstance(v, str) else f'{v:.1f}'} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
