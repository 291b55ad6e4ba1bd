"""fp4.kernels.mx_rows_hadamard (the slab kernel, block_quantize HMODE 2): MX along the token axis
with the block Hadamard fused, against

- the torch reference (fp4.quantize, backend="torch") on inputs whose float32 sums are exact
  (tests/fp4/test_kernels.py's exact_hadamard_input): bit-identical;
- mx_quant's butterfly path (HMODE 0) on inputs with inexact sums: the same stages in the same
  order, so bit-identical on every input, not only where the reference has a single answer;
- itself under stochastic rounding: the same generator state gives the same bits as HMODE 0
  (the same Philox counter per element), and a different state different bits.

Under TRITON_INTERPRET=1 on the CPU (tests/conftest.py); with CUDA the compiled kernel.
"""
import os

import pytest
import torch

from fp4_reference import wide_tensor

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed: the kernels cannot run")

from fp4.kernels import triton_quantize_operand_ex  # noqa: E402
from fp4.kernels.mx_quant import KIND_MX, KIND_NVFP4, TILE_CONFIG, block_quantize  # noqa: E402
from fp4.quantize import quantize_operand  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


def same_bits(a, b):
    a32, b32 = a.float().cpu(), b.float().cpu()
    same = (a32.view(torch.int32) == b32.view(torch.int32)) | (a32.isnan() & b32.isnan())
    return bool(same.all())


