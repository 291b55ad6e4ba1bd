"""The FP8 cast-transpose kernel (fp4.kernels.fp8_quant.fp8_quantize_t) against the flat kernel
(fp8_quantize) and the torch route of fp4.fp8_gemm.quantize_fp8.

q must equal fp8_quantize's float8 output bit for bit, q_t must equal q.t().contiguous() bit for
bit, and s must equal fp8_quantize's scale. As in test_kernels.py, without a GPU the kernels run
under TRITON_INTERPRET=1 on CPU tensors (set before triton is first imported); sizes are small.
"""
import os

import pytest
import torch

from fp4_reference import wide_tensor

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run")

from fp4 import fp8_gemm  # noqa: E402
from fp4.formats import FP8_DTYPES, FP8_MAX  # noqa: E402
from fp4.kernels import fp8_quant  # noqa: E402
from fp4.kernels.fp8_quant import fp8_quantize, fp8_quantize_t  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
FMTS = ("e4m3", "e5m2")
SHAPES = ((1, 1), (33, 70), (128, 64), (130, 257))


def codes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8).cpu()


def wide(shape, dtype, seed=0, spread=12):
    return wide_tensor(shape, dtype, seed, spread, DEV)


def check(x, fmt, config=None):
    """fp8_quantize_t(x) against fp8_quantize(x): q, q^T and s bit for bit; returns (q, q_t, s)."""
    q, q_t, s = fp8_quantize_t(x, fmt, config=config)
    _, s_ref, f8 = fp8_quantize(x.contiguous(), fmt, return_fp8=True, return_dq=False)
    m, n = x.shape
    assert q.dtype == q_t.dtype == FP8_DTYPES[fmt]
    assert q.shape == (m, n) and q_t.shape == (n, m) and q.is_contiguous() and q_t.is_contiguous()
    assert s.shape == () and s.dtype == torch.float32
    assert torch.equal(codes(q), codes(f8)), fmt
    assert torch.equal(codes(q_t), codes(q).t().contiguous()), fmt
    assert torch.equal(s.cpu().view(torch.int32), s_ref.cpu().view(torch.int32))
    return q, q_t, s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FMTS)
def test_both_layouts_match_the_flat_kernel(fmt, shape, dtype):
    check(wide(shape, dtype, seed=hash((fmt, shape)) % 1000), fmt)


def test_float16_and_non_contiguous_input():
    for fmt in FMTS:
        check(wide((40, 24), torch.float16, seed=3, spread=4), fmt)
        x = wide((24, 40), torch.bfloat16, seed=4).t()  # a transposed view: copied to row-major
        q, _, _ = check(x, fmt)
        assert torch.equal(codes(q), codes(fp8_quantize_t(x.contiguous(), fmt)[0]))


@pytest.mark.parametrize("fmt", FMTS)
def test_non_square_tiles(fmt):
    # A tile with BLOCK_M != BLOCK_N catches a row/column mix-up that square tiles would hide;
    # these are also tiles of the GPU sweep (experiments/gpu/fp8_fast_path_check.py --sweep).
    for bm, bn, warps in ((32, 16, 4), (16, 64, 2), (128, 64, 8)):
        check(wide((45, 77), torch.float32, seed=bm + bn), fmt, config=(bm, bn, warps))


def hard_values(fmt, k=-3):
    """Values for a tensor whose amax is fmt_max * 2^k, so s = 2^k exactly and x / s is exact:
    the planted grid ties, FP8-subnormal values, values at the saturation boundary, float32
    subnormals and values far below the grid all hit their intended case."""
    fmax = FP8_MAX[fmt]
    mbits, emin, emax = (3, -6, 8) if fmt == "e4m3" else (2, -14, 15)
    sub = 2.0 ** (emin - mbits)  # the grid's subnormal spacing
    top = 2.0 ** (emax - mbits)  # the grid's spacing in the binade of fmax
    vals = [fmax, -fmax, 0.0, -0.0,
            # ties between grid neighbours: to the even one (down, then up), negative
            1.0 + 2.0 ** -(mbits + 1), 1.0 + 3 * 2.0 ** -(mbits + 1), -(2.0 + 2.0 ** -mbits),
            # FP8 subnormals, their ties, and the rounding to zero / to the smallest subnormal
            sub, 3 * sub, 0.5 * sub, 1.5 * sub, 2.5 * sub, -0.5 * sub, 0.51 * sub, 0.49 * sub,
            2.0 ** emin, 2.0 ** emin - sub / 2, 2.0 ** emin - sub,
            # the saturation boundary: the tie below fmax (up for e4m3, down for e5m2: to the even
            # neighbour), just above that tie, between the tie and fmax, the point below fmax
            fmax - top / 2, fmax - top / 2 + top / 64, -(fmax - top / 4), fmax - top,
            # tiny: float32 subnormals (at k = -3) and values far below the grid
            1e-40, -1e-44, 2.0 ** -60, -(2.0 ** -30)]
    return torch.tensor(vals, dtype=torch.float64) * 2.0 ** k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FMTS)
