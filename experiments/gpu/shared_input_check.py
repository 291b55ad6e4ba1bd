"""Sibling projections on the GPU: grouped (X quantized once) against one linear at a time (issue 12)

    PYTHONPATH=. python3 experiments/gpu/shared_input_check.py [--tokens 65536] [--configs ...] [--iters 10]

For each configuration, llama-150m's two sibling groups -- q/k/v (768 -> 768, 256, 256) and
gate/up (768 -> 2304, 2304) -- with the runner's ExecutionConfig (Triton quantizers, real FP8 GEMMs),
bf16 autocast, fp32 master weights:
1. Bits. Forward and backward through fp4.linear.shared_input_linears and through the linears one
   by one, from the same input, the same output gradients and the same step: every output, dX and
   every dW compared bit for bit (PASS = all equal). The separate path is run twice first: it must
   repeat itself, else no comparison means anything.
2. Speed. Median time (CUDA events, --iters iterations after 3 warm-ups) of forward + backward of
   each group, grouped and separate, in this process side by side, and their ratio.
One line per configuration, then a summary; exit 1 on any FAIL.
"""
import argparse
import statistics
import sys

import torch

from fp4.linear import QuantLinear, QuantState, shared_input_linears
from fp4.recipe import Recipe
from fp4.state import ExecutionConfig
from experiments.bench_steps import parse_config

DEFAULT = "bf16,fp8,wgrad,wgrad+h16,wgrad+sr,wgrad+rht,nvfp4:wgrad"
GROUPS = {"qkv": (768, (768, 256, 256)), "gate_up": (768, (2304, 2304))}


def build(label: str, group: str, device):
    fmt, ladder, stab = parse_config(label)
    recipe = Recipe(ladder=ladder, stabilizer=stab, format=fmt)
    torch.manual_seed(0)
    state = QuantState(seed=0, execution=ExecutionConfig(quant_backend="auto", real_fp8=True))
    dim, outs = GROUPS[group]
    return torch.nn.ModuleList([QuantLinear(dim, out, bias=False, recipe=recipe, state=state, layer_index=i)
                                for i, out in enumerate(outs)]).to(device), state


def fwd_bwd(layers, state, x, dys, grouped: bool, step: int = 3):
    state.step = step  # resets the call counters: both paths draw as at the same step
    for p in layers.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ys = shared_input_linears(x, list(layers)) if grouped else [layer(x) for layer in layers]
    torch.autograd.backward(ys, dys)
    return [y.detach() for y in ys] + [x.grad] + [p.grad for p in layers.parameters()]


def median_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check(label: str, group: str, tokens: int, iters: int, device) -> str:
    layers, state = build(label, group, device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, GROUPS[group][0], device=device, generator=gen)
    dys = [torch.randn(tokens, out, device=device, generator=gen, dtype=torch.bfloat16) for out in GROUPS[group][1]]
    ref = fwd_bwd(layers, state, x, dys, grouped=False)
    control = fwd_bwd(layers, state, x, dys, grouped=False)
    if not all(torch.equal(a, b) for a, b in zip(ref, control)):
        return f"FAIL {label} {group}: the separate path does not repeat itself (no bitwise reference)"
    got = fwd_bwd(layers, state, x, dys, grouped=True)
    k = len(layers)
    names = [f"Y{i}" for i in range(k)] + ["dX"] + [f"dW{i}" for i in range(k)]
    same = [bool(torch.equal(a, b)) for a, b in zip(got, ref)]
    separate_ms = median_ms(lambda: fwd_bwd(layers, state, x, dys, grouped=False), iters)
    grouped_ms = median_ms(lambda: fwd_bwd(layers, state, x, dys, grouped=True), iters)
    bits = " ".join(f"{n}={'=' if ok else 'DIFF'}" for n, ok in zip(names, same))
    return (f"{'PASS' if all(same) else 'FAIL'} {label} {group} ({tokens} tokens): {bits}; fwd+bwd separate "
            f"{separate_ms:.3f} ms, grouped {grouped_ms:.3f} ms, grouped/separate {grouped_ms / separate_ms:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--configs", default=DEFAULT)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    device = torch.device("cuda")
    print(f"shared_input_check on {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    lines = []
    for label in filter(None, args.configs.split(",")):
        for group in GROUPS:
            try:
                lines.append(check(label, group, args.tokens, args.iters, device))
            except Exception as err:  # one configuration's failure does not hide the others'
                lines.append(f"FAIL {label} {group}: {type(err).__name__}: {err}"[:400])
                torch.cuda.synchronize()
            print(lines[-1], flush=True)
    fails = sum(line.startswith("FAIL") for line in lines)
    print(f"{len(lines) - fails} PASS, {fails} FAIL", flush=True)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
