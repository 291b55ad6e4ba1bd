"""fake_quantize / quantize_operand: bit-exact against fp4_reference, layout, padding, dispatch, errors."""
import math

import pytest
import torch

import fp4
import fp4_reference as ref
from fp4.quantize import BACKENDS, FORMATS, ROUNDINGS, SCALE_MODES, quantize_operand

F32 = torch.float32
MX = ["mxfp4", "e1m2", "int4"]
INF = torch.tensor(math.inf)


def _edge_blocks(fmt):
    """[n, 32] float32 MX blocks that sit on the rules' edges (see each comment)."""
    grid = ref.GRIDS[ref.ELEMENT_OF[fmt]]
    top = grid.max
    mids = ((grid.values[1:] + grid.values[:-1]) / 2).tolist()
    rows = []
    for k in (-130, -20, 0, 9, 100):
        # Exact element ties at scale 2^k (block max M * 2^k fixes the floor/even scale), and one
        # float32 ulp either side of every tie.
        tie = torch.tensor([top] + mids + [-m for m in mids], dtype=torch.float64) * 2.0 ** k
        tie = tie.to(F32)
        for row in (tie, torch.nextafter(tie, INF), torch.nextafter(tie, -INF)):
            rows.append(torch.cat([row, torch.zeros(32 - row.numel())]))
    gen = torch.Generator().manual_seed(2)
    small = torch.rand(31, generator=gen, dtype=torch.float64) * 2 - 1
    for amax in [2.0 ** -127, 2.0 ** -126, 2.0 ** 0, 2.0 ** 64, 2.0 ** -149, 2.0 ** -140 * 1.5,
                 2.0 ** -127 * 6, 2.0 ** -125 * 1.75, 2.0 ** -124 * 7, torch.finfo(F32).max,
                 2.0 ** 127 * 1.5, 2.0 ** -100 * 7.5]:
        # amax exactly a power of two, subnormal amax, amax at and just above 2^-127 * M.
        for a in (amax, float(torch.nextafter(torch.tensor(amax, dtype=F32), INF))):
            rows.append(torch.cat([torch.tensor([a]), small * a]).to(F32))
    subnormals = torch.randint(-2 ** 20, 2 ** 20, (32,), generator=gen).to(torch.float64) * 2.0 ** -149
    rows += [subnormals.to(F32), torch.zeros(32), -torch.zeros(32)]
    for special in (math.inf, -math.inf, math.nan):
        row = torch.linspace(-1, 1, 32)
        row[5] = special
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("mode", SCALE_MODES)
@pytest.mark.parametrize("fmt", MX)
def test_mx_bit_exact_on_a_million_values(fmt, mode):
    gen = torch.Generator().manual_seed(100 + MX.index(fmt) * 4 + SCALE_MODES.index(mode))
    # >= 2^20 values over 40+ binades, plus blocks drawn from every float32 bit pattern.
    x = torch.cat([ref.mx_blocks(1 << 15, gen), _edge_blocks(fmt),
                   ref.random_float32_bits(1 << 15, gen).reshape(-1, 32)])
    got = fp4.fake_quantize(x, fmt, scale_mode=mode)
    assert got.dtype == F32
    ref.assert_same_bits(got, ref.mx_quantize(x, fmt, mode))


@pytest.mark.parametrize("mode", SCALE_MODES)
def test_mxfp4_bfloat16_outputs_are_exact(mode):
    gen = torch.Generator().manual_seed(21)
    x = torch.cat([ref.mx_blocks(1 << 13, gen), _edge_blocks("mxfp4")]).to(torch.bfloat16)
    got = fp4.fake_quantize(x, "mxfp4", scale_mode=mode)
    assert got.dtype == torch.bfloat16
    # Comparing in float64 proves both correctness and that nothing was rounded by the bf16 cast.
    ref.assert_same_bits(got.double(), ref.mx_quantize(x.float(), "mxfp4", mode))


def _nvfp4_tensors(gen, count=32):
    for i in range(count):
        base = 2.0 ** float(torch.randint(-20, 20, (), generator=gen))
        spread = float(torch.randint(2, 16, (), generator=gen))
        yield (ref.wide_binade_values(64 * 512, gen, -spread, 1.0).double() * base).to(F32).reshape(64, 512)


def _nvfp4_edge_tensors():
    # Global amax 2688 makes s_g = 1, so a block with amax 6 * b has s_b = b exactly and x = mid * b
    # is an exact e2m1 tie in x / s; nextafter moves one float32 ulp off the tie.
    e2m1 = ref.GRIDS["e2m1"].values
    mids = ((e2m1[1:] + e2m1[:-1]) / 2)
    rows = [torch.full((16,), 2688.0, dtype=torch.float64)]
    for b in ref.GRIDS["e4m3"].values[1:]:
        rows.append(torch.cat([torch.tensor([6.0]), mids, -mids, torch.zeros(1)]) * b)
    ties = torch.stack(rows).to(F32)
    yield ties
    yield torch.nextafter(ties, INF)
    yield torch.nextafter(ties, -INF)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 64, generator=gen)
    for scale in (2.0 ** -126, 2.0 ** -135, 2.0 ** -145, 2.0 ** 100, 0.0):  # s_g subnormal, 0 ...
        yield (x.double() * scale).to(F32)
    yield ref.random_float32_bits(1 << 12, gen).reshape(64, 64)
    yield ref.random_float32_bits(1 << 12, gen).reshape(64, 64) * 2.0 ** -100
    for special in (math.inf, math.nan):
        y = x.clone()
        y[3, 7] = special
        yield y


