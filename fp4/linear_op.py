"""The quantized linear as two torch.library custom ops, so torch.compile traces it without breaks.

    fp4::quant_linear           Fprop:  (X, W, bias, layer, compute_dtype) -> (Y, where)
    fp4::quant_linear_backward  Dgrad, Wgrad and the bias gradient from (dY, X, W, layer, where)

Why custom ops rather than an autograd.Function
===============================================
Dynamo traces into an autograd.Function and into everything it calls. The emulation draws its
randomness from torch.Generators seeded by a hash of (seed, step, layer, GEMM, operand, call) and
counts calls per step in Python (fp4/state.py): traced, each of those Python ints becomes a guard,
so the graph recompiles every step and every layer, and Generators break the graph. A custom op
is opaque to the compiler: its fake implementation gives the output shapes, and at run time the
real implementation runs the same Python as in eager, reading step and call from the layer's
QuantState. So a compiled step quantizes exactly what the eager step quantizes, bit for bit
(tests/fp4/test_compile.py), and the compiler fuses everything around the linears (norms,
activations, residuals, the loss).

Naming the layer without specializing on it
===========================================
Ops take tensors and scalars only, so a layer is passed as `layer`, a one-element int64 CPU tensor
(a plain attribute of the QuantLinear, not a buffer: it stays on the CPU, out of the state_dict and
of FSDP's reach) that keys a table of live layers. A Python int would be a constant the compiled
code guards on, one recompilation per layer; a tensor is a graph input, so one compiled decoder
layer serves every decoder layer (regional compilation, experiments/training/setup.py). The table
holds weak references: it is a lookup of live modules, not a setting.

`where` (int64 [2] on the CPU: step, call index) is Fprop's second output, saved for backward: the
backward op rebuilds the call of its own forward from it, so Dgrad and Wgrad draw from the
identities of their forward. Observers (record_gemms, the diagnostics probe) belong to the forward
too: "the GEMMs of forwards started inside the block" include their backward GEMMs even when the
backward runs after the block, so a forward that has observers leaves them in `_OBSERVERS` under
its (layer, step, call) for its backward to take; a forward without observers leaves nothing, and
entries of a forward that never got a backward (no_grad) are dropped at that layer's next step.

The partitioner of torch.compile never recomputes a custom op (only cheap pointwise ops), so each
op runs once per forward and once per backward, and the call counter counts as in eager.
Activation checkpointing recomputes through QuantState.replaying (experiments/distributed.py).
"""
from __future__ import annotations

import itertools
import weakref
from typing import List, Optional, Tuple

import torch

from fp4.formats import FP8_DTYPES
from fp4.gemm import BOTH_LAYOUTS, Fp8Copy, _GemmCall, _run_gemm

__all__ = ["register_layer", "quant_linear", "quant_linear_backward"]

_LAYERS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def register_layer(module: torch.nn.Module) -> torch.Tensor:
    """Enter `module` in the table of live layers; returns its `layer` tensor for the ops."""
    key = next(_KEYS)
    _LAYERS[key] = module
    return torch.tensor([key], dtype=torch.int64)


def _layer(layer: torch.Tensor) -> torch.nn.Module:
    key = int(layer[0])
    module = _LAYERS.get(key)
    if module is None:
        raise RuntimeError(f"quantized linear #{key} is no longer alive (was its module deleted?)")
    return module


def _where(call: _GemmCall) -> torch.Tensor:
    return torch.tensor([call.step, call.call], dtype=torch.int64)


# (layer key, step, call) -> (record sinks, probe) of a forward that had observers.
_OBSERVERS: dict = {}


def _leave_observers(key: int, call: _GemmCall) -> None:
    for stale in [k for k in _OBSERVERS if k[0] == key and k[1] < call.step]:
        del _OBSERVERS[stale]
    if call.records or call.probe is not None:
        _OBSERVERS[(key, call.step, call.call)] = (call.records, call.probe)


def _take_observers(key: int, call: _GemmCall) -> None:
    call.records, call.probe = _OBSERVERS.pop((key, call.step, call.call), ([], None))


@torch.library.custom_op("fp4::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], layer: torch.Tensor,
                 compute_dtype: torch.dtype, shared_fp8: str) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """Fprop: Y = X . W^T with X: [T, in] in the compute dtype; returns (Y, where, saved FP8 copies).
    shared_fp8 = "<X's format>,<W's format>" when Fprop's FP8 copies serve backward
    (fp4.gemm.fp8_shared_copies; else ""): then saved = [q of X^T, s_X, q of W^T, s_W]."""
    call = _GemmCall(_layer(layer), compute_dtype)
    _leave_observers(int(layer[0]), call)
    cache: dict = {BOTH_LAYOUTS: ("x", "w") if shared_fp8 else ()}
    # Autocast off inside: the casts are explicit (grid values -> compute dtype, fp32 alpha).
    with torch.autocast(x.device.type, enabled=False):
        # ---- Fprop: Y = X . W^T, reduced over in_features (X and W blocked along dim -1) ----
        y = _run_gemm(call, "fprop", x, weight, bias=bias, cache=cache)
    saved: List[torch.Tensor] = []
    if shared_fp8:
        for name, fmt in zip(("x", "w"), shared_fp8.split(",")):
            copy = cache[("float8", name, fmt)]
            saved += [copy.transposed(), copy.scale.clone()]
    return y, _where(call), saved


