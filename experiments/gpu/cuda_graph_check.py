"""Does a replayed CUDA graph quantize and multiply exactly what eager does? (issue 12, graphed.py)

    PYTHONPATH=. python3 experiments/gpu/cuda_graph_check.py [--tokens 8192] [--configs ...]

For each configuration: a chain of QuantLinears with llama-150m's shapes (768 -> 2304 -> 768, bf16 autocast,
the runner's ExecutionConfig: Triton quantizers, real FP8 GEMMs) runs forward and backward eagerly
twice (the control: eager must repeat itself bit for bit, else no comparison means anything), then
once captured as a CUDA graph and replayed on the same inputs, as experiments/training/graphed.py
does. PASS: the output, dX and both dW are bitwise equal to eager's. Also the replay on a second
input equals eager on that input (the graph reads its static input buffer, it did not bake X in).

A recipe that draws (SR, random Hadamard signs) is captured as graphed.py does it: an uncaptured
pass lists its draws in a fp4.state.GeneratorPool, the pool's generators are registered with the
graph, and each replay at optimizer step s first re-seeds them for s. PASS: replays at the capture
step and at two later steps (on both inputs) equal eager at that step bit for bit; and, the
control that the draws matter, a replay left seeded for the capture step differs from eager at
the next step.
One line per configuration, then a summary line; exit 1 on any FAIL.
"""
import argparse
import sys

import torch

from fp4.linear import QuantLinear, QuantState
from fp4.recipe import Recipe
from fp4.state import ExecutionConfig, GeneratorPool
from experiments.bench_steps import parse_config

DEFAULT = "bf16,fp8,fprop,dgrad,wgrad,wgrad+h16,nvfp4:wgrad,h16_all,wgrad+sr,wgrad+rht,ufp4:wgrad"


def build(label: str, device):
    fmt, ladder, stab = parse_config(label) if label != "h16_all" else ("mxfp4", "wgrad", "h16_all")
    recipe = Recipe(ladder=ladder, stabilizer=stab, format=fmt)
    torch.manual_seed(0)
    state = QuantState(seed=0, execution=ExecutionConfig(quant_backend="auto", real_fp8=True))
    layers = torch.nn.ModuleList([QuantLinear(768, 2304, bias=False, recipe=recipe, state=state, layer_index=0),
                                  QuantLinear(2304, 768, bias=False, recipe=recipe, state=state, layer_index=1)])
    return layers.to(device), recipe, state


def fwd_bwd(layers, x, dy):
    for p in layers.parameters():
        p.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layers[1](torch.nn.functional.silu(layers[0](x)))
    y.backward(dy)
    return [y.detach().clone(), x.grad.detach().clone()] + [p.grad.detach().clone() for p in layers.parameters()]


def check(label: str, tokens: int, device) -> str:
    layers, recipe, state = build(label, device)
    gen = torch.Generator(device=device).manual_seed(1)
    inputs = [(torch.randn(tokens, 768, device=device, generator=gen),
               torch.randn(tokens, 768, device=device, generator=gen, dtype=torch.bfloat16)) for _ in range(2)]
    capture_step = 3

    def eager(i, step):
        state.step = step  # resets the call counters, as each optimizer step does
        x = inputs[i][0].clone().requires_grad_(True)
        return fwd_bwd(layers, x, inputs[i][1])

    ref, control = eager(0, capture_step), eager(0, capture_step)
    if not all(torch.equal(a, b) for a, b in zip(ref, control)):
        return f"FAIL {label}: eager does not repeat itself (no bitwise reference)"
    plan = [(capture_step, 0), (capture_step, 1), (capture_step + 1, 1), (capture_step + 2, 0)]
    want = {(s, i): eager(i, s) for s, i in plan}
    static_x = inputs[0][0].clone().requires_grad_(True)
    static_dy = inputs[0][1].clone()
    pool, out = GeneratorPool(), {}

    def forward_backward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layers[1](torch.nn.functional.silu(layers[0](static_x)))
        y.backward(static_dy)
        out["y"] = y

    state.step, state.generator_pool = capture_step, pool  # the listing pass (uncaptured), on a
    side = torch.cuda.Stream()  # side stream as graphed.py's warm-up and PyTorch's capture recipe
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward_backward()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    generators = pool.freeze(lambda d: torch.Generator(device=d))
    for p in layers.parameters():
        p.grad = None
    # A fresh input leaf: the listing pass made its gradient accumulator on the default stream,
    # which a capture on its side stream may not wait on.
    static_x = inputs[0][0].clone().requires_grad_(True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    for g in generators:
        graph.register_generator_state(g)
    state.step = capture_step
    pool.rewind()
    with torch.cuda.graph(graph):
        forward_backward()
    state.generator_pool = None

    def replay(step, i, seeded_for=None):
        with torch.no_grad():
            static_x.copy_(inputs[i][0])
            static_dy.copy_(inputs[i][1])
        pool.reseed(step if seeded_for is None else seeded_for)
        graph.replay()
        torch.cuda.synchronize()
        return [out["y"], static_x.grad] + [p.grad for p in layers.parameters()]

    names = ("Y", "dX", "dW1", "dW2")
    results = {(s, i): [bool(torch.equal(a, b)) for a, b in zip(replay(s, i), want[(s, i)])] for s, i in plan}
    verdict = all(all(r) for r in results.values())
    detail = "; ".join(f"step {s} input {i}: " + " ".join(f"{n}={'=' if ok else 'DIFF'}" for n, ok in zip(names, r))
                       for (s, i), r in results.items())
    if generators:  # the control: stale seeds must show, else the draws did not matter
        stale = replay(capture_step + 1, 1, seeded_for=capture_step)
        differs = not all(torch.equal(a, b) for a, b in zip(stale, want[(capture_step + 1, 1)]))
        verdict = verdict and differs
        detail += (f"; {len(generators)} draws; control (seeds of step {capture_step} replayed at step "
                   f"{capture_step + 1}): {'differs' if differs else 'EQUAL (the draws did not matter)'}")
    return f"{'PASS' if verdict else 'FAIL'} {label} ({recipe.name}, {tokens} tokens): {detail}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--configs", default=DEFAULT)
    args = ap.parse_args()
    device = torch.device("cuda")
    print(f"cuda_graph_check on {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    lines = []
    for label in filter(None, args.configs.split(",")):
        try:
            lines.append(check(label, args.tokens, device))
        except Exception as err:  # one configuration's failure does not hide the others'
            lines.append(f"FAIL {label}: {type(err).__name__}: {err}"[:400])
            torch.cuda.synchronize()
        print(lines[-1], flush=True)
    fails = sum(line.startswith("FAIL") for line in lines)
    print(f"summary: {sum(line.startswith('PASS') for line in lines)} PASS, {fails} FAIL")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
