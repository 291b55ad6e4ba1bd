"""Offline: what a quantizer launch costs the GPU before it runs (registers, occupancy, SASS)

    python -m fp4_experiments.kernel_sass [--case NAME ...] [--rows 65536 --cols 768] [--sass DIR]

No GPU is needed. Each case calls the public kernel entry (fp4.kernels.triton_quantize_operand_ex)
on a CPU tensor of the given shape with the kernels' launches recorded instead of run, then
compiles every recorded launch exactly as Triton's launcher would (same constexprs, ints and
pointers specialised as divisible by 16 where the launch values are) for an sm_90 target with
the Triton installed here, and prints per kernel:

    regs      registers per thread (ptxas), spill  local-memory loads/stores in the SASS,
    blocks/SM resident programs per SM allowed by registers, threads and shared memory (65,536
              registers, 2,048 threads, 32 blocks, 228 KB), bytes/SM the input bytes those
              programs hold in flight,
    instr     static SASS instructions, instr/elem over the elements one thread owns
              (straight-line code: both routes of a branch count), bars  block-wide barriers,
    compile s the time Triton and ptxas took (no cache), which the first step of a run pays.

Why: on an H200 a quantize pass at copy speed has ~32 issue slots per element, so the kernels are
not bound by instruction count but by the bytes each SM keeps in flight, i.e. by occupancy; a
kernel's register count decides it (results/bench/README.md, eleventh session). The device
machine's Triton (3.6) may allocate differently from the one here: numbers to compare variants,
the GPU bench (bench_kernels, experiments/gpu/kernel_tiles_check.py) to decide.
"""
from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

# name -> (format, axis, Hadamard block, rounding)
CASES = {
    "mxfp4-last": ("mxfp4", -1, None, "nearest"),
    "mxfp4-tokens": ("mxfp4", 0, None, "nearest"),
    "h16-last": ("mxfp4", -1, 16, "nearest"),
    "h16-tokens": ("mxfp4", 0, 16, "nearest"),
    "sr-last": ("mxfp4", -1, None, "stochastic"),
    "sr-tokens": ("mxfp4", 0, None, "stochastic"),
    "nvfp4-last": ("nvfp4", -1, None, "nearest"),
    "nvfp4-tokens": ("nvfp4", 0, None, "nearest"),
    "e4m3-last": ("e4m3", -1, None, "nearest"),
    "e4m3-cast-transpose": ("e4m3", "t", None, "nearest"),  # fp8_quantize_t: the FP8 rung's operands
}
_TORCH_PTR = {torch.int16: "*i16", torch.int32: "*i32", torch.float32: "*fp32", torch.float16: "*fp16",
              torch.uint8: "*u8", torch.bfloat16: "*bf16", torch.int64: "*i64"}


