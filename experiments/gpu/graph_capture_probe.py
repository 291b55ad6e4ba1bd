"""Where does capturing the runner's step as a CUDA graph fail? (issue 12, training/graphed.py)

    PYTHONPATH=. python3 experiments/gpu/graph_capture_probe.py [--model llama-20m]

Builds the runner's step (experiments/bench_steps.build_runner) for a few variants, takes the
plain steps, then captures as GraphedStep does, printing the full traceback of the first failure
(and which variant captured). Variants: compiled or eager layers, bf16 or wgrad+h16, the capture
error mode (global: any unsafe CUDA call in the process invalidates the capture; thread_local).
"""
import argparse
import traceback

import torch

from experiments.bench_steps import build_runner, compose_config, config_overrides
from experiments.training import graphed


def attempt(model: str, label: str, mode: str, error_mode: str) -> None:
    extra = [] if mode == "compile" else ["hardware.compile=false"]  # hardware=cuda either way
    cfg = compose_config(config_overrides(model, label, "compile", extra=extra))
    torch._dynamo.reset()
    build = build_runner(cfg)
    step = build.trainer.step
    tag = f"{model} {label} {mode} capture_error_mode={error_mode}"
    if not isinstance(step, graphed.GraphedStep):
        print(f"[{tag}] not a GraphedStep: {build.trainer.cuda_graph}", flush=True)
        return

    def capture(fn, generators=()):
        graph = torch.cuda.CUDAGraph()
        for gen in generators:
            graph.register_generator_state(gen)
        try:
            with torch.cuda.graph(graph, capture_error_mode=error_mode):
                fn()
        except Exception:
            print(f"[{tag}] capture raised:\n{traceback.format_exc()[-3000:]}", flush=True)
            raise
        return graph.replay

    step.capture = capture
    try:
        losses = [round(step(1e-4).loss, 4) for _ in range(5)]
        print(f"[{tag}] report {step.report} losses {losses}", flush=True)
    finally:
        build.close()
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-20m")
    args = ap.parse_args()
    for label, mode, error_mode in [("bf16", "eager", "global"), ("bf16", "compile", "global"),
                                    ("bf16", "compile", "thread_local"), ("wgrad+h16", "compile", "global")]:
        try:
            attempt(args.model, label, mode, error_mode)
        except Exception as err:
            print(f"[{label} {mode} {error_mode}] failed outside the capture: {type(err).__name__}: {err}"[:600],
                  flush=True)


if __name__ == "__main__":
    main()
