#!/usr/bin/env bash
# hardware.cuda_graph=true against eager on one GPU: same seed, same data, so the train losses
# should agree step for step, and the graphed steps should be faster. llama-150m, 16 x 512 tokens
# per step, 40 steps, the embedded C4 sample; wgrad+h16 (one micro-batch) and fp8 (two
# micro-batches of 8, to cover gradient accumulation across graph replays).
# Usage on the device machine: bash experiments/gpu/cuda_graph_check.sh <git commit>
source experiments/gpu/setup.sh
export FP4_ABLATE_GIT_COMMIT=${1:-unknown}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
COMMON="model=llama-150m train=gpu train.batch_size=16 train.max_tokens=327680 train.warmup_tokens=32768
  train.eval_every_tokens=163840 train.log_every_steps=1 cache_dir=/tmp/cache train.progress_bar=false"
for cfg in "+ladder=wgrad +stabilizer=h16" "+ladder=fp8 train.micro_batch_size=8"; do
  for graph in false true; do
    tag=$(echo "$cfg" | tr -d '+=' | tr ' .' '__')-graph_$graph
    timeout 150 python3 -m fp4_ablate run $COMMON $cfg hardware.cuda_graph=$graph results_dir=$OUT/runs/$tag \
      > $OUT/$tag.log 2>&1
    echo "[$tag] rc=$? $(grep -E 'captured|Error' $OUT/$tag.log | tail -2)"
  done
done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def load(tag):
    (d,) = (out / "runs" / tag).iterdir()
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    return json.loads((d / "summary.json").read_text()), rows
result = {}
for cfg in ("ladderwgrad_stabilizerh16", "ladderfp8_train_micro_batch_size8"):
    (se, re_), (sg, rg) = load(f"{cfg}-graph_false"), load(f"{cfg}-graph_true")
    le = [r["loss"] for r in re_ if r["kind"] == "train"]
    lg = [r["loss"] for r in rg if r["kind"] == "train"]
    ve = [r["val_ppl"] for r in re_ if r["kind"] == "eval"]
    vg = [r["val_ppl"] for r in rg if r["kind"] == "eval"]
    result[cfg] = {"steps": [len(le), len(lg)], "identical_losses": le == lg,
                   "max_abs_loss_diff": max(abs(a - b) for a, b in zip(le, lg)),
                   "val_ppl": [ve, vg], "tok_s": [se["mean_tokens_per_s"], sg["mean_tokens_per_s"]],
                   "speedup": sg["mean_tokens_per_s"] / se["mean_tokens_per_s"],
                   "status": [se["status"], sg["status"]]}
print(json.dumps(result, indent=1))
(out / "cuda_graph_check.json").write_text(json.dumps(result, indent=1))
PY