def test_nvfp4_bit_exact_against_float32_emulation():
    gen = torch.Generator().manual_seed(31)
    n = 0
    for x in list(_nvfp4_tensors(gen)) + list(_nvfp4_edge_tensors()):
        x_dq, s_g = quantize_operand(x, "nvfp4", -1)
        want_dq, want_s_g, want = ref.nvfp4_quantize(x)
        ref.assert_same_bits(x_dq, want_dq)
        ref.assert_same_bits(s_g.reshape(1), want_s_g.reshape(1))
        ref.assert_same_bits(fp4.fake_quantize(x, "nvfp4"), want)
        n += x.numel()
    assert n >= 10 ** 6


def test_nvfp4_2d_tiles():
    gen = torch.Generator().manual_seed(41)
    x = (torch.randn(96, 64, generator=gen) * torch.exp2(torch.randint(-6, 6, (96, 1), generator=gen)))
    got, s_g = quantize_operand(x, "nvfp4", -1, block_2d=True)
    want, want_s_g, _ = ref.nvfp4_quantize(x, tiles=True)
    ref.assert_same_bits(got, want)
    # A tile is the same set of values whichever axis the GEMM reduces over.
    ref.assert_same_bits(quantize_operand(x, "nvfp4", 0, block_2d=True)[0], got)
    assert not torch.equal(quantize_operand(x, "nvfp4", 0)[0], quantize_operand(x, "nvfp4", -1)[0])


def _fp8_tensors(fmt, gen):
    top = ref.GRIDS[fmt].max
    for i in range(32):
        base = 2.0 ** float(torch.randint(-20, 20, (), generator=gen))
        spread = float(torch.randint(2, 34, (), generator=gen))  # reaches the FP8 subnormals
        yield (ref.wide_binade_values(64 * 512, gen, -spread, 1.0).double() * base).to(F32).reshape(64, 512)
    g = ref.GRIDS[fmt].values
    mids = ((g[1:] + g[:-1]) / 2).to(F32)
    ties = torch.cat([torch.tensor([top]), mids, -mids])  # amax == max: s == 1, exact ties
    yield from (ties, torch.nextafter(ties, INF), torch.nextafter(ties, -INF))
    yield ref.random_float32_bits(1 << 12, gen)
    yield from (torch.zeros(7), torch.full((5,), 2.0 ** -149), torch.tensor([1.0, math.inf]),
                torch.tensor([math.nan, 2.0]), torch.tensor([3e38, -1.0, 2.0 ** -140]))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_bit_exact(fmt):
    gen = torch.Generator().manual_seed(51)
    for x in _fp8_tensors(fmt, gen):
        q, s = quantize_operand(x, fmt, -1)
        want_q, want_s, want = ref.fp8_quantize(x, fmt)
        ref.assert_same_bits(q, want_q)
        ref.assert_same_bits(s.reshape(1), want_s.reshape(1))
        ref.assert_same_bits(fp4.fake_quantize(x, fmt), want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_any_axis_and_rank(fmt):
    gen = torch.Generator().manual_seed(61)
    x = torch.randn(3, 64, 5, 32, generator=gen)
    for axis in range(-4, 4):
        got = fp4.fake_quantize(x, fmt, axis=axis)
        want = fp4.fake_quantize(x.movedim(axis, -1).contiguous(), fmt).movedim(-1, axis)
        assert got.shape == x.shape and torch.equal(got, want), axis


# Per-tensor SR draws x.shape uniforms, so a padded copy would draw different ones: not comparable.
@pytest.mark.parametrize("fmt, rounding", [(f, r) for f in FORMATS for r in ROUNDINGS
                                           if not (f in ("e4m3", "e5m2") and r == "stochastic")])
def test_non_multiple_axis_equals_zero_padded_math(fmt, rounding):
    gen = torch.Generator().manual_seed(71)
    x = torch.randn(6, 70, 3, generator=gen)
    block = 16 if fmt == "nvfp4" else 32  # per-tensor formats: any zero pad must be harmless
    padded = torch.cat([x, torch.zeros(6, (-70) % block, 3)], dim=1)
    kw = dict(rounding=rounding)
    got = quantize_operand(x, fmt, 1, generator=torch.Generator().manual_seed(5), **kw)
    want = quantize_operand(padded, fmt, 1, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(got[0], want[0][:, :70]), fmt
    assert (got[1] is None) == (want[1] is None) and (got[1] is None or torch.equal(got[1], want[1]))


def test_nvfp4_2d_tiles_pad_both_dims():
    gen = torch.Generator().manual_seed(72)
    x = torch.randn(40, 50, generator=gen)
    padded = torch.zeros(48, 64)
    padded[:40, :50] = x
    got, s_g = quantize_operand(x, "nvfp4", -1, block_2d=True)
    want, want_s_g = quantize_operand(padded, "nvfp4", -1, block_2d=True)
    assert torch.equal(got, want[:40, :50]) and torch.equal(s_g, want_s_g)


def test_hadamard_is_applied_first_in_float32():
    gen = torch.Generator().manual_seed(81)
    x = torch.randn(16, 64, generator=gen).to(torch.bfloat16)
    signs = fp4.transforms.random_signs(16, torch.Generator().manual_seed(1))
    rotated = fp4.transforms.hadamard_compute(x, 16, 0, signs)
    assert rotated.dtype == F32
    for fmt in ("mxfp4", "nvfp4", "e4m3"):
        got = quantize_operand(x, fmt, 0, hadamard_block=16, hadamard_signs=signs)
        want = quantize_operand(rotated, fmt, 0)
        assert got[0].dtype == torch.bfloat16
        assert torch.equal(got[0].float(), want[0]), fmt  # exact in bf16: no second rounding


def test_operand_scales_are_separate():
    gen = torch.Generator().manual_seed(91)
    x = torch.randn(4, 64, generator=gen) * 1e-3
    assert quantize_operand(x, "mxfp4", -1)[1] is None
    for fmt in ("nvfp4", "e4m3", "e5m2"):
        x_dq, s = quantize_operand(x, fmt, -1)
        assert s.dtype == F32 and s.dim() == 0
        assert torch.equal((x_dq * s), fp4.fake_quantize(x, fmt))


def test_defaults_and_names():
    assert FORMATS == ("mxfp4", "nvfp4", "e1m2", "int4", "e4m3", "e5m2", "e2m1")
    assert ROUNDINGS == ("nearest", "stochastic") and SCALE_MODES == ("floor", "ceil", "rceil", "even")
    assert BACKENDS == ("auto", "torch", "triton")
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3)) * 7
    assert torch.equal(fp4.fake_quantize(x, "mxfp4"), fp4.fake_quantize(x, "mxfp4", scale_mode="even"))
    sr = dict(rounding="stochastic")
    a = fp4.fake_quantize(x, "mxfp4", generator=torch.Generator().manual_seed(1), **sr)
    b = fp4.fake_quantize(x, "mxfp4", scale_mode="rceil", generator=torch.Generator().manual_seed(1), **sr)
    assert torch.equal(a, b)
    assert fp4.fake_quantize(torch.empty(0, 32), "nvfp4").shape == (0, 32)


