#!/usr/bin/env bash
# torch.compile through `fp4-ablate run` on one GPU: llama-150m, train=gpu (64 x 1024 tokens per
# step), 24 steps, for bf16, fp8, wgrad, wgrad+h16 and wgrad+sr, eager (hardware=auto) and compiled
# per decoder layer (hardware=cuda: inductor). Prints tokens/s (summary.json: steps after the 10
# untimed ones), the compile report (first step beyond the second, graphs, graph breaks) and both
# loss curves side by side (inductor fuses the unquantized ops, so the curves may differ slightly).
# Usage (device machine, repo root, .carry carried): bash experiments/gpu/compile_check.sh
source experiments/gpu/setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
C4="data=jsonl data.path=.carry/mix/c4-train.00000-of-00001.json.gz data.val_path=.carry/c4val tokenizer.vocab_size=8192 cache_dir=/tmp/cache"
SHORT="model=llama-150m train=gpu train.max_tokens=1572864 train.warmup_tokens=131072
  train.eval_every_tokens=1572864 data.val_tokens=131072 train.log_every_steps=1 train.target_ppl=null
  train.progress_bar=false"
show() {  # tokens/s, compile report, loss at a few steps
  python3 - "$@" <<'PY'
import glob, json, sys
for d in sys.argv[1:]:
    s = glob.glob(f"{d}/*/summary.json")
    if not s:
        print(f"  {d.rsplit('/', 1)[-1]}: no summary"); continue
    s = json.load(open(s[0]))
    m = [json.loads(l) for l in open(glob.glob(f"{d}/*/metrics.jsonl")[0])]
    loss = {r["step"]: r["loss"] for r in m if r["kind"] == "train"}
    print(f"  {d.rsplit('/', 1)[-1]:<22} {s['status']:<10} {s.get('mean_tokens_per_s') or 0:>10,.0f} tok/s"
          f"  compile={s.get('compile')}  loss@1,12,24=" + ",".join(f"{loss.get(k, float('nan')):.4f}" for k in (1, 12, 24)))
PY
}
for rung in "+ladder=bf16" "+ladder=fp8" "+ladder=wgrad" "+ladder=wgrad +stabilizer=h16" "+ladder=wgrad +stabilizer=sr"; do
  tag=$(echo "$rung" | tr -d '+' | tr ' =' '__')
  for hw in auto cuda; do
    t0=$(date +%s)
    timeout 200 python3 -m fp4_ablate run $C4 $SHORT $rung hardware=$hw results_dir=$OUT/runs/$tag-$hw \
      > $OUT/$tag-$hw.log 2>&1
    echo "[$rung hardware=$hw] rc=$? wall=$(( $(date +%s) - t0 )) s"
    grep -E 'Error|error:' $OUT/$tag-$hw.log | tail -3
  done
  show $OUT/runs/$tag-auto $OUT/runs/$tag-cuda
done
tar czf $OUT/compile_check.tgz --exclude=checkpoints --exclude='*.pt' -C $OUT runs $(cd $OUT && ls *.log)
