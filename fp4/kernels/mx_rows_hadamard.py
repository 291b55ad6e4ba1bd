"""MX quantize-dequantize along the token axis with the block Hadamard fused: the Wgrad operands
of an H16 / random-Hadamard recipe (dY and X, blocks of 32 rows), in one register-local pass.

Why a kernel of its own. mx_quant.block_quant_kernel transforms a [TR, TC] tile whose rows
are spread over threads and warps: its butterflies pair rows through reshapes and reductions
that Triton lowers to shared-memory exchanges, and its dot variant (HMODE 1) spends 32 FMAs per
element on a mostly-zero block-diagonal matrix. The compiled llama-150m wgrad+h16 step spent 41%
of its GPU time there at 37% of copy bandwidth (results/bench/nvidia-h200-issue12-e54ba26.md).

Layout. One program owns MB MX blocks of rows (32 * MB rows) by TC columns and holds the tile as
32 register tensors ("slabs") of shape [MB, TC]: slab s holds rows 32 * m + s. A slab is loaded
with rows contiguous along C (coalesced, vectorised), and every step after the load is
elementwise across slabs, i.e. inside one thread:
  1. x * signs[s % HB] * fl32(1/sqrt(HB)) (the same two multiplications as mx_quant);
  2. log2(HB) butterfly stages in float32, stage st pairing slabs (s, s + 2^st) into
     (a + b, a - b): the pairs, the order and the operations of mx_quant._butterfly, so the
     result is the same bits as mx_quant's butterfly path (HMODE 0) on every input, and equals
     the reference wherever the float32 sums are exact (its matmul has its own order);
  3. rows past R were loaded as zeros (the reference's zero padding) and are zeroed again after
     the transform, then never stored;
  4. the block amax is the integer max of |bits| over the 32 slabs, and the E8M0 exponent and
     the element rounding are mx_quant's (fp4.kernels._bits.mx_grid_bits: float32 magic-number
     rounding where every block exponent of the program is moderate, integer rounding
     otherwise), once per block and per slab. A program that needs the integer route runs it on
     SUB column parts of its tile through mx_quant's tile code (fp4.kernels._tiles), which gives
     the same bits; without a transform the fast route reads the slabs again after the
     program-wide test (RELOAD) rather than hold them: registers, hence programs per SM.
Stochastic rounding draws the same Philox bits per (global row, 4-column group) as mx_quant, so
the same seed gives the same result whichever kernel ran.

HB divides the 32-row MX block (2..32): a Hadamard block never straddles an MX block, so the
slabs of one program are closed under the butterflies. HB = 1 is plain MX along the tokens: the
block amax is still a max across slabs inside one thread, where mx_quant's tile reduces across
threads.

Launch facts as constexprs (block_quantize): EVEN when the tiles divide the tensor (no masks,
no re-zeroing of padding), OFF64 only for tensors of 2^31 elements or more (int32 offsets
otherwise): fewer instructions per element, the same bits.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._bits import (F32_INF_BITS, F32_NAN_BITS, load_bits, mx_exponent, mx_fast_program,
                    mx_grid_bits, mx_round_nearest, rand_bits, store_bits)
from ._tiles import _mx_tile_integer


@triton.jit
def _slab_butterflies(xs, LOG2HB: tl.constexpr, QB: tl.constexpr):
    """The Walsh-Hadamard stages across the QB slabs: stage st maps the pair (i, i + 2^st) to
    (a + b, a - b), as mx_quant._butterfly does along a tile axis."""
    for st in tl.static_range(LOG2HB):
        ys = ()
        for i in tl.static_range(QB):
            if ((i >> st) & 1) == 0:
                ys = ys + (xs[i] + xs[i + (1 << st)],)
            else:
                ys = ys + (xs[i - (1 << st)] - xs[i],)
        xs = ys
    return xs


@triton.jit
def _slab_bits(x_ptr, signs_ptr, offs0, blk, cols, R, C, LOG2HB: tl.constexpr,
               HSCALE: tl.constexpr, HAS_SIGNS: tl.constexpr, IN_KIND: tl.constexpr,
               MB: tl.constexpr, TC: tl.constexpr, QB: tl.constexpr, EVEN: tl.constexpr):
    """(the QB slabs' float32 bits after the transform, the [MB, TC] block amax) of the tile of
    MX blocks `blk` by columns `cols` (offs0: the offsets of each block's first row)."""
    in_c = cols[None, :] < C
    xs = ()
    for s in tl.static_range(QB):
        rows = blk * QB + s
        f = load_bits(x_ptr, offs0 + s * C, (rows[:, None] < R) & in_c, IN_KIND,
                      EVEN).to(tl.float32, bitcast=True)
        if HAS_SIGNS:
            f = f * tl.load(signs_ptr + s % (1 << LOG2HB))
        if LOG2HB > 0:
            f = f * HSCALE
        xs = xs + (f,)
    xs = _slab_butterflies(xs, LOG2HB, QB)
    bits = ()
    am = tl.zeros([MB, TC], dtype=tl.int32)
    for s in tl.static_range(QB):
        if EVEN or LOG2HB == 0:  # no transform: padding loaded as 0 stays 0
            b = xs[s].to(tl.int32, bitcast=True)
        else:
            b = tl.where(((blk * QB + s)[:, None] < R) & in_c, xs[s], 0.0).to(tl.int32, bitcast=True)
        am = tl.maximum(am, b & 0x7FFFFFFF)
        bits = bits + (b,)
    return bits, am


@triton.jit
def _slab_offsets(blk, cols, R, C, QB: tl.constexpr, OFF64: tl.constexpr):
    if OFF64:
        offs0 = (tl.program_id(2).to(tl.int64) * R * C + (blk * QB).to(tl.int64)[:, None] * C
                 + cols[None, :])
    else:  # the launcher's promise: every offset fits an int32 (cheaper address arithmetic)
        offs0 = tl.program_id(2) * R * C + (blk * QB)[:, None] * C + cols[None, :]
    return offs0


@triton.jit
def _slab_store(out_ptr, scale_ptr, bits, e, bad, offs0, blk, cols, R, C, seed,
                ROUTE: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, MAXN: tl.constexpr,
                MAXQ: tl.constexpr, LOG2N: tl.constexpr, NBITS: tl.constexpr,
                FMT_MAX: tl.constexpr, E8M0_B: tl.constexpr, IN_KIND: tl.constexpr,
                WRITE_SCALES: tl.constexpr, MB: tl.constexpr, TC: tl.constexpr, QB: tl.constexpr,
                EVEN: tl.constexpr):
    """Round every slab onto its block's grid and store it, then the scale codes. ROUTE 0: float32
    round-to-nearest (every block exponent of the program moderate), 1: stochastic."""
    in_c = cols[None, :] < C
    for s in tl.static_range(QB):
        rows = blk * QB + s
        a = bits[s] & 0x7FFFFFFF
        if ROUTE == 1:
            rnd = rand_bits(seed, tl.program_id(2) * R + rows, tl.program_id(1) * (TC // 4),
                            (C + 3) // 4, MB, TC)
            mag = mx_grid_bits(a, e, rnd, False, MBITS, EMIN, MAXN, MAXQ, LOG2N, NBITS, FMT_MAX, 1)
        else:
            mag = mx_round_nearest(a, e, EMIN, MBITS, FMT_MAX)
        out = tl.where(bad, F32_NAN_BITS, mag | (bits[s] & (-2147483648)))
        store_bits(out_ptr, offs0 + s * C, out, (rows[:, None] < R) & in_c, IN_KIND, EVEN)
    if WRITE_SCALES:
        nblk = (R + QB - 1) // QB
        code = tl.where(bad, 255, e + E8M0_B).to(tl.uint8)
        tl.store(scale_ptr + tl.program_id(2).to(tl.int64) * nblk * C + blk[:, None] * C
                 + cols[None, :], code, mask=(blk[:, None] < nblk) & in_c)


@triton.jit
def mx_rows_hadamard_kernel(
        x_ptr, out_ptr, signs_ptr, scale_ptr, seed_ptr, R, C,
        LOG2HB: tl.constexpr, HSCALE: tl.constexpr, HAS_SIGNS: tl.constexpr, MODE: tl.constexpr,
        ROUND: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
        MAXN: tl.constexpr, MAXQ: tl.constexpr, LOG2N: tl.constexpr, NBITS: tl.constexpr,
        MCAP: tl.constexpr, FMT_MAX: tl.constexpr, E8M0_B: tl.constexpr, IN_KIND: tl.constexpr,
        WRITE_SCALES: tl.constexpr, MB: tl.constexpr, TC: tl.constexpr, QB: tl.constexpr,
        EVEN: tl.constexpr = False, OFF64: tl.constexpr = True, SUB: tl.constexpr = 1,
        RELOAD: tl.constexpr = True):
    blk = tl.program_id(0) * MB + tl.arange(0, MB)  # MX block index along R (QB rows each)
    cols = tl.program_id(1) * TC + tl.arange(0, TC)
    offs0 = _slab_offsets(blk, cols, R, C, QB, OFF64)
    bits, am = _slab_bits(x_ptr, signs_ptr, offs0, blk, cols, R, C, LOG2HB, HSCALE, HAS_SIGNS,
                          IN_KIND, MB, TC, QB, EVEN)
    e = mx_exponent(am, MODE, MBITS, EMAX, MCAP)
    bad = am >= F32_INF_BITS
    if ROUND == 1:
        _slab_store(out_ptr, scale_ptr, bits, e, bad, offs0, blk, cols, R, C, tl.load(seed_ptr),
                    1, MBITS, EMIN, MAXN, MAXQ, LOG2N, NBITS, FMT_MAX, E8M0_B, IN_KIND,
                    WRITE_SCALES, MB, TC, QB, EVEN)
    elif mx_fast_program(e, am):
        if RELOAD:
            # Load (and transform) the tile again, a cache hit, rather than hold it across the
            # program-wide test: fewer registers, more programs per SM (mx_quant's RELOAD).
            bits, am = _slab_bits(x_ptr, signs_ptr, offs0, blk, cols, R, C, LOG2HB, HSCALE,
                                  HAS_SIGNS, IN_KIND, MB, TC, QB, EVEN)
        _slab_store(out_ptr, scale_ptr, bits, e, bad, offs0, blk, cols, R, C, 0, 0, MBITS, EMIN,
                    MAXN, MAXQ, LOG2N, NBITS, FMT_MAX, E8M0_B, IN_KIND, WRITE_SCALES, MB, TC, QB,
                    EVEN)
    else:
        # The integer route, SUB column parts of the tile one after another, as mx_quant's tile
        # (its butterflies give this kernel's bits on every input): a small body to compile.
        for part in range(SUB):
            _mx_tile_integer(x_ptr, out_ptr, signs_ptr, scale_ptr, R, C, tl.program_id(0) * MB * QB,
                             tl.program_id(1) * TC + part * (TC // SUB), 0, QB, 1, LOG2HB, HSCALE,
                             HAS_SIGNS, MODE, MBITS, EMIN, EMAX, MAXN, MAXQ, LOG2N, NBITS, MCAP,
                             E8M0_B, IN_KIND, WRITE_SCALES, MB * QB, TC // SUB, 0, EVEN, OFF64)
