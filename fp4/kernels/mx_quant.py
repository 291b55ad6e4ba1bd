"""Fused block quantize-dequantize: MX (E8M0 per 32), NVFP4 (E4M3 per 16 or 16x16 + fp32 tensor
scale), and per-tensor FP8 when a Hadamard transform has to be fused in front of it.

Layout. The operand is a contiguous [B, R, C] tensor (callers fold leading / trailing dims).
Blocks run along C (AXIS=1: Fprop/Dgrad operands, `axis=-1`) or along R (AXIS=0: the token axis
that Wgrad reduces over) -- never via a transposed copy. Program (pid_r, pid_c, b) loads one
[TR, TC] tile with rows contiguous in memory (coalesced, vectorised loads in both orientations),
reshapes it *logically* to [TR/RB, RB, TC/CB, CB] with (RB, CB) = (1, QB) for AXIS=1,
(QB, 1) for AXIS=0 and (16, 16) for NVFP4 2-D tiles, and reduces the block amax over dims 1
and 3. One tile holds TR*TC/QB blocks (e.g. 32 x 128 bf16 = 128 MX blocks), so every element is
read once and written once. Elements past R or C load as zeros: the same as the reference's zero
padding, since zeros never raise an amax; they are never stored. Where the tiles divide the
tensor the launcher passes EVEN and no mask is computed at all; below 2^31 elements (OFF64
False) offsets are int32: fewer instructions per element for the same bits.

What one program computes (PASS=1):
  1. bits of x (bf16 widened by a shift; fp32 as int32; fp16 upcast) -> optional block Hadamard:
     x * signs * fl32(1/sqrt(HB)) then log2(HB) butterfly stages (a+b, a-b) in float32 on the
     tile (pairs selected by a size-2 axis of a reshape; the pad is zeroed afterwards, exactly
     as the reference cuts its padded transform).
  2. per-block amax = integer max of |bits| (NaN/Inf sort above all finite patterns).
  3. MX: E8M0 exponent by integer bit arithmetic (fp4.kernels._bits.mx_exponent), elements
     rounded by `mx_grid_bits` (float32 magic-number rounding of |x| * 2^-e where the program's
     block exponents are moderate, else `round_bits` in x's own units) -- bits of q * 2^e.
     NVFP4: s_g, s_b, s = s_b * s_g and v = x / s as correctly rounded float32 operations
     (per-block ops: float64 op then one rounding; per-element x / s: a multiply and four
     FMAs from the block's reciprocal, _bits.div_f32_fma, or float64 for tensors so tiny or
     huge that some s falls outside [2^-60, 2^125)), the E4M3 block scale
     rounded by `round_bits`, E2M1 elements by `fixed_grid_bits`, output q * s_b. Never
     Triton's float32 `/` (approximate div.full.f32).
     FP8 (KIND=2): s = fp32(amax / max), v = x / s, output q.
  4. optional per-block scale codes (E8M0 byte e + 127, 0xFF for NaN; E4M3 byte of s_b).
Registers decide the speed. At copy speed an H200 has ~32 issue slots per element, so these
kernels are bound by the bytes each SM keeps in flight, i.e. by how many programs fit its
registers (experiments/kernel_sass.py prints both, offline). The rare routes -- MX integer
rounding for programs with a tiny or huge block exponent, the float64 division of tensors with
s_g < 2^-51 -- would set the register count of the whole kernel, so they run on SUB parts
of the tile one after another (each part loaded, rounded and stored by itself along the axis the
blocks do not run; fp4.kernels._tiles holds the tile code). Without a Hadamard the MX
round-to-nearest route reads its tile again after the program-wide test of the block exponents
(RELOAD: a cache hit, so DRAM still sees one read) instead of holding it across that test's
barrier; with one, recomputing the transform costs more than the registers save. MXFP4 along the
last axis: 53 registers instead of 128 on the device's Triton 3.6, 9 programs per SM instead of 4,
81% of copy instead of 76% (results/bench/kernel_occupancy_check-h200-f8509e8.txt).
PASS=0 is the cheap global-amax pre-pass for NVFP4 / FP8: it recomputes the (transformed) tile
and atomically maxes its |bits| into one int32.

Subnormal safety: see fp4/kernels/_bits.py. A program with a block of extreme exponent (an
all-zero block aside) rounds by integer arithmetic only, so a block with subnormal amax or with
amax just above 2^-127 comes out exact and finite on a flushing GPU too; the other programs take
the float route, exact there with or without flushing. The Hadamard butterflies are plain
float32 add/mul (IEEE in Triton's default lowering, no libdevice); the tests prove
bit-identity with the reference where the float32 sums are exact (the reference's float32
matmul has its own summation order, so inexact sums may differ in the last bit there).

Stochastic rounding: 32 random bits per element from one Philox call per 4 consecutive
elements of a row (tl.randint4x, counter = (global row, 4-column group)), with
the int32 seed read from a device tensor drawn once from the caller's torch.Generator (no host
sync); same generator state -> same bits.
"""
from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from ..formats import E4M3, E8M0_BIAS, MX_BLOCK, NVFP4_BLOCK, NVFP4_TENSOR_DIVISOR
from ..scaling import MX_SCALE_MODES
from ._bits import (F32_INF_BITS, F32_NAN_BITS, FORMATS, div_f32, div_f32_fma, div_fma_exact,
                    encode_minifloat, fixed_grid_bits, fixed_scale_consts, f32_bits,
                    mul_f32, mx_fast_program, mx_grid_bits, mx_round_nearest,
                    rand_bits, recip_f32, round_bits, store_bits)
