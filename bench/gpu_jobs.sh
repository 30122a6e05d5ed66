#!/usr/bin/env bash
# The lead's GPU verification in two device calls (see docs/benchmarks.md for the figures they produced).
#   part A: loss + model gpu tests, bench/loss.py, bench/train_step.py baselines
#   part B: jobs/pretrain.py (base, 1 GPU) and jobs/contrastive.py through Ray Train on carried Ray
# Carry: .device (ray-cp312.tar.xz, packed1024/, contrastive_valid/, tokenizer/) and .whl (liger-kernel).
set -u
OUT=${OUT:-outputs/gpu}; mkdir -p "$OUT"
PART=${1:-A}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
export RAY_DATA_DISABLE_PROGRESS_BARS=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
B="timeout -s INT -k 10"
if [[ $PART == A ]]; then
  nvidia-smi -L
  $B 200 python3 -m pytest -q -rs tests/unit/test_loss_gpu.py tests/unit/test_model_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
  $B 150 python3 bench/loss.py --out "$OUT/bench_loss.json" --chunk-sizes 1024,2048,4096,8192 2>&1 | tee "$OUT/bench_loss.log" | tail -16
  $B 150 python3 bench/train_step.py --variants packed --compile --json-out "$OUT/train_step.jsonl" 2>&1 | tail -2
  $B 150 python3 bench/train_step.py --variants packed --compile --median-len 100000 --sigma 0.01 \
      --json-out "$OUT/train_step.jsonl" 2>&1 | tail -2   # all documents 1024 tokens: like the embedded corpus
fi
if [[ $PART == B || $PART == C ]]; then
  tar xJf .device/ray-cp312.tar.xz -C /tmp/site
fi
if [[ $PART == B ]]; then
  $B 330 python3 jobs/pretrain.py --config configs/pretrain_base_1gpu.yaml --data.packed_dir .device/packed1024 \
      --checkpoint.storage_path /tmp/runs --train.num_steps 150 --checkpoint.every_steps 150 \
      --logging.every_steps 10 2>&1 | tee "$OUT/pretrain.log" | grep -vE "^\(|INFO|WARNING" | tail -12
  find /tmp/runs -name metrics.jsonl -exec cp {} "$OUT/pretrain_metrics.jsonl" \;
fi
if [[ $PART == B || $PART == C ]]; then
  $B 200 python3 jobs/contrastive.py --config configs/contrastive_1gpu.yaml --init random:base \
      --data.input_dir $PWD/.device/contrastive_valid --data.tokenizer $PWD/.device/tokenizer --train.max_steps 60 \
      --train.checkpoint_every 60 --train.lr 5e-5 --run.output_dir /tmp/cft 2>&1 | tee "$OUT/contrastive.log" \
      | grep -vE "^\(|INFO|WARNING" | tail -8
  cp /tmp/cft/metrics.jsonl "$OUT/contrastive_metrics.jsonl" 2>/dev/null; cp /tmp/cft/eval.json "$OUT/" 2>/dev/null
fi
if [[ $PART == C ]]; then  # same-code baselines for the Ray run (loss backend auto = fused torch rows)
  $B 150 python3 bench/train_step.py --variants packed,padded --compile --json-out "$OUT/train_step.jsonl" 2>&1 | tail -2
  $B 150 python3 bench/train_step.py --variants packed --compile --median-len 100000 --sigma 0.01 \
      --json-out "$OUT/train_step.jsonl" 2>&1 | tail -1
fi
