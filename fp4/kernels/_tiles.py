"""Tiles of a [B, R, C] operand, shared by the block kernel (mx_quant) and the slab kernel
(mx_rows_hadamard): where a tile lies, its (Hadamard-transformed) bits, the store of one value per
block, and MX round-to-nearest of a tile by integer arithmetic alone -- the rare route of programs
with a tiny or huge block exponent, which both kernels run on parts of their tile (see mx_quant's
"Registers decide the speed").

The butterflies pair elements through a size-2 axis of a reshape; along the rows they may instead
be one IEEE float32 dot with the block-diagonal +-1 matrix (HMODE 1). Both give the slab kernel's
bits wherever the float32 sums are exact, and the butterflies give them on every input.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._bits import F32_INF_BITS, F32_NAN_BITS, load_bits, mx_exponent, mx_grid_bits, store_bits


@triton.jit
def _butterfly(f, H: tl.constexpr, AXIS: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr):
    """One Walsh-Hadamard stage on the tile: pairs (i, i + H) along the axis -> (a + b, a - b)."""
    sel = tl.arange(0, 2)
    if AXIS == 1:
        y = tl.reshape(f, [TR, TC // (2 * H), 2, H])
        s4 = sel[None, None, :, None]
        # Summing against -0.0 selects one half exactly (x + -0.0 == x, signed zeros kept).
        lo = tl.sum(tl.where(s4 == 0, y, -0.0), axis=2, keep_dims=True)
        hi = tl.sum(tl.where(s4 == 1, y, -0.0), axis=2, keep_dims=True)
    else:
        y = tl.reshape(f, [TR // (2 * H), 2, H, TC])
        s4 = sel[None, :, None, None]
        lo = tl.sum(tl.where(s4 == 0, y, -0.0), axis=1, keep_dims=True)
        hi = tl.sum(tl.where(s4 == 1, y, -0.0), axis=1, keep_dims=True)
    y = tl.where(s4 == 0, lo + hi, lo - hi)
    return tl.reshape(y, [TR, TC])


@triton.jit
def _hadamard_rows_dot(f, LOG2HB: tl.constexpr, TR: tl.constexpr):
    """Block Hadamard along the rows of an fp32 [TR, TC] tile as one IEEE fp32 dot with the
    block-diagonal +-1 matrix (HB x HB blocks): Y = Hbd @ f. Entries are exactly +-1 or 0, so
    every FMA is an exact add of +-x (or of a zero product); the result equals the butterflies
    wherever the float32 sums are exact. Zero entries meet only rows of the same 32-row MX
    block (or of a tensor-scaled operand, where any Inf/NaN poisons everything anyway)."""
    i = tl.arange(0, TR)[:, None]
    j = tl.arange(0, TR)[None, :]
    p = i & j & ((1 << LOG2HB) - 1)
    p = p ^ (p >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    h = tl.where((p & 1) == 0, 1.0, -1.0)
    h = tl.where((i >> LOG2HB) == (j >> LOG2HB), h, 0.0)
    return tl.dot(h, f, input_precision="ieee")


@triton.jit
def _transformed_tile(x_ptr, signs_ptr, offs, inb, IN_KIND: tl.constexpr, AXIS: tl.constexpr,
                      LOG2HB: tl.constexpr, HSCALE: tl.constexpr, HAS_SIGNS: tl.constexpr,
                      TR: tl.constexpr, TC: tl.constexpr, HMODE: tl.constexpr = 0,
                      EVEN: tl.constexpr = False):
    """float32 bits of the (optionally Hadamard-transformed) [TR, TC] tile; pad positions 0."""
    bits = load_bits(x_ptr, offs, inb, IN_KIND, EVEN)
    if LOG2HB > 0:
        f = bits.to(tl.float32, bitcast=True)
        if HAS_SIGNS:
            # Tiles start at multiples of the Hadamard block, so the position inside a block
            # is the tile-local index modulo HB.
            if AXIS == 1:
                f = f * tl.load(signs_ptr + tl.arange(0, TC) % (1 << LOG2HB))[None, :]
            else:
                f = f * tl.load(signs_ptr + tl.arange(0, TR) % (1 << LOG2HB))[:, None]
        f = f * HSCALE
        if HMODE == 1 and AXIS == 0:
            f = _hadamard_rows_dot(f, LOG2HB, TR)
        else:
            for st in tl.static_range(LOG2HB):
                f = _butterfly(f, 1 << st, AXIS, TR, TC)
        if EVEN:
            bits = f.to(tl.int32, bitcast=True)
        else:
            bits = tl.where(inb, f, 0.0).to(tl.int32, bitcast=True)
    return bits


@triton.jit
def _tile_at(R, C, r0, c0, TR: tl.constexpr, TC: tl.constexpr, OFF64: tl.constexpr = True):
    """The [TR, TC] tile at element (r0, c0) of matrix tl.program_id(2) of a contiguous [B, R, C]
    tensor: (rows, cols, element offsets, in-bounds mask). OFF64 False: the launcher knows every
    offset fits an int32 (cheaper address arithmetic)."""
    rows = r0 + tl.arange(0, TR)
    cols = c0 + tl.arange(0, TC)
    if OFF64:
        offs = tl.program_id(2).to(tl.int64) * R * C + rows[:, None].to(tl.int64) * C + cols[None, :]
    else:
        offs = tl.program_id(2) * R * C + rows[:, None] * C + cols[None, :]
    return rows, cols, offs, (rows[:, None] < R) & (cols[None, :] < C)


@triton.jit
def _tile_coords(R, C, TR: tl.constexpr, TC: tl.constexpr, OFF64: tl.constexpr = True):
    """This program's [TR, TC] tile (program ids (row tile, column tile, b)): see _tile_at."""
    return _tile_at(R, C, tl.program_id(0) * TR, tl.program_id(1) * TC, TR, TC, OFF64)


