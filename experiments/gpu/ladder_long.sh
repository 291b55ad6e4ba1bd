#!/usr/bin/env bash
# The longer ladder (issue 17) in one command: every configuration trained for a fixed budget of
# ~12 tokens per quantized-linear parameter (no early stop, diagnostics on), at three model sizes.
#
#   part   model     quantized-linear params  tokens/run   seeds  grid
#   main   llama-3m  3,145,728                36,700,160   5      MAIN_GRID (12 configurations)
#   size1  llama-1m    983,040                11,796,480   3      SIZE_GRID (5)
#   size6  llama-6m  5,806,080                69,664,768   3      SIZE_GRID (5), needs $MIX6_DIR
#
# Data: training on the C4 train shard + real English from ../shared/data/webtext (JSON lines),
# validation on C4's validation shard. main and size1 read $MIX_DIR (the C4 shard + two Wikipedia
# shards + FineWeb + WebText: 36,974,096 tokens with the BPE-8192 tokenizer, so main is one epoch
# less 0.7%); size6 reads $MIX6_DIR (all of webtext + the C4 shard, ~75M tokens), which does not fit
# one device call's carry. Prepare with
#   bash experiments/gpu/ladder_repro.sh --prepare    (.carry/mix, .carry/c4val, .carry/whl)
# then on the GPU machine, repo root, .carry carried:
#   PARTS=main bash experiments/gpu/ladder_long.sh <git commit>
# $MIX6_DIR needs only the three Wikipedia shards $MIX_DIR lacks (wikipedia-00002..4): size6 links
# the rest from $MIX_DIR and refuses to start unless all eight files are there. Prepare it with
#   bash experiments/gpu/ladder_long.sh --prepare-mix6          (.carry/mix6, 55 MB)
# and carry its three files over calls of their own (a call carries ~40 MB beside the repo).
# Knobs (environment): PARTS (default "main size1"), PARTS_TOGETHER (1: the parts' sweeps side by
# side, below), KERNEL_CHECK (first|background), SEED_FROM/SEED_TO (override a part's seed
# range, e.g. to split a part over calls), GRID (override the part's grid), JOBS_PER_GPU,
# per part (named by the part, e.g. SEEDS_size6=0:2): SEEDS_<part>=FROM:TO, GRID_<part>,
# JOBS_<part> (the part's runs take seats 0..J-1 only, so a part beside it always keeps seats
# J..JOBS_PER_GPU-1), ORDER_<part>=cells (the sweep runs cell by cell, seeds inner, instead of
# seed by seed: give GRID_<part> longest first, so no long run starts last),
# DEADLINE (epoch seconds: stop in time to pack what is done), RESTORE (runs.tgz of an earlier
# call, or a results directory such as results/ladder-long, brought into a fresh $STATE), OUT,
# STATE, CACHE, EXTRA (more overrides for every run).
# Every run of every part lands in $STATE/runs; the report (`fp4-ablate report`) makes one table
# per part (each is its own experiment group) with the target calibrated post hoc from the FP8
# runs, and the scaling section across the parts.
set -u
if [ "${1:-}" = "--prepare-mix6" ]; then  # here, before the lease: the three shards $MIX_DIR lacks
  dir=${MIX6_DIR:-.carry/mix6}; mkdir -p "$dir"
  cp -n ../shared/data/webtext/wikipedia-0000[234].jsonl.gz "$dir/" && du -sh "$dir"; exit $?
fi
MIX_DIR=${MIX_DIR:-.carry/mix}
MIX6_DIR=${MIX6_DIR:-.carry/mix6}
VAL_DIR=${VAL_DIR:-.carry/c4val}
MAIN_GRID=bf16,fp8,fprop,dgrad,wgrad,wgrad_sr,wgrad_rht,wgrad_h16,wgrad_h16_all,nvfp4_wgrad,ufp4_wgrad,ufp4_e2m1_wgrad
SIZE_GRID=fp8,fprop,dgrad,wgrad,wgrad_h16_all
if [ -z "${FP4_ABLATE_CLI:-}" ]; then
  source experiments/gpu/setup.sh
  FP4_ABLATE_CLI="python3 -m fp4_ablate"
