"""fp4.kernels._bits.div_f32_fma: the quantizers' x / s from one reciprocal per divisor and four
FMAs per element, against the IEEE float32 division (torch's on the CPU, or on the GPU).

The claim is exactness (Markstein's theorem) for divisors in [DIV_FMA_MIN, DIV_FMA_MAX) and
quotients >= DIV_FMA_TINY; the cases below aim at where a Newton-style division goes wrong:
divisors whose significand is all ones (1 / b just above a float32 tie), quotients next to
float32 ties (a = b * m * (1 +- k ulp) with m of few bits), bf16 numerators over float32 scales
(the quantizers' own case), and the ends of the range. Under TRITON_INTERPRET=1 this needs an
interpreter whose tl.fma rounds once (Triton 3.9's does, 3.6's does not): otherwise the
file is skipped, saying so.
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run")
import triton.language as tl  # noqa: E402

from fp4.kernels._bits import DIV_FMA_MAX, DIV_FMA_MIN, DIV_FMA_TINY, div_f32_fma, recip_f32  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
N = 1 << 18


@triton.jit
def _divide(a_ptr, b_ptr, q_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    a = tl.load(a_ptr + offs, mask=mask, other=1.0)
    b = tl.load(b_ptr + offs, mask=mask, other=1.0)
    tl.store(q_ptr + offs, div_f32_fma(a, b, recip_f32(b)), mask=mask)


@triton.jit
def _fma_probe(p):
    a = tl.load(p)
    c = tl.load(p + 1)
    tl.store(p, tl.fma(a, a, c))


def divide(a, b):
    a, b = a.float().contiguous().to(DEV), b.float().contiguous().to(DEV)
    q = torch.empty_like(a)
    block = 1 << 16
    _divide[(triton.cdiv(a.numel(), block),)](a, b, q, a.numel(), BLOCK=block)
    return q


def mismatches(a, b):
    q, want = divide(a, b).cpu(), (a.float() / b.float()).cpu()
    return int((q.view(torch.int32) != want.view(torch.int32)).sum())


@pytest.fixture(scope="module", autouse=True)
def fma_rounds_once():
    if CUDA:
        return
    # a = 1 + 2^-23: a * a = 1 + 2^-22 + 2^-46, so fma(a, a, -a) = 2^-23 + 2^-46 exactly, while a
    # multiply rounded before the add gives 2^-23.
    t = torch.tensor([1 + 2.0 ** -23, -1 - 2.0 ** -23], dtype=torch.float32)
    _fma_probe[(1,)](t)
    if float(t[0]) != 2.0 ** -23 + 2.0 ** -46:
        pytest.skip(f"this Triton's interpreter ({triton.__version__}) rounds tl.fma twice: "
                    f"the kernels' division can only be checked on a GPU or with an exact interpreter (3.9's)")


def significands(n, g):
    return 1 + torch.randint(0, 1 << 23, (n,), generator=g).double() / (1 << 23)


def test_random_operands():
    g = torch.Generator().manual_seed(0)
    a = significands(N, g) * 2.0 ** torch.randint(-40, 40, (N,), generator=g).double()
    b = significands(N, g) * 2.0 ** torch.randint(-59, 100, (N,), generator=g).double()
    a = torch.where(torch.rand(N, generator=g) < 0.5, a, -a)
    assert mismatches(a, b) == 0


def test_divisor_significand_all_ones():
    g = torch.Generator().manual_seed(1)
    a = significands(N, g) * 2.0 ** torch.randint(-20, 20, (N,), generator=g).double()
    b = (2 - 2.0 ** -23) * 2.0 ** torch.randint(-59, 100, (N,), generator=g).double()
    assert mismatches(a, b) == 0


def test_quotients_next_to_float32_ties():
    g = torch.Generator().manual_seed(2)
    b = significands(N, g)
    m = torch.randint(1, 64, (N,), generator=g).double() * 2.0 ** torch.randint(-10, 5, (N,), generator=g).double()
    k = torch.randint(-3, 4, (N,), generator=g).double()
    a = (b * m * (1 + k * 2.0 ** -24)).float()
    assert mismatches(a, b) == 0


def test_bf16_over_float32_scales():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(N, generator=g) * 3).bfloat16().float()
    s = (torch.rand(N, generator=g) + 2.0 ** -20) * 2.0 ** torch.randint(-59, 100, (N,), generator=g).float()
    assert mismatches(x, s) == 0


def test_range_ends():
    """The divisors at DIV_FMA_MIN and just below DIV_FMA_MAX, quotients from DIV_FMA_TINY up."""
    g = torch.Generator().manual_seed(4)
    lo, hi, tiny = DIV_FMA_MIN.value, DIV_FMA_MAX.value, DIV_FMA_TINY.value
    n = N // 4
    b = torch.cat([lo * significands(n, g).clamp(max=1.0), torch.full((n,), lo),
                   hi * (1 - 2.0 ** -24) / significands(n, g), torch.full((n,), hi * (1 - 2.0 ** -24))])
    q = tiny * significands(4 * n, g) * 2.0 ** torch.randint(0, 42, (4 * n,), generator=g).double()
    a = (b * q).float()  # a / b within an ulp or two of q: >= DIV_FMA_TINY, a finite
    keep = (a.double() / b.float().double()).abs() >= tiny
    assert bool(keep.all()) and bool(a.isfinite().all())
    assert mismatches(a, b) == 0
