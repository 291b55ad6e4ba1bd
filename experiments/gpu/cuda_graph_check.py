"""Does a replayed CUDA graph quantize and multiply exactly what eager does? (issue 12, graphed.py)

    PYTHONPATH=. python3 experiments/gpu/cuda_graph_check.py [--tokens 8192] [--configs ...]

For each configuration whose recipe draws nothing (the ones hardware.cuda_graphs runs as a
graph): a chain of QuantLinears with llama-150m's shapes (768 -> 2304 -> 768, bf16 autocast,
the runner's ExecutionConfig: Triton quantizers, real FP8 GEMMs) runs forward and backward eagerly
twice (the control: eager must repeat itself bit for bit, else no comparison means anything), then
once captured as a CUDA graph and replayed on the same inputs, as experiments/training/graphed.py
does. PASS: the output, dX and both dW are bitwise equal to eager's. Also the replay on a second
input equals eager on that input (the graph reads its static input buffer, it did not bake X in).
One line per configuration, then a summary line; exit 1 on any FAIL.
"""
import argparse
import sys

import torch

from fp4.linear import QuantLinear, QuantState
from fp4.recipe import Recipe
from fp4.state import ExecutionConfig
from experiments.bench_steps import parse_config

DEFAULT = "bf16,fp8,fprop,dgrad,wgrad,wgrad+h16,nvfp4:wgrad,h16_all,wgrad+sr,ufp4:wgrad"


def build(label: str, device):
    fmt, ladder, stab = parse_config(label) if label != "h16_all" else ("mxfp4", "wgrad", "h16_all")
    recipe = Recipe(ladder=ladder, stabilizer=stab, format=fmt)
    if recipe.random_draws:
        return None, recipe
    torch.manual_seed(0)
    state = QuantState(seed=0, execution=ExecutionConfig(quant_backend="auto", real_fp8=True))
    layers = torch.nn.ModuleList([QuantLinear(768, 2304, bias=False, recipe=recipe, state=state, layer_index=0),
                                  QuantLinear(2304, 768, bias=False, recipe=recipe, state=state, layer_index=1)])
    return layers.to(device), recipe


def fwd_bwd(layers, x, dy):
    for p in layers.parameters():
        p.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layers[1](torch.nn.functional.silu(layers[0](x)))
    y.backward(dy)
    return [y.detach().clone(), x.grad.detach().clone()] + [p.grad.detach().clone() for p in layers.parameters()]


def check(label: str, tokens: int, device) -> str:
    layers, recipe = build(label, device)
    if layers is None:
        return f"SKIP {label}: draws {recipe.random_draws} (runs the plain step)"
    gen = torch.Generator(device=device).manual_seed(1)
    inputs = [(torch.randn(tokens, 768, device=device, generator=gen),
               torch.randn(tokens, 768, device=device, generator=gen, dtype=torch.bfloat16)) for _ in range(2)]

    def eager(i):
        x = inputs[i][0].clone().requires_grad_(True)
        return fwd_bwd(layers, x, inputs[i][1])

    ref, control = eager(0), eager(0)
    if not all(torch.equal(a, b) for a, b in zip(ref, control)):
        return f"FAIL {label}: eager does not repeat itself (no bitwise reference)"
    ref1 = eager(1)
    static_x = inputs[0][0].clone().requires_grad_(True)
    static_dy = inputs[0][1].clone()
    out = {}
    for p in layers.parameters():
        p.grad = None
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layers[1](torch.nn.functional.silu(layers[0](static_x)))
        y.backward(static_dy)
        out["y"] = y
    results = []
    for i in (0, 1):
        with torch.no_grad():
            static_x.copy_(inputs[i][0])
            static_dy.copy_(inputs[i][1])
        graph.replay()
        torch.cuda.synchronize()
        got = [out["y"], static_x.grad] + [p.grad for p in layers.parameters()]
        want = ref if i == 0 else ref1
        results.append([bool(torch.equal(a, b)) for a, b in zip(got, want)])
    names = ("Y", "dX", "dW1", "dW2")
    verdict = all(all(r) for r in results)
    detail = "; ".join(f"input {i}: " + " ".join(f"{n}={'=' if ok else 'DIFF'}" for n, ok in zip(names, r))
                       for i, r in enumerate(results))
    return f"{'PASS' if verdict else 'FAIL'} {label} ({recipe.name}, {tokens} tokens): {detail}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--configs", default=DEFAULT)
    args = ap.parse_args()
    device = torch.device("cuda")
    print(f"cuda_graph_check on {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    lines = [check(label, args.tokens, device) for label in args.configs.split(",") if label]
    for line in lines:
        print(line, flush=True)
    fails = sum(line.startswith("FAIL") for line in lines)
    print(f"summary: {sum(line.startswith('PASS') for line in lines)} PASS, {fails} FAIL, "
          f"{sum(line.startswith('SKIP') for line in lines)} SKIP")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