def test_planted_hard_values(fmt, dtype):
    g = torch.Generator().manual_seed(7)
    base = hard_values(fmt)
    x = (torch.rand(70, 67, generator=g, dtype=torch.float64) * 2 - 1) * FP8_MAX[fmt] * 2.0 ** -3
    idx = torch.randperm(x.numel(), generator=g)
    # Each hard value several times, scattered over the tiles; some on the tile edges (64).
    for rep in range(4):
        x.view(-1)[idx[rep * base.numel():(rep + 1) * base.numel()]] = base
    x[63, 63], x[64, 64], x[69, 66], x[0, 64] = base[4], base[9], base[18], base[-4]
    x = x.to(dtype).to(DEV)
    _, _, s = check(x, fmt)
    assert float(s) == 2.0 ** -3
    # The same values scaled to a huge amax (s near the top of float32), to a tiny one (s below
    # DIV_FMA_MIN: the float64 division branch), and to an amax that is itself subnormal.
    for k in (110, -100, -135):
        y = hard_values(fmt, k).to(torch.float32)
        check(y.reshape(1, -1).repeat(3, 1).to(dtype).to(DEV), fmt)
    # A huge value next to tiny ones: the tiny ones go to zeros of their sign.
    z = torch.full((17, 19), -1e-30, dtype=dtype)
    z[5, 7] = 3e38
    q, _, _ = check(z.to(DEV), fmt)
    assert (codes(q) == 0x80).sum() == z.numel() - 1


# The interpreter computes x / NaN in numpy, which warns.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("fmt", FMTS)
def test_non_finite_poisons_everything(fmt):
    nan_code = fp8_quant.FP8_NAN_CODE[fmt]
    for dtype in (torch.float32, torch.bfloat16):
        for bad, where in ((float("nan"), (0, 0)), (float("inf"), (70, 3)), (float("-inf"), (12, 64))):
            x = wide((71, 66), dtype, seed=5)
            x[where] = bad
            q, q_t, s = check(x, fmt)
            assert torch.isnan(s)
            assert torch.isnan(q.float()).all() and torch.isnan(q_t.float()).all()
            assert (codes(q) == nan_code).all() and (codes(q_t) == nan_code).all()


def test_empty_and_errors():
    for shape in ((0, 5), (5, 0), (0, 0)):
        for fmt in FMTS:
            q, q_t, s = fp8_quantize_t(torch.zeros(shape, device=DEV), fmt)
            assert q.shape == shape and q_t.shape == shape[::-1] and float(s) == 1.0
            assert q.dtype == q_t.dtype == FP8_DTYPES[fmt]
    for fmt in FMTS:  # all zero: s = 1, every code +0
        q, q_t, s = check(torch.zeros(20, 30, device=DEV), fmt)
        assert float(s) == 1.0 and not codes(q).any() and not codes(q_t).any()
    with pytest.raises(ValueError, match="unknown FP8 format"):
        fp8_quantize_t(torch.zeros(2, 2, device=DEV), "e3m4")
    with pytest.raises(ValueError, match="2-D"):
        fp8_quantize_t(torch.zeros(2, 2, 2, device=DEV), "e4m3")


@pytest.mark.parametrize("fmt", FMTS)
def test_matches_the_torch_route_of_quantize_fp8(fmt):
    cases = [wide((33, 70), torch.float32, seed=21, spread=8), wide((48, 40), torch.bfloat16, seed=22),
             torch.full((16, 32), 1e-41, device=DEV)]
    for k in (-3, 100, -100):
        cases.append(hard_values(fmt, k).to(torch.float32).reshape(2, -1).to(DEV))
    for x in cases:
        q, q_t, s = fp8_quantize_t(x, fmt)
        q_ref, s_ref = fp8_gemm.quantize_fp8(x.cpu(), fmt, backend="torch")
        assert q.dtype == q_ref.dtype and torch.equal(s.cpu(), s_ref)
        assert torch.equal(codes(q), codes(q_ref))
        assert torch.equal(codes(q_t), codes(q_ref).t().contiguous())
        # q_t viewed transposed is the column-major operand _scaled_mm takes: no further copy.
        assert fp8_gemm._col_major(q_t.t()).data_ptr() == q_t.data_ptr()
