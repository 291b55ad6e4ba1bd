#!/usr/bin/env bash
# One device call of a ladder that outlives the call. A lease is several calls back to back on
# one warm machine (it stays warm ~30 s after a call, keeping the ignored folders of the repo
# there); a sweep cut at every call's end would lose each run in flight, so instead:
#   - the first call starts ladder_long.sh in the background, detached, with all of its state
#     (runs, checkpoints, token cache, logs) in $LEASE, an ignored folder of the repo;
#   - every call (the first included) watches it for WATCH_S seconds, printing progress, then
#     packs what has finished into $OUT/runs.tgz.part-* (checkpoints excluded, as ladder_lib's
#     packing; in parts, below);
#   - a call that finds the ladder not running (it finished, or the machine is a fresh one)
#     starts it again: the sweep skips finished runs and resumes interrupted ones from their
#     checkpoints, so a restart loses at most the steps since each run's last checkpoint.
# On a fresh machine nothing of $LEASE is there: RESTORE (passed through to ladder_long.sh)
# brings back the runs packed by earlier calls, e.g. RESTORE=results/ladder-long.
#
#   WATCH_S=540 PARTS="main size1" PARTS_TOGETHER=1 RESTORE=results/ladder-long \
#     bash experiments/gpu/ladder_lease.sh <git commit>        (repo root, .carry carried once)
#
# The environment (PARTS, GRID, JOBS_PER_GPU, ...) reaches ladder_long.sh only when this call
# starts it; later calls just watch. STOP=1 (the last call of a lease) ends the ladder before packing.
set -u
LEASE=${LEASE:-.lease}
WATCH_S=${WATCH_S:-540}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$LEASE"
STATE=$LEASE/ladder
t_call=$(date +%s)
[ -n "${FP4_ABLATE_CLI:-}" ] || source experiments/gpu/setup.sh  # FP4_ABLATE_CLI set: a CPU smoke test

running() { pgrep -f "experiments/gpu/ladder_long.sh" >/dev/null; }

progress() {  # one line: finished runs, runs in flight with their tokens, tokens/s since start
  python3 - "$STATE/runs" "$LEASE/started" <<'EOF'
import json, os, sys, time
root, started = sys.argv[1], float(open(sys.argv[2]).read())
done, flight, tokens = [], [], 0
# "wgrad-h16-mxfp4-llama-3m-s4-5b00c889" -> "wgrad-h16-3m-s4": short, but the model and seed stay
# (two parts' runs of one cell otherwise read the same).
short = lambda n: n.rsplit("-", 1)[0].replace("-mxfp4", "").replace("llama-", "")
for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    d = os.path.join(root, name)
    try:
        status = json.load(open(os.path.join(d, "summary.json")))["status"]
        done.append(f"{short(name)}:{status}")
        continue
    except (OSError, ValueError, KeyError):
        pass
    last = None
    try:
        with open(os.path.join(d, "metrics.jsonl")) as f:
            for line in f:
                if '"train"' in line:
                    last = line
    except OSError:
        continue
    if last:
        t = json.loads(last)["tokens"]
        tokens += t
        flight.append(f"{short(name)}@{t / 1e6:.1f}M")
print(f"[lease +{time.time() - started:.0f}s] finished {len(done)}; in flight {len(flight)} "
      f"({tokens / 1e6:.0f}M tokens): {' '.join(flight)}")
EOF
}

# A call brings back at most 8 files of 16 MiB each: the archive travels in 15 MB parts
# (runs.tgz.part-aa, -ab, ...; `cat runs.tgz.part-* | tar xz` here). ~290 kB per finished run.
pack() {
  rm -f "$OUT"/runs.tgz.part-*
  tar czf - --exclude=checkpoints --exclude=run.lock -C "$STATE" runs \
    $(cd "$STATE" && ls -d wall_time.log gpu_util.log fp32_block_kernel_check.txt report report.log 2>/dev/null) \
    | split -b 15000000 - "$OUT/runs.tgz.part-"
  cp "$LEASE/ladder.log" "$OUT/ladder.log" 2>/dev/null
  echo "$t_call $(date +%s) $(( $(date +%s) - t_call )) ${WATCH_S}" >> "$LEASE/calls.log"
  cp "$LEASE/calls.log" "$OUT/calls.log"
  ls -la "$OUT"
}

if running; then
  echo "ladder running since $(( $(date +%s) - $(cat "$LEASE/started") )) s"
else
  [ -f "$LEASE/started" ] && echo "ladder not running: restarting (finished, or it died: tail below)" \
    && tail -5 "$LEASE/ladder.log"
  date +%s > "$LEASE/started"
  OUT=$LEASE/out STATE=$STATE CACHE=$LEASE/cache \
    setsid nohup bash experiments/gpu/ladder_long.sh "${1:-unknown}" \
    >> "$LEASE/ladder.log" 2>&1 < /dev/null &
  sleep 5
fi
end=$(( t_call + WATCH_S ))
while [ "$(date +%s)" -lt "$end" ] && running; do
  sleep $(( end - $(date +%s) < 60 ? end - $(date +%s) : 60 ))
  progress
done
running || { echo "ladder ended:"; tail -25 "$LEASE/ladder.log"; }
if [ "${STOP:-0}" = 1 ]; then  # the last call of a lease: nothing may train while it packs
  pkill -f "experiments/gpu/ladder_long.sh"; pkill -f "python3 -m fp4_ablate"; sleep 2
fi
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
pack
