"""On the GPU: the FP8 fast path computes the bits of the reference (issue 12).

1. fp8_gemm.quantize_fp8_both on CUDA (the Triton cast-transpose kernel, fp4.kernels.fp8_quant.
   fp8_quantize_t) against the torch route, byte for byte, on random and planted hard tensors.
2. A real-FP8 QuantLinear with Fprop's FP8 copies shared with backward (fp4.gemm.fp8_shared_copies)
   against the same layer with sharing off (check_finite=True re-quantizes X and W in backward):
   Y, dX, dW, db bit-identical, and the bytes saved for backward.
3. A compiled (inductor, per layer) stack of real-FP8 layers against eager: the quantized GEMMs run
   the same code; the outputs are compared bit for bit.
Usage (device machine, repo root, after experiments/gpu/setup.sh): python3 experiments/gpu/fp8_fast_path_check.py
"""
import copy
import sys

import torch

from fp4 import fp8_gemm
from fp4.linear import QuantLinear, QuantState
from fp4.recipe import Recipe

dev = torch.device("cuda")
ok = True


def report(name, good, detail=""):
    global ok
    ok &= bool(good)
    print(f"{'PASS' if good else 'FAIL'} {name} {detail}", flush=True)


gen = torch.Generator(device=dev).manual_seed(0)
for fmt in ("e4m3", "e5m2"):
    for dtype in (torch.bfloat16, torch.float32):
        for shape in ((4096, 768), (65536, 2304), (130, 257), (1, 1)):
            x = torch.randn(shape, generator=gen, device=dev).to(dtype)
            x.view(-1)[: min(64, x.numel())] *= 2.0 ** torch.arange(-30, 34, device=dev)[: min(64, x.numel())].to(dtype)
            q, qt, s = fp8_gemm.quantize_fp8_both(x, fmt, backend="triton")
            rq, rs = fp8_gemm.quantize_fp8(x, fmt, backend="torch")
            same = (torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
                    and torch.equal(qt.view(torch.uint8), rq.t().contiguous().view(torch.uint8))
                    and torch.equal(s, rs))
            report(f"cast-transpose {fmt} {str(dtype)[6:]} {shape}", same)


def layer_grads(layer, x, dy, check):
    layer.zero_grad(set_to_none=True)
    layer.check_finite = check
    xx = x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(xx)
    y.backward(dy)
    return [y.detach(), xx.grad, layer.weight.grad, layer.bias.grad]


torch.manual_seed(0)
layer = QuantLinear(768, 2304, bias=True, recipe=Recipe("fp8"), state=QuantState(seed=1)).to(dev)
x = torch.randn(8192, 768, device=dev)
dy = torch.randn(8192, 2304, device=dev, dtype=torch.bfloat16)
shared, unshared = layer_grads(layer, x, dy, False), layer_grads(layer, x, dy, True)
report("fp8 shared copies == re-quantized", all(torch.equal(a, b) for a, b in zip(shared, unshared)))

blocks = torch.nn.Sequential(*[QuantLinear(768, 768, recipe=Recipe("fp8"), state=QuantState(seed=1), layer_index=i)
                               for i in range(4)]).to(dev)
compiled = copy.deepcopy(blocks)
for m in compiled:
    m.compile()
inp = torch.randn(8192, 768, device=dev)
outs = []
for model in (blocks, compiled):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        xx = inp.clone().requires_grad_(True)
        y = model(xx)
    y.float().sum().backward()
    outs.append([y.detach(), xx.grad] + [m.weight.grad for m in model])
report("compiled fp8 layers == eager", all(torch.equal(a, b) for a, b in zip(*outs)))
sys.exit(0 if ok else 1)
