"""On the GPU: the FP8 cast-transpose (fp4.kernels.fp8_quant.fp8_quantize_t) at every operand shape
of a llama-150m step (64 x 1024 tokens), per tile, bytes equal across tiles (issue 12).

    PYTHONPATH=. python3 experiments/gpu/fp8_t_shapes_check.py

kernel_tiles_check times the two activation shapes four at a time; the step also casts the
weights (768 x 768 ... 2304 x 768) and E5M2 dY, where a tile's launch overhead and wave
quantization matter more. Prints us per call (triton.testing.do_bench, the amax pre-pass
included) for each (shape, format, tile) and the sum over one step's calls per tile.
"""
import torch
import triton

from fp4.kernels.fp8_quant import FP8_T_CONFIG, fp8_quantize_t

TILES = [(32, 32, 2), (16, 64, 1), (32, 64, 2), (64, 64, 4)]
D, F, T = 768, 2304, 65536
# (shape, format, calls per step): 12 layers; X of q/k/v and gate/up shared, W per linear, dY per linear.
SHAPES = [((T, D), "e4m3", 12 * 3), ((T, F), "e4m3", 12), ((D, D), "e4m3", 12 * 4),
          ((F, D), "e4m3", 12 * 2), ((D, F), "e4m3", 12), ((T, D), "e5m2", 12 * 5),
          ((T, F), "e5m2", 12 * 2)]


def main():
    dev = torch.device("cuda")
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), "default", FP8_T_CONFIG)
    g = torch.Generator(device=dev).manual_seed(0)
    totals = {t: 0.0 for t in TILES}
    ok = True
    for shape, fmt, calls in SHAPES:
        x = torch.randn(shape, device=dev, generator=g).bfloat16()
        want = fp8_quantize_t(x, fmt, TILES[0])
        row = []
        for tile in TILES:
            got = fp8_quantize_t(x, fmt, tile)
            same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got[:2], want[:2]))
            ok &= same and torch.equal(got[2], want[2])
            us = 1e3 * triton.testing.do_bench(lambda: fp8_quantize_t(x, fmt, tile), warmup=10, rep=50)
            totals[tile] += us * calls
            row.append(f"{tile}: {us:7.1f} us{'' if same else ' FAIL'}")
        print(f"{str(shape):15s} {fmt} x{calls:3d}  " + "  ".join(row), flush=True)
    print("per step (sum of calls), ms:", {str(t): round(v / 1e3, 2) for t, v in totals.items()})
    print("SUMMARY bytes:", "PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
