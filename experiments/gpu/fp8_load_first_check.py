"""On the GPU: the FP8 kernels with the operand's load issued before the tensor scale is read (issue 12)

    PYTHONPATH=. python3 experiments/gpu/fp8_load_first_check.py

At 69f500e the FP8 kernels read the tensor scale, branched on it (float32 or float64 division),
and only then loaded their tile: the compiled llama-150m fp8 step took 186.4 ms against 171.1 ms
at 6a4a755 (results/bench/nvidia-h200-issue12-69f500e.md). The kernels now load first. For
llama-150m's operands (65536 x 768 and x 2304 bf16) this times the cast-transpose
(fp8_quantize_t) and the flat pass writing codes only (fp8_quantize, return_dq=False), each with
its amax pre-pass, as % of a device copy of the same tensor (4 bytes an element for the copy;
the cast-transpose moves 2 in + 2 out, the flat pass 2 in + 1 out), and checks their bytes
against the torch reference (fp4.fp8_gemm.quantize_fp8 backend "torch"). Earlier: the
cast-transpose at 57.3% / 53.1% of copy (results/bench/fp8_tile_sweep-h200.txt, 1ef655c).
"""
import sys

import torch
import triton

from fp4.fp8_gemm import quantize_fp8
from fp4.kernels.fp8_quant import fp8_quantize, fp8_quantize_t


def main() -> int:
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    bench = lambda fn: triton.testing.do_bench(fn, warmup=5, rep=25)  # noqa: E731 (ms)
    g = torch.Generator(device="cuda").manual_seed(0)
    ok = True
    for cols in (768, 2304):
        x = torch.randn(65536, cols, device="cuda", generator=g).bfloat16()
        q, q_t, s = fp8_quantize_t(x, "e4m3")
        ref, ref_s = quantize_fp8(x, "e4m3", backend="torch")
        same = (torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
                and torch.equal(q_t.view(torch.uint8), ref.t().contiguous().view(torch.uint8))
                and torch.equal(s, ref_s))
        ok &= same
        copy_ms = bench(lambda: x.clone())
        t_ms = bench(lambda: fp8_quantize_t(x, "e4m3"))
        f_ms = bench(lambda: fp8_quantize(x, "e4m3", return_fp8=True, return_dq=False))
        print(f"65536 x {cols}: copy {copy_ms * 1e3:.0f} us; cast-transpose {t_ms * 1e3:.0f} us "
              f"({100 * copy_ms / t_ms:.1f}% of copy), flat codes-only {f_ms * 1e3:.0f} us "
              f"({100 * copy_ms * 0.75 / f_ms:.1f}% of copy by bytes); bytes {'PASS' if same else 'FAIL'}",
              flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
