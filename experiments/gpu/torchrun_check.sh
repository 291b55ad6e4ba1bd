#!/usr/bin/env bash
# torchrun on one GPU (NCCL): llama-150m for 40 steps under bf16, fp8 and wgrad+h16, each with
# parallel=fsdp2 and without (parallel=none), then llama-350m with FSDP2 + activation
# checkpointing. Prints both loss curves side by side and each run's peak GPU memory.
# CHECKS selects the parts (default "rungs ac350"):
#   rungs  llama-150m bf16 / fp8 / wgrad+h16, parallel=fsdp2 against parallel=none
#   ac350  llama-350m wgrad+h16 fsdp2, activation checkpointing off / on
#   noise  llama-150m wgrad+h16: the same run twice (parallel=none, same seed: the GPU's own
#          run-to-run noise) and fsdp2 with parallel.param_dtype=float32 (the one-process numerics)
#   1b     llama-1b (~1B decoder) fsdp2 + activation checkpointing, bf16 and wgrad+h16: peak memory
# Usage (device machine, repo root, .carry carried): bash experiments/gpu/torchrun_check.sh
source experiments/gpu/setup.sh
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The CLI under torchrun, printing the peak memory of each rank at exit.
cat > $OUT/run_with_peak.py <<'EOF'
import atexit, os, sys
import torch
def _peak():
    if torch.cuda.is_available():
        print(f"PEAK rank{os.environ.get('RANK', '0')}: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
              f" allocated, {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved", flush=True)
atexit.register(_peak)
from fp4_ablate.main import main
sys.exit(main())
EOF
TORCHRUN="python3 -m torch.distributed.run --standalone --nproc_per_node=1"
# 16 x 1024 tokens per step, 40 steps; evaluations at steps 20 and 40.
C4="data=jsonl data.path=.carry/mix/c4-train.00000-of-00001.json.gz data.val_path=.carry/c4val tokenizer.vocab_size=8192 cache_dir=/tmp/cache"
SHORT="train=gpu hardware=auto train.batch_size=16 train.micro_batch_size=8 train.max_tokens=655360
  train.warmup_tokens=65536 train.eval_every_tokens=327680 train.eval_batch_size=16
  train.log_every_steps=5 train.target_ppl=null train.progress_bar=false"
