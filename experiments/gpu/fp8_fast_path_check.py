"""On the GPU: the FP8 fast path computes the bits of the reference (issue 12).

1. fp8_gemm.quantize_fp8_both on CUDA (the Triton cast-transpose kernel, fp4.kernels.fp8_quant.
   fp8_quantize_t) against the torch route, byte for byte, on random and planted hard tensors.
2. A real-FP8 QuantLinear with Fprop's FP8 copies shared with backward (fp4.gemm.fp8_shared_copies)
   against the same layer with sharing off (check_finite=True re-quantizes X and W in backward):
   Y, dX, dW, db bit-identical, and the bytes saved for backward.
3. A compiled (inductor, per layer) stack of real-FP8 layers against eager: the quantized GEMMs run
   the same code; the outputs are compared bit for bit.
4. With --sweep: tiles (BLOCK_M, BLOCK_N, num_warps) of the cast-transpose kernel on llama-150m's
   operand shapes (65536 x 768 and 65536 x 2304 bf16, X / dY of a 64 x 1024-token step), each
   byte-checked against the default tile, then timed with triton.testing.do_bench beside a copy of
   the same tensor: GB/s at 4 bytes per element (2 read, 1 + 1 written) and % of the copy's
   bandwidth, the amax pre-pass timed apart. The compiled llama-150m fp8 step spent 28% of copy
   bandwidth in this kernel (results/bench/nvidia-h200-issue12-e54ba26.md); its tile was untuned.
Usage (device machine, repo root, after experiments/gpu/setup.sh):
    python3 experiments/gpu/fp8_fast_path_check.py [--sweep | --sweep-only]
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


def checks():
    """Items 1-3 of the docstring."""
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


SWEEP_TILES = ((64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8), (32, 128, 4), (128, 32, 4),
               (64, 256, 8), (256, 64, 8), (128, 128, 4), (32, 32, 2))


def sweep_tiles():
    """Time the cast-transpose tiles (item 4 of the docstring); byte-check each first."""
    import triton.testing
    from fp4.kernels.amax import IN_KINDS, KIND_VIEWS, global_amax_bits
    from fp4.kernels.fp8_quant import FP8_T_CONFIG, fp8_quantize_t
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=80)  # noqa: E731  (ms)
    print(f"\nsweep: cast-transpose tiles (default {FP8_T_CONFIG})", flush=True)
    for shape in ((65536, 768), (65536, 2304)):
        x = torch.randn(shape, generator=gen, device=dev).to(torch.bfloat16)
        n = x.numel()
        t_copy = bench(lambda: x.clone())
        copy_gbs = 4 * n / t_copy / 1e6
        amax = torch.zeros(1, dtype=torch.int32, device=dev)
        kind = IN_KINDS[x.dtype]
        t_amax = bench(lambda: global_amax_bits(x.view(KIND_VIEWS[kind]), kind, amax))
        print(f"  {shape} bf16: copy {t_copy * 1e3:.0f} us = {copy_gbs:.0f} GB/s; amax pre-pass "
              f"{t_amax * 1e3:.0f} us ({2 * n / t_amax / 1e6:.0f} GB/s)", flush=True)
        ref = fp8_quantize_t(x, "e4m3")
        best = None
        for tile in SWEEP_TILES:
            out = fp8_quantize_t(x, "e4m3", config=tile)
            same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(out[:2], ref[:2]))
            report(f"tile {tile} bytes == default tile {shape}", same and torch.equal(out[2], ref[2]))
            t = bench(lambda: fp8_quantize_t(x, "e4m3", config=tile))
            gbs = 4 * n / t / 1e6
            print(f"    tile {tile}: {t * 1e3:6.0f} us with the amax pass; kernel alone ~{(t - t_amax) * 1e3:5.0f} us"
                  f" = {4 * n / (t - t_amax) / 1e6:5.0f} GB/s ({100 * 4 * n / (t - t_amax) / 1e6 / copy_gbs:4.1f}%"
                  f" of copy); whole call {gbs:5.0f} GB/s", flush=True)
            best = min(best or (t, tile), (t, tile))
        print(f"  fastest {shape}: {best[1]} ({best[0] * 1e3:.0f} us)", flush=True)


if "--sweep-only" not in sys.argv:
    checks()
if "--sweep" in sys.argv or "--sweep-only" in sys.argv:
    sweep_tiles()
sys.exit(0 if ok else 1)
