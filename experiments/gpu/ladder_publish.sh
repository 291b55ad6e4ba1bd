#!/usr/bin/env bash
# Here, after a lease of ladder_lease.sh calls: bring the finished runs of the last call's packed
# parts into the committed results folder and rebuild its reports.
#
#   bash experiments/gpu/ladder_publish.sh /work/.device/<call>/ [results/ladder-long]
#
# - unpacks runs.tgz.part-* (from the last call: each call packs every finished run so far);
# - copies each *finished* run (summary.json present) that the results folder lacks, without its
#   run lock; runs cut by the lease's end are left out (their checkpoints stayed on the machine,
#   so the next lease trains them from the start);
# - gzips diagnostics.jsonl (the report reads diagnostics.jsonl.gz; ~6x smaller, so the folder stays
#   small enough to travel with the repo to the next lease);
# - merges the lease's time-stamped logs (wall time, GPU utilisation) into those of earlier
#   leases, copies its kernel check, and appends its sweep log and call log to earlier leases';
# - rebuilds report/ (this ladder) and report-with-llama20m/ (the scaling section across this
#   ladder and the committed llama-20m one), fixed-budget runs given a target post hoc
#   (calibrate), seeds still without their FP8 run left out (--unpaired exclude).
set -eu
PARTS=${1:?usage: ladder_publish.sh PARTS_DIR [RESULTS]}
RESULTS=${2:-results/ladder-long}
CLI=${FP4_ABLATE_CLI:-fp4-ablate}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cat "$PARTS"/runs.tgz.part-* | tar xzf - -C "$TMP"
mkdir -p "$RESULTS/runs"
added=0
for d in "$TMP"/runs/*/; do
  name=$(basename "$d")
  [ -f "$d/summary.json" ] && [ ! -e "$RESULTS/runs/$name" ] || continue
  mkdir "$RESULTS/runs/$name.part"
  (cd "$d" && tar cf - --exclude=run.lock --exclude=checkpoints .) | tar xf - -C "$RESULTS/runs/$name.part"
  [ -f "$RESULTS/runs/$name.part/diagnostics.jsonl" ] && gzip -9 "$RESULTS/runs/$name.part/diagnostics.jsonl"
  mv "$RESULTS/runs/$name.part" "$RESULTS/runs/$name"
  added=$((added + 1))
done
echo "added $added finished runs; $(ls "$RESULTS/runs" | wc -l) in $RESULTS/runs"
# The time-stamped logs are merged, not replaced: a lease restored from an older checkout (or a
# fresh machine) holds only part of them, and copying it over would drop the leases it lacks.
for f in wall_time.log gpu_util.log; do
  [ -f "$TMP/$f" ] || continue
  cat "$RESULTS/$f" "$TMP/$f" 2>/dev/null | sort -u > "$RESULTS/$f.part" && mv "$RESULTS/$f.part" "$RESULTS/$f"
done
[ -f "$TMP/fp32_block_kernel_check.txt" ] && cp "$TMP/fp32_block_kernel_check.txt" "$RESULTS/"
# Each lease's logs are appended under a header naming the lease (its first call's start, epoch
# seconds), once: publishing the same parts again adds nothing, earlier leases' logs stay.
lease=$(head -1 "$PARTS/calls.log" 2>/dev/null | cut -d' ' -f1)
for f in ladder.log calls.log; do  # beside the parts (ladder_lease.sh) or inside them
  src=$PARTS/$f; [ -f "$src" ] || src=$TMP/$f; [ -f "$src" ] || continue
  dst=$RESULTS/ladder.log; [ "$f" = calls.log ] && dst=$RESULTS/lease_calls.log
  # Without a calls.log the log's own checksum names it, so two such leases never read as one.
  header="## lease ${lease:-unknown-$(cksum < "$src" | cut -d' ' -f1)}"
  grep -qxF "$header" "$dst" 2>/dev/null && continue
  { echo "$header"; grep -v "^WARNING: Target\|^cp: warning" "$src" || true; } >> "$dst"
done
$CLI report "$RESULTS/runs" --out "$RESULTS/report" --target-ppl calibrate --unpaired exclude > /dev/null
$CLI report "$RESULTS/runs" results/mxfp4-ladder-llama20m/runs --out "$RESULTS/report-with-llama20m" \
  --target-ppl calibrate --unpaired exclude > /dev/null
echo "reports: $RESULTS/report, $RESULTS/report-with-llama20m"
