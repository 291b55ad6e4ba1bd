"""Scale computation: MX E8M0 block scales, NVFP4 two-level scales, FP8 per-tensor scales.

A quantized operand is `element * scale`. This module only decides the scales; rounding the
elements onto their grid lives in fp4.formats, and the blocking/layout in fp4.quantize.

MX (OCP Microscaling v1.0; e2m1 / e1m2 / int4 elements, blocks of 32)
-----------------------------------------------------------------------
One E8M0 scale 2^e per block, e in [-127, 127] (bias 127; code 0xFF = NaN). With amax the
block's max |x|, M the element max and emax_elem = floor(log2 M):

    floor  e = floor(log2 amax) - emax_elem          OCP spec; elements past M clip to +-M
    ceil   e = ceil(log2 amax) - emax_elem           amax first rounded up to a power of two
    rceil  e = ceil(log2(amax / M))                  smallest e with M * 2^e >= amax: never clips
    even   amax rounded to nearest-even at the element's mantissa bits, then floor

Why several: floor is the spec but clips up to (2 - M/2^emax_elem) of the block max (for e2m1,
values in [6, 8) * 2^e collapse to 6); ceil never clips but wastes up to one binade; rceil is
the tightest non-clipping scale and is the default under stochastic rounding (a clipped value
would bias SR); even (AMD) is the default under nearest rounding: a block max that would round
up past M anyway gets the next scale instead of being clipped.

Exactness. All exponent arithmetic is integer: floor(log2 a) comes from frexp of the float64
amax (float32 subnormals are normal in float64); rceil compares M * 2^e0 with amax exactly
(e is e0 or e0 + 1); even tests whether the mantissa rounds to 2.0. 2^-127 is itself a float32
subnormal; scales are built as float64 powers of two and never pass through a flushing path.
e is clamped to [-127, 127]; an all-zero block gets e = -127. A block with NaN or +-Inf gets the
NaN code (returned as exponent 128, i.e. code 0xFF) and decodes to a NaN scale.

NVFP4 (e2m1 elements, blocks of 16, E4M3 block scale, FP32 tensor scale)
-------------------------------------------------------------------------
Every step is one float32 operation rounded to nearest even (torch float32 ops on CPU and GPU
are IEEE; flush-to-zero must stay off):

    s_g = fp32(global_amax / 2688)                      2688 = 448 * 6
    s_b = e4m3_rne_satfinite(fp32(fp32(block_amax / 6) / s_g))
    s   = fp32(s_b * s_g)

Stochastic rounding rounds s_b *up* onto the E4M3 grid instead, so the block max maps to at most
6 (up to float32 rounding of s and x / s, which saturates by an ulp at worst).
Degenerate cases: global_amax == 0, or so small (< 2688 * 2^-150) that s_g underflows to 0,
gives s_b = 0 and therefore all-zero outputs (this avoids 0/0 in the block ratio). A non-finite
global amax makes the whole tensor NaN (handled by the caller).

FP32 block scales (scale mode "fp32"; e2m1 / e1m2 / int4 elements, blocks of 16; UFP4 paper)
---------------------------------------------------------------------------------------------
One float32 scale per block of 16, not rounded onto any scale grid:

    s = fp32(block_amax / M)      (M = element max; one correctly rounded float32 division)

so the block max maps onto the grid max (amax / s rounds to M). All-zero block: s = 0 and the
block stays zero (as does a block whose amax / M underflows float32). A block with NaN / +-Inf
is all NaN. The grid is uniform for e1m2 and int4, and int4 = 4 x e1m2 with s_int4 = s_e1m2 / 4
exactly, so the two give identical dequantized values under this scale.

FP8 per-tensor current scaling
------------------------------
    s = fp32(amax / fmt_max);  s == 0 -> s = 1

"s == 0" covers amax == 0 (the contract's rule) and an amax so small that amax / fmt_max
underflows to zero; with s = 1 those values round to (signed) zero on the FP8 grid, exactly as
they would have with any tiny s.
"""
from __future__ import annotations

from typing import Tuple

import torch

from typing import Optional

from .names import Rounding, ScaleMode, choices
from .formats import (E2M1, E4M3, E8M0_MAX, E8M0_MIN, E8M0_NAN, MX_FORMATS, NVFP4_TENSOR_DIVISOR,
                      OPERAND_FORMATS, ElementFormat, floor_log2, pow2, round_to_grid)

__all__ = ["SCALE_MODES", "MX_SCALE_MODES", "E8M0_NAN", "fp32_block_scales", "block_amax", "mx_exponent", "e8m0_decode", "mx_scales",
           "nvfp4_scales", "fp8_tensor_scale", "resolve_scale_mode"]

SCALE_MODES = choices(ScaleMode)  # every block scale rule
MX_SCALE_MODES = tuple(m for m in SCALE_MODES if m != ScaleMode.fp32)  # the E8M0 ones
NVFP4_GLOBAL_DIVISOR = NVFP4_TENSOR_DIVISOR  # old name


def resolve_scale_mode(fmt: str, rounding: str, scale_mode: Optional[str]) -> Optional[str]:
    """The block scale mode actually used: `even` under nearest, `rceil` under SR unless given.

    Which modes a format takes is a column of the format table (OPERAND_FORMATS[fmt].scale_modes).
    Lives here, not in fp4.quantize, because it is a scale rule: the torch reference and the Triton
    kernels both resolve it, and neither may import the other's internals.
    """
    valid = OPERAND_FORMATS[fmt].scale_modes if fmt in OPERAND_FORMATS else ()
    if not valid:
        if scale_mode is not None:
            raise ValueError(f"scale_mode {scale_mode!r} applies only to the MX formats "
                             f"{', '.join(MX_FORMATS)}, not to {fmt!r}; pass None")
        return None
    if scale_mode is None:
        return ScaleMode.even.value if rounding == Rounding.nearest else ScaleMode.rceil.value
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"unknown scale_mode {scale_mode!r}; valid choices: {', '.join(SCALE_MODES)}")
    if scale_mode not in valid:
        raise ValueError(f"scale_mode {scale_mode!r} is not valid for {fmt!r} (valid: {', '.join(valid)}); "
                         "for E2M1 elements with FP32 block scales use fmt 'e2m1'")
    return str(scale_mode)


