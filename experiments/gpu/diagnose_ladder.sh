#!/usr/bin/env bash
# Does the short `fp4-ablate diagnose` rank the ladder's configurations like the full runs do?
# On one GPU, on the ladder's own data, model and tokenizer (results/mxfp4-ladder-llama20m):
#   1. warm start: the bf16 rung trained for WARM_TOKENS (its own short schedule), final
#      checkpoint kept;
#   2. `fp4-ablate diagnose` from that checkpoint: every configuration of the ladder (plus
#      wgrad_h16_all) for STEPS optimizer steps on the same weights and batches, with the MX scale
#      rule the ladder ran with (format.scale_mode=even, SR included);
#   3. the same from the fresh initialisation.
# The rank correlation against the committed costs is computed on the CPU from the outputs
# (experiments/diagnostics/ranking.py). Data: bash experiments/gpu/ladder_repro.sh --prepare, then
# on the GPU machine, repo root, .carry carried:  bash experiments/gpu/diagnose_ladder.sh <commit>
set -u
source experiments/gpu/setup.sh
export FP4_ABLATE_GIT_COMMIT=${1:-unknown}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; STATE=/tmp/diag; mkdir -p $STATE
CLI="python3 -m fp4_ablate"
COMMON="model=llama-20m train=gpu data=jsonl data.path=.carry/mix/*.json*.gz data.val_path=.carry/c4val
  tokenizer.vocab_size=8192 cache_dir=$STATE/cache results_dir=$STATE/runs format.scale_mode=even"
WARM_TOKENS=${WARM_TOKENS:-4194304}; STEPS=${STEPS:-8}
CONFIGS=fp8,fprop,dgrad,wgrad,wgrad_sr,wgrad_rht,wgrad_h16,wgrad_h16_all
t0=$(date +%s)
$CLI run $COMMON +ladder=bf16 train.max_tokens=$WARM_TOKENS train.warmup_tokens=524288 \
  train.target_ppl=null train.keep_final_checkpoint=true train.progress_bar=false 2>&1 | tail -3
RUN=$(ls -d $STATE/runs/bf16-* | head -1)
echo "warm start $RUN: $(( $(date +%s) - t0 )) s"
t1=$(date +%s)
$CLI diagnose --checkpoint "$RUN" --configs $CONFIGS --steps $STEPS --lr 0.002 --out $OUT/warm \
  cache_dir=$STATE/cache format.scale_mode=even 2>&1 | tail -30
echo "diagnose (warm): $(( $(date +%s) - t1 )) s"
t2=$(date +%s)
$CLI diagnose --configs $CONFIGS --steps $STEPS --lr 0.002 --out $OUT/init $COMMON 2>&1 | tail -5
echo "diagnose (init): $(( $(date +%s) - t2 )) s"
nvidia-smi --query-gpu=name,memory.used --format=csv
