#!/usr/bin/env bash
# GPU runs on a lent device, one part per call (docs/benchmarks.md names the part behind each figure).
#   part A: loss + model gpu tests, bench/loss.py, bench/train_step.py baselines
#   part B: jobs/pretrain.py (base, 1 GPU) and jobs/contrastive.py through Ray Train on carried Ray
#   parts A4 / B4: the same with flash-attn-4 installed (auto -> fa4): GPU tests, train_step variants, and the
#   Ray pretrain job. FA4's wheels do not fit one call next to Ray, so earlier calls in the 30 s idle window
#   stash them: carry .fa4a and `cp .fa4a/* /tmp/fa4stash/` (bench/prepare_fa4_wheels.sh makes .fa4a/.fa4b);
#   for B4 also carry .device/ray-cp312.tar.xz and .device/packed1024 and copy them to /tmp/raystash/. The
#   A4/B4 call itself carries .fa4b.
# Carry: .device (ray-cp312.tar.xz, packed1024/, contrastive_valid/, tokenizer/) and .whl (extra wheels, if any).
set -u
OUT=${OUT:-outputs/gpu}; mkdir -p "$OUT"
PART=${1:-A}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
export RAY_DATA_DISABLE_PROGRESS_BARS=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
B="timeout -s INT -k 10"
KEYS='import sys, json
for line in sys.stdin:
    d = json.loads(line) if line.startswith("{") else {"line": line.strip()}
    print({k: d[k] for k in ("ffn_backend", "rows_ffn", "quack_tuned", "nvmmh", "tokens_per_step", "fused_rope", "host_masked", "tokens_per_s", "step_ms", "mfu",
           "host_syncs_per_step", "sync_sites", "peak_mem_gib", "new_graphs_in_timed_loop", "warmup_s", "line") if k in d})'

RAY_TAR=.device/ray-cp312.tar.xz PACKED=$PWD/.device/packed1024
if [[ $PART == *4 ]]; then
  source bench/fa4_env.sh /tmp/fa4stash .fa4b || exit 1
  RAY_TAR=/tmp/raystash/ray-cp312.tar.xz PACKED=/tmp/raystash/packed1024
fi
if [[ $PART == A4 ]]; then
  nvidia-smi -L
  $B 240 python3 -m pytest -q -rs -s tests/unit/neobert/test_model_gpu.py tests/unit/neobert/test_loss_gpu.py 2>&1 \
      | tee "$OUT/gpu_tests.log" | grep -E "rel err|passed|failed|Error" | tail -40
  T="python3 bench/train_step.py --compile --json-out $OUT/train_step.jsonl"
  $B 200 $T --variants packed,padded 2>&1 | grep '^{' | cut -c1-300   # auto = fa4, fp32 residual
  $B 100 $T --variants packed --bf16-residual 2>&1 | grep '^{' | cut -c1-300
  $B 100 $T --variants packed --bf16-residual --backend torch_varlen 2>&1 | grep '^{' | cut -c1-300
  $B 100 $T --variants packed --bf16-residual --median-len 100000 --sigma 0.01 2>&1 | grep '^{' | cut -c1-300
fi
if [[ $PART == P4 ]]; then  # RoPE fused into the fa4 op: GPU tests, then fused vs unfused A/B
  nvidia-smi -L
  $B 300 python3 -m pytest -q -rs -s tests/unit/neobert/test_model_gpu.py tests/unit/neobert/test_loss_gpu.py 2>&1 \
      | tee "$OUT/gpu_tests.log" | grep -E "rel err|rel diff|max rel|passed|failed|Error" | tail -40
  T="python3 bench/train_step.py --compile --variants packed --bf16-residual --json-out $OUT/train_step.jsonl"
  for flags in "" "--unfused-rope" ""; do
    $B 150 $T $flags 2>&1 | grep '^{' | cut -c1-420
  done
fi
if [[ $PART == Q4 ]]; then  # profile of the default fa4 step: kernel categories, idle gaps, GEMM rates
  $B 200 python3 bench/train_step.py --compile --variants packed --bf16-residual --profile \
      --profile-out "$OUT/prof" --json-out "$OUT/train_step_prof.jsonl" 2>&1 | grep '^{' | cut -c1-300
