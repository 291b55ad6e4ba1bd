#!/usr/bin/env bash
# Shared by the ladder scripts (ladder_repro.sh, ladder_long.sh): a sweep's state that survives
# machine leases of a few minutes. Source it after setting OUT, STATE, RESULTS, COMMON (the
# overrides every run gets), FP4_ABLATE_CLI and DEADLINE (empty: none), then call
# `ladder_restore`, `ladder_start`; `ladder_sweep ARGS` runs one resumable sweep; set `stage`
# to name what the call is doing (logged in wall_time.log on exit).

# Runs per GPU when JOBS_PER_GPU is not set: one per GIB_PER_RUN GiB of the GPU's memory, at
# most MAX_RUNS (past that the host's cores, not the GPU, are the limit).
ladder_jobs_per_gpu() {  # GIB_PER_RUN MAX_RUNS
  local mem
  mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
  local n=$(( ${mem:-0} / ($1 * 1024) ))
  [ "$n" -gt "$2" ] && n=$2
  [ "$n" -ge 1 ] || n=1
  echo "$n"
}

# RESTORE: a runs.tgz of an earlier call, or a results directory (e.g. results/<ladder>), whose
# finished runs and logs are brought into a fresh $STATE; files already there win.
ladder_restore() {
  if [ -n "${RESTORE:-}" ] && [ -f "$RESTORE" ]; then
    tar xzf "$RESTORE" -C "$STATE" --skip-old-files
  elif [ -n "${RESTORE:-}" ] && [ -d "$RESTORE" ]; then
    for f in runs calibrate.txt wall_time.log gpu_util.log bench; do
      [ -e "$RESTORE/$f" ] && cp -rn "$RESTORE/$f" "$STATE/"
    done
  fi
  [ -n "${RESTORE:-}" ] && echo "restored $(ls "$RESULTS" | wc -l) run dirs from $RESTORE"
  return 0
}

# GPU utilization and memory every 20 s (how full the shared GPU is), and on exit, whatever
# happened: this call's wall time in wall_time.log and everything done packed into $OUT/runs.tgz
# (checkpoints excluded: a run cut by the deadline restarts in the next call).
ladder_start() {
  t0=$(date +%s)
  stage=start
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 20 \
    >> "$STATE/gpu_util.log" 2>/dev/null & SMI=$!
  trap ladder_finish EXIT
}

ladder_finish() {
  kill "$SMI" 2>/dev/null
  local gpu
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  echo "$t0 $(date +%s) $(( $(date +%s) - t0 )) $stage $gpu" >> "$STATE/wall_time.log"
  awk '{s += $3} END {print "sweep wall time so far (all calls):", s, "s over", NR, "call(s)"}' \
    "$STATE/wall_time.log" | tee "$OUT/wall_time.txt"
  tar czf "$OUT/runs.tgz" --exclude=checkpoints -C "$STATE" runs wall_time.log gpu_util.log \
    $(cd "$STATE" && ls -d calibrate.txt bench report report.log fp32_block_kernel_check.txt 2>/dev/null)
}

# One resumable sweep, stopped before DEADLINE (interrupted runs keep their checkpoints here).
ladder_sweep() {
  local limit=""
  if [ -n "${DEADLINE:-}" ]; then
    local left=$(( DEADLINE - $(date +%s) ))
    [ "$left" -gt 30 ] || { echo "deadline reached before: sweep $*"; return 124; }
    limit="timeout -k 15 $left"
  fi
  $limit $FP4_ABLATE_CLI sweep $COMMON "$@" 2>&1 \
    | grep --line-buffered -E "^\[sweep|sweep finished|FAILED|Error|fp4-ablate sweep"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then  # orphans of a timeout (only then: another sweep may share the GPU)
    pkill -f "python3 -m fp4_ablate" 2>/dev/null; pkill -f loky 2>/dev/null; sleep 2
  fi
  return "$rc"
}
