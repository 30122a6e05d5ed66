#!/usr/bin/env bash
# GPU runs on a lent single-H200 machine, a few parts per device call (docs/benchmarks.md names the part behind
# each figure). Every comparison is made between runs of one call.
#   bash bench/h200_jobs.sh "stash tests"     carry .fa4a: stash FA4's first half, GPU tests without FA4
#   bash bench/h200_jobs.sh "fa4 headline"    carry .fa4b (within the 30 s idle window): FA4 + quack installed,
#                                             their GPU tests, then packed vs padded vs FSDP2 (world size 1)
#   bash bench/h200_jobs.sh "fa4 long"        no carry: 1,024 / 4,096 / 8,192-token documents, same budget
# .fa4a / .fa4b are made here by bench/prepare_fa4_wheels.sh. Results: $OUT/*.jsonl and *.log.
set -u
OUT=${OUT:-outputs/gpu}; mkdir -p "$OUT"
PARTS=" ${1:-tests} "
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache PYTHONPATH=$PWD
B="timeout -s INT -k 10"
has() { [[ $PARTS == *" $1 "* ]]; }
KEYS='import sys, json
for line in sys.stdin:
    d = json.loads(line) if line.startswith("{") else {"line": line.strip()}
    print({k: d[k] for k in ("variant", "max_seq_len", "backend", "ffn_backend", "tokens_per_s", "step_ms", "mfu",
           "peak_mem_gib", "host_syncs_per_step", "new_graphs_in_timed_loop", "final_loss", "packed_over_padded",
           "fsdp2_overhead", "max_abs_loss_diff", "loss_steps", "error", "line") if k in d})'
T="python3 bench/train_step.py --compile --bf16-residual --json-out"

if has stash; then mkdir -p /tmp/fa4stash && cp .fa4a/* /tmp/fa4stash/ && ls /tmp/fa4stash; fi
if has fa4; then source bench/fa4_env.sh /tmp/fa4stash .fa4b || exit 1; fi
if has tests; then
  nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
  $B 240 python3 -m pytest -q -rs -s tests/unit/neobert/test_model_gpu.py tests/unit/neobert/test_loss_gpu.py 2>&1 \
      | tee "$OUT/gpu_tests.log" | grep -E "rel err|passed|failed|Error" | tail -30
fi
if has headline; then
  $B 150 python3 -m pytest -q -rs tests/unit/neobert/test_model_gpu.py -k "fa4 or quack" 2>&1 \
      | tee "$OUT/gpu_tests_fa4.log" | grep -E "passed|failed|Error" | tail -8
  # the shipped step (packed), the padded baseline and FSDP2 at world size 1: same documents, same init
  $B 420 $T "$OUT/headline.jsonl" --variants packed,fsdp2,padded --quack-tuned --steps 45 --warmup 5 2>&1 \
      | grep -E '^\{|Error' | python3 -c "$KEYS"
fi
if has long; then  # same 65,536-token budget per step; document median scaled with the cap (300 at 1,024)
  for L in 1024 4096 8192 1024; do
    $B 150 $T "$OUT/long_context.jsonl" --variants packed --quack-tuned --max-seq-len $L \
        --median-len $((300 * L / 1024)) 2>&1 | grep -E '^\{|Error' | python3 -c "$KEYS"
  done
fi
