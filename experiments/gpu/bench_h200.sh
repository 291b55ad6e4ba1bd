#!/usr/bin/env bash
# Issue 12's benchmark on one H200 in one device call (<= 9 minutes): the runner's own step
# (`fp4-ablate bench`, experiments/bench*.py) beside the compiled transformers-bf16 and
# torchao-float8 peers, the targets table, the compiled-vs-eager correctness pass and sweep packing.
#
# Prepare once, here (copies the wheels the bare GPU machine lacks; nothing is downloaded):
#   bash experiments/gpu/bench_h200.sh --prepare
#     -> .carry/whl/   hydra-core, omegaconf, antlr4 (what experiments/gpu/setup.sh installs)
#     -> .carry/peers/ torchao 0.17.0 (installed by this script only: the other scripts'
#                      runs never see it)
# Then on the GPU machine, repo root, with .carry/whl and .carry/peers carried:
#   bash experiments/gpu/bench_h200.sh <git commit> [more fp4-ablate bench flags, last one wins]
# Sections, cheap and certain first: eager runner rows (llama-150m and llama-20m, all ten
# configurations), packing (llama-20m fp8, J=1,2,4; compiled and graphed as a sweep's runs: --pack-mode eager for the older rows' kind), the llama-150m peers (both compiled), then the
# llama-150m compiled rows (bf16, fp8, wgrad+h16, wgrad+sr, wgrad), each with its correctness pass.
# Every row is bounded (--row-timeout / --compile-timeout), the whole by --time-budget (BUDGET s:
# rows that would start later are recorded as skipped), and the .md/.json are rewritten after
# every row, so a call cut short still returns what it measured. Files in $OUT (flat, 3):
#   nvidia-h200-issue12.md, nvidia-h200-issue12.json, bench.log
# Env: BUDGET (seconds for all rows, default 450), STEPS (timed steps per row, default 6),
# KERNELS=1 (also the kernel bench, ~1-2 min more: then lower BUDGET).
set -u
if [ "${1:-}" = "--prepare" ]; then
  W=${WHEELS:-../shared/wheels/device-py312}
  mkdir -p .carry/whl .carry/peers
  cp -n "$W"/{hydra_core,omegaconf,antlr4}*.whl .carry/whl/
  cp -n "$W"/torchao-0.17.0*.whl .carry/peers/
  du -sh .carry/whl .carry/peers
  exit 0
fi
t0=$(date +%s)
source experiments/gpu/setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .carry/peers/torchao-*.whl || echo "torchao wheel not installed: the torchao-float8 peer will be skipped"
python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1
export FP4_ABLATE_GIT_COMMIT=${1:-${FP4_ABLATE_GIT_COMMIT:-unknown}}
shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-450}
KERNEL_FLAG=--skip-kernels; [ "${KERNELS:-0}" = "1" ] && KERNEL_FLAG=
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
echo "setup: $(( $(date +%s) - t0 )) s"
set -o pipefail
# The outer timeout only guards a hang outside Python (a stuck kernel): the budget ends first.
timeout -k 10 $((BUDGET + 60)) python3 -m fp4_ablate bench $KERNEL_FLAG --out "$OUT" --name issue12 \
  --models llama-150m,llama-20m --steps "${STEPS:-6}" --warmup 2 \
  --order eager,pack,peers,compile \
  --compile-models llama-150m --compile-configs bf16,fp8,wgrad+h16,wgrad+sr,wgrad \
  --peers transformers-bf16,torchao-float8 --peer-models llama-150m --peer-modes compile \
  --pack-jobs 1,2,4 --pack-model llama-20m --pack-config fp8 --pack-seconds 8 \
  --check-steps 2 --row-timeout 90 --compile-timeout 150 --time-budget "$BUDGET" "$@" \
  > "$OUT/bench.log" 2>&1
rc=$?
echo "bench rc=$rc after $(( $(date +%s) - t0 )) s"
# The rows as they finished (one JSON line each), then the Markdown (written after every row).
grep -E '^\{' "$OUT/bench.log" | cut -c1-400 | tail -40
grep -vE '^\{' "$OUT/bench.log" | grep -iE 'error|Traceback' | tail -5
cat "$OUT"/*.md 2>/dev/null | head -120
ls -la "$OUT"
exit $rc