class _Recorder:
    """Stands for a @triton.jit kernel: `kernel[grid](*args, **meta)` records the launch."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getattr__(self, name):  # arg_names and the like: the kernel's own
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((self.fn, grid, args, meta))


def record_launches(fmt, axis, hadamard, rounding, rows, cols, config=None):
    """The launches triton_quantize_operand_ex makes for a [rows, cols] bfloat16 operand (with
    `config`: the block kernels' launch configuration in place of their table's)."""
    from fp4.kernels import amax, fp8_quant, mx_quant, triton_quantize_operand_ex
    launches, saved = [], {}
    if config is not None:
        saved[(mx_quant, "launch_config")] = mx_quant.launch_config
        mx_quant.launch_config = lambda *args: config
    for module in (mx_quant, fp8_quant, amax):
        for name in dir(module):
            obj = getattr(module, name)
            if name.endswith("_kernel") and hasattr(obj, "arg_names") and (module, name) not in saved:
                saved[(module, name)] = obj
                setattr(module, name, _Recorder(obj, launches))
    try:
        x = torch.zeros(rows, cols, dtype=torch.bfloat16)
        gen = torch.Generator().manual_seed(0)
        if axis == "t":
            fp8_quant.fp8_quantize_t(x, fmt)
        else:
            triton_quantize_operand_ex(x, fmt, axis, rounding, generator=gen, hadamard_block=hadamard,
                                       return_scales=fmt != "e4m3")
    finally:
        for (module, name), obj in saved.items():
            setattr(module, name, obj)
    return launches


def compile_launch(fn, args, meta, arch=90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    constexprs = {k: v for k, v in meta.items() if k in fn.arg_names}
    defaults = inspect.signature(fn.fn).parameters
    for name in fn.arg_names[len(args):]:  # constexprs the launch leaves at their default
        constexprs.setdefault(name, defaults[name].default)
    options = {k: v for k, v in meta.items() if k not in fn.arg_names}
    signature, attrs = {}, {}
    params = [n for n in fn.arg_names if n not in constexprs]
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[params.index(name)]
        if isinstance(value, torch.Tensor):
            signature[name] = _TORCH_PTR[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            signature[name] = "i64" if abs(int(value)) >= 2 ** 31 else "i32"
            if int(value) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                          options=options)


def sass_stats(kernel, elements, sass_dir=None, label=""):
    from triton.backends.nvidia import __file__ as nv_init
    bindir = Path(nv_init).parent / "bin"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"kernel_sass_{os.getpid()}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    sass = subprocess.run([str(bindir / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
    usage = subprocess.run([str(bindir / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                           text=True).stdout
    cubin.unlink()
    if sass_dir:
        Path(sass_dir, f"{label}.sass").write_text(sass)
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9]+)", line)
        if m:
            ops[m.group(1)] += 1
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    threads = 32 * kernel.metadata.num_warps
    # An H200 SM: 65,536 registers, 2,048 threads, 32 blocks, 228 KB of shared memory (1 KB of
    # it reserved per block).
    blocks = min(65536 // (regs * threads), 2048 // threads, 32,
                 228 * 1024 // (kernel.metadata.shared + 1024))
    total = sum(ops.values()) - ops["NOP"]
    return dict(regs=regs, spill=ops["LDL"] + ops["STL"], blocks=blocks, threads=threads, instr=total,
                per_elem=total / max(elements / threads, 1), bars=ops["BAR"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="default: every case")
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--cols", type=int, default=768)
    ap.add_argument("--sass", help="write each kernel's SASS into this directory")
    ap.add_argument("--config", type=lambda v: tuple(int(t) for t in v.split(",")),
                    help="TR,TC,WARPS,HMODE[,RELOAD] for the block kernels instead of their table's")
    args = ap.parse_args(argv)
    if args.sass:
        os.makedirs(args.sass, exist_ok=True)
    import triton
    print(f"triton {triton.__version__}, sm_90, [{args.rows}, {args.cols}] bfloat16")
    print(f"{'case':14s} {'kernel':24s} {'tile':>10s} {'regs':>5s} {'spill':>5s} {'blocks/SM':>9s} "
          f"{'bytes/SM':>8s} {'instr':>6s} {'instr/elem':>10s} {'bars':>4s} {'compile s':>9s}")
    for case in args.case or list(CASES):
        for fn, grid, largs, meta in record_launches(*CASES[case], args.rows, args.cols, args.config):
            programs = 1
            for g in (grid if isinstance(grid, tuple) else (grid,)):
                programs *= g
            elements = args.rows * args.cols / max(programs, 1)
            t0 = time.perf_counter()
            kernel = compile_launch(fn, largs, meta)
            compile_s = time.perf_counter() - t0
            st = sass_stats(kernel, elements, args.sass, f"{case}-{fn.__name__}")
            tile = f"{int(elements)}"
            print(f"{case:14s} {fn.__name__:24s} {tile:>10s} {st['regs']:5d} {st['spill']:5d} {st['blocks']:9d} "
                  f"{st['blocks'] * elements * 2 / 1024:7.0f}K {st['instr']:6d} {st['per_elem']:10.1f} "
                  f"{st['bars']:4d} {compile_s:9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
