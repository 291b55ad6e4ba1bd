"""Rounding of float32 bit patterns: the subnormal-safe core of every kernel, with a float32
fast route where it is provably the same.

Why integers. GPU code may flush float32 subnormals to zero (libdevice under Triton's
nvvm-reflect-ftz, `.ftz` instruction variants, fast-math in generated code). MX scaling lives
at the bottom of the float32 range: the smallest E8M0 scale 2^-127 is itself a subnormal, and
a gradient block whose amax is subnormal needs it. A quantizer that materialises 2^e as a float
(exp2, ldexp) or multiplies a subnormal by a scale can turn such a block into scale 0 and then
0/0 = NaN. Here no float operation ever sees a subnormal operand on the MX path:

- the block amax is an integer max of |x| bit patterns (for finite non-negative floats the bit
  pattern order is the value order, and NaN/Inf bit patterns sort above every finite one);
- floor(log2 amax) comes from the exponent field; a subnormal amax is normalised by converting
  its integer mantissa to float (an int->float conversion, exact below 2^24, no subnormal
  operand), i.e. amax = m * 2^-149 = float(m) * 2^-149;
- an element is rounded onto the scaled grid *in x's own units*: the grid point spacing at
  |x| is 2^Q with Q = max(floor(log2|x|), e + emin) - mbits, and rounding to a multiple of 2^Q
  is integer arithmetic on the bit pattern (see `round_bits`), which is linear in the value
  inside a binade and across the subnormal range, and whose mantissa carry moves into the
  next binade by itself. The result *is* q * 2^e: nothing is ever multiplied by 2^e.
- bit patterns of 2^k and n * 2^k (k down to -149) are assembled from integer fields.

So the MX kernels are exact and identical on any device for every finite input, including
subnormal ones, and under TRITON_INTERPRET=1 (numpy, which keeps subnormals) they compute
the same bits.

The float route (round_nearest_f32, mx_round_nearest). The integer rounding costs ~22 integer
instructions an element, and Hopper issues integer ops at half the float32 rate, which bound the
quantizers (results/bench/README.md, ninth session). Round-to-nearest is also two float32
additions, (v + B) - B with B = 2^(spacing exponent + 23), on v = |x| / scale. It is taken only
where it gives round_bits' bits whether or not float32 subnormals are flushed: for NVFP4 / FP8
elements after their division (v is at most ~max, and a subnormal v rounds to 0 either way), and
for MX in programs whose non-zero blocks all have |e| <= FAST_E_MAX (there v = |x| * 2^-e, 2^e
and q * 2^e are normal wherever the result is non-zero). Other programs (tiny or huge blocks,
NaN / Inf) and stochastic rounding keep the integer route.

Paths that need a division by an arbitrary float32 scale (NVFP4, FP8) emulate the float32
division as float64 division rounded to float32: float64 has more than 2*24+2 significand bits,
so that double rounding equals one correctly rounded float32 division (Figueroa), Triton lowers
float64 division to IEEE `div.rn.f64` (its float32 `/` is the approximate `div.full.f32`), and
flush-to-zero never applies to float64.

Format descriptors (FORMATS): mbits, emin (exponent of the smallest normal binade; below it the
spacing stays 2^(emin - mbits)), emax_elem = floor(log2 max), and max = maxn * 2^maxq with maxn
a small odd integer so that max * 2^e can be assembled exactly, plus mcap, the 23-bit mantissa
of max / 2^emax_elem (rceil compares the amax mantissa against it).
"""
from __future__ import annotations

import struct

import triton
import triton.language as tl

from ..formats import E8M0_MAX, E8M0_MIN, ELEMENT_FORMATS, ElementFormat

ROUND_NEAREST, ROUND_STOCHASTIC, ROUND_UP = 0, 1, 2
# Globals read inside @triton.jit functions must be constexpr.
F32_INF_BITS = tl.constexpr(0x7F800000)
F32_NAN_BITS = tl.constexpr(0x7FC00000)
E8M0_LO, E8M0_HI = tl.constexpr(E8M0_MIN), tl.constexpr(E8M0_MAX)