from .amax import IN_KINDS, KIND_VIEWS, draw_seed, global_amax_bits
from ._tiles import (_mx_store_tile, _mx_tile_blocks, _mx_tile_integer, _part_origin,
                     _store_block_values_at, _tile_at, _tile_coords, _transformed_tile)
from .mx_rows_hadamard import mx_rows_hadamard_kernel

KIND_MX, KIND_NVFP4, KIND_FP8 = 0, 1, 2
# MODE constexpr of _bits.mx_exponent, in fp4.scaling.MX_SCALE_MODES order (floor 0, ceil 1, rceil 2, even 3).
MODES = {mode: code for code, mode in enumerate(MX_SCALE_MODES)}
# Format facts reach the kernel as launch constexprs computed here from the one format table in
# fp4.formats (_scale_constexprs): the NVFP4 tensor divisor (E4M3.max * E2M1.max = 2688), the E4M3
# fields of the block-scale byte, the E8M0 bias of MX scale bytes. (The element max a block amax is
# mapped onto is FMT_MAX of _fmt_constexprs.)
# E4M3 grid constants for the NVFP4 block scale (block exponent 0): qlo, spacing 2^-9, max 448.
E4M3_QLO, E4M3_QBITS, E4M3_MAXB = (tl.constexpr(v) for v in fixed_scale_consts(E4M3.name))