@quant_linear.register_fake
def _quant_linear_fake(x, weight, bias, layer, compute_dtype, shared_fp8):
    saved = []
    if shared_fp8:
        x_dtype, w_dtype = (FP8_DTYPES[f] for f in shared_fp8.split(","))
        saved = [x.new_empty((x.shape[1], x.shape[0]), dtype=x_dtype), x.new_empty((), dtype=torch.float32),
                 weight.new_empty((weight.shape[1], weight.shape[0]), dtype=w_dtype),
                 weight.new_empty((), dtype=torch.float32)]
    return (x.new_empty((x.shape[0], weight.shape[0]), dtype=compute_dtype),
            torch.empty(2, dtype=torch.int64, device="cpu"), saved)


@torch.library.custom_op("fp4::quant_linear_backward", mutates_args=())
def quant_linear_backward(dy: torch.Tensor, x: Optional[torch.Tensor], weight: torch.Tensor, layer: torch.Tensor,
                          where: torch.Tensor, saved: List[torch.Tensor], compute_dtype: torch.dtype,
                          bias_dtype: torch.dtype, needs: List[bool]
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX, dW, db) of the forward that returned `where`; a gradient not in `needs` is empty. x is
    None when the forward saved FP8 copies of X and W instead (`saved`)."""
    call = _GemmCall(_layer(layer), compute_dtype, where=tuple(where.tolist()))
    _take_observers(int(layer[0]), call)
    cache: dict = {BOTH_LAYOUTS: ("dy",) if needs[0] and needs[1] else ()}
    if saved:
        spec = call.specs["fprop"]
        cache[("float8", "x", spec.a.fmt)] = Fp8Copy(None, saved[1], saved[0])
        cache[("float8", "w", spec.b.fmt)] = Fp8Copy(None, saved[3], saved[2])
        x = saved[0].t()  # stands for X: _run_gemm reads only its shape, the copy comes from the cache
    # Distinct empty tensors: a custom op's outputs may not alias one another.
    dx, dw, db = dy.new_empty(0), dy.new_empty(0), dy.new_empty(0)
    with torch.autocast(dy.device.type, enabled=False):
        dy = dy.to(compute_dtype)
        if needs[0]:
            # ---- Dgrad: dX = dY . W, reduced over out_features (dY along dim -1, W along dim 0) ----
            dx = _run_gemm(call, "dgrad", dy, weight, cache=cache).to(compute_dtype)
        if needs[1]:
            # ---- Wgrad: dW = dY^T . X, reduced over tokens (dY and X along dim 0) ----
            dw = _run_gemm(call, "wgrad", dy, x, cache=cache).to(weight.dtype)
        if needs[2]:
            # The bias gradient is a reduction, not a GEMM: high precision, from the unquantized dY.
            db = dy.float().sum(0).to(compute_dtype).to(bias_dtype)
    return dx, dw, db


@quant_linear_backward.register_fake
def _quant_linear_backward_fake(dy, x, weight, layer, where, saved, compute_dtype, bias_dtype, needs):
    return (dy.new_empty((dy.shape[0], weight.shape[1]), dtype=compute_dtype) if needs[0] else dy.new_empty(0),
            weight.new_empty(weight.shape) if needs[1] else dy.new_empty(0),
            dy.new_empty((dy.shape[1],), dtype=bias_dtype) if needs[2] else dy.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, layer, compute_dtype, shared_fp8 = inputs
    _, where, saved = output
    ctx.shared = bool(saved)
    # With shared FP8 copies the high-precision X is not kept: backward multiplies the copies.
    ctx.save_for_backward(*(() if ctx.shared else (x,)), weight, layer, where, *saved)
    ctx.compute_dtype = compute_dtype
    ctx.bias_dtype = bias.dtype if bias is not None else compute_dtype


def _backward(ctx, dy, _dwhere, _dsaved):
    tensors = ctx.saved_tensors
    if ctx.shared:
        x, (weight, layer, where), saved = None, tensors[:3], list(tensors[3:])
    else:
        (x, weight, layer, where), saved = tensors, []
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    dx, dw, db = quant_linear_backward(dy, x, weight, layer, where, saved, ctx.compute_dtype,
                                       ctx.bias_dtype, needs)
    return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None, None, None, None)


quant_linear.register_autograd(_backward, setup_context=_setup_context)