@triton.jit
def _store_block_values_at(ptr, v, R, C, r0, c0, RB: tl.constexpr, CB: tl.constexpr,
                           TR: tl.constexpr, TC: tl.constexpr):
    """Store one value per [RB, CB] block of the [TR, TC] tile at element (r0, c0) (v:
    [TR//RB, 1, TC//CB, 1]) to the row-major [B, ceil(R/RB), ceil(C/CB)] array at ptr: the block
    scales."""
    nrb = (R + RB - 1) // RB
    ncb = (C + CB - 1) // CB
    rb = (r0 // RB + tl.arange(0, TR // RB))[:, None, None, None]
    cb = (c0 // CB + tl.arange(0, TC // CB))[None, None, :, None]
    tl.store(ptr + tl.program_id(2).to(tl.int64) * nrb * ncb + rb * ncb + cb, v,
             mask=(rb < nrb) & (cb < ncb))


@triton.jit
def _store_block_values(ptr, v, R, C, RB: tl.constexpr, CB: tl.constexpr, TR: tl.constexpr,
                        TC: tl.constexpr):
    """_store_block_values_at for this program's tile."""
    _store_block_values_at(ptr, v, R, C, tl.program_id(0) * TR, tl.program_id(1) * TC, RB, CB, TR, TC)


@triton.jit
def _part_origin(part, AXIS: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr, SUB: tl.constexpr):
    """Element origin (r0, c0) of part `part` of this program's [TR, TC] tile split SUB ways
    along the axis the blocks do not run (rows for AXIS 1, columns for AXIS 0); the part is
    [TR // SUB, TC] or [TR, TC // SUB]."""
    r0 = tl.program_id(0) * TR
    c0 = tl.program_id(1) * TC
    if AXIS == 1:
        r0 = r0 + part * (TR // SUB)
    else:
        c0 = c0 + part * (TC // SUB)
    return r0, c0


@triton.jit
def _mx_tile_blocks(x_ptr, signs_ptr, offs, inb, AXIS: tl.constexpr, RB: tl.constexpr,
                    CB: tl.constexpr, LOG2HB: tl.constexpr, HSCALE: tl.constexpr,
                    HAS_SIGNS: tl.constexpr, MODE: tl.constexpr, MBITS: tl.constexpr,
                    EMAX: tl.constexpr, MCAP: tl.constexpr, IN_KIND: tl.constexpr,
                    TR: tl.constexpr, TC: tl.constexpr, HMODE: tl.constexpr, EVEN: tl.constexpr):
    """(b4, a4, am, e) of a [TR, TC] tile: its (transformed) bits as [TR/RB, RB, TC/CB, CB]
    blocks, their magnitudes, each block's amax bits and E8M0 exponent."""
    bits = _transformed_tile(x_ptr, signs_ptr, offs, inb, IN_KIND, AXIS, LOG2HB, HSCALE,
                             HAS_SIGNS, TR, TC, HMODE, EVEN)
    b4 = tl.reshape(bits, [TR // RB, RB, TC // CB, CB])
    a4 = b4 & 0x7FFFFFFF
    am = tl.max(tl.max(a4, axis=3, keep_dims=True), axis=1, keep_dims=True)
    return b4, a4, am, mx_exponent(am, MODE, MBITS, EMAX, MCAP)


@triton.jit
def _mx_store_tile(out_ptr, scale_ptr, mag, b4, am, e, offs, inb, R, C, r0, c0,
                   RB: tl.constexpr, CB: tl.constexpr, E8M0_B: tl.constexpr,
                   IN_KIND: tl.constexpr, WRITE_SCALES: tl.constexpr, TR: tl.constexpr,
                   TC: tl.constexpr, EVEN: tl.constexpr):
    """Store the MX tile at (r0, c0): grid magnitudes `mag` with x's signs (NaN for a block whose
    amax is NaN / Inf), then, with WRITE_SCALES, the E8M0 codes (0xFF for such a block)."""
    out = tl.where(am >= F32_INF_BITS, F32_NAN_BITS, mag | (b4 & (-2147483648)))
    store_bits(out_ptr, offs, tl.reshape(out, [TR, TC]), inb, IN_KIND, EVEN)
    if WRITE_SCALES:
        code = tl.where(am >= F32_INF_BITS, 255, e + E8M0_B)
        _store_block_values_at(scale_ptr, code.to(tl.uint8), R, C, r0, c0, RB, CB, TR, TC)


@triton.jit
def _mx_tile_integer(x_ptr, out_ptr, signs_ptr, scale_ptr, R, C, r0, c0, AXIS: tl.constexpr,
                     RB: tl.constexpr, CB: tl.constexpr, LOG2HB: tl.constexpr, HSCALE: tl.constexpr,
                     HAS_SIGNS: tl.constexpr, MODE: tl.constexpr, MBITS: tl.constexpr,
                     EMIN: tl.constexpr, EMAX: tl.constexpr, MAXN: tl.constexpr, MAXQ: tl.constexpr,
                     LOG2N: tl.constexpr, NBITS: tl.constexpr, MCAP: tl.constexpr,
                     E8M0_B: tl.constexpr, IN_KIND: tl.constexpr, WRITE_SCALES: tl.constexpr,
                     TR: tl.constexpr, TC: tl.constexpr, HMODE: tl.constexpr, EVEN: tl.constexpr,
                     OFF64: tl.constexpr):
    """MX round-to-nearest of the [TR, TC] tile at (r0, c0) by integer arithmetic alone
    (round_bits on each block's grid), loaded and stored by itself: the route of programs with a
    tiny or huge block exponent, run on a part of the program's tile at a time so that this rare
    route does not set the kernel's register count (and with it the programs per SM)."""
    rows, cols, offs, inb = _tile_at(R, C, r0, c0, TR, TC, OFF64)
    b4, a4, am, e = _mx_tile_blocks(x_ptr, signs_ptr, offs, inb, AXIS, RB, CB, LOG2HB, HSCALE,
                                    HAS_SIGNS, MODE, MBITS, EMAX, MCAP, IN_KIND, TR, TC, HMODE,
                                    EVEN)
    mag = mx_grid_bits(a4, e, a4, False, MBITS, EMIN, MAXN, MAXQ, LOG2N, NBITS, 0.0, 0)  # (no FMT_MAX on this route)
    _mx_store_tile(out_ptr, scale_ptr, mag, b4, am, e, offs, inb, R, C, r0, c0, RB, CB, E8M0_B,
                   IN_KIND, WRITE_SCALES, TR, TC, EVEN)