fi
export FP4_ABLATE_GIT_COMMIT=${1:-${FP4_ABLATE_GIT_COMMIT:-unknown}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # many runs share the host's cores
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-1}  # one compile worker per run
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STATE=${STATE:-$OUT/ladder}; RESULTS=$STATE/runs; mkdir -p "$RESULTS"
DEADLINE=${DEADLINE:-}
source experiments/gpu/ladder_lib.sh
# A llama-3m run needs a few GiB; the 16 host cores, not the GPU's memory, bound the packing.
JOBS_PER_GPU=${JOBS_PER_GPU:-$(ladder_jobs_per_gpu 6 15)}
echo "runs per GPU: $JOBS_PER_GPU"
ladder_restore
ladder_start

part_settings() {  # PART -> MODEL MAX_TOKENS EVAL_EVERY SEEDS PART_GRID DATA_DIR PART_SEED_FROM PART_SEED_TO PART_JOBS PART_ORDER
  case "$1" in
    main)  MODEL=llama-3m; MAX_TOKENS=36700160; EVAL_EVERY=1048576; SEEDS=5; PART_GRID=$MAIN_GRID; DATA_DIR=$MIX_DIR ;;
    size1) MODEL=llama-1m; MAX_TOKENS=11796480; EVAL_EVERY=393216;  SEEDS=3; PART_GRID=$SIZE_GRID; DATA_DIR=$MIX_DIR ;;
    size6) MODEL=llama-6m; MAX_TOKENS=69664768; EVAL_EVERY=2097152; SEEDS=3; PART_GRID=$SIZE_GRID; DATA_DIR=$MIX6_DIR ;;
    *) echo "unknown part $1: choose main, size1 or size6"; exit 2 ;;
  esac
  local v
  PART_SEED_FROM=${SEED_FROM:-0}; PART_SEED_TO=${SEED_TO:-$SEEDS}
  v=SEEDS_$1; [ -n "${!v:-}" ] && { PART_SEED_FROM=${!v%%:*}; PART_SEED_TO=${!v##*:}; }
  v=GRID_$1; [ -n "${!v:-}" ] && PART_GRID=${!v}
  v=JOBS_$1; PART_JOBS=${!v:-$JOBS_PER_GPU}
  v=ORDER_$1; PART_ORDER=${!v:-seeds}
  case "$PART_ORDER" in seeds|cells) ;; *) echo "ORDER_$1=$PART_ORDER: choose seeds or cells"; exit 2 ;; esac
  [ "$PART_JOBS" -le "$JOBS_PER_GPU" ] || { echo "JOBS_$1=$PART_JOBS exceeds JOBS_PER_GPU=$JOBS_PER_GPU"; exit 2; }
  return 0
}

MIX6_FILES="c4-train.00000-of-00001.json.gz fineweb-legal-00000.jsonl.gz webtext-00000.jsonl.gz
  wikipedia-00000.jsonl.gz wikipedia-00001.jsonl.gz wikipedia-00002.jsonl.gz
  wikipedia-00003.jsonl.gz wikipedia-00004.jsonl.gz"
# size6's data: the files $MIX_DIR has are linked, not carried twice; a missing file would
# silently shrink the epoch, so it stops the part instead.
link_mix6() {
  mkdir -p "$MIX6_DIR"
  local f missing=""
  for f in $MIX6_FILES; do
    [ -e "$MIX6_DIR/$f" ] || { [ -e "$MIX_DIR/$f" ] && ln -s "$(realpath "$MIX_DIR/$f")" "$MIX6_DIR/$f"; }
    [ -e "$MIX6_DIR/$f" ] || missing="$missing $f"
  done
  [ -z "$missing" ] || { echo "part size6: $MIX6_DIR lacks$missing (carry them, see the header)"; exit 2; }
}

