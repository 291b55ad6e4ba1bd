#!/usr/bin/env bash
# The paper-scale ladder of issue 6 in one command: calibrate the target from FP8 runs, run the
# default 7-configuration grid plus a bf16 reference row for every seed, then report.
#
# Data: training on the C4 train shard plus real English from ../shared/data/webtext (a JSON-lines
# mix in $MIX_DIR), validation on C4's validation shard ($VAL_DIR, C4 layout). Prepare both with
#   bash experiments/gpu/ladder_repro.sh --prepare   (copies into .carry/mix, .carry/c4val, .carry/whl)
# then on the GPU machine, repo root, .carry carried:
#   bash experiments/gpu/ladder_repro.sh <git commit>
# Every knob is an environment variable (defaults = the plan: llama-20m, 5 seeds,
# 20.97M tokens per run, calibration at 70% of the budget, runs sharing the GPU by its memory
# (JOBS_PER_GPU, below): 12 on an H200, ~0.6M tokens/s together against ~0.1M for one run alone).
#
# Resumable and splittable: all state lives in $STATE (runs, target, wall-time log); running the
# same command again completes only what is missing (an interrupted run resumes from its last
# checkpoint). DEADLINE=<epoch seconds> stops the sweep in time to pack what is done, and
# RESTORE=<runs.tgz of an earlier call, or a results directory such as
# results/mxfp4-ladder-llama20m> brings finished runs into a fresh $STATE, so the ladder can be
# spread over machine leases of a few minutes each.
# Last, `fp4-ablate bench` times each configuration alone on the GPU (the grid's runs share it,
# so their own tokens/s are not comparable) and the report models the step gain from that.
set -u
MIX_DIR=${MIX_DIR:-.carry/mix}
VAL_DIR=${VAL_DIR:-.carry/c4val}
if [ "${1:-}" = "--prepare" ]; then
  SRC=${SHARED:-../shared/data}
  mkdir -p "$MIX_DIR" "$VAL_DIR"
  cp "$SRC/c4/c4-train.00000-of-00001.json.gz" "$MIX_DIR/"
  # Two Wikipedia shards + FineWeb + WebText (~30M tokens with the C4 shard); the whole of
  # webtext (~100 MB gzipped) would not fit the 64 MiB a device call carries.
  cp "$SRC"/webtext/wikipedia-0000{0,1}.jsonl.gz "$SRC"/webtext/fineweb-legal-00000.jsonl.gz \
     "$SRC"/webtext/webtext-00000.jsonl.gz "$MIX_DIR/"
  cp "$SRC/c4/c4-validation.00000-of-00001.json.gz" "$VAL_DIR/"
  cp "$SRC/c4/SOURCES.md" "$VAL_DIR/SOURCES-c4.md"; cp "$SRC/webtext/SOURCES.md" "$MIX_DIR/SOURCES-webtext.md"
  # Wheels the offline GPU machine lacks (setup.sh installs .carry/whl/*): Hydra, and its joblib
  # launcher for several runs per GPU (from the package registry, pure Python).
  mkdir -p .carry/whl
  cp "${WHEELS:-../shared/wheels/device-py312}"/{hydra_core,omegaconf,antlr4}*.whl .carry/whl/
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 -d .carry/whl hydra-joblib-launcher==1.2.0
  du -sh "$MIX_DIR" "$VAL_DIR" .carry/whl
  exit 0
fi
if [ -z "${FP4_ABLATE_CLI:-}" ]; then
  source experiments/gpu/setup.sh
  FP4_ABLATE_CLI="python3 -m fp4_ablate"
fi
export FP4_ABLATE_GIT_COMMIT=${1:-${FP4_ABLATE_GIT_COMMIT:-unknown}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # several runs share the host's cores
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STATE=${STATE:-$OUT/ladder}; RESULTS=$STATE/runs; mkdir -p "$RESULTS"
SEEDS=${SEEDS:-5}
MODEL=${MODEL:-llama-20m}
MAX_TOKENS=${MAX_TOKENS:-20971520}
# Runs per GPU: a llama-20m run peaks at ~8.2 GB (12 runs: 98 GB on an H200, gpu_util.log), so
# one per 10 GiB of the GPU's memory, at most 12 (past that the GPU is saturated: ~86% busy at 12):
# 12 on an H200 (141 GB), 7 on an H100 80GB.
source experiments/gpu/ladder_lib.sh
JOBS_PER_GPU=${JOBS_PER_GPU:-$(ladder_jobs_per_gpu 10 12)}
echo "runs per GPU: $JOBS_PER_GPU"
DEADLINE=${DEADLINE:-}
EXTRA=${EXTRA:-}
GRID=fp8,fprop,dgrad,wgrad,wgrad_sr,wgrad_rht,wgrad_h16,bf16
COMMON="model=$MODEL train=gpu data=jsonl data.path=$MIX_DIR/*.json*.gz data.val_path=$VAL_DIR
  tokenizer.vocab_size=${VOCAB:-8192} train.max_tokens=$MAX_TOKENS
  train.warmup_tokens=$((MAX_TOKENS / 20)) train.eval_every_tokens=${EVAL_EVERY:-524288}
  cache_dir=${CACHE:-/tmp/cache} results_dir=$RESULTS train.progress_bar=false
  sweep.jobs_per_gpu=$JOBS_PER_GPU $EXTRA"
ladder_restore
ladder_start
echo "== 0. token caches (tokenizer + packed streams) built once, before runs share them"
stage=cache
$FP4_ABLATE_CLI run $COMMON train.max_tokens=32768 train.warmup_tokens=0 train.target_ppl=null \
  results_dir=/tmp/cache-warmup sweep.force=true 2>&1 | grep -E "data ready|Error" || exit 1
T=$(grep -so 'train.target_ppl=[0-9.]*' "$STATE/calibrate.txt" | cut -d= -f2)
if [ -z "$T" ]; then
  echo "== 1. FP8 runs without a target (calibration), $SEEDS seeds"
  stage=calibration
  ladder_sweep +ladder=fp8 train.target_ppl=null "seed=range(0,$SEEDS)" || exit 1
  $FP4_ABLATE_CLI calibrate "$RESULTS" --fraction 0.7 | tee "$STATE/calibrate.txt"
  T=$(grep -o 'train.target_ppl=[0-9.]*' "$STATE/calibrate.txt" | cut -d= -f2)
  [ -n "$T" ] || { echo "calibration gave no target"; exit 1; }
fi
echo "== 2. the default grid + the bf16 reference row at train.target_ppl=$T, seed-major"
stage=grid
ladder_sweep "seed=range(0,$SEEDS)" "+ablation=$GRID" train.target_ppl=$T || exit 1
echo "== 3. each configuration alone on the GPU: the isolated tokens/s the step gain is modeled from"
stage=bench
if ! ls "$STATE"/bench/*.json >/dev/null 2>&1; then
  $FP4_ABLATE_CLI bench --models "$MODEL" --batches 64 --seq-len 512 --skip-kernels \
    --compile-models '' --peers '' --profile-model '' --name ladder --out "$STATE/bench" \
    --configs bf16,fp8,fprop,dgrad,wgrad,wgrad+sr,wgrad+rht,wgrad+h16 \
    2>&1 | tail -12
fi
stage=done
BENCH_JSON=$(ls "$STATE"/bench/*.json 2>/dev/null | head -1)
$FP4_ABLATE_CLI report "$RESULTS" --out "$STATE/report" ${BENCH_JSON:+--throughput "$BENCH_JSON"} \
  > "$STATE/report.log" 2>&1; head -40 "$STATE/report.log"