def _kernel_descriptor(fmt: ElementFormat):
    """(mbits, emin, emax, maxn, maxq, mcap) of an element grid, derived from fp4.formats.

    max = maxn * 2^maxq with maxn odd (so max * 2^e is assembled from integer fields), and mcap is
    the 23-bit float32 mantissa of max / 2^emax_elem. E.g. e2m1: max 6 = 3 * 2^1 = 1.5 * 2^2 ->
    (1, 0, 2, 3, 1, 0x400000); e4m3: 448 = 7 * 2^6 = 1.75 * 2^8 -> (3, -6, 8, 7, 6, 0x600000)."""
    maxn, maxq = fmt.max, 0
    while maxn != int(maxn):
        maxn, maxq = maxn * 2, maxq - 1
    while int(maxn) % 2 == 0:
        maxn, maxq = maxn / 2, maxq + 1
    mcap = int((fmt.max / 2.0 ** fmt.emax_elem - 1.0) * 2 ** 23)
    return fmt.mbits, fmt.emin, fmt.emax_elem, int(maxn), maxq, mcap


# Kernel descriptors of every element grid: mbits emin emax maxn maxq mcap.
FORMATS = {name: _kernel_descriptor(fmt) for name, fmt in ELEMENT_FORMATS.items()}


def f32_bits(value: float) -> int:
    """Host-side float32 bit pattern of a Python float (for constexpr constants)."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def fixed_scale_consts(fmt: str):
    """(qlo, qbits, maxb) for rounding an already-scaled value (block exponent e = 0)."""
    mbits, emin, _, maxn, maxq, _ = FORMATS[fmt]
    return emin + 127, f32_bits(2.0 ** (emin - mbits)), f32_bits(float(maxn) * 2.0 ** maxq)


@triton.jit
def pow2_bits(k):
    """float32 bits of 2^k for int32 k in [-149, 127], assembled from fields (never exp2)."""
    sub = 1 << tl.minimum(tl.maximum(k + 149, 0), 22)
    return tl.where(k >= -126, (k + 127) << 23, sub)


@triton.jit
def scaled_int_bits(k, MAXN: tl.constexpr, LOG2N: tl.constexpr, NBITS: tl.constexpr):
    """float32 bits of MAXN * 2^k (MAXN a small integer constant, NBITS its float32 bits).

    Normal results add k to the exponent field of float(MAXN); subnormal ones are the integer
    MAXN shifted into place; a result past the float32 range gives +Inf bits (only reachable
    for a scale that itself overflows, where no finite element can exceed it).
    """
    top = k + LOG2N
    normal = NBITS + (tl.minimum(k, 127) << 23)
    sub = MAXN << tl.minimum(tl.maximum(k + 149, 0), 22)
    bits = tl.where(top >= -126, normal, sub)
    return tl.where(top >= 128, 0x7F800000, bits)


@triton.jit
def grid_split(a, qlo, MBITS: tl.constexpr):
    """(s, sc, mask, sig) of magnitudes `a` (finite float32 bits) against the grid whose smallest
    normal binade has exponent field qlo: s the significand bits below the grid spacing (see
    round_bits), sc = min(s, 23), mask the low sc bits, sig the 24-bit significand (hidden bit
    included). Shared by round_bits and the kernels' own rounding rules."""
    expf = a >> 23
    ep = tl.maximum(expf, 1)
    s = tl.maximum(expf, qlo) - ep + (23 - MBITS)
    sc = tl.minimum(s, 23)
    return s, sc, (1 << sc) - 1, a - ((ep - 1) << 23)


