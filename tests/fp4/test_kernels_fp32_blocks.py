"""The scale-mode-fp32 kernel (fp4.kernels.fp32_block_quant) against the torch reference
(fp4.quantize._fp32_blocks, backend="torch"): byte equality of x_dq (float32 bit patterns, NaN
included) and of the float32 block scales, for nearest *and* stochastic rounding (the kernel
reads the reference's own torch.rand uniforms: same generator state, same bits).

Without a GPU the kernel runs under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py); with
CUDA the same tests run the compiled kernel against the reference on the same GPU (the uniforms
then come from CUDA's generator on both sides). Sizes are small: the interpreter runs numpy per
tile op. experiments/gpu/fp32_block_kernel_check.py is the full-size GPU check.
"""
import math
import os

import pytest
import torch

from fp4_reference import wide_tensor

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run")

import fp4.kernels  # noqa: E402
from fp4 import quantize as Q  # noqa: E402
from fp4.formats import FP32_BLOCK, MX_ELEMENTS  # noqa: E402
from fp4.kernels import triton_quantize_operand, triton_quantize_operand_ex  # noqa: E402
from fp4.kernels.fp32_block_quant import fp32_block_quantize  # noqa: E402
from fp4.quantize import quantize_operand, use_triton  # noqa: E402
from fp4.scaling import fp32_block_scales  # noqa: E402
from fp4.transforms import split_blocks  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
FMTS = ("e1m2", "int4", "e2m1")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Byte equality of two float32 tensors (NaN payloads included)."""
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    return torch.equal(a.contiguous().view(torch.int32).cpu(), b.contiguous().view(torch.int32).cpu())


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def run_both(x, fmt, axis, rounding="nearest", seed=0, **kw):
    """(kernel x_dq, reference x_dq), both on x's device, SR from two generators of one seed."""
    g = (lambda: gen(seed)) if rounding == "stochastic" else (lambda: None)
    ref, ref_ts = quantize_operand(x, fmt, axis, rounding=rounding, scale_mode="fp32", generator=g(),
                                   backend="torch", **kw)
    out, ts = triton_quantize_operand(x, fmt, axis, rounding=rounding, scale_mode="fp32", generator=g(),
                                      **kw)
    assert ts is None and ref_ts is None
    assert out.dtype == torch.float32 and out.device == x.device
    return out, ref


def check(x, fmt, axis, rounding="nearest", seed=0, **kw):
    out, ref = run_both(x, fmt, axis, rounding, seed, **kw)
    assert same_bits(out, ref), (fmt, axis, rounding, x.dtype, tuple(x.shape), kw,
                                 int((out.view(torch.int32) != ref.view(torch.int32)).sum()))
    return out


def wide(shape, dtype, seed=0, spread=20):
    return wide_tensor(shape, dtype, seed, spread, DEV)


# ---- many shapes, both orientations, every dtype / element / rounding -------------------------
SHAPES = [((37, 100), -1), ((100, 37), 0), ((64, 48), 0), ((2, 3, 40), -1), ((3, 40, 5), 1),
          ((40, 3, 2), 0), ((70,), 0), ((1, 1), -1)]


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FMTS)
def test_bit_identical_shapes_axes(fmt, dtype, rounding):
    spread = 2 if dtype == torch.float16 else 20
    for i, (shape, axis) in enumerate(SHAPES):
        x = wide_tensor((shape[0], math.prod(shape[1:])), dtype, 100 + i, spread, DEV).reshape(shape)
        check(x, fmt, axis, rounding, seed=i)


def test_non_contiguous_and_multi_program_tiles():
    x = wide((96, 300), torch.bfloat16, seed=3)
    for rounding in ("nearest", "stochastic"):
        check(x.t(), "e1m2", 0, rounding, seed=1)       # non-contiguous input
        check(x, "int4", -1, rounding, seed=2)          # several programs along both grid dims
        check(x, "e2m1", 0, rounding, seed=3)
    # Explicit tiles: several blocks per program along the quantization axis and small tiles.
    x3 = x.contiguous().view(1, 96, 300)
    for axis, config in [(1, (8, 64, 4)), (1, (32, 32, 2)), (0, (32, 64, 4)), (0, (64, 16, 4))]:
        for rounding in ("nearest", "stochastic"):
            want = run_both(x, "e1m2", -1 if axis == 1 else 0, rounding, seed=4)[1]
            g = gen(4) if rounding == "stochastic" else None
            shape = (96, 19, 16) if axis == 1 else (300, 6, 16)
            got, _ = fp32_block_quantize(x3, "e1m2", axis, rounding, g, shape, config=config)
            assert same_bits(got.view(96, 300), want), (axis, config, rounding)