@triton.jit
def _scaled_tile(x_ptr, out_ptr, signs_ptr, scale_ptr, seed_ptr, R, C, r0, c0, gf, finite,
                 KIND: tl.constexpr, AXIS: tl.constexpr, RB: tl.constexpr, CB: tl.constexpr,
                 LOG2HB: tl.constexpr, HSCALE: tl.constexpr, HAS_SIGNS: tl.constexpr,
                 ROUND: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                 FMT_MAX: tl.constexpr, FIX_QBITS: tl.constexpr, FIX_MAXB: tl.constexpr,
                 SB_ROUND: tl.constexpr, NV_DIV: tl.constexpr, SB_MBITS: tl.constexpr,
                 SB_EMIN: tl.constexpr, IN_KIND: tl.constexpr, WRITE_SCALES: tl.constexpr,
                 TR: tl.constexpr, TC: tl.constexpr, HMODE: tl.constexpr, EVEN: tl.constexpr,
                 OFF64: tl.constexpr, DIV64: tl.constexpr):
    """NVFP4 (KIND 1) or tensor-scaled FP8 (KIND 2) of the [TR, TC] tile at (r0, c0), loaded and
    stored here, with the tensor amax gf (float32; finite False for NaN / Inf). DIV64: x / s by
    the float64 route (a tensor scale with some s outside div_f32_fma's range), else
    one reciprocal per block and FMAs per element (_bits.div_f32_fma), both correctly rounded."""
    rows, cols, offs, inb = _tile_at(R, C, r0, c0, TR, TC, OFF64)
    bits = _transformed_tile(x_ptr, signs_ptr, offs, inb, IN_KIND, AXIS, LOG2HB, HSCALE,
                             HAS_SIGNS, TR, TC, HMODE, EVEN)
    b4 = tl.reshape(bits, [TR // RB, RB, TC // CB, CB])
    a4 = b4 & 0x7FFFFFFF
    sign = b4 & (-2147483648)
    if ROUND == 1:
        rnd = tl.reshape(rand_bits(tl.load(seed_ptr), tl.program_id(2) * R + rows, c0 // 4,
                                   (C + 3) // 4, TR, TC), [TR // RB, RB, TC // CB, CB])
    else:
        rnd = a4
    x = b4.to(tl.float32, bitcast=True)
    if KIND == 1:
        am = tl.max(tl.max(a4, axis=3, keep_dims=True), axis=1, keep_dims=True)
        s_g = div_f32(gf, NV_DIV)
        safe_g = tl.where(s_g > 0, s_g, 1.0)
        ratio = div_f32(div_f32(am.to(tl.float32, bitcast=True), FMT_MAX), safe_g)
        sb = round_bits(ratio.to(tl.int32, bitcast=True) & 0x7FFFFFFF, E4M3_QLO, E4M3_QBITS,
                        E4M3_MAXB, am, SB_MBITS, SB_ROUND)
        sb = tl.where(s_g > 0, sb, 0)
        s_b = sb.to(tl.float32, bitcast=True)
        s = mul_f32(s_b, s_g)
        den = tl.where(s > 0, s, 1.0)
        # The launcher's test of s_g puts every s in div_f32_fma's range: one reciprocal a block.
        v = div_f32(x, den) if DIV64 else div_f32_fma(x, den, recip_f32(den))
        q = fixed_grid_bits(v, rnd, EMIN, FIX_QBITS, FIX_MAXB, FMT_MAX, MBITS, ROUND)
        q = tl.where(s > 0, q, 0)
        # q * s_b is exact in float32 (<= 5 significant bits, far from the subnormals).
        dq = (q | sign).to(tl.float32, bitcast=True) * s_b
        out = tl.where(finite, dq.to(tl.int32, bitcast=True), F32_NAN_BITS)
        if WRITE_SCALES:
            code = encode_minifloat(sb, SB_MBITS, SB_EMIN, 7)
            _store_block_values_at(scale_ptr, code.to(tl.uint8), R, C, r0, c0, RB, CB, TR, TC)
    else:
        s = div_f32(gf, FMT_MAX)
        s = tl.where(s == 0, 1.0, s)
        v = div_f32(x, s) if DIV64 else div_f32_fma(x, s, recip_f32(s))
        q = fixed_grid_bits(v, rnd, EMIN, FIX_QBITS, FIX_MAXB, FMT_MAX, MBITS, ROUND)
        out = tl.where(finite, q | sign, F32_NAN_BITS)
    store_bits(out_ptr, offs, tl.reshape(out, [TR, TC]), inb, IN_KIND, EVEN)


@triton.jit
def block_quant_kernel(
        x_ptr, out_ptr, signs_ptr, amax_ptr, tscale_ptr, scale_ptr, seed_ptr, R, C,
        KIND: tl.constexpr, PASS: tl.constexpr, AXIS: tl.constexpr, RB: tl.constexpr,
        CB: tl.constexpr, LOG2HB: tl.constexpr, HSCALE: tl.constexpr, HAS_SIGNS: tl.constexpr,
        MODE: tl.constexpr, ROUND: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
        EMAX: tl.constexpr, MAXN: tl.constexpr, MAXQ: tl.constexpr, LOG2N: tl.constexpr,
        NBITS: tl.constexpr, MCAP: tl.constexpr, FMT_MAX: tl.constexpr, FIX_QBITS: tl.constexpr,
        FIX_MAXB: tl.constexpr, SB_ROUND: tl.constexpr, NV_DIV: tl.constexpr, SB_MBITS: tl.constexpr,
        SB_EMIN: tl.constexpr, SB_MIN: tl.constexpr, SB_MAX: tl.constexpr, E8M0_B: tl.constexpr,
        IN_KIND: tl.constexpr, WRITE_SCALES: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr,
        HMODE: tl.constexpr, EVEN: tl.constexpr = False, OFF64: tl.constexpr = True, SUB: tl.constexpr = 1,
        RELOAD: tl.constexpr = True):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    if PASS == 0:
        rows, cols, offs, inb = _tile_coords(R, C, TR, TC, OFF64)
        bits = _transformed_tile(x_ptr, signs_ptr, offs, inb, IN_KIND, AXIS, LOG2HB, HSCALE,
                                 HAS_SIGNS, TR, TC, HMODE, EVEN)
        tl.atomic_max(amax_ptr, tl.max(tl.max(bits & 0x7FFFFFFF, axis=1), axis=0))
    elif KIND == 0:
        rows, cols, offs, inb = _tile_coords(R, C, TR, TC, OFF64)
        b4, a4, am, e = _mx_tile_blocks(x_ptr, signs_ptr, offs, inb, AXIS, RB, CB, LOG2HB, HSCALE,
                                        HAS_SIGNS, MODE, MBITS, EMAX, MCAP, IN_KIND, TR, TC, HMODE,
                                        EVEN)
        if ROUND == 1:
            rnd = tl.reshape(rand_bits(tl.load(seed_ptr), pid_b * R + rows, pid_c * (TC // 4),
                                       (C + 3) // 4, TR, TC), [TR // RB, RB, TC // CB, CB])
            mag = mx_grid_bits(a4, e, rnd, False, MBITS, EMIN, MAXN, MAXQ, LOG2N, NBITS, FMT_MAX,
                               ROUND)
            _mx_store_tile(out_ptr, scale_ptr, mag, b4, am, e, offs, inb, R, C, pid_r * TR,
                           pid_c * TC, RB, CB, E8M0_B, IN_KIND, WRITE_SCALES, TR, TC, EVEN)
        elif mx_fast_program(e, am):
            if RELOAD:
                # Read the tile again (a cache hit) rather than hold it across the block-wide
                # test: the kernel then needs a third of the registers, and more programs per
                # SM keep more bytes in flight (experiments/kernel_sass.py).
                bits = _transformed_tile(x_ptr, signs_ptr, offs, inb, IN_KIND, AXIS, LOG2HB,
                                         HSCALE, HAS_SIGNS, TR, TC, HMODE, EVEN)
                b4 = tl.reshape(bits, [TR // RB, RB, TC // CB, CB])
                a4 = b4 & 0x7FFFFFFF
            mag = mx_round_nearest(a4, e, EMIN, MBITS, FMT_MAX)
            _mx_store_tile(out_ptr, scale_ptr, mag, b4, am, e, offs, inb, R, C, pid_r * TR,
                           pid_c * TC, RB, CB, E8M0_B, IN_KIND, WRITE_SCALES, TR, TC, EVEN)
        else:
            # The integer route, SUB parts of the tile one after another (_mx_tile_integer).
            for part in range(SUB):
                r0, c0 = _part_origin(part, AXIS, TR, TC, SUB)
                _mx_tile_integer(x_ptr, out_ptr, signs_ptr, scale_ptr, R, C, r0, c0, AXIS, RB, CB,
                                 LOG2HB, HSCALE, HAS_SIGNS, MODE, MBITS, EMIN, EMAX, MAXN, MAXQ,
                                 LOG2N, NBITS, MCAP, E8M0_B, IN_KIND, WRITE_SCALES,
                                 TR // SUB if AXIS == 1 else TR, TC if AXIS == 1 else TC // SUB,
                                 HMODE, EVEN, OFF64)
    else:
        g = tl.load(amax_ptr)
        finite = g < F32_INF_BITS
        gf = g.to(tl.float32, bitcast=True)
        if KIND == 1:
            s_t = div_f32(gf, NV_DIV)
            # Every divisor s = s_b * s_g (s_b a non-zero E4M3 value, or 1 for an empty block)
            # within div_f32_fma's range.
            fma_div = div_fma_exact(s_t * SB_MIN, s_t * SB_MAX)
        else:
            s_t = div_f32(gf, FMT_MAX)
            s_t = tl.where(s_t == 0, 1.0, s_t)
            fma_div = div_fma_exact(s_t, s_t)
        if pid_r + pid_c + pid_b == 0:
            tl.store(tscale_ptr, tl.where(finite, s_t, float("nan")))
        if fma_div:
            _scaled_tile(x_ptr, out_ptr, signs_ptr, scale_ptr, seed_ptr, R, C, pid_r * TR,
                         pid_c * TC, gf, finite, KIND, AXIS, RB, CB, LOG2HB, HSCALE, HAS_SIGNS,
                         ROUND, MBITS, EMIN, FMT_MAX, FIX_QBITS, FIX_MAXB, SB_ROUND, NV_DIV,
                         SB_MBITS, SB_EMIN, IN_KIND, WRITE_SCALES, TR, TC, HMODE, EVEN, OFF64,
                         False)
        else:
            # The float64 division, SUB parts of the tile one after another (the register
            # count of this rare route would otherwise be the kernel's).
            for part in range(SUB):
                r0, c0 = _part_origin(part, AXIS, TR, TC, SUB)
                _scaled_tile(x_ptr, out_ptr, signs_ptr, scale_ptr, seed_ptr, R, C, r0, c0, gf,
                             finite, KIND, AXIS, RB, CB, LOG2HB, HSCALE, HAS_SIGNS, ROUND, MBITS,
                             EMIN, FMT_MAX, FIX_QBITS, FIX_MAXB, SB_ROUND, NV_DIV, SB_MBITS,
                             SB_EMIN, IN_KIND, WRITE_SCALES, TR // SUB if AXIS == 1 else TR,
                             TC if AXIS == 1 else TC // SUB, HMODE, EVEN, OFF64, True)


def _fmt_constexprs(elem: str):
    mbits, emin, emax, maxn, maxq, mcap = FORMATS[elem]
    _, qbits, maxb = fixed_scale_consts(elem)
    return dict(MBITS=mbits, EMIN=emin, EMAX=emax, MAXN=maxn, MAXQ=maxq,
                LOG2N=int(math.floor(math.log2(maxn))), NBITS=f32_bits(float(maxn)), MCAP=mcap,
                FMT_MAX=float(maxn) * 2.0 ** maxq, FIX_QBITS=qbits, FIX_MAXB=maxb)


def _scale_constexprs():
    """Scale-encoding constexprs from fp4.formats: NVFP4 s_g divisor, E4M3 block-scale fields and
    range (smallest non-zero and largest s_b), E8M0 bias."""
    return dict(NV_DIV=float(NVFP4_TENSOR_DIVISOR), SB_MBITS=E4M3.mbits, SB_EMIN=E4M3.emin,
                SB_MIN=E4M3.min_subnormal, SB_MAX=E4M3.max, E8M0_B=E8M0_BIAS)


def _f32_value(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


# Launch configuration per (kind is MX, kernel axis, Hadamard block, SR, block_2d):
# (TR, TC, num_warps, HMODE). Missing keys (or an entry whose tile does not fit the blocks) use
# _default_config. Chosen from `python -m fp4_experiments.bench_kernels --sweep` on an H100
# (8192^2 bf16, docs/kernels-notes.md); HMODE 1 = Hadamard along rows as a dot (axis 0 only);
# HMODE 2 = fp4.kernels.mx_rows_hadamard (MX, axis 0, HB <= 32): 36% of copy against the dot's
# 25% on an H200 (results/bench/rows_hadamard_check-h200-d75e512.txt), the same bits as HMODE 0.
TILE_CONFIG = {
    # nvfp4 (since div_f32_fma, results/bench/division_check-h200-ca735ce.txt, 65536 x 768):
    # axis=-1 34.8% -> 42.2% of copy, axis=0 19.8% -> 32.8% (16 x 64, one warp;
    # tiles_check-h200-18e4257.txt, 33.2% on 65536 x 2304).
    (False, 1, 1, False, False): (32, 128, 4, 0),
    (False, 0, 1, False, False): (16, 64, 1, 0),
    (True, 1, 1, True, False): (16, 256, 4, 0),     # sr+mxfp4 axis=-1: 42% -> 52%
    # h16+mxfp4 axis=-1: 48.6% -> 68.1% of copy on 65536 x 768 (C not a multiple of 512),
    # 56.6% -> 67.8% on 65536 x 2304 (tiles_check-h200-18e4257.txt).
    (True, 1, 16, False, False): (16, 256, 4, 0),
    (True, 1, 16, True, False): (8, 512, 4, 0),
    # HMODE 2 = fp4.kernels.mx_rows_hadamard (TR = 32 rows per MX block x blocks per program).
    # Without a transform too: 66.8% of copy against this kernel's 44.4% on llama-150m's
    # 65536 x 768 operands (results/bench/kernel_tiles_check-h200-2eb148a.txt); not under SR,
    # where the slab layout's Philox draws make it 2x slower.
    # Same file: without a transform 73.5% -> 76.6% with two MX blocks of 128 columns; h16
    # 59.4% -> 79.8% with one block of 128 columns and two warps.
    (True, 0, 1, False, False): (64, 128, 4, 2),
    (True, 0, 16, False, False): (32, 128, 2, 2),
    (True, 0, 16, True, False): (32, 256, 4, 2),
}


def _fits(config, axis, hb, rb, cb):
    tr, tc = config[:2]
    if config[3] == 2:  # the slab kernel: MX blocks of 32 rows, Hadamard blocks inside them (or none)
        return (axis == 0 and rb == MX_BLOCK and cb == 1 and 1 <= hb <= MX_BLOCK
                and tr % MX_BLOCK == 0 and tc % 4 == 0)
    if axis == 1:
        return tc % max(hb, cb) == 0 and tr % rb == 0
    return tr % max(hb, rb) == 0 and tc % cb == 0 and tc % 4 == 0


def _tile_parts(axis, tr, tc, rb, cb, hmode, parts=4):
    """SUB of block_quant_kernel: how many parts a tile's rare routes (MX integer rounding, the
    float64 division of tiny tensors) split it into, along the axis the blocks do not run (rows
    for axis 1, columns for axis 0), so that those routes do not set the kernel's register count.
    Each part holds whole blocks, whole 4-column groups of the SR draws, and >= 16 columns for
    the dot Hadamard."""
    while parts > 1:
        if axis == 1 and tr % (parts * rb) == 0:
            return parts
        if axis == 0 and tc % (parts * max(cb, 4)) == 0 and (hmode != 1 or tc // parts >= 16):
            return parts
        parts //= 2
    return 1


def _default_config(kind, axis, hb, rb, cb, rounding):
    if axis == 1:
        tc = max(128, hb, cb)
        tr = max(4096 // tc, rb)
        return tr, tc, 4, 0
    tr = max(32, hb, rb)
    tc = max(4096 // tr, cb, 16)
    return tr, tc, 4, (1 if hb > 1 else 0)


def block_shape(kind, axis, block_2d):
    """(RB, CB): the rows and columns of one scale block of the kernel's [B, R, C] view."""
    if block_2d:
        return NVFP4_BLOCK, NVFP4_BLOCK
    qb = MX_BLOCK if kind == KIND_MX else NVFP4_BLOCK
    return (1, qb) if axis == 1 else (qb, 1)


def launch_config(kind, axis, hb, rounding, block_2d):
    """The launch configuration (TR, TC, num_warps, HMODE[, RELOAD]) block_quantize uses: the
    TILE_CONFIG entry where it fits the blocks, else _default_config."""
    rb, cb = block_shape(kind, axis, block_2d)
    config = TILE_CONFIG.get((kind == KIND_MX, axis, hb, rounding == "stochastic", block_2d))
    if config is None or not _fits(config, axis, hb, rb, cb):
        config = _default_config(kind, axis, hb, rb, cb, rounding)
    return config


def block_quantize(x3: torch.Tensor, kind: int, elem: str, axis: int, mode: str = "even",
                   rounding: str = "nearest", generator=None, block_2d: bool = False,
                   hadamard_block=None, hadamard_signs=None, write_scales: bool = False,
                   config=None):
    """Launch on a contiguous [B, R, C] tensor; blocks along C (axis=1) or R (axis=0).

    Returns (x_dq [B, R, C] in x's dtype, tensor scale (0-dim fp32) or None, scale codes (uint8
    [B, ceil(R/RB), ceil(C/CB)]) or None). `config` = (TR, TC, num_warps, HMODE[, RELOAD]) overrides the
    tile (TR a multiple of the row block and of HB for axis 0, TC of CB / HB for axis 1).
    """
    assert x3.dim() == 3 and x3.is_contiguous() and axis in (0, 1)
    B, R, C = x3.shape
    in_kind = IN_KINDS[x3.dtype]
    view = KIND_VIEWS[in_kind]
    qb = MX_BLOCK if kind == KIND_MX else NVFP4_BLOCK
    rb, cb = block_shape(kind, axis, block_2d)
    hb = hadamard_block or 1
    log2hb = int(math.log2(hb))
    if config is None:
        config = launch_config(kind, axis, hb, rounding, block_2d)
    tr, tc, num_warps, hmode = config[:4]
    # Reading the tile again pays where it is only a load (80.3% of copy against 74.3% along the
    # tokens), not where the Hadamard must be recomputed too (52.8% against 61.5%; results/bench/
    # kernel_occupancy_check-h200-f8509e8.txt).
    reload = config[4] if len(config) > 4 else hb == 1
    if hmode == 2 and (kind != KIND_MX or not _fits(config, axis, hb, rb, cb)):
        raise ValueError(f"config {config}: HMODE 2 (mx_rows_hadamard) needs an MX format, "
                         f"axis 0, a Hadamard block of 32 or less (or none) and TR a multiple of 32; got "
                         f"kind {kind}, axis {axis}, Hadamard block {hb}")
    # The dot Hadamard needs a dot-sized tile (>= 16 each way) and no 2-D tiles.
    # Zero entries of its block-diagonal matrix may meet an Inf (0 * Inf = NaN) only inside one
    # MX block, so for MX the tile spans one MX block or one Hadamard block.
    if hmode == 1 and (axis != 0 or hb == 1 or tr < 16 or tc < 16 or block_2d
                       or (kind == KIND_MX and tr > max(qb, hb))):
        hmode = 0
    out = torch.empty_like(x3)
    dev = x3.device
    amax = torch.zeros(1, dtype=torch.int32, device=dev)
    tscale = torch.empty((), dtype=torch.float32, device=dev)
    nrb, ncb = -(-R // rb), -(-C // cb)
    scales = torch.empty((B, nrb, ncb) if write_scales else (1,), dtype=torch.uint8, device=dev)
    signs = (hadamard_signs.to(device=dev, dtype=torch.float32).contiguous()
             if hadamard_signs is not None else amax)
    seed = draw_seed(generator, dev) if rounding == "stochastic" else amax
    grid = (triton.cdiv(R, tr), triton.cdiv(C, tc), B)
    meta = dict(KIND=kind, AXIS=axis, RB=rb, CB=cb, LOG2HB=log2hb,
                HSCALE=_f32_value(1.0 / math.sqrt(hb)), HAS_SIGNS=hadamard_signs is not None,
                MODE=MODES[mode] if mode else 0, ROUND=1 if rounding == "stochastic" else 0,
                SB_ROUND=2 if rounding == "stochastic" else 0,
                IN_KIND=in_kind, WRITE_SCALES=write_scales, TR=tr, TC=tc, HMODE=hmode,
                # Tiles that divide the tensor need no masks; offsets below 2^31 no int64 arithmetic.
                EVEN=R % tr == 0 and C % tc == 0, OFF64=x3.numel() >= 2 ** 31,
                SUB=_tile_parts(axis, tr, tc, rb, cb, hmode), RELOAD=reload,
                num_warps=num_warps, **_fmt_constexprs(elem), **_scale_constexprs())
    if hmode == 2:
        # The slab kernel: TR = MX_BLOCK x blocks per program, so the same grid; it takes the
        # constexprs of its own signature from the same table.
        if x3.numel():
            slab_meta = {k: v for k, v in meta.items()
                         if k in mx_rows_hadamard_kernel.arg_names or k == "num_warps"}
            mx_rows_hadamard_kernel[grid](x3.view(view), out.view(view), signs, scales, seed, R, C,
                                          MB=tr // MX_BLOCK, QB=MX_BLOCK, **slab_meta)
        return out, None, (scales if write_scales else None)
    args = (x3.view(view), out.view(view), signs, amax, tscale, scales, seed, R, C)
    if kind != KIND_MX and x3.numel():
        if hb > 1:
            block_quant_kernel[grid](*args, PASS=0, **meta)
        else:
            # The global amax does not depend on the layout: one flat, vectorised pass.
            global_amax_bits(x3.view(view), in_kind, amax)
    if x3.numel():
        block_quant_kernel[grid](*args, PASS=1, **meta)
    return out, (tscale if kind != KIND_MX else None), (scales if write_scales else None)