@triton.jit
def round_bits(a, qlo, qbits, maxb, rnd, MBITS: tl.constexpr, ROUND: tl.constexpr):
    """Round magnitudes onto a scaled grid; all operands int32 float32-bit patterns.

    a      |x| bits, finite (NaN is the caller's business)
    qlo    biased exponent field of the grid's smallest normal binade: e + emin + 127 (>= 0)
    qbits  bits of the subnormal grid spacing 2^(e + emin - mbits)
    maxb   bits of the grid max * 2^e (saturation threshold; a >= maxb gives maxb)
    rnd    int32 random bits (stochastic rounding only)
    Returns the bits of the grid point (q * 2^e), non-negative.

    s is the number of low bits of the 24-bit significand (sig = mantissa with the hidden bit,
    value = sig * 2^(max(expf,1) - 150)) below the grid spacing. For s <= 23 rounding the bit
    pattern itself at bit s is exact: the pattern is linear in the value inside a binade and
    over the subnormals, and a carry out of the mantissa lands on the next binade's leading
    point, which is a grid point. For s >= 24 the value is below one spacing: the result is
    0 or exactly one spacing (qbits).
    """
    s, sc, mask, sig = grid_split(a, qlo, MBITS)
    if ROUND == 0:
        # RNE: add half - 1 plus the kept LSB, truncate; a tie rounds to the even neighbour.
        # The parity is taken from the significand (hidden bit included), not from the pattern:
        # at s = 23 the pattern's bit 23 is the exponent's LSB, while the grid index of the
        # binade's leading point 2^(expf-127) is odd (e.g. 0.75 -> 1.0, not 0.5, for e2m1).
        lsb = (sig >> sc) & 1
        norm = (a + (mask >> 1) + lsb) & ~mask
        tiny = tl.where((s == 24) & (sig > 0x800000), qbits, 0)
    elif ROUND == 1:
        # Up with probability (dropped bits) / 2^s: exact at the bits' resolution.
        up = (rnd & mask) < (a & mask)
        norm = (a & ~mask) + tl.where(up, mask + 1, 0)
        d = tl.minimum(tl.maximum(s - 24, 0), 31)
        tiny = tl.where((rnd & 0xFFFFFF) < (sig >> d), qbits, 0)
    else:
        norm = (a & ~mask) + tl.where((a & mask) != 0, mask + 1, 0)
        tiny = tl.where(sig != 0, qbits, 0)
    res = tl.where(s <= 23, norm, tiny)
    return tl.where(a >= maxb, maxb, res)


# A program whose MX block exponents all lie in [-FAST_E_MAX, FAST_E_MAX] rounds by float32
# arithmetic (mx_round_nearest); any other program (tiny or huge blocks, NaN / Inf) by round_bits.
FAST_E_MAX = tl.constexpr(100)


@triton.jit
def round_nearest_f32(v, EMIN: tl.constexpr, MBITS: tl.constexpr, FMT_MAX: tl.constexpr):
    """RNE of float32 magnitudes v (finite, >= 0, < 2^104) onto the element grid of block
    exponent 0 (spacing 2^(max(floor(log2 v), EMIN) - MBITS)), saturated at FMT_MAX: the value
    round_bits gives for the same grid, in about a third of the instructions.

    Magic-number rounding: with B = 2^(Q + 23) for the spacing 2^Q at v, every float32 in
    [B, 2B) is a multiple of 2^Q, so the IEEE addition v + B rounds v to that multiple (to the
    even multiple on a tie: the even grid index, as round_bits breaks ties), and subtracting B
    is exact. B is a normal float32 for every v here, and a subnormal v (which any flushing of
    float32 subnormals would turn into a zero of its sign) lies far below half the smallest
    spacing of every grid (E5M2: 2^-17), so it rounds to 0 either way. Callers put the sign back
    from x's own bits."""
    expv = v.to(tl.int32, bitcast=True) >> 23
    big = ((tl.maximum(expv, EMIN + 127) + (23 - MBITS)) << 23).to(tl.float32, bitcast=True)
    return tl.minimum((v + big) - big, FMT_MAX)


