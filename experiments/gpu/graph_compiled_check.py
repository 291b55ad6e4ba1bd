"""Does the compiled step replay as a CUDA graph with the plain compiled step's bits, and how fast? (issue 12)

    source experiments/gpu/setup.sh && TORCH_LOGS=recompiles python3 experiments/gpu/graph_compiled_check.py \
        [--check-model llama-20m] [--check-configs bf16,wgrad+h16,fp8] [--check-steps 6] \
        [--time-model llama-150m] [--time-configs wgrad+h16,bf16] [--steps 8] [--out DIR]

1. Bits. For each check config, the runner's step (experiments/bench_steps.build_runner, the code
   path of `fp4-ablate run`) with compiled decoder layers is run `--check-steps` steps twice from the
   same seed: hardware.cuda_graphs=false (the plain compiled step) and null (captured at the
   attempt's third step, replayed after). Losses, gradient norms and every gradient are compared
   bit for bit (bench_steps.compare_snapshots). Where they differ, a second plain run says whether
   the plain step itself repeats its bits.
2. Speed. For each time config, bench_steps.runner_row of the compiled step with and without the
   graph, in this one process, side by side: median step time, tokens/s, peak memory.

Prints one line per result and writes DIR/graph_compiled_check.json.
"""
import argparse
import json
import os
import time

import torch

from experiments.bench_steps import (build_runner, compare_snapshots, compose_config, config_overrides,
                                     run_steps, runner_row)


def snapshots(model, label, graphs, steps):
    extra = ["hardware.cuda_graphs=false"] if not graphs else []
    cfg = compose_config(config_overrides(model, label, "compile", extra=extra))
    torch._dynamo.reset()
    build = build_runner(cfg)
    try:
        snaps = run_steps(build, steps, snapshot=True)[1]
        return snaps, (dict(build.trainer.cuda_graph) if build.trainer.cuda_graph else None)
    finally:
        build.close()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def check_bits(model, label, steps):
    t0 = time.perf_counter()
    plain, _ = snapshots(model, label, False, steps)
    graphed, report = snapshots(model, label, True, steps)
    cmp = compare_snapshots(plain, graphed)
    out = {"model": model, "config": label, "steps": steps, "cuda_graph": report,
           "bit_exact": cmp["bit_exact"], "loss_equal": cmp["loss_equal"],
           "grads_differing": cmp["grads_differing"], "grads_compared": cmp["grads_compared"],
           "worst_param": cmp["worst_param"], "worst_rel_diff": cmp["worst_rel_diff"], "losses_plain": [s.loss for s in plain],
           "losses_graphed": [s.loss for s in graphed]}
    if not cmp["bit_exact"]:
        again, _ = snapshots(model, label, False, steps)
        out["plain_repeats_itself"] = compare_snapshots(plain, again)["bit_exact"]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def time_rows(model, label, steps):
    rows = {}
    for name, extra in (("plain", ["hardware.cuda_graphs=false"]), ("graphed", [])):
        row = runner_row(model, label, "compile", steps=steps, extra=extra)
        rows[name] = {k: row.get(k) for k in ("median_step_s", "tokens_per_s", "peak_mem_bytes", "cuda_graph",
                                              "compile_s", "recompiles_after_first_step", "graph_breaks",
                                              "warmup_step_s", "step_times_s", "last_loss")}
    rows["graphed_over_plain_step_time"] = rows["graphed"]["median_step_s"] / rows["plain"]["median_step_s"]
    return {"model": model, "config": label, **rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-model", default="llama-20m")
    ap.add_argument("--check-configs", default="bf16,wgrad+h16,fp8,wgrad+sr,wgrad+rht,ufp4:wgrad")
    ap.add_argument("--check-steps", type=int, default=6)
    ap.add_argument("--time-model", default="llama-150m")
    ap.add_argument("--time-configs", default="wgrad+h16,bf16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "bits": [], "speed": []}
    import transformers
    result["transformers"] = transformers.__version__

    def save():
        with open(os.path.join(args.out, "graph_compiled_check.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)

    for label in filter(None, args.check_configs.split(",")):
        try:
            r = check_bits(args.check_model, label, args.check_steps)
        except Exception as err:
            r = {"model": args.check_model, "config": label, "error": f"{type(err).__name__}: {err}"[:800]}
        result["bits"].append(r)
        print("BITS", json.dumps({k: r.get(k) for k in ("config", "bit_exact", "cuda_graph", "grads_differing",
                                                        "worst_param", "worst_rel_diff", "plain_repeats_itself",
                                                        "error", "seconds")}, default=str),
              flush=True)
        save()
    for label in filter(None, args.time_configs.split(",")):
        try:
            r = time_rows(args.time_model, label, args.steps)
            print("SPEED", label, f"plain {r['plain']['median_step_s'] * 1e3:.1f} ms, graphed "
                  f"{r['graphed']['median_step_s'] * 1e3:.1f} ms, ratio {r['graphed_over_plain_step_time']:.3f}, "
                  f"graph {r['graphed']['cuda_graph']}", flush=True)
        except Exception as err:
            r = {"model": args.time_model, "config": label, "error": f"{type(err).__name__}: {err}"[:800]}
            print("SPEED", label, r["error"], flush=True)
        result["speed"].append(r)
        save()


if __name__ == "__main__":
    main()
