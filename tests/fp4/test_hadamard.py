"""Block Hadamard transform: orthogonality, GEMM invariance, signs, determinism, padding, errors."""
import math

import pytest
import torch

import fp4
from fp4.transforms import hadamard, hadamard_matrix, random_signs

BLOCKS = [1, 2, 4, 8, 16, 32, 64, 128]


def _walsh(b):
    """Sylvester Hadamard entry by entry: H[i, j] = (-1)^popcount(i & j)."""
    return torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(b)] for i in range(b)],
                        dtype=torch.float64)


def _reference(x, block, signs=None):
    """float64 block transform along the last dim (a multiple of block)."""
    xb = x.double().reshape(*x.shape[:-1], -1, block)
    if signs is not None:
        xb = xb * signs.double()
    return (xb @ _walsh(block) / math.sqrt(block)).reshape(x.shape)


@pytest.mark.parametrize("block", BLOCKS)
def test_matrix_is_sylvester_and_orthonormal(block):
    h = hadamard_matrix(block, torch.float64)
    assert torch.allclose(h, _walsh(block) / math.sqrt(block), rtol=0, atol=1e-15)
    assert torch.allclose(h @ h.T, torch.eye(block, dtype=torch.float64), rtol=0, atol=1e-12)
    if math.log2(block) % 2 == 0:  # 1/sqrt(b) is a power of two: exact even in float32
        h32 = hadamard_matrix(block, torch.float32)
        assert torch.equal(h32 @ h32.T, torch.eye(block))


def test_matrix_is_cached():
    assert hadamard_matrix(16) is hadamard_matrix(16)
    assert hadamard_matrix(16, torch.float64) is not hadamard_matrix(16)


@pytest.mark.parametrize("block", [2, 16, 64])
def test_transform_matches_reference(block):
    gen = torch.Generator().manual_seed(block)
    x = torch.randn(5, 3, 128, generator=gen, dtype=torch.float64)
    signs = random_signs(block, gen).double()
    assert torch.allclose(hadamard(x, block), _reference(x, block), rtol=0, atol=1e-12)
    assert torch.allclose(hadamard(x, block, signs=signs), _reference(x, block, signs), rtol=0, atol=1e-12)
    y = hadamard(x.float(), block, signs=signs.float())
    assert y.dtype == torch.float32
    assert torch.allclose(y.double(), _reference(x.float(), block, signs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("signed", [False, True])
def test_gemm_products_are_preserved(signed):
    gen = torch.Generator().manual_seed(1)
    signs = random_signs(16, gen) if signed else None
    x, w = torch.randn(48, 64, generator=gen), torch.randn(32, 64, generator=gen)
    # Fprop / Dgrad: both operands along their shared last dim.
    assert torch.allclose(hadamard(x, signs=signs) @ hadamard(w, signs=signs).T, x @ w.T, rtol=1e-5, atol=1e-4)
    # Wgrad: dY^T X with both operands transformed along the token axis (dim 0).
    dy = torch.randn(48, 32, generator=gen)
    got = hadamard(dy, axis=0, signs=signs).T @ hadamard(x, axis=0, signs=signs)
    assert torch.allclose(got, dy.T @ x, rtol=1e-5, atol=1e-4)
    # In float64 the invariance holds to rounding of the exact identity.
    xd, wd = x.double(), w.double()
    sd = None if signs is None else signs.double()
    assert torch.allclose(hadamard(xd, signs=sd) @ hadamard(wd, signs=sd).T, xd @ wd.T, rtol=0, atol=1e-12)


def test_deterministic_without_signs_and_per_seed_with_signs():
    x = torch.randn(8, 64)
    assert torch.equal(hadamard(x), hadamard(x))
    a = random_signs(16, torch.Generator().manual_seed(7))
    b = random_signs(16, torch.Generator().manual_seed(7))
    c = random_signs(16, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and set(a.tolist()) <= {-1.0, 1.0}
    assert torch.equal(hadamard(x, signs=a), hadamard(x, signs=b))
    assert not torch.equal(hadamard(x, signs=a), hadamard(x, signs=c))
    many = torch.stack([random_signs(64, torch.Generator().manual_seed(s)) for s in range(50)])
    assert abs(many.mean().item()) < 0.1  # both signs are drawn


def test_axis_dtype_and_shape():
    x = torch.randn(32, 3, 16, dtype=torch.float64)
    y = hadamard(x, 16, axis=0)
    assert torch.allclose(y, hadamard(x.movedim(0, -1), 16).movedim(-1, 0), rtol=0, atol=1e-15)
    xb = x.to(torch.bfloat16)
    yb = hadamard(xb, 16, axis=-1)
    assert yb.dtype == torch.bfloat16 and yb.shape == xb.shape
    assert torch.equal(yb, fp4.hadamard(xb.float(), 16).to(torch.bfloat16))  # float32 math, one rounding


def test_non_multiple_length_is_zero_padded_and_cut():
    x = torch.randn(4, 20, 3)
    padded = torch.cat([x, torch.zeros(4, 12, 3)], dim=1)
    assert torch.equal(hadamard(x, 16, axis=1), hadamard(padded, 16, axis=1)[:, :20])


@pytest.mark.parametrize("block", [0, 3, 12, 24, -16, 2.0])
def test_non_power_of_two_block_is_rejected(block):
    with pytest.raises(ValueError, match="power of two"):
        hadamard(torch.ones(4, 48), block)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(block)


def test_package_attribute_is_callable_even_after_the_submodule_import():
    import fp4.transforms  # importing the submodule must not shadow fp4.hadamard
    x = torch.randn(4, 32)
    assert torch.equal(fp4.hadamard(x, 16, -1, None), hadamard(x))
    assert torch.equal(fp4.hadamard(x, block=8, axis=0), hadamard(x, 8, 0))


def test_bad_signs_and_axis():
    with pytest.raises(ValueError, match="shape"):
        hadamard(torch.ones(4, 32), 16, signs=torch.ones(8))
    with pytest.raises(IndexError):
        hadamard(torch.ones(4, 32), 16, axis=2)