@triton.jit
def mx_round_nearest(a, e, EMIN: tl.constexpr, MBITS: tl.constexpr, FMT_MAX: tl.constexpr):
    """Bits of the RNE grid point q * 2^e of |x| bits `a` in a block of exponent e, for blocks
    with |e| <= FAST_E_MAX (the caller's program-level test): round_bits(a, e + emin + 127, ...)
    for those blocks, by float32 arithmetic.

    v = |x| * 2^-e is exact for every |x| that can round to a non-zero grid point (|x| >=
    2^(e + emin - mbits - 1) >= 2^-118: normal, and v >= 2^(emin - mbits - 1) too); a smaller
    |x|, a subnormal one included, gives a v below half the smallest spacing, which rounds to 0
    however it was computed (flushed or not). q * 2^e is exact and normal: q <= FMT_MAX < 2^16,
    and a non-zero q >= 2^(emin - mbits) >= 2^-17 times 2^e >= 2^-100. 2^e and 2^-e are normal
    floats assembled from their exponent fields."""
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    p = ((127 + e) << 23).to(tl.float32, bitcast=True)
    r = round_nearest_f32(a.to(tl.float32, bitcast=True) * inv, EMIN, MBITS, FMT_MAX)
    return (r * p).to(tl.int32, bitcast=True)


@triton.jit
def mx_fast_program(e, am):
    """The scalar `fast` of mx_grid_bits: every block of the program with a non-zero amax has
    |e| <= FAST_E_MAX. All-zero blocks (the tile's padding among them; e = -127) do not count:
    both routes give 0 there (2^127 and 2^-127 = 0.0 on the float route)."""
    em = tl.where(am == 0, 0, e)
    return (tl.min(em) >= -FAST_E_MAX) & (tl.max(em) <= FAST_E_MAX)


@triton.jit
def mx_grid_bits(a, e, rnd, fast, MBITS: tl.constexpr, EMIN: tl.constexpr, MAXN: tl.constexpr,
                 MAXQ: tl.constexpr, LOG2N: tl.constexpr, NBITS: tl.constexpr,
                 FMT_MAX: tl.constexpr, ROUND: tl.constexpr):
    """Bits of the grid point q * 2^e for |x| bits `a` in MX blocks of exponent e: the float32
    route (mx_round_nearest) for round-to-nearest where `fast` (a scalar: every block exponent
    of the program within +-FAST_E_MAX), otherwise round_bits on the block's grid."""
    if ROUND == 0:
        if fast:
            mag = mx_round_nearest(a, e, EMIN, MBITS, FMT_MAX)
        else:
            mag = _mx_round_bits(a, e, rnd, MBITS, EMIN, MAXN, MAXQ, LOG2N, NBITS, ROUND)
    else:
        mag = _mx_round_bits(a, e, rnd, MBITS, EMIN, MAXN, MAXQ, LOG2N, NBITS, ROUND)
    return mag


@triton.jit
def _mx_round_bits(a, e, rnd, MBITS: tl.constexpr, EMIN: tl.constexpr, MAXN: tl.constexpr,
                   MAXQ: tl.constexpr, LOG2N: tl.constexpr, NBITS: tl.constexpr,
                   ROUND: tl.constexpr):
    """round_bits on the grid of MX block exponent e (the integer route of mx_grid_bits)."""
    return round_bits(a, e + (EMIN + 127), pow2_bits(e + (EMIN - MBITS)),
                      scaled_int_bits(e + MAXQ, MAXN, LOG2N, NBITS), rnd, MBITS, ROUND)


@triton.jit
def fixed_grid_bits(v, rnd, EMIN: tl.constexpr, QBITS: tl.constexpr, MAXB: tl.constexpr,
                    FMT_MAX: tl.constexpr, MBITS: tl.constexpr, ROUND: tl.constexpr):
    """Bits of |v| rounded onto the element grid of block exponent 0 (v float32, already divided
    by its scale, |v| < 2^104): round_nearest_f32 for round-to-nearest, round_bits otherwise."""
    if ROUND == 0:
        q = round_nearest_f32(tl.abs(v), EMIN, MBITS, FMT_MAX).to(tl.int32, bitcast=True)
    else:
        q = round_bits(v.to(tl.int32, bitcast=True) & 0x7FFFFFFF, EMIN + 127, QBITS, MAXB, rnd,
                       MBITS, ROUND)
    return q


