"""FP8 per-tensor current scaling (E4M3 / E5M2): amax pre-pass + one fused scale/round/cast pass.

Contract (docs/design.md, "FP8 per-tensor current scaling"):
    s = fp32(amax / fmt_max)  (s == 0 -> 1);  q = fp8_rne_satfinite(fp32(x / s));  x_dq = q
    NaN/Inf anywhere -> every output and s are NaN.

Layout. The tensor is treated as flat (contiguous): each program owns BLOCK consecutive
elements, so loads and stores are fully coalesced and vectorised. Pass 1 (`_amax_kernel`) maxes
the |x| bit patterns of its chunk and atomically maxes one int32 (bit-pattern order is value
order for finite non-negative floats; NaN/Inf patterns sort above them, so the same int says
"non-finite"; fp4.kernels.amax). Pass 2 (`_fp8_kernel`) reads that int, derives s, and writes q in x's dtype and,
optionally, the FP8 byte (sign-magnitude code from integer fields), i.e. the float8 tensor that
torch._scaled_mm multiplies with s as its per-tensor scale. The tensor scale s is written by
program 0, so no host round trip sits between the passes.

Numerics: s = fp32(amax / max) is a float64 division rounded once to float32 (equal to the
correctly rounded float32 division; Triton's float32 `/` is the approximate div.full.f32 on
NVIDIA), v = fp32(x / s) correctly rounded from one reciprocal of s and four FMAs an element
(fp4.kernels._bits.div_f32_fma; float64 for s outside [2^-60, 2^125)),
and v is rounded onto the FP8 grid: to nearest by two float32 additions
(fp4.kernels._bits.round_nearest_f32; a subnormal v rounds to a zero of x's sign, flushed or
not), stochastically by integer arithmetic on its bits. The FP8 byte is the conversion of that
grid value (exact: the format holds it), not of v. The pass reads x twice (amax, then
quantize) and writes once: the per-tensor scale depends on all of x, so that is the floor for
current scaling.

Cast-transpose (`fp8_quantize_t`, `_fp8_t_kernel`). torch._scaled_mm takes its first operand
row-major and its second column-major, and every operand of a linear layer is used both ways
(X: Fprop and Wgrad, W: Fprop and Dgrad, dY: Dgrad and Wgrad). Instead of a later
q.t().contiguous() (a read and a write of the codes), the second pass runs over 2-D tiles of a
row-major x [M, N]: each program loads its tile once, rounds it exactly as `_fp8_kernel` does
(the shared helpers `_fp8_tensor_scale` and `_fp8_grid_bits`), and stores the codes to q [M, N]
and, transposed in registers (tl.trans), to q_t [N, M]; Transformer Engine's cast-transpose.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats import FP8_DTYPES, FP8_MAX
from ._bits import (F32_INF_BITS, F32_NAN_BITS, FORMATS, div_f32, div_f32_fma, div_fma_exact,
                    fixed_grid_bits, fixed_scale_consts, load_bits, recip_f32,
                    store_bits)
from .amax import IN_KINDS, KIND_VIEWS, draw_seed, global_amax_bits

# NaN bytes: E4M3FN has only S.1111.111; E5M2 uses exponent 31 with a non-zero mantissa. (An
# encoding fact of the float8 byte this kernel writes, checked against torch's casts by the tests.)
FP8_NAN_CODE = {"e4m3": 0x7F, "e5m2": 0x7E}
# Launch configuration of the quantize pass (bench_kernels --sweep measures alternatives): elements
# per program and warps. The amax pre-pass has its own (fp4.kernels.amax.AMAX_CONFIG).
FP8_CONFIG = dict(block=4096, num_warps=4)
# Tile (rows x columns of x) and warps of the cast-transpose pass (fp8_quantize_t): the fastest
# of fifteen byte-identical tiles on llama-150m's operands (65536 x 768 and x 2304 bf16) on an
# H200 after the division change, 36.6% / 36.8% of copy (amax pre-pass included, 4 bytes an
# element) against 32 x 32 x 2 warps' 35.5% / 33.6% (results/bench/tiles_check-h200-18e4257.txt).
# Both sides are multiples of 16 so either store is a run of >= 16 consecutive bytes per row.
FP8_T_CONFIG = dict(block_m=16, block_n=64, num_warps=1)


@triton.jit
def _fp8_tensor_scale(amax_ptr, FMT_MAX: tl.constexpr):
    """(s, finite) from the amax pre-pass's int: s = fp32(amax / max), 0 -> 1; finite is False
    when the amax pattern is NaN / Inf (then every output is NaN and s is stored as NaN)."""
    g = tl.load(amax_ptr)
    finite = g < F32_INF_BITS
    s = div_f32(g.to(tl.float32, bitcast=True), FMT_MAX)
    s = tl.where(s == 0, 1.0, s)
    return s, finite


@triton.jit
def _fp8_grid_bits(bits, s, rnd, MBITS: tl.constexpr, EMIN: tl.constexpr, QBITS: tl.constexpr,
                   MAXB: tl.constexpr, FMT_MAX: tl.constexpr, ROUND: tl.constexpr,
                   DIV64: tl.constexpr):
    """Signed float32 bits of q = fp8_round(fp32(x / s)) for x given as float32 bits (any shape).
    DIV64: the float64 division (s outside div_f32_fma's range, _bits.div_fma_exact), else one reciprocal of
    the tensor scale and FMAs per element (_bits.div_f32_fma); both correctly rounded."""
    x = bits.to(tl.float32, bitcast=True)
    v = div_f32(x, s) if DIV64 else div_f32_fma(x, s, recip_f32(s))
    q = fixed_grid_bits(v, rnd, EMIN, QBITS, MAXB, FMT_MAX, MBITS, ROUND)
    return q | (bits & (-2147483648))


@triton.jit
def _fp8_code(q, MBITS: tl.constexpr):
    """The float8 byte of a grid value q (signed float32 bits): a conversion of a value the
    format holds exactly, so the hardware cvt (or the interpreter's) has nothing to round."""
    qf = q.to(tl.float32, bitcast=True)
    if MBITS == 3:
        code = qf.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        code = qf.to(tl.float8e5).to(tl.uint8, bitcast=True)
    return code


@triton.jit
def _fp8_chunk(x_ptr, out_ptr, f8_ptr, seed_ptr, N, start, bits, s, finite, FMT_MAX: tl.constexpr,
               MBITS: tl.constexpr, EMIN: tl.constexpr, QBITS: tl.constexpr, MAXB: tl.constexpr,
               NAN_CODE: tl.constexpr, ROUND: tl.constexpr, WRITE_F8: tl.constexpr,
               WRITE_DQ: tl.constexpr, IN_KIND: tl.constexpr, BLOCK: tl.constexpr,
               DIV64: tl.constexpr):
    """_fp8_kernel's work on the BLOCK elements from `start` (a multiple of 4): their bits as the
    caller loaded them (the usual route, whose load is in flight while the tensor scale is read)
    or, when `bits` is None, loaded here."""
    offs = start + tl.arange(0, BLOCK)
    mask = offs < N
    if bits is None:
        bits = load_bits(x_ptr, offs, mask, IN_KIND)
    if ROUND == 1:
        # One Philox call (4 x 32 bits) per 4 consecutive elements.
        ctr = (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.int32)
        r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), ctr)
        rnd = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK])
        rnd = rnd.to(tl.int32, bitcast=True)
    else:
        rnd = bits
    q = _fp8_grid_bits(bits, s, rnd, MBITS, EMIN, QBITS, MAXB, FMT_MAX, ROUND, DIV64)
    if WRITE_DQ:
        store_bits(out_ptr, offs, tl.where(finite, q, F32_NAN_BITS), mask, IN_KIND)
    if WRITE_F8:
        code = tl.where(finite, _fp8_code(q, MBITS), NAN_CODE)
        tl.store(f8_ptr + offs, code.to(tl.uint8), mask=mask)


