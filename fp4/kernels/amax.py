"""Launch helpers shared by the FP8 and the block kernels: input kinds, the SR seed, the amax pre-pass.

Why a module of its own: fp8_quant.py (per-tensor FP8) and mx_quant.py (MX / NVFP4 blocks) both
need the flat global-amax pass and the seed draw. Keeping them here lets each kernel module import
this one and never the other (they used to import each other: an import cycle).

Global amax. Each program maxes the |x| bit patterns of ITERS x BLOCK consecutive elements and
atomically maxes one int32: for finite non-negative floats bit-pattern order is value order, and
NaN / Inf patterns sort above every finite one, so the same int also says "non-finite". The
per-tensor scale depends on all of x, so this read of x is the floor for current scaling.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._bits import load_bits

# Input dtype -> IN_KIND of _bits.load_bits / store_bits (same order as fp4.kernels.KERNEL_DTYPES).
IN_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# How each kind is viewed for the kernel: float32 and bfloat16 as integers (bits), float16 as is.
KIND_VIEWS = {0: torch.int32, 1: torch.int16, 2: torch.float16}
# Elements per loop step, steps per program and warps of the amax pass (several steps per program
# keep the single-address atomics few; bench_kernels --sweep measures alternatives).
AMAX_CONFIG = dict(block=4096, iters=8, num_warps=8)


@triton.jit
def _amax_kernel(x_ptr, amax_ptr, N, IN_KIND: tl.constexpr, BLOCK: tl.constexpr,
                 ITERS: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * (BLOCK * ITERS)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc = tl.maximum(acc, load_bits(x_ptr, offs, offs < N, IN_KIND) & 0x7FFFFFFF)
    tl.atomic_max(amax_ptr, tl.max(acc, axis=0))


def global_amax_bits(xv: torch.Tensor, in_kind: int, amax: torch.Tensor) -> None:
    """amax[0] = max |x| bit pattern over a contiguous x (viewed as int32 / int16 / float16)."""
    n = xv.numel()
    cfg = AMAX_CONFIG
    grid = (triton.cdiv(n, cfg["block"] * cfg["iters"]),)
    _amax_kernel[grid](xv, amax, n, IN_KIND=in_kind, BLOCK=cfg["block"], ITERS=cfg["iters"],
                       num_warps=cfg["num_warps"])


def draw_seed(generator, device) -> torch.Tensor:
    """One int32 seed on `device`, drawn from `generator` (torch's global RNG when None).

    The kernels read it from device memory, so no host sync sits between the draw and the launch;
    the same generator state gives the same seed and so the same stochastic-rounding bits."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    seed = torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=gdev, dtype=torch.int64)
    return seed.to(device=device, dtype=torch.int32)
