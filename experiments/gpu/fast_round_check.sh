#!/usr/bin/env bash
# Issue 12, on one H200 in one device call (<= 8 minutes): the quantizers' float32 rounding route
# (fp4.kernels._bits.round_nearest_f32 / mx_round_nearest, the FP8 byte by conversion of the grid
# value) against the torch reference on the GPU, and their speed.
#   1. the kernel tests on CUDA (compiled kernels against the reference run on the CPU);
#   2. `bench_kernels --no-compile`: % of copy bandwidth, both orientations, with the full-size
#      correctness pass (planted hard blocks);
#   3. the FP8 cast-transpose tiles on llama-150m's operand shapes (fp8_fast_path_check --sweep-only);
# Usage (device machine, repo root, .carry/whl carried): bash experiments/gpu/fast_round_check.sh <commit>
# Files in $OUT: fast_round_check-h200-<commit>.txt (everything), kernels-<commit>.json.
set -u
t0=$(date +%s)
source experiments/gpu/setup.sh
C=${1:-unknown}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG="$OUT/fast_round_check-h200-$C.txt"
{
  echo "# bash experiments/gpu/fast_round_check.sh $C, one $(nvidia-smi --query-gpu=name --format=csv,noheader)"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "## 1. kernel tests on CUDA"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/fp4/test_kernels.py \
    tests/fp4/test_kernels_rows_hadamard.py tests/fp4/test_kernels_fp8_transpose.py 2>&1 | tail -25
  echo "pytest rc=${PIPESTATUS[0]} at $(( $(date +%s) - t0 )) s"
  echo "## 2. kernel bench (no torch.compile of the reference)"
  timeout 150 python3 -m fp4_experiments.bench_kernels --no-compile "$OUT/kernels-$C.json" 2>&1 | tail -40
  echo "bench_kernels rc=${PIPESTATUS[0]} at $(( $(date +%s) - t0 )) s"
  echo "## 3. FP8 cast-transpose tiles"
  timeout 90 python3 experiments/gpu/fp8_fast_path_check.py --sweep-only 2>&1 | tail -40
  echo "fp8_fast_path_check rc=${PIPESTATUS[0]} at $(( $(date +%s) - t0 )) s"
} > "$LOG" 2>&1
cat "$LOG"