fi
if [[ $PART == R4 ]]; then  # quack SwiGLU-epilogue FFN: kernel A/B alone, then the GPU tests
  $B 240 python3 bench/ffn_kernels.py --json-out "$OUT/ffn_kernels.jsonl" 2>&1 | grep -E '^\{|Error|error' | cut -c1-400
  $B 120 python3 bench/ffn_kernels.py --tokens 13107 --json-out "$OUT/ffn_kernels.jsonl" 2>&1 | grep -E '^\{|Error' | cut -c1-400
  $B 300 python3 -m pytest -q -rs -s tests/unit/neobert/test_model_gpu.py 2>&1 \
      | tee "$OUT/gpu_tests.log" | grep -E "quack|rel diff|passed|failed|Error" | tail -30
fi
if [[ $PART == S4 ]]; then  # whole step: quack FFN (auto) vs torch FFN, alternating in one call; then a profile
  T="python3 bench/train_step.py --compile --variants packed --bf16-residual --json-out $OUT/train_step.jsonl"
  for flags in "" "--ffn-backend torch" "" "--ffn-backend torch"; do
    $B 150 $T $flags 2>&1 | grep '^{' | cut -c1-460
  done
  $B 200 python3 bench/train_step.py --compile --variants packed --bf16-residual --profile \
      --profile-out "$OUT/prof" --json-out "$OUT/train_step_prof.jsonl" 2>&1 | grep '^{' | cut -c1-200
fi
if [[ $PART == V4 ]]; then  # GPU tests, then the default step vs each of its parts switched off
  nvidia-smi -L
  $B 240 python3 -m pytest -q -rs -s tests/unit/neobert/test_model_gpu.py tests/unit/neobert/test_loss_gpu.py 2>&1 \
      | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|Error" | tail -8
  T="python3 bench/train_step.py --compile --variants packed --bf16-residual --json-out $OUT/train_step.jsonl"
  for flags in "--check-syncs" "--device-masked" "--ffn-backend torch" "" "--ffn-backend torch --unfused-rope --device-masked"; do
    $B 120 $T $flags 2>&1 | grep -E '^\{|Error' | python3 -c "$KEYS"
  done
fi
if [[ $PART == H4 ]]; then  # GPU tests, then where the host time goes (host profile)
  nvidia-smi -L
  $B 240 python3 -m pytest -q -rs -s tests/unit/neobert/test_model_gpu.py tests/unit/neobert/test_loss_gpu.py 2>&1 \
      | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|Error" | tail -8
  $B 200 python3 bench/train_step.py --compile --variants packed --bf16-residual --host-profile "$OUT/host" \
      --json-out "$OUT/train_step_host.jsonl" 2>&1 | grep -E '^\{|Error' | tee "$OUT/host.json" | python3 -c "$KEYS"
  python3 -c "import json; d=json.loads(open('$OUT/host.json').read().splitlines()[-1]); print(json.dumps(d.get('host'), indent=0)[:3000])"
