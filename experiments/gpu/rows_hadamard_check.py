"""On the GPU: the slab kernel (fp4.kernels.mx_rows_hadamard, block_quantize HMODE 2) for the
Wgrad operands of wgrad+h16 / wgrad+rht (issue 12).

For llama-150m's token-axis operands (X and dY of a 64 x 1024-token step: 65536 x 768 and
65536 x 2304 bf16), MXFP4 with H16 along the tokens, nearest and stochastic, with and without
signs:
1. bytes: the slab kernel against mx_quant's butterfly path (HMODE 0, the same stages in the same
   order) must be identical on these random tensors (inexact sums included); against the dot
   path (HMODE 1, the default before) the count of differing elements is printed (both equal the
   reference where the float32 sums are exact; they may differ in the last bit elsewhere);
2. speed: triton.testing.do_bench of every tile (TR = 32 x blocks per program, TC, num_warps)
   beside a copy of the same tensor: GB/s at 4 bytes per element (2 read, 2 written: the
   dequantized bf16 output) and % of the copy's bandwidth, the old paths' default tiles timed
   the same way.
Usage (device machine, repo root): PYTHONPATH=. python3 experiments/gpu/rows_hadamard_check.py
"""
import sys

import torch
import triton

from fp4.kernels.mx_quant import KIND_MX, block_quantize

dev = torch.device("cuda")
bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=60)  # noqa: E731  (ms)
ok = True


def quant(x3, config, rounding="nearest", signs=None, seed=0):
    gen = torch.Generator(device=dev).manual_seed(seed)
    return block_quantize(x3, KIND_MX, "e2m1", 0, "even", rounding, gen, hadamard_block=16,
                          hadamard_signs=signs, write_scales=True, config=config)


def same(a, b):
    return torch.equal(a[0].view(torch.int16), b[0].view(torch.int16)) and torch.equal(a[2], b[2])


print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
g = torch.Generator(device=dev).manual_seed(0)
signs = (torch.randint(0, 2, (16,), device=dev, generator=g) * 2 - 1).float()
# A few tiles only: each variant compiles for seconds (32 slabs unrolled).
tiles = [(32, 128, 4, 2), (32, 256, 4, 2), (32, 512, 4, 2), (32, 256, 8, 2), (32, 512, 8, 2),
         (64, 128, 4, 2), (64, 256, 8, 2)]
# B = 4 operands per call: each call moves 0.8-2.4 GB, so the launcher's host time (~50 us) hides
# behind the GPU's instead of inflating the timing of a 50 us kernel.
for R, C in ((65536, 768), (65536, 2304)):
    x3 = (torch.randn(4, R, C, device=dev, generator=g) *
          torch.exp2(torch.randint(-8, 8, (4, R, 1), device=dev, generator=g).float())).bfloat16()
    n = x3.numel()
    t_copy = bench(lambda: x3.clone())
    copy_gbs = 4 * n / t_copy / 1e6
    print(f"\n{R} x {C} bf16: copy {t_copy * 1e3:.0f} us = {copy_gbs:.0f} GB/s", flush=True)
    for rounding, sg in (("nearest", None), ("nearest", signs), ("stochastic", None)):
        slab = quant(x3, (32, 256, 4, 2), rounding, sg)
        bfly = quant(x3, (32, 128, 4, 0), rounding, sg)
        dot = quant(x3, (32, 128, 4, 1), rounding, sg)
        eq = same(slab, bfly)
        ok &= eq
        diff = int((slab[0].view(torch.int16) != dot[0].view(torch.int16)).sum())
        print(f"  {rounding:10s} signs={sg is not None}: slab == butterfly (HMODE 0) "
              f"{'PASS' if eq else 'FAIL'}; vs dot (HMODE 1): {diff} of {n} elements differ",
              flush=True)
    timed = {}
    for config in [(32, 128, 4, 1), (32, 128, 4, 0)] + tiles:
        try:
            if config[3] == 2 and not same(quant(x3, config), quant(x3, (32, 128, 4, 0))):
                print(f"  {config}: FAIL bytes differ from HMODE 0")
                ok = False
                continue
            t = timed[config] = bench(lambda: quant(x3, config))
        except Exception as err:  # noqa: BLE001 -- a tile that does not compile is reported
            print(f"  {config}: {type(err).__name__}: {str(err)[:200]}")
            continue
        gbs = 4 * n / t / 1e6
        print(f"  {str(config):20s} nearest {t * 1e3:6.0f} us {gbs:5.0f} GB/s "
              f"({100 * gbs / copy_gbs:4.1f}% of copy)", flush=True)
    # Stochastic rounding: the old default and the three fastest slab tiles.
    best = sorted((c for c in timed if c[3] == 2), key=timed.get)[:3]
    for config in [(32, 128, 4, 1)] + best:
        ts = bench(lambda: quant(x3, config, "stochastic"))
        print(f"  {str(config):20s} stochastic {ts * 1e3:6.0f} us "
              f"({100 * 4 * n / ts / 1e6 / copy_gbs:4.1f}% of copy)", flush=True)
print("\nSUMMARY slab kernel bytes:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
