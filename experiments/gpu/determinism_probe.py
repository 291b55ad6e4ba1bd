"""Does the plain training step repeat its own bits from the same seed on this GPU, and if not, which
part varies? (issue 12: graph_compiled_check found compiled bf16 / wgrad+h16 steps that do not)

    source experiments/gpu/setup.sh && PYTHONPATH=.:$PYTHONPATH python3 experiments/gpu/determinism_probe.py \
        [--model llama-20m] [--configs bf16,wgrad+h16] [--steps 4] [--out DIR]

For each configuration and variant, the runner's step (experiments/bench_steps.build_runner, the path
of `fp4-ablate run`, hardware.cuda_graphs=false) is built twice from the same seed and run `--steps`
steps; bench_steps.compare_snapshots says whether losses, gradient norms and every gradient agree
bit for bit, and names the gradient that differs most. Variants: compiled layers with PyTorch's
default SDPA backends; compiled with only the memory-efficient SDPA backend; compiled with only the
math backend; eager layers with the default backends. Prints one line per (configuration, variant)
and writes DIR/determinism_probe.json.
"""
import argparse
import json
import os

import torch

from experiments.bench_steps import build_runner, compare_snapshots, compose_config, config_overrides, run_steps

BACKENDS = ("flash", "mem_efficient", "math", "cudnn")
VARIANTS = {
    "compiled, default SDPA": ("compile", None),
    "compiled, mem-efficient SDPA only": ("compile", "mem_efficient"),
    "compiled, math SDPA only": ("compile", "math"),
    "eager layers, default SDPA": ("eager", None),
}


def set_sdpa(only):
    """Enable every SDPA backend (only=None) or just `only` (process-wide: this probe's own setting)."""
    for name in BACKENDS:
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(only is None or name == only)


def snapshots(model, label, mode, steps):
    cfg = compose_config(config_overrides(model, label, mode, extra=["hardware.cuda_graphs=false"]))
    torch._dynamo.reset()
    build = build_runner(cfg)
    try:
        return run_steps(build, steps, snapshot=True)[1]
    finally:
        build.close()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-20m")
    ap.add_argument("--configs", default="bf16,wgrad+h16")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": []}
    for label in filter(None, args.configs.split(",")):
        for variant, (mode, only) in VARIANTS.items():
            set_sdpa(only)
            try:
                first = snapshots(args.model, label, mode, args.steps)
                second = snapshots(args.model, label, mode, args.steps)
                cmp = compare_snapshots(first, second)
                row = {"config": label, "variant": variant, "repeats": cmp["bit_exact"],
                       "loss_equal": cmp["loss_equal"], "grads_differing": cmp["grads_differing"],
                       "grads_compared": cmp["grads_compared"], "worst_param": cmp["worst_param"],
                       "worst_rel_diff": cmp["worst_rel_diff"]}
            except Exception as err:
                row = {"config": label, "variant": variant, "error": f"{type(err).__name__}: {err}"[:400]}
            finally:
                set_sdpa(None)
            result["rows"].append(row)
            print("DET", json.dumps(row), flush=True)
            with open(os.path.join(args.out, "determinism_probe.json"), "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