@pytest.mark.parametrize("axis", [-1, 0])
def test_block_scales_are_the_reference_scales(axis):
    x = wide((48, 80), torch.bfloat16, seed=5)
    x[3, :16] = 0.0
    x[7, 5] = float("inf")
    for fmt in FMTS:
        _, ts, s = triton_quantize_operand_ex(x, fmt, axis, scale_mode="fp32", return_scales=True)
        assert ts is None and s.dtype == torch.float32
        blocks, _ = split_blocks(x.float(), axis, FP32_BLOCK)
        want = fp32_block_scales(blocks, MX_ELEMENTS[fmt])[..., 0]  # [rows, nblocks] for axis -1
        got = s[0] if axis == -1 else s[0].t()
        assert got.shape == want.shape
        assert torch.equal(got.isnan(), want.isnan())
        assert same_bits(torch.nan_to_num(got, nan=0.0), torch.nan_to_num(want, nan=0.0))


# ---- special values ------------------------------------------------------------------------
def special_blocks(fmt, dtype=torch.float32):
    """[rows, 16] blocks, one hard case each (zero / subnormal / underflowing-scale / tie / huge
    / tiny-quotient / NaN / Inf blocks), as rows of a [rows, 16] tensor."""
    M = MX_ELEMENTS[fmt].max
    grid = MX_ELEMENTS[fmt].grid.float()
    mids = (grid[1:] + grid[:-1]) / 2
    g = torch.Generator().manual_seed(2)
    u = torch.rand(16, generator=g)
    sub = 2.0 ** -149
    fmax = float(torch.finfo(dtype).max)

    def block(*vals, fill=None):
        b = torch.zeros(16) if fill is None else fill.clone()
        b[:len(vals)] = torch.tensor(vals, dtype=torch.float32)
        return b

    rows = [
        torch.zeros(16),                                   # all zero: s = 0
        -torch.zeros(16),                                  # all -0: x_dq keeps the sign
        u * 2.0 ** -140,                                   # subnormal amax, subnormal s
        block(sub),                                        # amax 2^-149: s = 2^-149 (e1m2) or 0
        block(sub, -sub, 0.0, -0.0),
        block(3 * sub, -2 * sub, sub, -sub),
        block(2.0 ** -126, fill=u * 2.0 ** -126),          # smallest normal amax
        block(M * 2.0 ** -127, fill=-u * 2.0 ** -127),     # s exactly 2^-127 (subnormal)
        block(1.0, 2.0 ** -130, -2.0 ** -140, 1e-38, -1e-30, 2.0 ** -100, fill=u * 0.01),  # tiny v
        block(M, *mids.tolist(), *(-mids[:1]).tolist()),   # s = 1: grid midpoints (ties)
        block(M, *(grid[1:] * (1 + 2 ** -22)).tolist()),   # just above grid points
        block(fmax, fill=u * fmax),                        # huge: q * s may round past the max
        block(-fmax, fmax, fill=-u * 1e38),
        u * 3 - 1.5,
        torch.randn(16, generator=g) * 2.0 ** 100,
        block(float("nan"), fill=u),
        block(1.0, float("inf"), fill=u),
        block(-1.0, float("-inf"), fill=-u),
        block(float("inf"), float("-inf")),
    ]
    return torch.stack(rows).to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("axis", [-1, 0])
def test_special_values(axis, dtype):
    for fmt in FMTS:
        x = special_blocks(fmt, dtype)
        if axis == 0:
            x = x.t().contiguous()
        for rounding, seeds in (("nearest", [0]), ("stochastic", [0, 1, 2])):
            for seed in seeds:
                out = check(x, fmt, axis, rounding, seed=seed)
                rows = out if axis == -1 else out.t()
                assert rows[-4:].isnan().all() and not rows[:-4].isnan().any()
                assert (rows[:2] == 0).all() and torch.signbit(rows[1]).all()


