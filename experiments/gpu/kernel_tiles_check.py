"""On the GPU: launch tiles of the quantize kernels on llama-150m's operands, bytes and speed (issue 12)

    PYTHONPATH=. python3 experiments/gpu/kernel_tiles_check.py [--quick]

For the operands of a llama-150m step (X and dY of 64 x 1024 tokens: 65536 x 768 and 65536 x 2304
bf16, four of them per launch so that a launch moves 0.4-1.2 GB and host time hides), every
candidate tile (TR, TC, num_warps, HMODE) of fp4.kernels.mx_quant.block_quantize for

    mxfp4 along the last axis and along the tokens (HMODE 2 = the slab kernel, here without a
    transform), h16+mxfp4 both ways (the slab kernel along the tokens), nvfp4 both ways, and
    the default of per-tensor E4M3 (its own kernel) both ways, and its cast-transpose's tiles,

1. bytes: the output and scale codes equal those of the launcher's default tile (FAIL otherwise;
   every tile computes the same elementwise operations, so any difference is a kernel bug);
2. speed: triton.testing.do_bench, GB/s at 4 bytes per element (2 read, 2 written) and % of a
   device copy of the same tensors timed in the same process. The default tile is marked "*".
Stochastic rounding: the default and the fastest tile of each nearest row. --reload-ab adds each
default tile with RELOAD False (the tile held in registers across the program-wide test instead
of read again: more registers, fewer programs per SM; experiments/kernel_sass.py). One line per tile,
then a summary; exit 1 on any byte FAIL.
"""
import argparse
import sys

import torch
import triton

from fp4.kernels import triton_quantize_operand
from fp4.kernels.fp8_quant import FP8_T_CONFIG, fp8_quantize_t
from fp4.kernels.mx_quant import KIND_MX, KIND_NVFP4, block_quantize, launch_config

dev = torch.device("cuda")

# name -> (kind, element, axis, Hadamard block, candidate tiles); the default is tile None.
CASES = {
    "mxfp4 last axis": (KIND_MX, "e2m1", 1, None, [(32, 128, 4, 0), (16, 256, 4, 0), (8, 512, 4, 0),
                                                   (64, 128, 8, 0), (32, 256, 8, 0)]),
    "mxfp4 tokens": (KIND_MX, "e2m1", 0, None, [(32, 128, 4, 0), (32, 256, 8, 0), (32, 128, 4, 2),
                                                (32, 256, 4, 2), (32, 256, 2, 2), (32, 512, 4, 2),
                                                (64, 128, 4, 2), (64, 256, 8, 2), (32, 128, 2, 2),
                                                (64, 128, 2, 2), (128, 128, 4, 2), (64, 64, 2, 2)]),
    "h16+mxfp4 tokens": (KIND_MX, "e2m1", 0, 16, [(32, 128, 4, 2), (32, 256, 4, 2), (32, 256, 2, 2),
                                                  (32, 128, 2, 2), (32, 256, 8, 2), (64, 128, 4, 2),
                                                  (64, 256, 8, 2), (32, 64, 2, 2), (32, 64, 1, 2),
                                                  (32, 128, 1, 2), (64, 128, 2, 2)]),
    "h16+mxfp4 last axis": (KIND_MX, "e2m1", 1, 16, [(8, 512, 4, 0), (16, 256, 4, 0), (8, 256, 4, 0),
                                                     (4, 256, 2, 0), (16, 128, 4, 0), (8, 128, 2, 0)]),
    "nvfp4 last axis": (KIND_NVFP4, "e2m1", 1, None, [(16, 256, 4, 0), (8, 512, 4, 0), (32, 256, 8, 0),
                                                      (16, 512, 8, 0), (32, 128, 4, 0), (16, 128, 2, 0),
                                                      (64, 128, 8, 0), (32, 64, 2, 0), (64, 64, 4, 0)]),
    "nvfp4 tokens": (KIND_NVFP4, "e2m1", 0, None, [(32, 256, 4, 0), (16, 256, 4, 0), (32, 128, 4, 0),
                                                   (64, 128, 8, 0), (32, 512, 8, 0), (16, 512, 8, 0),
                                                   (16, 128, 2, 0), (16, 128, 4, 0), (16, 64, 1, 0),
                                                   (16, 256, 2, 0)]),
    # Per-tensor E4M3 (fp4.kernels.fp8_quant, its own tiles): the flat pass (the default only;
    # the layout does not matter to it) and the cast-transpose (both layouts of the FP8 bytes, as
    # the real FP8 GEMMs take them: 2 bytes written per element too), its tiles (BM, BN, warps).
    "e4m3 last axis": (None, "e4m3", 1, None, []),
    "e4m3 tokens": (None, "e4m3", 0, None, []),
    "e4m3 cast-transpose": (None, "e4m3", 2, None, [(32, 64, 2), (64, 32, 2), (64, 64, 4),
                                                   (32, 128, 4), (64, 64, 2), (128, 64, 8), (32, 32, 1),
                                                   (16, 64, 1), (32, 32, 4), (16, 32, 1)]),
}