def _div_fp32(num: torch.Tensor, den: float) -> torch.Tensor:
    """fp32(num / den), correctly rounded on every device.

    On CUDA, torch evaluates `tensor / python_float` as `tensor * fp32(1 / den)`, which is not
    the correctly rounded quotient (e.g. amax / 448 came out one ulp off on an H100). Dividing by
    a 0-dim tensor on the same device runs a true IEEE division on both the CPU and the GPU.
    torch.full writes it with a fill kernel (torch.tensor would copy from the host: a stall, and
    an error inside CUDA-graph capture).
    """
    return num / torch.full((), den, dtype=torch.float32, device=num.device)


def block_amax(blocks: torch.Tensor) -> torch.Tensor:
    """max |x| over the last dim; NaN if the block holds a NaN, +Inf if it holds an Inf."""
    return blocks.abs().amax(dim=-1)


def _carry_when_rounded(a: torch.Tensor, mbits: int) -> torch.Tensor:
    """True where rounding a's significand to mbits bits (RNE) carries it into the next binade."""
    m = torch.frexp(a).mantissa  # [0.5, 1): significand / 2
    top = 2.0 ** (mbits + 1)
    return torch.round(m * top) == top


def mx_exponent(amax: torch.Tensor, fmt: ElementFormat, mode: str) -> torch.Tensor:
    """Shared E8M0 exponent per block (int64) from the block amax; E8M0_NAN for non-finite blocks."""
    if mode not in MX_SCALE_MODES:
        raise ValueError(f"unknown MX scale mode {mode!r}; valid: {list(MX_SCALE_MODES)}")
    amax = amax.to(torch.float64)
    finite = torch.isfinite(amax)
    zero = amax == 0
    a = torch.where(finite & ~zero, amax, torch.ones_like(amax))
    fl = floor_log2(a)
    if mode == "floor":
        e = fl - fmt.emax_elem
    elif mode == "ceil":
        not_pow2 = torch.frexp(a).mantissa != 0.5
        e = fl + not_pow2.to(torch.int64) - fmt.emax_elem
    elif mode == "rceil":
        # M * 2^e0 lies in [2^fl, 2^(fl+1)) like amax, so the answer is e0 or e0 + 1.
        e0 = fl - fmt.emax_elem
        e = e0 + (fmt.max * pow2(e0) < a).to(torch.int64)
    else:
        e = fl + _carry_when_rounded(a, fmt.mbits).to(torch.int64) - fmt.emax_elem
    e = torch.where(zero, torch.full_like(e, E8M0_MIN), e.clamp(E8M0_MIN, E8M0_MAX))
    return torch.where(finite, e, torch.full_like(e, E8M0_NAN))


def e8m0_decode(e: torch.Tensor) -> torch.Tensor:
    """float64 scale 2^e; NaN for the NaN code."""
    scale = pow2(torch.where(e == E8M0_NAN, torch.zeros_like(e), e))
    return torch.where(e == E8M0_NAN, torch.full_like(scale, float("nan")), scale)


def mx_scales(blocks: torch.Tensor, fmt: ElementFormat, mode: str) -> torch.Tensor:
    """float64 scale per block of `blocks` ([..., nblocks, block]), shaped [..., nblocks, 1]."""
    return e8m0_decode(mx_exponent(block_amax(blocks.to(torch.float64)), fmt, mode)).unsqueeze(-1)


def nvfp4_scales(blocks: torch.Tensor, global_amax: torch.Tensor, rounding: str = "nearest"
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(s_b [..., nblocks, 1] float32 E4M3 values, s_g 0-dim float32) for float32 `blocks`.

    global_amax is passed in (not taken from `blocks`) so padded or tiled views share it.
    """
    global_amax = global_amax.to(torch.float32)
    s_g = _div_fp32(global_amax, NVFP4_GLOBAL_DIVISOR)
    ratio = _div_fp32(block_amax(blocks.to(torch.float32)), E2M1.max) / s_g
    # Rounded in float64: the float32 ratio is exact there, and E4M3 points are float32-exact.
    e4m3_rounding = "up" if rounding == "stochastic" else "nearest"
    s_b = round_to_grid(ratio, E4M3, e4m3_rounding).to(torch.float32)
    s_b = torch.where(s_g == 0, torch.zeros_like(s_b), s_b)
    return s_b.unsqueeze(-1), s_g


def fp32_block_scales(blocks: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """float32 scale per block of float32 `blocks` ([..., nblocks, 16]), shaped [..., nblocks, 1]:
    s = fp32(block_amax / fmt.max), correctly rounded, not rounded further (scale mode "fp32").

    0 for an all-zero block (and for one whose amax / max underflows float32); NaN / +Inf for a
    block holding NaN / Inf (the caller poisons those blocks)."""
    return _div_fp32(block_amax(blocks.to(torch.float32)), fmt.max).unsqueeze(-1)


def fp8_tensor_scale(x32: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """Per-tensor float32 scale fp32(amax / fmt.max), 1 where that is 0; NaN if x is not finite."""
    s = _div_fp32(x32.abs().amax().to(torch.float32), fmt.max)
    return torch.where(s == 0, torch.ones_like(s), s)
