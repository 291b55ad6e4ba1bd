"""Fused quantize-dequantize for scale mode "fp32" (the UFP4 paper's scaling), bit-identical to
fp4.quantize._fp32_blocks for every input, stochastic rounding included.

What is computed (the reference's definition, fp4.scaling.fp32_block_scales / fp4.quantize):
blocks of QB = FP32_BLOCK = 16 along the quantization axis, one unrounded float32 scale per block

    s    = fp32(amax / M)          M = element max (e2m1 6, e1m2 1.75, int4 7)
    v    = fp32(x / s)             0 with x's sign where s == 0 (all-zero / underflowing block)
    q    = v rounded onto the element grid (nearest-even, or stochastic), saturating at +-M
    x_dq = fp32(q * s)             one rounding (q has <= 3 significant bits: the float64
                                   product is exact), returned as float32 whatever x's dtype

and a block holding NaN / +-Inf is all NaN (0x7FC00000, the reference's NaN).

Layout: as fp4.kernels.mx_quant (read its docstring): the operand is a contiguous [B, R, C] tensor
with blocks along C (AXIS=1) or along R (AXIS=0, the token axis), one [TR, TC] tile per program,
viewed as [TR/RB, RB, TC/CB, CB] with (RB, CB) = (1, 16) or (16, 1); the block amax is an
integer max of |bits| (NaN / Inf sort above every finite pattern). The optional fused block
Hadamard is mx_quant's `_transformed_tile` (butterflies; along rows as one IEEE dot when the
tile holds exactly one Hadamard block, so a 0 * Inf of the block-diagonal matrix cannot reach
another 16-block).

Exact arithmetic (Triton's float32 `/` is the approximate div.full.f32 on a GPU, and libdevice
may flush subnormals):
- s: float64 division rounded once to float32 (_bits.div_f32), per block: correctly rounded
  (float64 has > 2 * 24 + 2 bits), no subnormal is flushed (the FP64 path never flushes).
- v: one reciprocal per block and a multiply and four FMAs per element (_bits.div_f32_fma,
  correctly rounded by Markstein's theorem) when that is provably the IEEE result for
  everything that matters, else the float64 route (div_f32), chosen per program (a uniform
  branch):
    * every positive scale of the tile in [DIV_FMA_MIN, DIV_FMA_MAX) = [2^-60, 2^125): then
      every quotient >= 2^-42 is exact, and a smaller one (flushed or a few ulps off) is far
      below half the smallest spacing of every grid, so nearest rounding sends it to a zero of
      x's sign either way (the sign is taken from x's bits);
    * under SR additionally no element with x != 0 and |v| < DIV_FMA_TINY = 2^-42: such a v
      is rounded up with probability |v| / spacing, so its exact value matters; a tile holding
      one takes the float64 route. (Rare: it needs an element 2^40 below its block max.)
  Under TRITON_INTERPRET=1 (numpy, IEEE, no flushing; Triton 3.9 rounds tl.fma once) both
  routes give the same bits; the EXACT_DIV launch option forces the float64 route (tests pin
  that it agrees).
- x_dq: _bits.mul_f32 (exact float64 product, one rounding to float32; subnormal-safe).
- Element rounding: `_bits.round_bits` (nearest, proven bit-identical for the other kernels) on
  the bits of |v| with the fixed grid (block exponent 0); SR by `round_bits_uniform` below.

Stochastic rounding, bit for bit: the reference draws u = torch.rand(shape, generator, float32)
in its blocked working layout ([..., nblocks, 16]: the quantization axis moved last, padded to a
multiple of 16) and rounds |v| up iff u < frac, frac = (|v| - lo) / (hi - lo) computed exactly in
float64 (fp4.formats.round_to_grid). The kernel wrapper makes *the same call* (same shape, dtype,
device and generator, so the same generator state gives the same numbers, on the CPU's
Mersenne twister as on CUDA's Philox) and the kernel reads u at the element's position in that
layout: [B, R, C] with AXIS=1 -> (b * R + r) * Lp + c, AXIS=0 -> (b * C + c) * Lp + r, Lp the
padded axis length. The comparison is exact for any float32 u in [0, 1): frac = dropped bits /
2^s as a float64 (exact: < 2^24 times a power of two), compared with float64(u). The price is the
uniform tensor (4 bytes per element written by torch.rand and read here); the MX / NVFP4 kernels
instead draw Philox bits in-kernel and agree with their reference only in distribution.

Scales: with WRITE_SCALES the float32 s of every block is stored ([B, ceil(R/RB), ceil(C/CB)],
as fp4.scaling.fp32_block_scales gives it: NaN / +Inf for a non-finite block, 0 for a zero one).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..formats import FP32_BLOCK
from ._bits import (DIV_FMA_TINY, F32_INF_BITS, F32_NAN_BITS, FORMATS, div_f32, div_f32_fma,
                    div_fma_exact, fixed_scale_consts, grid_split, mul_f32, recip_f32,
                    round_bits)
from .amax import IN_KINDS, KIND_VIEWS
from ._tiles import _store_block_values, _tile_coords, _transformed_tile
from .mx_quant import _f32_value

@triton.jit
def pow2_f64(k):
    """float64 2^k for int32 k in [-1022, 1023], assembled from the exponent field."""
    return ((k.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def round_bits_uniform(a, u, qlo, qbits, maxb, MBITS: tl.constexpr):
    """Stochastic rounding of magnitudes `a` (finite float32 bits, int32) onto the fixed grid with
    float32 uniforms `u` in [0, 1): exactly fp4.formats.round_to_grid's `lo + (u < frac)`.

    qlo / qbits / maxb as in _bits.round_bits (here for block exponent 0). With s the number of
    significand bits below the grid spacing (see round_bits), frac = D / 2^s where D is the low s
    bits of the significand (s <= 23) or the whole significand (s >= 24: |v| below one spacing,
    the result is 0 or one spacing). D < 2^24 and 2^-s >= 2^-152 are exact float64 numbers, so
    float64(u) < D * 2^-s is the exact comparison, for any u (CUDA's torch.rand is not a
    multiple of 2^-24 near 0, and can be exactly 0: then any nonzero frac rounds up)."""
    s, sc, mask, sig = grid_split(a, qlo, MBITS)
    dropped = tl.where(s <= 23, a & mask, sig)
    up = u.to(tl.float64) < dropped.to(tl.float64) * pow2_f64(-s)
    norm = (a & ~mask) + tl.where(up, mask + 1, 0)
    tiny = tl.where(up, qbits, 0)
    res = tl.where(s <= 23, norm, tiny)
    return tl.where(a >= maxb, maxb, res)


@triton.jit
def fp32_block_kernel(
        x_ptr, out_ptr, u_ptr, signs_ptr, scale_ptr, R, C, LP,
        AXIS: tl.constexpr, RB: tl.constexpr, CB: tl.constexpr, LOG2HB: tl.constexpr, HSCALE: tl.constexpr,
        HAS_SIGNS: tl.constexpr, HMODE: tl.constexpr, ROUND: tl.constexpr, MBITS: tl.constexpr,
        EMIN: tl.constexpr, FMT_MAX: tl.constexpr, FIX_QBITS: tl.constexpr, FIX_MAXB: tl.constexpr,
        IN_KIND: tl.constexpr, WRITE_SCALES: tl.constexpr, EXACT_DIV: tl.constexpr,
        TR: tl.constexpr, TC: tl.constexpr):
    pid_b = tl.program_id(2)
    rows, cols, offs, inb = _tile_coords(R, C, TR, TC)
    bits = _transformed_tile(x_ptr, signs_ptr, offs, inb, IN_KIND, AXIS, LOG2HB, HSCALE,
                             HAS_SIGNS, TR, TC, HMODE)
    b4 = tl.reshape(bits, [TR // RB, RB, TC // CB, CB])
    a4 = b4 & 0x7FFFFFFF
    sign = b4 & (-2147483648)
    am = tl.max(tl.max(a4, axis=3, keep_dims=True), axis=1, keep_dims=True)
    finite = am < F32_INF_BITS
    s = div_f32(am.to(tl.float32, bitcast=True), FMT_MAX)  # NaN / Inf for a non-finite block
    pos = finite & (s > 0)
    den = tl.where(pos, s, 1.0)
    x = b4.to(tl.float32, bitcast=True)
    if EXACT_DIV:
        v = div_f32(x, den)
    else:
        v = div_f32_fma(x, den, recip_f32(den))
        need_exact = div_fma_exact(tl.min(den), tl.max(den)) == 0
        if ROUND == 1:
            tiny = pos & (a4 != 0) & (tl.abs(v) < DIV_FMA_TINY)
            need_exact = need_exact | (tl.max(tiny.to(tl.int32)) > 0)
        if need_exact:
            v = div_f32(x, den)
    vb = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if ROUND == 1:
        # (Along axis 0 the uniforms run along rows; the compiler picks the coalesced load
        # layout itself: an explicit [TC, TR] load + tl.trans timed the same on an H200.)
        if AXIS == 1:
            uoffs = (pid_b * R + rows)[:, None].to(tl.int64) * LP + cols[None, :]
        else:
            uoffs = (pid_b * C + cols)[None, :].to(tl.int64) * LP + rows[:, None]
        ut = tl.load(u_ptr + uoffs, mask=inb, other=0.0)
        u = tl.reshape(ut, [TR // RB, RB, TC // CB, CB])
        q = round_bits_uniform(vb, u, EMIN + 127, FIX_QBITS, FIX_MAXB, MBITS)
    else:
        q = round_bits(vb, EMIN + 127, FIX_QBITS, FIX_MAXB, vb, MBITS, 0)
    q = tl.where(pos, q, 0) | sign
    dq = mul_f32(q.to(tl.float32, bitcast=True), tl.where(pos, s, 0.0))
    out = tl.where(finite, dq.to(tl.int32, bitcast=True), F32_NAN_BITS)
    tl.store(out_ptr + offs, tl.reshape(out, [TR, TC]), mask=inb)
    if WRITE_SCALES:
        _store_block_values(scale_ptr, s, R, C, RB, CB, TR, TC)


def _elem_constexprs(elem: str):
    mbits, emin, _, maxn, maxq, _ = FORMATS[elem]
    _, qbits, maxb = fixed_scale_consts(elem)
    return dict(MBITS=mbits, EMIN=emin, FMT_MAX=float(maxn) * 2.0 ** maxq, FIX_QBITS=qbits,
                FIX_MAXB=maxb)


# Launch configuration (TR, TC, num_warps) per (kernel axis, Hadamard block > 1, SR); a missing
# key or a tile that does not fit the blocks uses _default_config. From the H200 sweep of
# experiments/gpu/fp32_block_kernel_check.py --sweep (8192 x 4096 bf16, e1m2; x read 2 B +
# x_dq written 4 B per element, SR + 8 B of uniforms; torch copy 36 us):
#   axis=-1 nearest 90 us, SR 171 us (one 1024-wide row per program: 2 x 512, 4 x 256, 16 x 128
#   within 4%); h16 108 us. axis=0 nearest 116 us, SR 270 us, h16 135 us (16-row tiles; 32 rows
#   and 4 warps were slower). The torch reference: 3.0 - 3.9 ms.
TILE_CONFIG = {
    (1, False, False): (1, 1024, 4),
    (1, False, True): (1, 1024, 4),
    (1, True, False): (4, 256, 4),
    (1, True, True): (4, 256, 4),
    (0, False, False): (16, 64, 1),
    (0, False, True): (16, 32, 1),
    (0, True, False): (16, 64, 2),
    (0, True, True): (16, 64, 2),
}
MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (column tiles)


def _fits(config, axis, hb):
    tr, tc = config[:2]
    blk = max(FP32_BLOCK, hb)
    return tc % blk == 0 if axis == 1 else tr % blk == 0


def _default_config(axis, hb):
    blk = max(FP32_BLOCK, hb)
    if axis == 1:
        tc = max(128, blk)
        return max(4096 // tc, 1), tc, 4
    tr = blk
    return tr, max(4096 // tr, 16), 4


def _pow2_at_least(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _choose_config(axis, hb, stochastic, R, C):
    """The tuned tile, narrowed to the tensor: columns shrink to the next power of two of C (at
    least one block) with rows growing to keep the tile size (axis 1), and grow past the grid's
    column-tile limit if C is huge."""
    blk = max(FP32_BLOCK, hb)
    config = TILE_CONFIG.get((axis, hb > 1, stochastic))
    if config is None or not _fits(config, axis, hb):
        config = _default_config(axis, hb)
    tr, tc, warps = config
    floor_c = blk if axis == 1 else 16
    narrow = max(min(tc, _pow2_at_least(C)), floor_c)
    if narrow < tc:
        tr, tc = (tr * (tc // narrow) if axis == 1 else tr), narrow
    while triton.cdiv(C, tc) > MAX_GRID_Y:
        tc *= 2
        tr = max(tr // 2, 1 if axis == 1 else tr)
    return tr, tc, warps


def fp32_block_quantize(x3: torch.Tensor, elem: str, axis: int, rounding: str = "nearest",
                        generator=None, uniform_shape=None, hadamard_block=None,
                        hadamard_signs=None, write_scales: bool = False, config=None,
                        exact_div: bool = False):
    """Launch on a contiguous [B, R, C] tensor; blocks of 16 along C (axis=1) or R (axis=0).

    Returns (x_dq float32 [B, R, C], block scales float32 [B, ceil(R/RB), ceil(C/CB)] or None).
    Under SR the uniforms are torch.rand(uniform_shape, generator=generator) on x's device, the
    reference's draw: uniform_shape must be the reference's blocked shape (x's shape with the
    axis removed, then (nblocks, 16)); it defaults to the folded [B, R, C] view's, which has
    the same number of elements in the same order. `config` = (TR, TC, num_warps) overrides
    the tile; exact_div forces the float64 element division.
    """
    assert x3.dim() == 3 and x3.is_contiguous() and axis in (0, 1)
    B, R, C = x3.shape
    in_kind = IN_KINDS[x3.dtype]
    view = KIND_VIEWS[in_kind]
    hb = hadamard_block or 1
    stochastic = rounding == "stochastic"
    if config is None:
        config = _choose_config(axis, hb, stochastic, R, C)
    tr, tc, num_warps = config
    assert _fits(config, axis, hb), f"tile {config} does not fit blocks of {max(FP32_BLOCK, hb)}"
    # The Hadamard as a dot along rows only when the tile holds exactly one Hadamard block.
    hmode = 1 if (axis == 0 and hb > 1 and tr == max(FP32_BLOCK, hb) and tc >= 16) else 0
    dev = x3.device
    out = torch.empty(x3.shape, dtype=torch.float32, device=dev)
    length = C if axis == 1 else R
    lp = -(-length // FP32_BLOCK) * FP32_BLOCK
    if stochastic:
        if uniform_shape is None:
            uniform_shape = (B * R, lp // FP32_BLOCK, FP32_BLOCK) if axis == 1 else \
                (B * C, lp // FP32_BLOCK, FP32_BLOCK)
        u = torch.rand(uniform_shape, generator=generator, dtype=torch.float32, device=dev)
        assert u.numel() == (B * R if axis == 1 else B * C) * lp, "uniform_shape is not the blocked shape"
    else:
        u = out
    nrb = -(-R // (1 if axis == 1 else FP32_BLOCK))
    ncb = -(-C // (FP32_BLOCK if axis == 1 else 1))
    scales = torch.empty((B, nrb, ncb) if write_scales else (1,), dtype=torch.float32, device=dev)
    signs = (hadamard_signs.to(device=dev, dtype=torch.float32).contiguous()
             if hadamard_signs is not None else out)
    if x3.numel():
        grid = (triton.cdiv(R, tr), triton.cdiv(C, tc), B)
        fp32_block_kernel[grid](
            x3.view(view), out.view(torch.int32), u, signs, scales, R, C, lp,
            AXIS=axis, RB=1 if axis == 1 else FP32_BLOCK, CB=FP32_BLOCK if axis == 1 else 1, LOG2HB=int(math.log2(hb)),
            HSCALE=_f32_value(1.0 / math.sqrt(hb)), HAS_SIGNS=hadamard_signs is not None,
            HMODE=hmode, ROUND=1 if stochastic else 0, IN_KIND=in_kind,
            WRITE_SCALES=write_scales, EXACT_DIV=exact_div, TR=tr, TC=tc, num_warps=num_warps,
            **_elem_constexprs(elem))
    return out, (scales if write_scales else None)