curves() {  # loss every 5 steps of two run directories, side by side
  python3 - "$1" "$2" <<'EOF'
import glob, json, sys
def load(d):
    f = glob.glob(f"{d}/*/metrics.jsonl")
    return {(r["kind"], r["step"]): r for r in map(json.loads, open(f[0]))} if f else {}
a, b = load(sys.argv[1]), load(sys.argv[2])
na, nb = (d.rstrip("/").rsplit("/", 1)[-1][-12:] for d in sys.argv[1:3])
print(f"{'step':>5} {na:>12} {nb:>12} {'rel diff':>9}   (loss)")
for k in sorted(set(a) | set(b), key=lambda k: (k[1], k[0])):
    key = "loss" if k[0] == "train" else "val_loss"
    x, y = a.get(k, {}).get(key), b.get(k, {}).get(key)
    d = f"{abs(x - y) / abs(x):.1e}" if x is not None and y is not None else "-"
    fmt = lambda v: f"{v:.4f}" if v is not None else "-"
    print(f"{k[1]:>5} {fmt(x):>12} {fmt(y):>12} {d:>9}  {'' if k[0] == 'train' else '(val)'}")
for d in sys.argv[1:]:
    s = glob.glob(f"{d}/*/summary.json")
    if s:
        s = json.load(open(s[0]))
        print(f"  {d.rsplit('/', 1)[-1]}: {s['status']}, {s.get('mean_tokens_per_s') or 0:,.0f} tok/s, "
              f"world_size={s.get('world_size')} parallel={s.get('parallel')} "
              f"micro/rank={s.get('micro_batch_per_rank')} allreduce={s.get('allreduce_dtype')}")
EOF
}
check_rungs() {
  for rung in "+ladder=bf16" "+ladder=fp8" "+ladder=wgrad +stabilizer=h16"; do
    tag=$(echo "$rung" | tr -d '+' | tr ' =' '__')
    for mode in none fsdp2; do
      timeout 240 $TORCHRUN $OUT/run_with_peak.py run model=llama-150m $C4 $SHORT $rung parallel=$mode \
        results_dir=$OUT/runs/$tag-$mode > $OUT/$tag-$mode.log 2>&1
      echo "[$rung parallel=$mode] rc=$? $(grep -E '^PEAK' $OUT/$tag-$mode.log | head -1)"
      grep -E 'Error|error:' $OUT/$tag-$mode.log | tail -3
    done
    curves $OUT/runs/$tag-none $OUT/runs/$tag-fsdp2
  done
}
check_ac350() {
  # llama-350m: FSDP2 with activation checkpointing against FSDP2 without (same numerics: the
  # recomputed forward of a deterministic Fprop is the same).
  for ac in false true; do
    timeout 300 $TORCHRUN $OUT/run_with_peak.py run model=llama-350m $C4 $SHORT +ladder=wgrad +stabilizer=h16 \
      parallel=fsdp2 parallel.activation_checkpointing=$ac train.max_tokens=327680 \
      train.eval_every_tokens=163840 results_dir=$OUT/runs/350m-ac-$ac > $OUT/350m-ac-$ac.log 2>&1
    echo "[llama-350m wgrad+h16 fsdp2 activation_checkpointing=$ac] rc=$? $(grep -E '^PEAK' $OUT/350m-ac-$ac.log | head -1)"
    grep -E 'Error|error:' $OUT/350m-ac-$ac.log | tail -3
  done
  curves $OUT/runs/350m-ac-false $OUT/runs/350m-ac-true
}
check_noise() {
  local rung="+ladder=wgrad +stabilizer=h16"
  for tag in none-a none-b fsdp2-fp32; do
    local mode=none; [ "$tag" = fsdp2-fp32 ] && mode="fsdp2 parallel.param_dtype=float32"
    timeout 240 $TORCHRUN $OUT/run_with_peak.py run model=llama-150m $C4 $SHORT $rung parallel=$mode \
      results_dir=$OUT/runs/noise-$tag > $OUT/noise-$tag.log 2>&1
    echo "[noise $tag: $rung parallel=$mode] rc=$? $(grep -E '^PEAK' $OUT/noise-$tag.log | head -1)"
    grep -E 'Error|error:' $OUT/noise-$tag.log | tail -3
  done
  echo "-- the same run twice (parallel=none): run-to-run noise"
  curves $OUT/runs/noise-none-a $OUT/runs/noise-none-b
  echo "-- parallel=none against fsdp2 with float32 parameters"
  curves $OUT/runs/noise-none-a $OUT/runs/noise-fsdp2-fp32
}
check_1b() {  # 8 steps of 16 x 1024 tokens in micro-batches of 4, evaluation at the end
  for rung in "+ladder=bf16" "+ladder=wgrad +stabilizer=h16"; do
    local tag=1b-$(echo "$rung" | tr -d '+' | tr ' =' '__')
    timeout 420 $TORCHRUN $OUT/run_with_peak.py run model=llama-1b $C4 $SHORT $rung parallel=fsdp2 \
      parallel.activation_checkpointing=true train.micro_batch_size=4 train.max_tokens=131072 \
      train.warmup_tokens=16384 train.eval_every_tokens=131072 train.log_every_steps=1 \
      train.checkpoint_every_steps=1000 results_dir=$OUT/runs/$tag > $OUT/$tag.log 2>&1
    echo "[llama-1b $rung fsdp2 + activation checkpointing] rc=$? $(grep -E '^PEAK' $OUT/$tag.log | head -1)"
    grep -E 'Error|error:|parameters' $OUT/$tag.log | tail -3
    curves $OUT/runs/$tag $OUT/runs/$tag
  done
}
for check in ${CHECKS:-rungs ac350}; do
  echo "== $check"
  check_$check
done
tar czf $OUT/torchrun_check.tgz --exclude=checkpoints -C $OUT runs