@pytest.mark.parametrize("kwargs, names", [
    (dict(fmt="fp4"), "mxfp4, nvfp4, e1m2, int4, e4m3, e5m2"),
    (dict(fmt="mxfp4", rounding="down"), "nearest, stochastic"),
    (dict(fmt="mxfp4", scale_mode="round"), "floor, ceil, rceil, even"),
    (dict(fmt="mxfp4", backend="cuda"), "auto, torch, triton"),
    (dict(fmt="nvfp4", scale_mode="even"), "mxfp4, e1m2, int4"),
    (dict(fmt="mxfp4", block_2d=True), "nvfp4"),
    (dict(fmt="mxfp4", hadamard_block=12), "power of two"),
    (dict(fmt="mxfp4", hadamard_signs=torch.ones(16)), "hadamard_block"),
])
def test_bad_arguments_name_the_valid_choices(kwargs, names):
    with pytest.raises(ValueError, match=names):
        quantize_operand(torch.ones(2, 32), axis=-1, **kwargs)


def test_backend_dispatch(monkeypatch):
    import fp4.kernels as kernels
    calls = []

    def fake_kernel(*args):
        calls.append(args)
        return "kernel"

    monkeypatch.setattr(kernels, "triton_quantize_operand", fake_kernel, raising=False)
    monkeypatch.setattr(kernels, "triton_available", lambda x: True, raising=False)
    x = torch.randn(2, 32)
    assert quantize_operand(x, "mxfp4", -1, backend="triton") == "kernel"
    # The kernel receives the resolved scale mode, not None.
    assert calls[0][:5] == (x, "mxfp4", -1, "nearest", "even") and len(calls[0]) == 9
    # auto on a CPU tensor never takes the kernel; torch never does.
    assert quantize_operand(x, "mxfp4", -1)[1] is None
    assert quantize_operand(x, "mxfp4", -1, backend="torch")[1] is None
    assert len(calls) == 1
    monkeypatch.delattr(kernels, "triton_quantize_operand")
    with pytest.raises(RuntimeError, match="Triton"):
        quantize_operand(x, "mxfp4", -1, backend="triton")
