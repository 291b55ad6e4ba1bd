"""Quantize-kernel benchmark: Triton fast path vs the torch reference (eager and torch.compile).

bench_kernels(device="cuda", size=8192, dtype=torch.bfloat16, batch=4) -> list of row dicts

What it measures, in one process on one CUDA device, for an operand of [batch * size, size]
(timing) and [size, size] (correctness):
  - the device-to-device copy bandwidth of the same tensor (bytes read + bytes written): the
    ceiling every quantize pass is compared with (`pct_copy`);
  - for mxfp4, nvfp4, h16+mxfp4, sr+mxfp4 and e4m3, in both orientations (axis=-1: blocks along
    the contiguous dim; axis=0: blocks along the token dim, no transposed copy), the median time
    of one launch on the [batch * size, size] operand (batch 4: 0.5 GB in and out, so that the
    launcher's host time, ~0.1 ms, hides behind the GPU's; at batch 1 it inflated the H200's
    timings of 8192 x 8192 operands, results/bench/bench_kernels-h200-0d76e75.txt)
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


def bench_kernels(device: str = "cuda", size: int = 8192, dtype: torch.dtype = torch.bfloat16,
                  compile_reference: bool = True, batch: int = 4) -> List[Dict]:
    import triton.testing

    from fp4.kernels import triton_quantize_operand
    from fp4.quantize import quantize_operand

    dev = torch.device(device)
    if dev.type != "cuda":
        raise RuntimeError("bench_kernels measures GPU bandwidth: pass a CUDA device")
    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    torch.manual_seed(0)
    x = torch.randn(batch * size, size, device=dev, dtype=dtype)  # what is timed
    nbytes = 2 * x.numel() * x.element_size()  # read x once + write x_dq once
    rows: List[Dict] = []

    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x))
    copy_gbps = nbytes / copy_ms / 1e6
    rows.append(dict(op="copy", orientation="-", impl="torch", median_ms=copy_ms,
                     gbps=copy_gbps, pct_copy=100.0, correct=None, shape=list(x.shape)))
    del y

    xs = _plant_special_blocks(x[:size])  # what is checked
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
                if not compile_reference:
                    raise RuntimeError("skipped (--no-compile)")
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


def _plant_signed(x: torch.Tensor) -> torch.Tensor:
    """Planted blocks plus negative tiny values and -0 (signed-zero paths of every format)."""
    x = _plant_special_blocks(x)
    x[128:160, :32] = -x[64:96, :32]
    x[160:192, :32] = -0.0
    x[192:224, 32:64] = -x[192:224, 32:64] * 2.0 ** -120
    return x


def diagnose(device: str = "cuda", size: int = 8192, dtype: torch.dtype = torch.bfloat16
             ) -> List[Dict]:
    """Who deviates on the GPU: the kernel, the GPU reference, or both? For each tensor-scaled
    format (and mxfp4 as a control) compare bit for bit the kernel on the GPU, the torch
    reference on the GPU and the torch reference on the CPU (IEEE float32 division everywhere,
    i.e. the contract) on the same input; also the per-tensor scales, and torch's own GPU float8
    cast against its CPU cast on a sweep of float32 values."""
    from fp4.kernels import triton_quantize_operand
    from fp4.quantize import quantize_operand

    dev = torch.device(device)
    torch.manual_seed(0)
    x = _plant_signed(torch.randn(size, size, device=dev, dtype=dtype))
    xc = x.cpu()
    rows: List[Dict] = []
    for fmt in ("nvfp4", "e4m3", "e5m2", "mxfp4"):
        for axis in (-1, 0):
            k, ks = triton_quantize_operand(x, fmt, axis)
            g, gs = quantize_operand(x, fmt, axis, backend="torch")
            c, cs = quantize_operand(xc, fmt, axis, backend="torch")
            k, g = k.cpu(), g.cpu()
            row = dict(fmt=fmt, axis=axis, kernel_vs_gpu_ref=_mismatches(k, g),
                       kernel_vs_cpu_ref=_mismatches(k, c), gpu_ref_vs_cpu_ref=_mismatches(g, c))
            if cs is not None:
                row.update(scale_kernel=float(ks), scale_gpu_ref=float(gs), scale_cpu_ref=float(cs))
            rows.append(row)
            print(row, flush=True)
    amax = x.float().abs().amax()
    for d in (448.0, 57344.0, 2688.0, 6.0):
        q_gpu = float(amax / d)
        q_cpu = float(amax.cpu() / d)
        q_dev_tensor = float(amax / torch.tensor(d, device=dev))
        r = dict(check=f"amax/{d}", gpu_python_scalar=q_gpu.hex(), cpu=q_cpu.hex(),
                 gpu_device_tensor=q_dev_tensor.hex())
        rows.append(r)
        print(r, flush=True)
    # torch's float8 casts, GPU vs CPU, on float32 values around every e4m3/e5m2 rounding point.
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1 << 22, generator=g) * torch.exp2(torch.randint(-30, 20, (1 << 22,), generator=g).float())
    v = torch.cat([v, -v, v.view(torch.int32).add(1).view(torch.float32),
                   torch.tensor([0.0, -0.0, 2.0 ** -140, -2.0 ** -140, 2.0 ** -10, 3 * 2.0 ** -11])])
    for name, dt, mx in (("e4m3", torch.float8_e4m3fn, 448.0), ("e5m2", torch.float8_e5m2, 57344.0)):
        vc = v.clamp(-mx, mx)
        a = vc.to(dt).float()
        b = vc.to(dev).to(dt).float().cpu()
        r = dict(check=f"torch float8 cast {name} GPU vs CPU", mismatches=_mismatches(a, b))
        rows.append(r)
        print(r, flush=True)
    return rows


def sweep(device: str = "cuda", size: int = 8192, dtype: torch.dtype = torch.bfloat16
          ) -> List[Dict]:
    """Time launch configurations of the kernels (fp4.kernels.mx_quant.block_quantize `config`,
    fp8_quant.FP8_CONFIG, amax.AMAX_CONFIG) on an [size, size] operand; % of copy bandwidth."""
    import triton.testing

    from fp4.kernels import amax as amax_pass, fp8_quant, triton_quantize_operand
    from fp4.kernels import mx_quant

    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(size, size, device=dev, dtype=dtype)
    nbytes = 2 * x.numel() * x.element_size()
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x))
    del y
    rows: List[Dict] = []
    ax1 = [(32, 128, 4, 0), (16, 256, 4, 0), (32, 256, 8, 0), (64, 128, 8, 0), (8, 512, 4, 0),
           (64, 256, 8, 0), (16, 512, 8, 0)]
    ax0 = [(32, 128, 4, 0), (32, 64, 4, 0), (32, 256, 4, 0), (32, 256, 8, 0), (32, 512, 8, 0),
           (64, 128, 8, 0), (32, 32, 2, 0)]
    ops = {"mxfp4": dict(fmt="mxfp4"), "nvfp4": dict(fmt="nvfp4"),
           "h16+mxfp4": dict(fmt="mxfp4", hadamard_block=16),
           "sr+mxfp4": dict(fmt="mxfp4", rounding="stochastic")}
    for op, kw in ops.items():
        for axis, cands in ((-1, ax1), (0, ax0)):
            if op == "h16+mxfp4":
                cands = cands + [c[:3] + (1,) for c in cands if axis == 0]
            key_kw = dict(kw)
            for cfg in cands:
                if axis == 0 and op == "nvfp4" and cfg[0] < 16:
                    continue
                key = (kw["fmt"] == "mxfp4", 1 if axis == -1 else 0,
                       kw.get("hadamard_block", 1), kw.get("rounding") == "stochastic", False)
                mx_quant.TILE_CONFIG[key] = cfg
                gen = torch.Generator(device=dev).manual_seed(1)
                try:
                    ms = triton.testing.do_bench(
                        lambda: triton_quantize_operand(x, axis=axis, generator=gen, **key_kw))
                    r = dict(op=op, axis=axis, config=cfg, ms=ms, pct_copy=100 * copy_ms / ms)
                except Exception as err:
                    r = dict(op=op, axis=axis, config=cfg, error=f"{type(err).__name__}: {err}"[:300])
                mx_quant.TILE_CONFIG.pop(key, None)
                rows.append(r)
                print(r, flush=True)
    for fcfg in (dict(block=4096, num_warps=8), dict(block=2048, num_warps=4),
                 dict(block=8192, num_warps=8), dict(block=4096, num_warps=4),
                 dict(block=16384, num_warps=16)):
        for acfg in (dict(block=4096, iters=8, num_warps=8), dict(block=4096, iters=1, num_warps=8),
                     dict(block=8192, iters=16, num_warps=8)):
            fp8_quant.FP8_CONFIG, amax_pass.AMAX_CONFIG = fcfg, acfg
            for rounding in ("nearest", "stochastic"):
                gen = torch.Generator(device=dev).manual_seed(1)
                ms = triton.testing.do_bench(lambda: triton_quantize_operand(
                    x, "e4m3", -1, rounding=rounding, generator=gen))
                r = dict(op="e4m3", rounding=rounding, fp8=fcfg, amax=acfg, ms=ms,
                         pct_copy=100 * copy_ms / ms)
                rows.append(r)
                print(r, flush=True)
    amax = torch.zeros(1, dtype=torch.int32, device=dev)
    for acfg in (dict(block=4096, iters=8, num_warps=8), dict(block=4096, iters=1, num_warps=8),
                 dict(block=8192, iters=16, num_warps=8), dict(block=2048, iters=16, num_warps=4)):
        amax_pass.AMAX_CONFIG = acfg
        ms = triton.testing.do_bench(lambda: amax_pass.global_amax_bits(x.view(torch.int16), 1, amax))
        r = dict(op="amax pass", amax=acfg, ms=ms, pct_copy_of_read=100 * copy_ms / 2 / ms)
        rows.append(r)
        print(r, flush=True)
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", help="JSON output path")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile reference (quicker)")
    parser.add_argument("--diagnose", action="store_true", help="kernel / GPU ref / CPU ref bits")
    parser.add_argument("--sweep", action="store_true", help="time launch configurations")
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4, help="timed operand: [BATCH * SIZE, SIZE]")
    args = parser.parse_args()
    if args.diagnose or args.sweep:
        result = (diagnose(size=args.size) if args.diagnose else []) + (
            sweep(size=args.size) if args.sweep else [])
    else:
        result = bench_kernels(size=args.size, compile_reference=not args.no_compile, batch=args.batch)
        print(_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
