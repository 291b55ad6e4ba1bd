#!/usr/bin/env bash
# First look on a GPU: kernel bit-exactness and bandwidth, then short runs of every path.
# Usage (device machine, repo root, .carry carried): bash experiments/gpu/h100_check.sh
source experiments/gpu/setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
C4="data=c4_local data.path=.carry/data/c4 tokenizer.vocab_size=8192 cache_dir=/tmp/cache results_dir=$OUT/runs"
( timeout 330 python3 -m fp4_ablate bench --skip-steps --out $OUT/bench > $OUT/kernels.log 2>&1; echo "kernel bench rc=$?" >> $OUT/kernels.log ) 
grep -E "^\|" $OUT/kernels.log | head -40; tail -3 $OUT/kernels.log
for args in "+ladder=fp8 hardware=auto" "+ladder=wgrad +stabilizer=h16 hardware=auto" "+ladder=wgrad +stabilizer=sr hardware=auto" "+ladder=fp8 hardware=cuda" "+ladder=wgrad +stabilizer=h16 hardware=cuda"; do
  timeout 120 python3 -m fp4_ablate run model=llama-20m train=gpu $C4 train.max_tokens=1048576 train.warmup_tokens=131072 train.eval_every_tokens=524288 train.progress_bar=false $args > $OUT/run.log 2>&1
  echo "[$args] rc=$? $(grep -E 'tok/s|Error|error' $OUT/run.log | tail -2)"
done
ls $OUT/runs
