#!/usr/bin/env bash
# Issue 12's last check: does `fp4-ablate run` train at the tokens/s its benchmark promises? In
# one device call on one GPU: `fp4-ablate bench` times the compiled llama-150m step of each
# configuration (no peers), then `fp4-ablate run` trains each with the bench row's own overrides
# (read back from the bench's .json, so both run the same configuration) except hardware=auto (the
# user's default, which picks the compiled path on CUDA) and the real data, for STEPS steps, and
# the table compares summary.json's mean_tokens_per_s (steps after the untimed ones, evaluation
# excluded) with the bench row's tokens/s.
# Usage (device machine, repo root, .carry/whl, .carry/c4val and .carry/mix/c4-train* carried):
#   CONFIGS=bf16,fp8,wgrad+h16,wgrad+sr bash experiments/gpu/run_vs_bench.sh <git commit>
# Where their times differ, PROFILE=1 profiles both: the bench's rows (--profile-configs, 3 steps)
# and steps 15-17 of each run (+profile=on: the run directory's profile.txt / profile.json).
# Files in $OUT: run-vs-bench.md (the table), nvidia-*-run-vs-bench.{md,json} (the bench), *.log,
# runs.tgz (the run directories, checkpoints excluded).
set -u
source experiments/gpu/setup.sh
export FP4_ABLATE_GIT_COMMIT=${1:-${FP4_ABLATE_GIT_COMMIT:-unknown}}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CONFIGS=${CONFIGS:-bf16,fp8,wgrad+h16,wgrad+sr}
STEPS=${STEPS:-30}
t0=$(date +%s)
timeout -k 10 300 python3 -m fp4_ablate bench --skip-kernels --out "$OUT" --name run-vs-bench \
  --models llama-150m --eager-models '' --order compile --compile-models llama-150m \
  --compile-configs "$CONFIGS" --peers '' --pack-jobs '' --check-steps 0 --steps 6 --warmup 2 \
  --compile-timeout 80 --time-budget 240 \
  ${PROFILE:+--profile-model llama-150m --profile-modes compile --profile-configs "$CONFIGS"} \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$? after $(( $(date +%s) - t0 )) s"
BENCH_JSON=$(ls "$OUT"/*run-vs-bench.json | head -n 1)
C4=(data=jsonl data.path=.carry/mix/c4-train.00000-of-00001.json.gz data.val_path=.carry/c4val
    cache_dir=/tmp/run-vs-bench-cache)
TOKENS=$(( STEPS * 64 * 1024 ))
SHORT=(train.max_tokens=$TOKENS train.warmup_tokens=131072 train.eval_every_tokens=$TOKENS
       data.val_tokens=131072 train.log_every_steps=1 train.target_ppl=null)
[ -n "${PROFILE:-}" ] && SHORT+=(+profile=on profile.start_step=15)
# One line per bench row: its label, then its overrides without the bench's own directories and
# with hardware=auto in place of the bench's hardware=cuda.
python3 - "$BENCH_JSON" > "$OUT/rows.txt" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["steps"]:
    if r.get("kind") == "runner" and r.get("median_step_s"):
        o = [x for x in r["overrides"] if not x.startswith(("results_dir=", "cache_dir=", "hardware="))]
        print(r["config"], " ".join(o + ["hardware=auto"]))
PY
# GC="on off" also trains each with Python's collector disabled (experiments/gpu/gc_probe.py, which
# reports the collections either way): what the collector costs the run's steps.
while read -r label overrides; do
  tag=${label//+/_}  # the device tool returns no file with a "+" in its name
  for gc in ${GC:-on}; do
    t1=$(date +%s)
    # shellcheck disable=SC2086  # the overrides are one word each
    timeout 200 python3 experiments/gpu/gc_probe.py --gc "$gc" -- run "${C4[@]}" "${SHORT[@]}" \
      $overrides results_dir="$OUT/runs/$tag/gc-$gc" > "$OUT/run-$tag-gc-$gc.log" 2>&1
    echo "[run $label gc=$gc] rc=$? wall=$(( $(date +%s) - t1 )) s"
    grep -E 'Error|error:|GC_PROBE' "$OUT/run-$tag-gc-$gc.log" | tail -n 3
  done
done < "$OUT/rows.txt"
python3 - "$BENCH_JSON" "$OUT/runs" "$FP4_ABLATE_GIT_COMMIT" > "$OUT/run-vs-bench.md" <<'PY'
import glob, json, sys
bench, runs, commit = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
UNTIMED = 10  # the training loop's untimed first steps (summary.json's tokens/s leaves them out)
print(f"`fp4-ablate run` beside `fp4-ablate bench`, one call on {bench['meta'].get('device_name')}, commit {commit};")
print("run: llama-150m, train=gpu (64 x 1024 tokens per step), C4 train shard + C4 validation,"
      " hardware=auto; tokens/s = summary.json mean_tokens_per_s\n")
print("| configuration | bench tokens/s (compiled step) | run: Python GC | run tokens/s | run / bench |"
      " run step ms, median (steps after the untimed) | GC collections gen0/1/2 (ms) | run compile (summary.json) |")
print("|---|---:|---|---:|---:|---:|---|---|")
for r in bench["steps"]:
    if r.get("kind") != "runner" or not r.get("median_step_s"):
        continue
    tag = r["config"].replace("+", "_")
    for d in sorted(glob.glob(f"{runs}/{tag}/gc-*")):
        gc = d.rsplit("gc-", 1)[1]
        s = glob.glob(f"{d}/*/summary.json")
        probe = [l for l in open(f"{runs}/../run-{tag}-gc-{gc}.log") if l.startswith("GC_PROBE")]
        probe = json.loads(probe[-1].split(" ", 1)[1]) if probe else {}
        gcs = " / ".join(f"{probe[g]['collections']} ({probe[g]['ms']:.0f})" for g in ("gen0", "gen1", "gen2")
                         if g in probe)
        if not s:
            print(f"| {r['config']} | {r['tokens_per_s']:,.0f} | {gc} | no summary | | | {gcs} | |"); continue
        s = json.load(open(s[0]))
        m = [json.loads(l) for l in open(glob.glob(f"{d}/*/metrics.jsonl")[0]) if '"train"' in l]
        dts = sorted(x["step_time_s"] for x in m if x["step"] > UNTIMED)
        med = dts[len(dts) // 2] * 1e3 if dts else float("nan")
        tps = s.get("mean_tokens_per_s") or 0
        print(f"| {r['config']} | {r['tokens_per_s']:,.0f} | {gc} | {tps:,.0f} | {tps / r['tokens_per_s']:.3f} |"
              f" {med:.1f} | {gcs} | {s.get('compile')} |")
PY
cat "$OUT/run-vs-bench.md"
tar czf "$OUT/runs.tgz" --exclude=checkpoints --exclude='*.pt' -C "$OUT" runs
rm -rf "$OUT/runs"
ls -la "$OUT"
