#!/usr/bin/env bash
# On one GPU, repo root, .carry/whl carried: the quantize kernels after the division change
# (issue 12, twelfth session: x / s by one reciprocal per divisor and FMAs per element,
# fp4.kernels._bits.div_f32_fma; the FP8 kernels' float64 route in parts), in one device call:
#   0. kernel_sass: registers, programs per SM and SASS counts on this machine's Triton;
#   1. kernel_tiles_check --quick: every candidate tile of every quantizer on llama-150m's
#      65536 x 768 operand (four per launch), bytes equal to the default tile's, % of copy;
#      the FP8 cast-transpose and its tiles included;
#   2. bench_kernels --no-compile: correctness at 8192 x 8192 with planted hard blocks (0
#      mismatches expected everywhere), then a [4 x 8192, 8192] operand timed per quantizer.
# Usage: bash experiments/gpu/division_check.sh <commit>
# Files in $OUT: division_check-<commit>.txt, kernels-<commit>.json
set -u
COMMIT=${1:?commit}
source experiments/gpu/setup.sh
LOG=$OUT/division_check-$COMMIT.txt
{
  echo "# commit $COMMIT, $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
  echo "# 0. kernel_sass (this machine's Triton, sm_90; offline)"
  timeout 100 python3 -m fp4_experiments.kernel_sass 2>&1 | grep -v -i warn
  echo "# 1. kernel_tiles_check --quick"
  timeout 270 python3 experiments/gpu/kernel_tiles_check.py --quick
  echo "rc=$?"
  echo "# 2. bench_kernels --no-compile"
  timeout 170 python3 -m fp4_experiments.bench_kernels "$OUT/kernels-$COMMIT.json" --no-compile
  echo "rc=$?"
} 2>&1 | tee "$LOG"
