"""ExecutionConfig: per-model execution settings carried by QuantState (no process-wide switches)."""
import copy
from collections import Counter

import pytest
import torch
from torch import nn

import fp4.kernels as kernels
from fp4 import fp8_gemm
from fp4.linear import ExecutionConfig, QuantLinear, QuantState, gemm_paths, record_gemms, swap_linears
from fp4.names import QuantBackend
from fp4.recipe import Recipe


def _model(recipe, execution):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    state = QuantState(seed=recipe.seed, execution=execution)
    assert swap_linears(model, recipe, state) == 2
    return model, state


def _step(model):
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    model(x).sum().backward()
    return x.grad


def test_execution_config_validates_and_normalizes():
    assert ExecutionConfig() == ExecutionConfig(QuantBackend.auto, True)
    assert ExecutionConfig("torch").quant_backend is QuantBackend.torch
    assert ExecutionConfig(real_fp8=0).real_fp8 is False
    with pytest.raises(ValueError, match="auto, torch, triton"):
        ExecutionConfig("cuda")
    with pytest.raises(Exception):
        ExecutionConfig().real_fp8 = False  # frozen
    with pytest.raises(TypeError):
        QuantState(execution={"real_fp8": False})


def test_two_models_in_one_process_each_run_as_built(monkeypatch):
    # Pretend the device has FP8 tensor cores: whether a GEMM takes torch._scaled_mm is then decided
    # by each model's own ExecutionConfig alone.
    monkeypatch.setattr(fp8_gemm, "fp8_path_available", lambda device: True)
    real, real_state = _model(Recipe("fp8"), ExecutionConfig(QuantBackend.torch, real_fp8=True))
    emul, emul_state = _model(Recipe("fp8"), ExecutionConfig(QuantBackend.auto, real_fp8=False))
    with record_gemms() as everything, real_state.record_gemms() as mine:
        g_real = _step(real)
        g_emul = _step(emul)
        g_real_again = _step(real)  # interleaving does not leak one model's settings into the other
    # 2 layers x 3 GEMMs x 2 operands per step; the model's own recorder sees only its 2 steps.
    kinds = lambda records: Counter((r.path.rsplit(" ", 1)[-1], r.quant_backend) for r in records)
    assert kinds(everything) == {("(torch._scaled_mm)", "torch"): 24, ("(emulated)", "auto"): 12}
    assert kinds(mine) == {("(torch._scaled_mm)", "torch"): 24}
    torch.testing.assert_close(g_real, g_emul, rtol=1e-5, atol=1e-5)
    assert torch.equal(g_real, g_real_again)
    assert gemm_paths(Recipe("fp8"), "cuda", emul_state.execution)["wgrad"] == "fp8:e5m2xe4m3 (emulated)"
    assert gemm_paths(Recipe("fp8"), "cuda", real_state.execution)["wgrad"] == "fp8:e5m2xe4m3 (torch._scaled_mm)"


def test_quant_backend_reaches_the_dispatcher_per_model(monkeypatch):
    calls = []

    def fake_kernel(x, fmt, *args):
        calls.append(fmt)
        from fp4.quantize import quantize_operand
        return quantize_operand(x, fmt, *args[:1], rounding=args[1], scale_mode=args[2], backend="torch")

    monkeypatch.setattr(kernels, "triton_quantize_operand", fake_kernel)
    monkeypatch.setattr(kernels, "triton_available", lambda x: True)
    forced, _ = _model(Recipe("wgrad"), ExecutionConfig("triton"))
    ref, _ = _model(Recipe("wgrad"), ExecutionConfig("torch"))
    g_ref = _step(ref)
    assert calls == []
    g_forced = _step(forced)
    assert calls and set(calls) == {"mxfp4"} and len(calls) == 2 * 6  # 2 layers x 6 quantized operands
    assert torch.equal(g_ref, g_forced)


def test_execution_is_given_to_swap_linears_and_quantlinear():
    model = nn.Sequential(nn.Linear(8, 8))
    swap_linears(model, Recipe("fprop"), execution=ExecutionConfig("torch", False))
    assert model[0].state.execution == ExecutionConfig("torch", False)
    layer = QuantLinear.from_linear(nn.Linear(8, 8), Recipe("fprop"), execution=ExecutionConfig(real_fp8=False))
    assert layer.state.execution.real_fp8 is False
    with pytest.raises(ValueError, match="disagrees"):
        swap_linears(copy.deepcopy(nn.Sequential(nn.Linear(8, 8))), Recipe("fprop"), QuantState(),
                     execution=ExecutionConfig("torch"))
    # Not training state: a checkpoint does not carry it.
    assert QuantState(execution=ExecutionConfig("torch")).state_dict() == {"seed": 0, "step": 0}
