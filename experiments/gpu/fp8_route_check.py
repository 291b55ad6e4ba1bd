"""GPU check of the real FP8 path's quantizer: fp4.fp8_gemm.quantize_fp8 on the fused Triton
kernel against its plain-torch route, byte for byte, on full-size and hard tensors.
Usage (device machine, after `source experiments/gpu/setup.sh`): python3 experiments/gpu/fp8_route_check.py"""
import torch

from fp4 import fp8_gemm


def cases():
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in [(8192, 768), (768, 2048), (4096, 4096), (33, 70)]:
        for dtype in (torch.bfloat16, torch.float32):
            yield f"randn{shape} {dtype}", (torch.randn(shape, generator=g, device="cuda") * 3).to(dtype)
    yield "zeros", torch.zeros(64, 64, device="cuda")
    yield "subnormal amax", torch.full((64, 64), 1e-41, device="cuda")
    yield "tiny normal amax", torch.full((64, 64), 2.0 ** -120, device="cuda")


bad = 0
for fmt in ("e4m3", "e5m2"):
    for name, x in cases():
        qk, sk = fp8_gemm.quantize_fp8(x, fmt, backend="triton")
        qt, st = fp8_gemm.quantize_fp8(x, fmt, backend="torch")
        n = int((qk.view(torch.uint8) != qt.view(torch.uint8)).sum()) + int(not torch.equal(sk, st))
        bad += n
        print(f"{fmt} {name}: mismatches {n}")
print("fp8 route check:", "OK (bit-identical)" if bad == 0 else f"FAILED ({bad} mismatches)")