def quant(x3, case, config, rounding="nearest"):
    kind, elem, axis, hb, _ = CASES[case]
    gen = torch.Generator(device=dev).manual_seed(7)
    if kind is None and axis == 2:  # the cast-transpose of the real FP8 GEMMs
        q, q_t, scale = fp8_quantize_t(x3.view(-1, x3.shape[-1]), elem, config)
        return q.view(torch.uint8), scale, q_t.view(torch.uint8)
    if kind is None:  # the public entry of the per-tensor FP8 quantizer
        q, scale = triton_quantize_operand(x3.view(-1, x3.shape[-1]), elem, -1 if axis == 1 else 0)
        return q, scale, torch.empty(0, device=dev)
    return block_quantize(x3, kind, elem, axis, "even" if kind == KIND_MX else None, rounding, gen,
                          hadamard_block=hb, write_scales=True, config=config)


def default_tile(case):
    """The (TR, TC, num_warps, HMODE) block_quantize picks for this case (the cast-transpose's
    (BM, BN, warps))."""
    kind, _, axis, hb, _ = CASES[case]
    if kind is None:
        return tuple(FP8_T_CONFIG.values())
    return tuple(launch_config(kind, axis, hb or 1, "nearest", False)[:4])


def same(a, b):
    return (torch.equal(a[0].view(torch.int16), b[0].view(torch.int16)) and torch.equal(a[2], b[2])
            and (a[1] is None or torch.equal(a[1], b[1])))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the 65536 x 768 shape only")
    ap.add_argument("--defaults-only", action="store_true", help="time the launcher's default tiles only")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--reload-ab", action="store_true",
                    help="also time each default tile holding its tile in registers (RELOAD False)")
    args = ap.parse_args()
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50)  # noqa: E731  (ms)
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    g = torch.Generator(device=dev).manual_seed(0)
    ok = True
    shapes = ((65536, 768),) if args.quick else ((65536, 768), (65536, 2304))
    for R, C in shapes:
        x3 = (torch.randn(4, R, C, device=dev, generator=g)
              * torch.exp2(torch.randint(-8, 8, (4, R, 1), device=dev, generator=g).float())).bfloat16()
        n = x3.numel()
        copy_ms = bench(lambda: x3.clone())
        copy_gbs = 4 * n / copy_ms / 1e6
        print(f"\n{R} x {C} bf16 (x4): copy {copy_ms * 1e3:.0f} us = {copy_gbs:.0f} GB/s", flush=True)
        for case, (kind, _, _, _, tiles) in CASES.items():
            if args.cases and case not in args.cases.split(","):
                continue
            tiles = [] if args.defaults_only else tiles
            if args.reload_ab and kind is not None:
                tiles = tiles + [default_tile(case) + (False,)]
            want = quant(x3, case, None)
            timed = {}
            for config in [None] + tiles:
                try:
                    if config is not None and not same(quant(x3, case, config), want):
                        print(f"  {case:18s} {str(config):18s} FAIL bytes differ from the default tile")
                        ok = False
                        continue
                    ms = timed[config] = bench(lambda: quant(x3, case, config))
                except Exception as err:  # noqa: BLE001 -- a tile that does not compile is reported
                    print(f"  {case:18s} {str(config):18s} {type(err).__name__}: {str(err)[:160]}")
                    continue
                print(f"  {case:18s} {'default *' if config is None else str(config):18s} nearest "
                      f"{ms * 1e3:6.0f} us ({100 * 4 * n / ms / 1e6 / copy_gbs:5.1f}% of copy)", flush=True)
            if case in ("mxfp4 last axis", "mxfp4 tokens") and timed:
                best = min(timed, key=timed.get)
                for config in dict.fromkeys([None, best]):
                    ms = bench(lambda: quant(x3, case, config, "stochastic"))
                    print(f"  {case:18s} {'default *' if config is None else str(config):18s} stochastic "
                          f"{ms * 1e3:6.0f} us ({100 * 4 * n / ms / 1e6 / copy_gbs:5.1f}% of copy)", flush=True)
        del x3
        torch.cuda.empty_cache()
    print("\nSUMMARY tile bytes:", "PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
