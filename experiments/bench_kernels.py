"""Quantize-kernel benchmark: Triton fast path vs the torch reference (eager and torch.compile).

bench_kernels(device="cuda", size=8192, dtype=torch.bfloat16) -> list of row dicts

What it measures, in one process on one CUDA device, for an [size, size] operand:
  - the device-to-device copy bandwidth of the same tensor (bytes read + bytes written): the
    ceiling every quantize pass is compared with (`pct_copy`);
  - for mxfp4, nvfp4, h16+mxfp4, sr+mxfp4 and e4m3, in both orientations (axis=-1: blocks along
    the contiguous dim; axis=0: blocks along the token dim, no transposed copy), the median time
    (triton.testing.do_bench), achieved GB/s counting x read once and x_dq written once, and the
    percentage of copy bandwidth, for impl = "triton", "torch" (eager reference) and
    "torch.compile" (the reference compiled; a compile failure is recorded in `error`);
  - a correctness pass at full size: the kernel's round-to-nearest output compared bit for bit
    with the reference on a tensor with planted hard blocks (all-zero, subnormal amax, amax just
    above 2^-127, amax exactly 2^-127); `correct` is the mismatch count (0 = bit-identical).
    SR rows instead compare two runs with the same seed (0 = reproducible). With H16 the
    reference is a float32 matmul with its own summation order, so a non-zero count there means
    inexact float32 sums rounded differently, not a kernel error; `note` says so.

Per-tensor formats (nvfp4, e4m3) read x twice (global amax pre-pass, then the fused pass), so
their ceiling at this byte count is about 2/3 of copy bandwidth.

Run on a GPU machine:  python -m fp4_experiments.bench_kernels  (prints a table, writes JSON if
given a path). Importable on CPU: triton is imported inside the function.
"""
from __future__ import annotations

import json
import sys
from typing import Dict, List

import torch

OPS = {
    "mxfp4": dict(fmt="mxfp4"),
    "nvfp4": dict(fmt="nvfp4"),
    "h16+mxfp4": dict(fmt="mxfp4", hadamard_block=16),
    "sr+mxfp4": dict(fmt="mxfp4", rounding="stochastic"),
    "e4m3": dict(fmt="e4m3"),
}
ORIENTATIONS = {"axis=-1": -1, "axis=0": 0}


def _plant_special_blocks(x: torch.Tensor) -> torch.Tensor:
    """Overwrite a few 32x32 corners with blocks the subnormal-flush bug class breaks."""
    x = x.clone()
    tiny = 2.0 ** -127
    u = torch.rand(32, 32, device=x.device)
    x[:32, :32] = 0
    x[32:64, :32] = (u * 2.0 ** -130).to(x.dtype)
    x[64:96, :32] = (u * tiny).to(x.dtype)
    x[64:96, 0] = tiny
    x[96:128, :32] = (u * tiny).to(x.dtype)
    x[96:128, 0] = torch.tensor(tiny * (1 + 2.0 ** -7)).to(x.dtype)
    x[:32, 32:64] = (u * 2.0 ** -140).to(x.dtype)
    return x


def _mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    a32, b32 = a.float(), b.float()
    same = (a32.view(torch.int32) == b32.view(torch.int32)) | (a32.isnan() & b32.isnan())
    return int((~same).sum().item())


def bench_kernels(device: str = "cuda", size: int = 8192, dtype: torch.dtype = torch.bfloat16
                  ) -> List[Dict]:
    import triton.testing

    from fp4.kernels import triton_quantize_operand
    from fp4.quantize import quantize_operand

    dev = torch.device(device)
    if dev.type != "cuda":
        raise RuntimeError("bench_kernels measures GPU bandwidth: pass a CUDA device")
    torch.manual_seed(0)
    x = torch.randn(size, size, device=dev, dtype=dtype)
    nbytes = 2 * x.numel() * x.element_size()  # read x once + write x_dq once
    rows: List[Dict] = []

    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x))
    copy_gbps = nbytes / copy_ms / 1e6
    rows.append(dict(op="copy", orientation="-", impl="torch", median_ms=copy_ms,
                     gbps=copy_gbps, pct_copy=100.0, correct=None))
    del y

    xs = _plant_special_blocks(x)
    for op, kw in OPS.items():
        for orient, axis in ORIENTATIONS.items():
            kw = dict(kw)
            sr = kw.get("rounding") == "stochastic"

            def gen():
                return torch.Generator(device=dev).manual_seed(1234)

            def run_triton():
                return triton_quantize_operand(x, axis=axis, generator=gen() if sr else None, **kw)

            def run_torch():
                return quantize_operand(x, axis=axis, backend="torch",
                                        generator=gen() if sr else None, **kw)

            # Correctness at full size (planted blocks included).
            if sr:
                a = triton_quantize_operand(xs, axis=axis, generator=gen(), **kw)[0]
                b = triton_quantize_operand(xs, axis=axis, generator=gen(), **kw)[0]
                correct, note = _mismatches(a, b), "same-seed reproducibility"
            else:
                a = triton_quantize_operand(xs, axis=axis, **kw)[0]
                b = quantize_operand(xs, axis=axis, backend="torch", **kw)[0]
                correct = _mismatches(a, b)
                note = ("bit mismatches vs reference" + (
                    " (H16: reference float32 matmul order; non-zero = inexact sums)"
                    if "hadamard_block" in kw else ""))
            del a, b
            impls = {"triton": run_triton, "torch": run_torch}
            try:
                torch._dynamo.reset()  # one fresh compile per configuration (no cache limit hit)
                compiled = torch.compile(run_torch)
                compiled()
                impls["torch.compile"] = compiled
            except Exception as err:  # record, do not crash the whole benchmark
                rows.append(dict(op=op, orientation=orient, impl="torch.compile", median_ms=None,
                                 gbps=None, pct_copy=None, correct=None,
                                 error=f"{type(err).__name__}: {err}"[:500]))
            for impl, fn in impls.items():
                try:
                    ms = triton.testing.do_bench(fn)
                except Exception as err:
                    rows.append(dict(op=op, orientation=orient, impl=impl, median_ms=None,
                                     gbps=None, pct_copy=None, correct=None,
                                     error=f"{type(err).__name__}: {err}"[:500]))
                    continue
                gbps = nbytes / ms / 1e6
                rows.append(dict(op=op, orientation=orient, impl=impl, median_ms=ms, gbps=gbps,
                                 pct_copy=100.0 * gbps / copy_gbps,
                                 correct=correct if impl == "triton" else None,
                                 note=note if impl == "triton" else None))
            torch.cuda.empty_cache()
    return rows


def _table(rows: List[Dict]) -> str:
    head = f"{'op':10} {'orient':8} {'impl':14} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'correct':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = "-" if r["median_ms"] is None else f"{r['median_ms']:.4f}"
        gb = "-" if r["gbps"] is None else f"{r['gbps']:.0f}"
        pc = "-" if r["pct_copy"] is None else f"{r['pct_copy']:.1f}"
        lines.append(f"{r['op']:10} {r['orientation']:8} {r['impl']:14} {ms:>9} {gb:>8} {pc:>6} "
                     f"{str(r['correct']):>8}" + (f"  {r['error']}" if r.get("error") else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    result = bench_kernels()
    print(_table(result))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)