fi
if [[ $PART == I4 ]]; then  # quack without nvMatmulHeuristics: import retried per GEMM vs guarded vs installed
  # carry .nvmmh (the nvidia-matmul-heuristics wheel, quack's optional `heuristics` extra) besides .fa4b
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/nvmmh .nvmmh/*.whl >/dev/null 2>&1
  T="python3 bench/train_step.py --compile --variants packed --bf16-residual --json-out $OUT/train_step.jsonl"
  NV="env PYTHONPATH=/tmp/nvmmh:$PYTHONPATH"
  for run in "$T" "$T --no-nvmmh-guard" "$NV $T" "$T" \
             "$T --tokens-per-step 8192 --steps 10 --warmup 4" "$T --tokens-per-step 8192 --steps 10 --warmup 4 --no-nvmmh-guard" \
             "$NV $T --tokens-per-step 8192 --steps 10 --warmup 4"; do
    $B 110 $run 2>&1 | grep -E '^\{|Error' | python3 -c "$KEYS"
  done
fi
if [[ $PART == J4 ]]; then  # GPU tests; torch FFN on the sparse rows (the default) vs quack there; quack tuned
  $B 200 python3 -m pytest -q -rs -s tests/unit/neobert/test_model_gpu.py tests/unit/neobert/test_loss_gpu.py 2>&1 \
      | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|Error" | tail -8
  T="python3 bench/train_step.py --compile --variants packed --bf16-residual --json-out $OUT/train_step.jsonl"
  $B 100 $T 2>&1 | grep -E '^\{|Error' | python3 -c "$KEYS"
  $B 100 $T --same-ffn-on-rows 2>&1 | grep -E '^\{|Error' | python3 -c "$KEYS"
  $B 250 $T --quack-tuned 2>&1 | grep -E '^\{|Error' | python3 -c "$KEYS"
  $B 100 $T 2>&1 | grep -E '^\{|Error' | python3 -c "$KEYS"
fi
if [[ $PART == K4 ]]; then  # autotuned quack FFN (bench), then the Ray pretrain job with it
  # earlier calls stash .fa4a in /tmp/fa4stash and .device/{ray-cp312.tar.xz,packed1024} in /tmp/raystash
  T="python3 bench/train_step.py --compile --variants packed --bf16-residual --json-out $OUT/train_step.jsonl"
  $B 200 $T --quack-tuned 2>&1 | grep -E '^\{|Error' | python3 -c "$KEYS"
  tar xJf $RAY_TAR -C /tmp/site
  $B 300 python3 jobs/pretrain.py --config configs/pretrain_base_1gpu.yaml --data.packed_dir $PACKED \
      --checkpoint.storage_path /tmp/runs --train.num_steps 120 --checkpoint.every_steps 120 \
      --logging.every_steps 10 2>&1 | tee "$OUT/pretrain.log" | grep -vE "^\(|INFO|WARNING" | tail -12
  find /tmp/runs -name metrics.jsonl -exec cp {} "$OUT/pretrain_metrics.jsonl" \;
fi
if [[ $PART == A ]]; then
  nvidia-smi -L
  $B 200 python3 -m pytest -q -rs tests/unit/neobert/test_loss_gpu.py tests/unit/neobert/test_model_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
  $B 150 python3 bench/loss.py --out "$OUT/bench_loss.json" --chunk-sizes 1024,2048,4096,8192 2>&1 | tee "$OUT/bench_loss.log" | tail -16
  $B 150 python3 bench/train_step.py --variants packed --compile --json-out "$OUT/train_step.jsonl" 2>&1 | tail -2
  $B 150 python3 bench/train_step.py --variants packed --compile --median-len 100000 --sigma 0.01 \
      --json-out "$OUT/train_step.jsonl" 2>&1 | tail -2   # all documents 1024 tokens: like the embedded corpus
fi
if [[ $PART == B || $PART == C || $PART == B4 ]]; then
  tar xJf $RAY_TAR -C /tmp/site
fi
if [[ $PART == B || $PART == B4 ]]; then
  $B 330 python3 jobs/pretrain.py --config configs/pretrain_base_1gpu.yaml --data.packed_dir $PACKED \
      --checkpoint.storage_path /tmp/runs --train.num_steps 150 --checkpoint.every_steps 150 \
      --logging.every_steps 10 2>&1 | tee "$OUT/pretrain.log" | grep -vE "^\(|INFO|WARNING" | tail -12
  find /tmp/runs -name metrics.jsonl -exec cp {} "$OUT/pretrain_metrics.jsonl" \;
fi
if [[ $PART == B || $PART == C ]]; then
  $B 200 python3 jobs/contrastive.py --config configs/contrastive_1gpu.yaml --init random:base \
      --data.input_dir $PWD/.device/contrastive_valid --data.tokenizer $PWD/.device/tokenizer --train.num_steps 60 \
      --checkpoint.every_steps 60 --train.lr 5e-5 --checkpoint.storage_path /tmp/cft 2>&1 | tee "$OUT/contrastive.log" \
      | grep -vE "^\(|INFO|WARNING" | tail -8
  cp /tmp/cft/contrastive-1gpu/metrics.jsonl "$OUT/contrastive_metrics.jsonl" 2>/dev/null; cp /tmp/cft/contrastive-1gpu/eval.json "$OUT/" 2>/dev/null
fi
if [[ $PART == C ]]; then  # same-code baselines for the Ray run
  $B 150 python3 bench/train_step.py --variants packed,padded --compile --json-out "$OUT/train_step.jsonl" 2>&1 | tail -2
  $B 150 python3 bench/train_step.py --variants packed --compile --median-len 100000 --sigma 0.01 \
      --json-out "$OUT/train_step.jsonl" 2>&1 | tail -1
fi