# On a GPU, before any ufp4 run: the FP32-block kernel's chosen tiles were timed but not
# byte-checked on a GPU yet. KERNEL_CHECK=first (default) waits for the check; =background runs it
# beside the sweeps (~1 min of 15 idle runs saved) and a failure then only marks the ufp4 runs
# invalid in $STATE/fp32_block_kernel_check.txt.
case "${GRID:-$MAIN_GRID}" in
  *ufp4*)
    if command -v nvidia-smi >/dev/null && [ ! -f "$STATE/fp32_block_kernel_check.txt" ]; then
      check() {
        python3 experiments/gpu/fp32_block_kernel_check.py > "$STATE/fp32_block_kernel_check.part" 2>&1
        local rc=$?; mv "$STATE/fp32_block_kernel_check.part" "$STATE/fp32_block_kernel_check.txt"
        tail -1 "$STATE/fp32_block_kernel_check.txt"; return $rc
      }
      if [ "${KERNEL_CHECK:-first}" = background ]; then check & else
        check || { echo "fp32 block kernel check failed"; exit 1; }
      fi
    fi ;;
esac
# PARTS_TOGETHER=1 runs the parts' sweeps side by side, sharing the JOBS_PER_GPU seats (gpu_slots
# locks them in the shared cache dir): the short size-point runs fill the seats the main point's
# equal-length waves leave idle, instead of waiting for its last wave.
warmed="" sweeps=""
for part in ${PARTS:-main size1}; do
  part_settings "$part"
  [ "$part" = size6 ] && link_mix6
  ls "$DATA_DIR"/*.json*.gz >/dev/null 2>&1 || { echo "part $part: no data in $DATA_DIR"; exit 2; }
  # Fixed budget (target null, the report calibrates one post hoc), eval every 1/35-1/30 of it,
  # warmup 5% of it, diagnostics every 50 steps.
  COMMON="model=$MODEL train=gpu data=jsonl data.path=$DATA_DIR/*.json*.gz data.val_path=$VAL_DIR
    tokenizer.vocab_size=8192 train.max_tokens=$MAX_TOKENS train.target_ppl=null
    train.warmup_tokens=$((MAX_TOKENS / 20)) train.eval_every_tokens=$EVAL_EVERY +diagnostics=on
    cache_dir=${CACHE:-/tmp/cache} results_dir=$RESULTS train.progress_bar=false
    sweep.jobs_per_gpu=$PART_JOBS ${EXTRA:-}"
  case " $warmed " in
    *" $DATA_DIR "*) ;;  # its token cache is built; side by side, a second warm-up would only delay
    *)
      echo "== $part: token cache (built once, before the runs share it)"
      stage=$part-cache
      # One step and an evaluation of the FP8 rung, compiled as the runs are: a failure here
      # stops the call before 14 runs each fail the same way.
      $FP4_ABLATE_CLI run $COMMON train.max_tokens=32768 train.warmup_tokens=0 \
        results_dir=/tmp/cache-warmup sweep.force=true 2>&1 | grep -E "data ready|Error"
      [ "${PIPESTATUS[0]}" = 0 ] || { echo "part $part: the warm-up run failed"; exit 1; }
      [ "${PARTS_TOGETHER:-0}" = 1 ] && warmed="$warmed $DATA_DIR" ;;
  esac
  echo "== $part: $MODEL, $MAX_TOKENS tokens per run, seeds $PART_SEED_FROM..$(( PART_SEED_TO - 1 )), grid ${GRID:-$PART_GRID}, seats 0..$(( PART_JOBS - 1 )), by $PART_ORDER"
  stage=$part
  # Hydra's basic sweeper crosses the sweep overrides in the order given, the first outermost.
  seeds="seed=range($PART_SEED_FROM,$PART_SEED_TO)" cells="+ablation=${GRID:-$PART_GRID}"
  if [ "$PART_ORDER" = cells ]; then set -- "$cells" "$seeds"; else set -- "$seeds" "$cells"; fi
  if [ "${PARTS_TOGETHER:-0}" = 1 ]; then
    ladder_sweep "$@" & sweeps="$sweeps $!"
  else
    ladder_sweep "$@" || exit 1
  fi
done
for pid in $sweeps; do wait "$pid" || { stage=failed; exit 1; }; done
stage=done
$FP4_ABLATE_CLI report "$RESULTS" --out "$STATE/report" --target-ppl calibrate \
  > "$STATE/report.log" 2>&1; head -40 "$STATE/report.log"