@triton.jit
def mx_exponent(am, MODE: tl.constexpr, MBITS: tl.constexpr, EMAX: tl.constexpr,
                MCAP: tl.constexpr):
    """E8M0 exponent (int32, clamped to [-127, 127]; -127 for am == 0) from amax bits `am`.

    MODE: 0 floor, 1 ceil, 2 rceil, 3 even (see fp4.scaling). A subnormal amax is normalised by
    an int->float conversion of its mantissa, so E and M are exact for every finite amax.
    """
    expa = am >> 23
    mant = am & 0x7FFFFF
    fb = mant.to(tl.float32).to(tl.int32, bitcast=True)
    E = tl.where(expa > 0, expa - 127, (fb >> 23) - 276)
    M = tl.where(expa > 0, mant, fb & 0x7FFFFF)
    if MODE == 0:
        e = E - EMAX
    elif MODE == 1:
        e = E + (M != 0).to(tl.int32) - EMAX
    elif MODE == 2:
        # max = mcap-mantissa * 2^EMAX covers amax at e0 = E - EMAX iff amax's mantissa <= mcap.
        e = E + (M > MCAP).to(tl.int32) - EMAX
    else:
        # Round the amax significand to MBITS bits (RNE); a carry to 2.0 bumps the binade.
        t = M + (1 << (22 - MBITS)) - 1 + ((M >> (23 - MBITS)) & 1)
        e = E + (t >> 23) - EMAX
    e = tl.minimum(tl.maximum(e, E8M0_LO), E8M0_HI)
    return tl.where(am == 0, E8M0_LO, e)


@triton.jit
def load_bits(ptr, offs, mask, IN_KIND: tl.constexpr, EVEN: tl.constexpr = False):
    """float32 bit patterns (int32) of x; IN_KIND 0: float32 viewed as int32, 1: bfloat16
    viewed as int16 (widened by a shift, no float conversion), 2: float16 (exact upcast).
    EVEN: every offset is in bounds (the launcher's tiles divide the tensor): no mask."""
    if EVEN:
        raw = tl.load(ptr + offs)
    elif IN_KIND == 2:
        raw = tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        raw = tl.load(ptr + offs, mask=mask, other=0)
    if IN_KIND == 0:
        bits = raw
    elif IN_KIND == 1:
        bits = raw.to(tl.int32) << 16
    else:
        bits = raw.to(tl.float32).to(tl.int32, bitcast=True)
    return bits


@triton.jit
def store_bits(ptr, offs, bits, mask, IN_KIND: tl.constexpr, EVEN: tl.constexpr = False):
    """Store float32 bits in x's dtype. Grid values are exact in bfloat16 (<= 5 significant bits,
    float32 exponent range), so the bfloat16 store is the high half of the pattern. EVEN: no mask."""
    if IN_KIND == 0:
        val = bits
    elif IN_KIND == 1:
        val = (bits >> 16).to(tl.int16)
    else:
        val = bits.to(tl.float32, bitcast=True).to(tl.float16)
    if EVEN:
        tl.store(ptr + offs, val)
    else:
        tl.store(ptr + offs, val, mask=mask)


@triton.jit
def div_f32(num, den):
    """Correctly rounded float32 num / den via float64 division (den: float32 tensor or an exact
    constant; either is promoted to float64 exactly)."""
    return (num.to(tl.float64) / den).to(tl.float32)


# The divisors for which div_f32_fma is the IEEE quotient wherever a grid can tell (see there).
DIV_FMA_MIN = tl.constexpr(2.0 ** -60)
DIV_FMA_MAX = tl.constexpr(2.0 ** 125)
# Below this |quotient| div_f32_fma's residuals may underflow (only SR on an exact uniform cares).
DIV_FMA_TINY = tl.constexpr(2.0 ** -42)


@triton.jit
def recip_f32(den):
    """RN32(1 / den), correctly rounded (the float64 route): once per divisor, for div_f32_fma."""
    return (1.0 / den.to(tl.float64)).to(tl.float32)