def exact_input(shape, dtype, seed):
    """Integers < 2^8 times 2^-4..0 times a power of two per column: float32 sums along rows
    (the token axis) are exact."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-255, 256, shape, generator=g).float()
    x = x * torch.exp2(torch.randint(-4, 1, shape, generator=g).float())
    x = x * torch.exp2(torch.randint(-30, 30, (1, shape[1]), generator=g).float())
    return x.to(dtype).to(DEV)


def signs_for(hb, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (hb,), generator=g) * 2 - 1).float().to(DEV)


def run(x, elem="e2m1", mode="even", rounding="nearest", gen=None, hb=16, signs=None,
        config=None, scales=True):
    x3 = x.reshape(1, *x.shape) if x.dim() == 2 else x
    return block_quantize(x3.contiguous(), KIND_MX, elem, 0, mode, rounding, gen,
                          hadamard_block=hb, hadamard_signs=signs, write_scales=scales,
                          config=config)


def test_is_the_default_for_h16_along_tokens():
    assert TILE_CONFIG[(True, 0, 16, False, False)][3] == 2
    assert TILE_CONFIG[(True, 0, 16, True, False)][3] == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hb", [16, 4])  # 1/sqrt(hb) exact: every product and sum is exact
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", [(100, 40), (64, 256)])
def test_reference_bits_on_exact_sums(dtype, hb, signed, shape):
    # 100 rows: three full MX blocks and a partial one (zero-padded rows inside a Hadamard block);
    # 64 x 256: the default tile divides it, so the kernel runs without masks (EVEN).
    x = exact_input(shape, dtype, seed=hb)
    signs = signs_for(hb, 3) if signed else None
    for fmt, mode in (("mxfp4", "even"), ("mxfp4", "floor"), ("e1m2", "rceil"), ("int4", "ceil")):
        ref, _ = quantize_operand(x.cpu(), fmt, 0, scale_mode=mode, hadamard_block=hb,
                                  hadamard_signs=None if signs is None else signs.cpu(),
                                  backend="torch")
        got, ts, codes = triton_quantize_operand_ex(x, fmt, 0, "nearest", mode, None, False, hb,
                                                    signs, return_scales=True)
        assert ts is None
        assert same_bits(got, ref), (fmt, mode)
        # the scale bytes: those of the butterfly path (HMODE 0), checked against the reference
        # by tests/fp4/test_kernels.py.
        elem = {"mxfp4": "e2m1", "e1m2": "e1m2", "int4": "int4"}[fmt]
        _, _, codes0 = run(x, elem, mode, hb=hb, signs=signs, config=(32, 64, 4, 0))
        assert torch.equal(codes.cpu().reshape(codes0.shape), codes0.cpu())


@pytest.mark.parametrize("hb,config", [(16, (32, 256, 4, 2)), (16, (64, 64, 2, 2)),
                                       (32, (32, 16, 1, 2)), (2, (32, 64, 4, 2))])
def test_butterfly_bits_on_inexact_sums(hb, config):
    # randn with a wide spread (and 1/sqrt(hb) inexact for hb 2, 32): many float32 products
    # and sums round, in the same order in both kernels.
    x = wide_tensor((96, 70), torch.bfloat16, seed=5, spread=12, device=DEV)
    signs = signs_for(hb, 1)
    a, _, ca = run(x, hb=hb, signs=signs, config=config)
    b, _, cb = run(x, hb=hb, signs=signs, config=(32, 64, 4, 0))
    assert same_bits(a, b) and torch.equal(ca, cb)


def test_batched_and_specials():
    x = wide_tensor((64, 48), torch.float32, seed=2, device=DEV).reshape(2, 32, 48).clone()
    x[0, 3, 5] = float("inf")
    x[1, 7, 9] = float("nan")
    x[1, 0:32, 20] = 0.0
    a, _, ca = run(x, hb=16)
    b, _, cb = run(x, hb=16, config=(32, 64, 4, 0))
    assert same_bits(a, b) and torch.equal(ca, cb)
    assert a[0, :, 5].isnan().all() and a[1, :, 9].isnan().all()  # the whole block is poisoned
    assert (ca[0, 0, 5] == 255) and (a[1, :, 20] == 0).all()


def test_stochastic_rounding_same_draws_as_mx_quant():
    x = wide_tensor((64, 40), torch.bfloat16, seed=9, spread=6, device=DEV)
    gen = lambda s: torch.Generator(device=DEV).manual_seed(s)  # noqa: E731
    a, _, _ = run(x, rounding="stochastic", gen=gen(4))
    b, _, _ = run(x, rounding="stochastic", gen=gen(4), config=(32, 64, 4, 0))
    c, _, _ = run(x, rounding="stochastic", gen=gen(5))
    assert same_bits(a, b)
    assert not same_bits(a, c)


def test_config_errors_name_the_constraint():
    x = torch.zeros(32, 32, device=DEV)
    with pytest.raises(ValueError, match="HMODE 2"):
        run(x, hb=64, config=(64, 64, 4, 2))
    with pytest.raises(ValueError, match="HMODE 2"):
        block_quantize(x.reshape(1, 32, 32), KIND_NVFP4, "e2m1", 0, None, hadamard_block=16,
                       config=(32, 64, 4, 2))


@pytest.mark.parametrize("shape,config", [((64, 256), (32, 256, 4, 2)), ((100, 40), (32, 64, 4, 2)),
                                          ((96, 70), (64, 64, 2, 2))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_without_a_transform(shape, config, dtype):
    """HB = 1: plain MX along the tokens in the slab layout, the reference's bits (nearest, every
    scale mode) and mx_quant's draws under stochastic rounding."""
    x = wide_tensor(shape, dtype, seed=13, spread=20, device=DEV)
    x[:32, 3] = 0.0
    x[5, 7] = float("inf")
    for fmt, elem, mode in (("mxfp4", "e2m1", "even"), ("mxfp4", "e2m1", "floor"), ("e1m2", "e1m2", "rceil"),
                            ("int4", "int4", "ceil")):
        ref, _ = quantize_operand(x.cpu(), fmt, 0, scale_mode=mode, backend="torch")
        got, _, codes = run(x, elem, mode, hb=1, config=config)
        _, _, codes0 = run(x, elem, mode, hb=1, config=(32, 64, 4, 0))
        assert same_bits(got.reshape(ref.shape), ref), (fmt, mode)
        assert torch.equal(codes, codes0)
    gen = lambda s: torch.Generator(device=DEV).manual_seed(s)  # noqa: E731
    a, _, _ = run(x, rounding="stochastic", gen=gen(4), hb=1, config=config)
    b, _, _ = run(x, rounding="stochastic", gen=gen(4), hb=1, config=(32, 64, 4, 0))
    assert same_bits(a, b)
