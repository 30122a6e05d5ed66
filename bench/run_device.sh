#!/usr/bin/env bash
# One device call: probe, gpu tests, benchmark variants, kernel survey, memory sweep.
#   bash bench/run_device.sh "tests main attn exp sweep"   (logs + *.jsonl under $OUT, default ./outputs)
set -u
OUT=${OUT:-outputs}; mkdir -p "$OUT"
PARTS=${1:-"tests main"}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
PY=${PY:-python3}
R="$OUT/results.jsonl"
B="timeout -s INT -k 10"
T="$PY bench/train_step.py --json-out $R"
has() { [[ " $PARTS " == *" $1 "* ]]; }
nvidia-smi -L; $PY -c "import torch, inspect; from torch.nn.attention.varlen import varlen_attn as f; print(torch.__version__, inspect.signature(f))"
if has tests; then
  $B 150 $PY -m pytest -q -s tests/unit/neobert/test_model_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "rel err|passed|failed|Error" | tail -20
  $B 120 $PY -m pytest -q tests/unit/neobert/test_loss_gpu.py 2>&1 | tee "$OUT/loss_gpu_tests.log" | tail -3
fi
if has attn; then
  $B 90 $PY bench/attn_kernels.py --backends torch_varlen --json-out "$OUT/attn.jsonl" 2>&1 | tail -4
fi
if has main; then
  $B 200 $T --variants packed,padded --compile --check-syncs --profile --profile-out "$OUT/prof" 2>&1 | tee "$OUT/bench_compile.log" | grep -v '^{"variant"' | grep -v Profiler | tail -3
fi
if has eager; then
  $B 90 $T --variants packed,padded --steps 8 --warmup 2 --tokens-per-step 32768 --check-syncs 2>&1 | tail -1
fi
if has modes; then
  $B 70 $T --variants packed --compile --max-seqlen-mode bucket 2>&1 | tail -1
  $B 70 $T --variants packed --compile --max-seqlen-mode exact 2>&1 | tail -1
fi
if has exp; then
  $B 70 $T --variants packed --compile --bf16-residual 2>&1 | tail -1
fi
if has loss; then  # the masked-LM loss benchmark
  $B 150 $PY bench/loss.py --out "$OUT/bench_loss.json" 2>&1 | tee "$OUT/bench_loss.log" | tail -14
fi
if has sweep; then
  $B 240 $PY bench/train_step.py --memory-sweep --compile --dynamic --json-out "$OUT/memory.jsonl" 2>&1 | tail -3
fi
$PY bench/summarize.py "$R" "$OUT/attn.jsonl" "$OUT/memory.jsonl"
