#!/usr/bin/env bash
# On one GPU, repo root, .carry/whl carried: the quantize kernels after the register cut (issue 12,
# eleventh session), in one device call:
#   1. kernel_tiles_check --quick --defaults-only --reload-ab: bytes of every tile equal the
#      default's, and each default tile timed reading its tile again (RELOAD, the new default)
#      against holding it in registers, on llama-150m's 65536 x 768 operand, four per launch;
#   2. fp4-ablate's kernel bench without torch.compile (bench_kernels --no-compile: correctness at
#      8192 x 8192 with planted hard blocks, then a [4 x 8192, 8192] operand timed per quantizer);
#   3. the kernel test files on CUDA (compiled kernels against the reference) in the time left.
# Usage: bash experiments/gpu/kernel_occupancy_check.sh <commit> [seconds for the tests, default 240]
# Files in $OUT: kernel_occupancy_check-<commit>.txt, bench_kernels-<commit>.json
set -u
COMMIT=${1:?commit}
TEST_S=${2:-240}
source experiments/gpu/setup.sh
LOG=$OUT/kernel_occupancy_check-$COMMIT.txt
{
  echo "# commit $COMMIT, $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
  echo "# 0. kernel_sass (this machine's Triton, sm_90; offline)"
  timeout 120 python3 -m fp4_experiments.kernel_sass 2>&1 | grep -v -i warn
  echo "# 1. kernel_tiles_check --quick --defaults-only --reload-ab"
  timeout 200 python3 experiments/gpu/kernel_tiles_check.py --quick --defaults-only --reload-ab
  echo "rc=$?"
  echo "# 2. bench_kernels --no-compile"
  timeout 200 python3 -m fp4_experiments.bench_kernels "$OUT/bench_kernels-$COMMIT.json" --no-compile
  echo "rc=$?"
  echo "# 3. kernel tests on CUDA: timeout $TEST_S pytest tests/fp4/test_kernels*.py"
  timeout "$TEST_S" python3 -m pytest -q -p no:cacheprovider tests/fp4/test_kernels.py \
    tests/fp4/test_kernels_rows_hadamard.py tests/fp4/test_kernels_fp32_blocks.py \
    tests/fp4/test_kernels_fp8_transpose.py tests/fp4/test_kernels_compile.py 2>&1 | tail -15
  echo "pytest rc=${PIPESTATUS[0]}"
} 2>&1 | tee "$LOG"
