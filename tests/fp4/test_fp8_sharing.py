"""Fprop's FP8 copies of X and W serve Dgrad and Wgrad (fp4.gemm.fp8_shared_copies).

Per-tensor FP8 of a tensor is the same whatever GEMM asks for it, so sharing must give the bits the
layer computed when it re-quantized X and W in backward, while keeping X for backward in FP8 (one
byte per element) instead of the compute dtype. Real FP8 GEMMs need FP8 tensor cores: the CPU
stands in by saying it has them (torch._scaled_mm runs on the CPU too); check_finite turns sharing
off (it reads the high-precision X in Wgrad), which gives the unshared reference in one process.
"""
import pytest
import torch

from fp4 import fp8_gemm
from fp4.linear import QuantLinear, QuantState, record_gemms
from fp4.recipe import Recipe


def _layer(tokens_ok=True):
    torch.manual_seed(0)
    layer = QuantLinear(64, 48, bias=True, recipe=Recipe("fp8"), state=QuantState(seed=1))
    x = torch.randn(32 if tokens_ok else 30, 64, requires_grad=True)
    return layer, x


def _grads(layer, x, check: bool):
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer.check_finite = check
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
    return [y.detach(), x.grad, layer.weight.grad, layer.bias.grad], saved


@pytest.fixture
def fp8_cores(monkeypatch):
    if not hasattr(torch, "_scaled_mm"):
        pytest.skip("this torch has no _scaled_mm")
    monkeypatch.setattr(fp8_gemm, "fp8_path_available", lambda device: True)
    probe = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    one = torch.ones((), dtype=torch.float32)
    try:
        torch._scaled_mm(probe, probe.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"torch._scaled_mm does not run on this CPU build: {err}")


def test_shared_copies_give_the_requantized_bits_and_keep_x_in_fp8(fp8_cores):
    layer, x = _layer()
    shared, saved_shared = _grads(layer, x, check=False)
    unshared, saved_unshared = _grads(layer, x, check=True)
    for a, b in zip(shared, unshared):
        assert torch.equal(a, b)
    float8 = {torch.float8_e4m3fn, torch.float8_e5m2}
    # Shared: X^T and W^T in FP8 (plus their scales), no high-precision X among the saved tensors.
    assert sum(n for d, n in saved_shared if d in float8) == 32 * 64 + 48 * 64
    assert (torch.float32, 32 * 64) not in saved_shared
    assert (torch.float32, 32 * 64) in saved_unshared
    assert not any(d in float8 for d, _ in saved_unshared)


def test_no_sharing_where_a_backward_gemm_cannot_run_in_fp8(fp8_cores):
    # 30 tokens: Wgrad's reduction (K = tokens) is not a multiple of 16, so Wgrad is emulated and
    # needs the high-precision X; the layer then saves X as before.
    layer, x = _layer(tokens_ok=False)
    with record_gemms() as records:
        _, saved = _grads(layer, x, check=False)
    assert (torch.float32, 30 * 64) in saved
    paths = {r.gemm: r.path for r in records}
    assert paths["wgrad"].endswith("(emulated)") and paths["fprop"].endswith("(torch._scaled_mm)")
