#!/usr/bin/env bash
# The paper-scale ladder of issue 6 in one command: calibrate the target from FP8 runs, run the
# default 7-configuration grid plus a bf16 reference row for every seed, then report.
#
# Data: training on the C4 train shard plus real English from ../shared/data/webtext (a JSON-lines
# mix in $MIX_DIR), validation on C4's validation shard ($VAL_DIR, C4 layout). Prepare both with
#   bash experiments/gpu/ladder_repro.sh --prepare   (copies into .carry/mix and .carry/c4val)
# then on the GPU machine, repo root, .carry carried:
#   bash experiments/gpu/ladder_repro.sh <git commit>
# Every knob is an environment variable (defaults = the issue's plan: llama-20m, 5 seeds,
# 20.97M tokens per run, calibration at 70% of the budget). Sweeps are resumable: running the
# same command again (same RESULTS) completes only what is missing, so it can be split over calls.
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
  du -sh "$MIX_DIR" "$VAL_DIR"
  exit 0
fi
if [ -z "${FP4_ABLATE_CLI:-}" ]; then
  source experiments/gpu/setup.sh
  FP4_ABLATE_CLI="python3 -m fp4_ablate"
fi
export FP4_ABLATE_GIT_COMMIT=${1:-${FP4_ABLATE_GIT_COMMIT:-unknown}}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RESULTS=${RESULTS:-$OUT/runs}
SEEDS=${SEEDS:-5}
MODEL=${MODEL:-llama-20m}
MAX_TOKENS=${MAX_TOKENS:-20971520}
EXTRA=${EXTRA:-}
COMMON="model=$MODEL train=gpu data=jsonl data.path=$MIX_DIR/*.json*.gz data.val_path=$VAL_DIR
  tokenizer.vocab_size=${VOCAB:-8192} train.max_tokens=$MAX_TOKENS
  train.warmup_tokens=$((MAX_TOKENS / 20)) train.eval_every_tokens=${EVAL_EVERY:-524288}
  cache_dir=${CACHE:-/tmp/cache} results_dir=$RESULTS train.progress_bar=false $EXTRA"
t0=$(date +%s)
sweep() { $FP4_ABLATE_CLI sweep $COMMON sweep.seeds=$SEEDS "$@" 2>&1 | grep -E "^\[sweep|sweep finished|FAILED|Error"; }
echo "== 1. FP8 runs without a target (calibration), $SEEDS seeds"
sweep +ladder=fp8 train.target_ppl=null
$FP4_ABLATE_CLI calibrate "$RESULTS" --fraction 0.7 | tee "$OUT/calibrate.txt"
T=$(grep -o 'train.target_ppl=[0-9.]*' "$OUT/calibrate.txt" | cut -d= -f2)
[ -n "$T" ] || { echo "calibration gave no target"; exit 1; }
echo "== 2. the default grid at train.target_ppl=$T"
sweep train.target_ppl=$T
echo "== 3. bf16 reference row"
sweep +ladder=bf16 train.target_ppl=$T
echo "sweep wall time (calibration + grid + bf16): $(( $(date +%s) - t0 )) s" | tee "$OUT/wall_time.txt"
$FP4_ABLATE_CLI report "$RESULTS" --out "$OUT/report" > "$OUT/report.log" 2>&1; head -30 "$OUT/report.log"
tar czf "$OUT/runs.tgz" --exclude=checkpoints -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