@triton.jit
def div_f32_fma(num, den, inv):
    """Correctly rounded float32 num / den from inv = RN32(1 / den) (recip_f32): one multiply
    and four FMAs an element, no branch, where div_rn spends a reciprocal, a range check and a
    convergence barrier per element (the divisor of a scaled quantizer is shared by a block or
    the tensor, so its reciprocal is computed once).

        q0 = num * inv               within 1.5 ulp of num / den (inv within half an ulp)
        q1 = q0 + fma(-den, q0, num) * inv      within 1 ulp: faithful
        q  = q1 + fma(-den, q1, num) * inv      = RN(num / den)   (FMAs; one rounding each)

    The last step is Markstein's theorem (Markstein 1990; Cornea, Harrison and Tang 2002): if
    inv is within half an ulp of 1 / den and q1 is a faithful quotient, the residual
    num - den * q1 is exact and q1 + residual * inv rounds to the correctly rounded quotient.
    Its hypotheses, no underflow of the residual, hold for DIV_FMA_MIN <= den < DIV_FMA_MAX and
    |num / den| >= DIV_FMA_TINY (the residual is ~ulp(q) * den >= 2^-126; inv is normal): every
    quotient that a grid rounding can tell apart (the smallest half-spacing of every grid here,
    E5M2's, is 2^-17; a 24-bit SR draw cannot raise anything below 2^-40). A smaller quotient
    comes out within a few ulps, or flushed to a zero of its sign under `.ftz`, which every
    grid rounds like the IEEE quotient, to zero; callers that need even those exact (SR against
    an exact uniform, fp32_block_quant) test |q| < DIV_FMA_TINY. Triton lowers tl.fma to
    `fma.rn.f32`; its interpreter rounds an fma once, as the GPU does, from Triton 3.9 (3.6 rounds
    the product first)."""
    q0 = num * inv
    q1 = tl.fma(tl.fma(-den, q0, num), inv, q0)
    return tl.fma(tl.fma(-den, q1, num), inv, q1)


@triton.jit
def div_fma_exact(lo, hi):
    """Whether every divisor in [lo, hi] is in div_f32_fma's range [DIV_FMA_MIN, DIV_FMA_MAX):
    the kernels' uniform test between it and the float64 route (div_f32)."""
    return (lo >= DIV_FMA_MIN) & (hi < DIV_FMA_MAX)


@triton.jit
def mul_f32(a, b):
    """Correctly rounded float32 a * b via float64 (exact product), safe for subnormal operands."""
    return (a.to(tl.float64) * b.to(tl.float64)).to(tl.float32)


@triton.jit
def encode_minifloat(bits, MBITS: tl.constexpr, EMIN: tl.constexpr, SIGN_BIT: tl.constexpr):
    """Code (sign-magnitude, exponent bias 1 - EMIN) of a float32 grid value given as bits.

    The value must lie exactly on the grid (it comes out of round_bits); the sign goes to bit
    SIGN_BIT (7 for FP8, 3 for FP4). Normal codes are (E - EMIN + 1, top mantissa bits); subnormal
    codes are the integer k with value = k * 2^(EMIN - MBITS).
    """
    a = bits & 0x7FFFFFFF
    E = (a >> 23) - 127
    normal = ((E - EMIN + 1) << MBITS) | ((a >> (23 - MBITS)) & ((1 << MBITS) - 1))
    sh = tl.minimum(tl.maximum(23 - MBITS - E + EMIN, 0), 31)
    sub = ((a & 0x7FFFFF) | 0x800000) >> sh
    code = tl.where(E >= EMIN, normal, sub)
    code = tl.where(a == 0, 0, code)
    return code | (((bits >> 31) & 1) << SIGN_BIT)


@triton.jit
def rand_bits(seed, grow, g0, GROUPS_PER_ROW, TR: tl.constexpr, TC: tl.constexpr):
    """int32 random bits for the rows `grow` ([TR]) of a [TR, TC] tile: one Philox call
    (tl.randint4x, 4 x 32 bits) per group of 4 consecutive columns, counter = global row *
    groups-per-row + group index (unique per group, so no two elements share a draw); element
    4g + k takes output k. Shared by the MX/NVFP4 tile kernel and the slab kernel, so the same
    seed gives the same bits whichever of them quantizes an operand."""
    ctr = grow[:, None] * GROUPS_PER_ROW + (g0 + tl.arange(0, TC // 4))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, ctr)
    r = tl.join(tl.join(r0, r1), tl.join(r2, r3))
    return tl.reshape(r, [TR, TC]).to(tl.int32, bitcast=True)
