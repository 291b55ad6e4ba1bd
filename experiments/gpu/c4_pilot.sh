#!/usr/bin/env bash
# The whole tool on one GPU, C4 only: a ~19M-parameter Llama (llama-20m, vocab 8192) on the full
# shared C4 sample (c4-train: 2.44M tokens; validation: the C4 validation shard), 4.9M tokens
# per run (2 epochs), 2 seeds. Steps: FP8 runs without a target -> `calibrate` (FP8 perplexity at
# 70% of the budget) -> the default 7-configuration sweep at that target -> `report`.
# Usage on the device machine: bash experiments/gpu/c4_pilot.sh <git commit>
source experiments/gpu/setup.sh
export FP4_ABLATE_GIT_COMMIT=${1:-unknown}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
COMMON="model=llama-20m train=gpu data=c4_local data.path=.carry/data/c4 tokenizer.vocab_size=8192
  train.max_tokens=4915200 train.warmup_tokens=245760 train.eval_every_tokens=262144
  cache_dir=/tmp/cache results_dir=$OUT/runs train.progress_bar=false"
SEEDS=${SEEDS:-2}
t0=$(date +%s)
python3 -m fp4_ablate sweep $COMMON +ladder=fp8 train.target_ppl=null sweep.seeds=$SEEDS 2>&1 | grep -E "^\[sweep|sweep finished|FAILED"
python3 -m fp4_ablate calibrate $OUT/runs --fraction 0.7 | tee $OUT/calibrate.txt
T=$(grep -o 'train.target_ppl=[0-9.]*' $OUT/calibrate.txt | cut -d= -f2)
python3 -m fp4_ablate sweep $COMMON train.target_ppl=$T sweep.seeds=$SEEDS 2>&1 | grep -E "^\[sweep|sweep finished|FAILED"
echo "sweep wall time (calibration + grid): $(( $(date +%s) - t0 )) s"
python3 -m fp4_ablate report $OUT/runs --out $OUT/report > $OUT/report.log 2>&1; head -30 $OUT/report.log
tar czf $OUT/pilot.tgz --exclude=checkpoints -C $OUT runs report calibrate.txt