@triton.jit
def _fp8_kernel(x_ptr, out_ptr, f8_ptr, amax_ptr, scale_ptr, seed_ptr, N,
                FMT_MAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                QBITS: tl.constexpr, MAXB: tl.constexpr, NAN_CODE: tl.constexpr,
                ROUND: tl.constexpr, WRITE_F8: tl.constexpr, WRITE_DQ: tl.constexpr,
                IN_KIND: tl.constexpr, BLOCK: tl.constexpr, PARTS: tl.constexpr = 4):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    # The load first: in flight while the tensor scale is read.
    bits = load_bits(x_ptr, offs, offs < N, IN_KIND)
    s, finite = _fp8_tensor_scale(amax_ptr, FMT_MAX)
    if pid == 0:
        tl.store(scale_ptr, tl.where(finite, s, float("nan")))
    if div_fma_exact(s, s):
        _fp8_chunk(x_ptr, out_ptr, f8_ptr, seed_ptr, N, start, bits, s, finite, FMT_MAX, MBITS,
                   EMIN, QBITS, MAXB, NAN_CODE, ROUND, WRITE_F8, WRITE_DQ, IN_KIND, BLOCK, False)
    else:
        # The float64 division of a tiny or huge tensor, PARTS chunks one after another: this
        # rare route would otherwise set the kernel's register count (fp4.kernels.mx_quant).
        for part in range(PARTS):
            _fp8_chunk(x_ptr, out_ptr, f8_ptr, seed_ptr, N, start + part * (BLOCK // PARTS), None,
                       s, finite, FMT_MAX, MBITS, EMIN, QBITS, MAXB, NAN_CODE, ROUND, WRITE_F8,
                       WRITE_DQ, IN_KIND, BLOCK // PARTS, True)


@triton.jit
def _fp8_t_tile(x_ptr, f8_ptr, f8t_ptr, M, N, r0, c0, bits, s, finite, FMT_MAX: tl.constexpr,
                MBITS: tl.constexpr, EMIN: tl.constexpr, QBITS: tl.constexpr,
                MAXB: tl.constexpr, NAN_CODE: tl.constexpr, IN_KIND: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIV64: tl.constexpr):
    """The cast-transpose of the [BLOCK_M, BLOCK_N] tile of x at (r0, c0); `bits` as the caller
    loaded them, or None: loaded here."""
    rows = r0 + tl.arange(0, BLOCK_M)
    cols = c0 + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    if bits is None:
        bits = load_bits(x_ptr, rows[:, None] * N + cols[None, :], mask, IN_KIND)
    q = _fp8_grid_bits(bits, s, bits, MBITS, EMIN, QBITS, MAXB, FMT_MAX, 0, DIV64)
    code = tl.where(finite, _fp8_code(q, MBITS), NAN_CODE).to(tl.uint8)
    tl.store(f8_ptr + rows[:, None] * N + cols[None, :], code, mask=mask)
    mask_t = (cols[:, None] < N) & (rows[None, :] < M)
    tl.store(f8t_ptr + cols[:, None] * M + rows[None, :], tl.trans(code), mask=mask_t)


@triton.jit
def _fp8_t_kernel(x_ptr, f8_ptr, f8t_ptr, amax_ptr, scale_ptr, M, N,
                  FMT_MAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                  QBITS: tl.constexpr, MAXB: tl.constexpr, NAN_CODE: tl.constexpr,
                  IN_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  PARTS: tl.constexpr = 2):
    """Cast-transpose: one [BLOCK_M, BLOCK_N] tile of a row-major x [M, N] is loaded once, rounded
    as _fp8_kernel rounds (nearest), and its codes stored to f8 [M, N] and, transposed in
    registers (tl.trans), to f8t [N, M], both row-major with rows along the contiguous axis."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    r0 = pid_m.to(tl.int64) * BLOCK_M
    c0 = pid_n.to(tl.int64) * BLOCK_N
    rows = r0 + tl.arange(0, BLOCK_M)
    cols = c0 + tl.arange(0, BLOCK_N)
    # The load first, in flight while the tensor scale is read (_fp8_kernel).
    bits = load_bits(x_ptr, rows[:, None] * N + cols[None, :],
                     (rows[:, None] < M) & (cols[None, :] < N), IN_KIND)
    s, finite = _fp8_tensor_scale(amax_ptr, FMT_MAX)
    if pid_m + pid_n == 0:
        tl.store(scale_ptr, tl.where(finite, s, float("nan")))
    if div_fma_exact(s, s):
        _fp8_t_tile(x_ptr, f8_ptr, f8t_ptr, M, N, r0, c0, bits, s, finite, FMT_MAX, MBITS, EMIN,
                    QBITS, MAXB, NAN_CODE, IN_KIND, BLOCK_M, BLOCK_N, False)
    else:
        # The float64 division, PARTS row parts one after another (_fp8_kernel).
        for part in range(PARTS):
            _fp8_t_tile(x_ptr, f8_ptr, f8t_ptr, M, N, r0 + part * (BLOCK_M // PARTS), c0, None, s,
                        finite, FMT_MAX, MBITS, EMIN, QBITS, MAXB, NAN_CODE, IN_KIND,
                        BLOCK_M // PARTS, BLOCK_N, True)


def fp8_quantize(x: torch.Tensor, fmt: str, rounding: str = "nearest", generator=None,
                 return_fp8: bool = False, return_dq: bool = True):
    """(x_dq in x's dtype or None, s (0-dim fp32), float8 tensor or None) for a float32/bf16/fp16 x.

    x_dq == q (the per-tensor scale excluded, as quantize_operand returns it); with return_fp8
    the third item is q as torch.float8_e4m3fn / float8_e5m2 (same shape), for torch._scaled_mm.
    return_dq=False skips x_dq (the real FP8 GEMM needs only the float8 tensor and s): one write
    of a byte per element instead of two bytes more.
    """
    if not (return_dq or return_fp8):
        raise ValueError("fp8_quantize: nothing to return (return_dq and return_fp8 both False)")
    if fmt not in FP8_MAX:
        raise ValueError(f"unknown FP8 format {fmt!r}; valid: {', '.join(FP8_MAX)}")
    xc = x.contiguous()
    in_kind = IN_KINDS[xc.dtype]
    view = KIND_VIEWS[in_kind]
    n = xc.numel()
    dev = xc.device
    out = torch.empty_like(xc) if return_dq else torch.empty(1, dtype=xc.dtype, device=dev)
    amax = torch.zeros(1, dtype=torch.int32, device=dev)
    scale = torch.empty((), dtype=torch.float32, device=dev)
    f8 = torch.empty(xc.shape if return_fp8 else (1,), dtype=torch.uint8, device=dev)
    seed = draw_seed(generator, dev) if rounding == "stochastic" else amax
    mbits, emin = FORMATS[fmt][:2]
    _, qbits, maxb = fixed_scale_consts(fmt)
    block = FP8_CONFIG["block"]
    grid = (triton.cdiv(n, block),)
    if n:
        global_amax_bits(xc.view(view), in_kind, amax)
        _fp8_kernel[grid](xc.view(view), out.view(view), f8, amax, scale, seed, n,
                          FMT_MAX=FP8_MAX[fmt], MBITS=mbits, EMIN=emin, QBITS=qbits, MAXB=maxb,
                          NAN_CODE=FP8_NAN_CODE[fmt], ROUND=1 if rounding == "stochastic" else 0,
                          WRITE_F8=return_fp8, WRITE_DQ=return_dq, IN_KIND=in_kind, BLOCK=block,
                          num_warps=FP8_CONFIG["num_warps"])
    else:
        scale.fill_(1.0)
    return (out if return_dq else None), scale, (f8.view(FP8_DTYPES[fmt]) if return_fp8 else None)


def fp8_quantize_t(x2d: torch.Tensor, fmt: str, config=None):
    """(q, q_t, s) for a 2-D float32/bf16/fp16 x [M, N]: q the float8 tensor of fp8_quantize
    (row-major [M, N], bit for bit), q_t = q^T as its own row-major [N, M] float8 tensor (so
    q_t.t() is the column-major [M, N] operand torch._scaled_mm takes), s the 0-dim fp32 scale.

    The cast-transpose of Transformer Engine: after the same amax pre-pass, one tiled pass reads
    x once and writes both layouts, so no transposed copy of q is made afterwards. Round to
    nearest only (the real FP8 GEMM path does not use stochastic rounding). NaN / Inf anywhere:
    every code of q and q_t is NaN and s is NaN, as in fp8_quantize. An empty x gives empty
    q, q_t and s = 1. `config` = (BLOCK_M, BLOCK_N, num_warps) overrides FP8_T_CONFIG's tile (a
    tile sweep; any tile gives the same bytes).
    """
    if fmt not in FP8_MAX:
        raise ValueError(f"unknown FP8 format {fmt!r}; valid: {', '.join(FP8_MAX)}")
    if x2d.dim() != 2:
        raise ValueError(f"fp8_quantize_t takes a 2-D tensor, got shape {tuple(x2d.shape)}")
    xc = x2d.contiguous()
    in_kind = IN_KINDS[xc.dtype]
    view = KIND_VIEWS[in_kind]
    m, n = xc.shape
    dev = xc.device
    amax = torch.zeros(1, dtype=torch.int32, device=dev)
    scale = torch.empty((), dtype=torch.float32, device=dev)
    f8 = torch.empty((m, n), dtype=torch.uint8, device=dev)
    f8t = torch.empty((n, m), dtype=torch.uint8, device=dev)
    mbits, emin = FORMATS[fmt][:2]
    _, qbits, maxb = fixed_scale_consts(fmt)
    bm, bn, warps = config or (FP8_T_CONFIG["block_m"], FP8_T_CONFIG["block_n"], FP8_T_CONFIG["num_warps"])
    if m and n:
        global_amax_bits(xc.view(view), in_kind, amax)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _fp8_t_kernel[grid](xc.view(view), f8, f8t, amax, scale, m, n,
                            FMT_MAX=FP8_MAX[fmt], MBITS=mbits, EMIN=emin, QBITS=qbits, MAXB=maxb,
                            NAN_CODE=FP8_NAN_CODE[fmt], IN_KIND=in_kind, BLOCK_M=bm, BLOCK_N=bn,
                            num_warps=warps)
    else:
        scale.fill_(1.0)
    dtype = FP8_DTYPES[fmt]
    return f8.view(dtype), f8t.view(dtype), scale