def test_adversarial_uniforms(monkeypatch):
    """Uniforms at the edges of the comparison u < frac (exact 0, far below 2^-24, just below
    a half, 1 - 2^-24), shared by the reference and the kernel through torch.rand itself, on
    values a hair above grid points and far below one spacing: every decision must agree."""
    real_rand = torch.rand
    edges = torch.tensor([0.0, 2.0 ** -149, 2.0 ** -60, 2.0 ** -33, 2.0 ** -25, 2.0 ** -24, 3 * 2.0 ** -24,
                          0.5 - 2.0 ** -25, 0.5, 0.5 + 2.0 ** -24, 1 - 2.0 ** -24, 0.25, 0.75],
                         dtype=torch.float32)

    def fake_rand(*size, generator=None, dtype=None, device=None, **kw):
        size = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        n = math.prod(size)
        g = torch.Generator().manual_seed(n)
        vals = torch.where(real_rand(n, generator=g) < 0.7,
                           edges[torch.randint(0, len(edges), (n,), generator=g)],
                           real_rand(n, generator=g))
        return vals.to(dtype or torch.float32).reshape(size).to(device)

    monkeypatch.setattr(torch, "rand", fake_rand)
    for fmt in FMTS:
        M = MX_ELEMENTS[fmt].max
        grid = MX_ELEMENTS[fmt].grid.float()
        g = torch.Generator().manual_seed(9)
        idx = torch.randint(0, len(grid) - 1, (64, 48), generator=g)
        eps = torch.exp2(-torch.randint(1, 60, (64, 48), generator=g).float())
        x = grid[idx] + eps * (grid[idx + 1] - grid[idx])      # frac = eps (down to 2^-59)
        x = torch.where(torch.rand(64, 48, generator=g) < 0.2, eps * 2.0 ** -80, x)  # tiny v
        x = x * torch.where(torch.rand(64, 48, generator=g) < 0.5, -1.0, 1.0)
        x[:, ::16] = M                                           # s = 1: v = x exactly
        x[::16, :] = M
        x = x.to(DEV)
        check(x, fmt, -1, "stochastic", seed=0)
        check(x, fmt, 0, "stochastic", seed=0)
        check(x * 2.0 ** -120, fmt, -1, "stochastic", seed=0)   # tiny scales: float64 division


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_forced_float64_division_agrees(rounding):
    x = torch.cat([special_blocks("e1m2"), wide((21, 16), torch.float32, seed=4)]).reshape(-1, 64)
    x3 = x.contiguous().view(1, *x.shape)
    for axis, rdim in ((1, 64), (0, x.shape[0])):
        shape = (x.shape[0], 4, 16) if axis == 1 else (64, -(-rdim // 16), 16)
        outs = [fp32_block_quantize(x3, "e1m2", axis, rounding, gen(3) if rounding == "stochastic" else None,
                                    shape, exact_div=exact)[0] for exact in (False, True)]
        assert same_bits(outs[0], outs[1])
        ref = quantize_operand(x, "e1m2", -1 if axis == 1 else 0, rounding=rounding, scale_mode="fp32",
                               generator=gen(3) if rounding == "stochastic" else None, backend="torch")[0]
        assert same_bits(outs[0].view(x.shape), ref)


def test_generator_none_uses_the_global_rng():
    x = wide((32, 64), torch.float32, seed=6)
    torch.manual_seed(123)
    ref = quantize_operand(x, "int4", -1, rounding="stochastic", scale_mode="fp32", backend="torch")[0]
    torch.manual_seed(123)
    out = triton_quantize_operand(x, "int4", -1, rounding="stochastic", scale_mode="fp32")[0]
    assert same_bits(out, ref)
    again = triton_quantize_operand(x, "int4", -1, rounding="stochastic", scale_mode="fp32")[0]
    assert not same_bits(again, ref)  # the global RNG moved on


# ---- fused Hadamard -------------------------------------------------------------------------
def exact_hadamard_input(shape, dtype, seed):
    """Integers < 2^8 times 2^-4..2^0, times a power of two per row: all float32 sums exact, so the
    reference's float32 matmul and the kernel's butterflies / dot have one right answer."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-255, 256, shape, generator=g).float()
    x = k * torch.exp2(torch.randint(-4, 1, shape, generator=g).float())
    x = x * torch.exp2(torch.randint(-30, 30, (shape[0], 1), generator=g).float())
    return x.to(dtype).to(DEV)


@pytest.mark.parametrize("axis", [-1, 0])
def test_hadamard_fused_bit_identical(axis):
    g = torch.Generator().manual_seed(11)
    # The power of two varies across the transformed axis only: sums along it stay exact. Blocks
    # that are powers of 4 only, so that 1 / sqrt(hb) is exact too.
    x = exact_hadamard_input((40, 72), torch.bfloat16, seed=1)
    x = x if axis == -1 else x.t().contiguous()
    for hb, fmt, rounding in [(16, "e1m2", "nearest"), (16, "int4", "stochastic"), (4, "e2m1", "nearest"),
                              (64, "e1m2", "stochastic"), (1, "int4", "nearest"), (4, "e2m1", "stochastic")]:
        for signed in (False, True):
            signs = (torch.randint(0, 2, (hb,), generator=g) * 2 - 1).float().to(DEV) if signed else None
            check(x, fmt, axis, rounding, seed=hb, hadamard_block=hb, hadamard_signs=signs)
    # An Inf inside one Hadamard block poisons exactly that block's 16-blocks, as in the reference.
    y = x.float().clone()
    if axis == -1:
        y[3, 20] = float("inf")
    else:
        y[20, 3] = float("inf")
    check(y, "e1m2", axis, "nearest", hadamard_block=16)


# ---- routing (fp4.quantize) -----------------------------------------------------------------
def test_quantize_routes_fp32_to_the_kernel(monkeypatch):
    x = wide((32, 64), torch.bfloat16, seed=17)
    assert Q.NO_KERNEL_SCALE_MODES == frozenset()
    assert use_triton(x, "triton", "e1m2", "fp32")
    assert use_triton(x, "auto", "e1m2", "fp32") == (CUDA and x.is_cuda)
    assert not use_triton(x.double(), "triton", "e1m2", "fp32")
    calls = []
    real = fp4.kernels.triton_quantize_operand

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(fp4.kernels, "triton_quantize_operand", spy)
    for fmt in FMTS:
        for rounding in ("nearest", "stochastic"):
            out, ts = quantize_operand(x, fmt, 0, rounding=rounding, scale_mode="fp32", generator=gen(1),
                                       backend="triton")
            ref, _ = quantize_operand(x, fmt, 0, rounding=rounding, scale_mode="fp32", generator=gen(1),
                                      backend="torch")
            assert ts is None and same_bits(out, ref)
    assert len(calls) == 6 and all(c[4] == "fp32" for c in calls)
    # "auto" takes the kernel only on CUDA; float64 always takes the reference.
    quantize_operand(x, "e1m2", -1, scale_mode="fp32")
    quantize_operand(x.double(), "e1m2", -1, scale_mode="fp32", backend="triton")
    assert len(calls) == 6 + (1 if CUDA else 0)


def test_edge_inputs_match_the_reference():
    empty = torch.zeros(0, 32, dtype=torch.bfloat16, device=DEV)
    out, ts = quantize_operand(empty, "e1m2", -1, scale_mode="fp32", backend="triton")
    assert out.shape == empty.shape and ts is None
    scalar = torch.tensor(1.5, device=DEV)
    for backend in ("torch", "triton"):
        with pytest.raises(IndexError):
            quantize_operand(scalar, "e1m2", -1, scale_mode="fp32", backend=backend)
        with pytest.raises(IndexError):
            quantize_operand(torch.ones(4, 16, device=DEV), "e1m2", 2, scale_mode="fp32", backend=backend)
    # fake_quantize on the kernel route: float32 values cast back to x's dtype.
    x = wide((16, 48), torch.bfloat16, seed=2)
    out, _ = quantize_operand(x, "int4", -1, scale_mode="fp32", backend="triton")
    assert out.dtype == torch.float32
