"""The quantized linear as two torch.library custom ops, so torch.compile traces it without breaks.

    fp4::quant_linear           Fprop:  (X, [W_i], [b_i], layers, compute_dtype) -> ([Y_i], wheres)
    fp4::quant_linear_backward  Dgrad, Wgrad and the bias gradients from ([dY_i], X, [W_i], layers, wheres)

Both take k >= 1 linears that read the same X: one QuantLinear (k = 1), or sibling projections
(q/k/v, gate/up: fp4.linear.shared_input_linears) whose X is quantized once per orientation for
all of them where that gives the bits of quantizing it per layer (fp4.gemm.OperandCache).

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
Ops take tensors and scalars only, so a layer is passed by its `layer` tensor, a one-element int64
CPU tensor (a plain attribute of the QuantLinear, not a buffer: it stays on the CPU, out of the
state_dict and of FSDP's reach) that keys a table of live layers; `layers` is a group's list of
them. A Python int would be a constant the compiled code guards on, one recompilation per layer;
a tensor is a graph input, so one compiled decoder layer serves every decoder layer (regional
compilation, experiments/training/setup.py). The table holds weak references: it is a lookup of
live modules, not a setting.

`wheres` (int64 [k, 2] on the CPU: each layer's step and call index) is Fprop's second output,
saved for backward: the backward op rebuilds each call of its own forward from it, so Dgrad and
Wgrad draw from the identities of their forward. Observers (record_gemms, the diagnostics probe) belong to the forward
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
from fp4.gemm import Fp8Copy, OperandCache, _GemmCall, _run_gemm

__all__ = ["register_layer", "quant_linear", "quant_linear_backward"]

_LAYERS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def register_layer(module: torch.nn.Module) -> torch.Tensor:
    """Enter `module` in the table of live layers; returns its `layer` tensor for the ops."""
    key = next(_KEYS)
    _LAYERS[key] = module
    return torch.tensor([key], dtype=torch.int64)


def _layer(key: int) -> torch.nn.Module:
    module = _LAYERS.get(key)
    if module is None:
        raise RuntimeError(f"quantized linear #{key} is no longer alive (was its module deleted?)")
    return module


# (layer key, step, call) -> (record sinks, probe) of a forward that had observers.
_OBSERVERS: dict = {}


def _leave_observers(key: int, call: _GemmCall) -> None:
    for stale in [k for k in _OBSERVERS if k[0] == key and k[1] < call.step]:
        del _OBSERVERS[stale]
    if call.records or call.probe is not None:
        _OBSERVERS[(key, call.step, call.call)] = (call.records, call.probe)


def _take_observers(key: int, call: _GemmCall) -> None:
    call.records, call.probe = _OBSERVERS.pop((key, call.step, call.call), ([], None))


def _group_calls(layers: List[torch.Tensor], compute_dtype: torch.dtype, wheres=None) -> List[_GemmCall]:
    keys = [int(layer[0]) for layer in layers]
    if wheres is None:
        return [_GemmCall(_layer(key), compute_dtype) for key in keys]
    return [_GemmCall(_layer(key), compute_dtype, where=tuple(w)) for key, w in zip(keys, wheres.tolist())]


@torch.library.custom_op("fp4::quant_linear", mutates_args=())
def quant_linear(xs: List[torch.Tensor], weights: List[torch.Tensor], biases: List[torch.Tensor],
                 layers: List[torch.Tensor], compute_dtype: torch.dtype, shared_fp8: str
                 ) -> Tuple[List[torch.Tensor], torch.Tensor, List[torch.Tensor]]:
    """Fprop of k >= 1 linears reading one X: Y_i = X . W_i^T with X: [T, in] in the compute dtype,
    given once per layer (xs: the same values, each layer's own cast, so that autograd adds the dX_i
    of the layers exactly as it adds separate layers' gradients; layers: their `layer` tensors;
    biases: [] or one per layer). The quantized copies of X are made from xs[0] and shared.
    Returns (Ys, wheres int64 [k, 2], saved FP8 copies). shared_fp8 = "<X's format>,<W's format>"
    when Fprop's FP8 copies serve backward (fp4.gemm.fp8_shared_copies; else ""): then saved =
    [q of X^T, s_X] + [q of W_i^T, s_W_i] per layer."""
    calls = _group_calls(layers, compute_dtype)
    shared_x: dict = {}  # X's quantized copies, made once for every layer of the group
    ys: List[torch.Tensor] = []
    saved: List[torch.Tensor] = []
    # Autocast off inside: the casts are explicit (grid values -> compute dtype, fp32 alpha).
    x = xs[0]
    x_fmt, w_fmt = shared_fp8.split(",") if shared_fp8 else (None, None)
    with torch.autocast(x.device.type, enabled=False):
        for i, (call, weight) in enumerate(zip(calls, weights)):
            _leave_observers(int(layers[i][0]), call)
            cache = OperandCache(("x", "w") if shared_fp8 else (), shared_x)
            # ---- Fprop: Y = X . W^T, reduced over in_features (X and W blocked along dim -1) ----
            ys.append(_run_gemm(call, "fprop", x, weight, bias=biases[i] if biases else None, cache=cache))
            if shared_fp8:
                if i == 0:
                    copy = cache.get("x", ("float8", x_fmt))
                    saved += [copy.transposed(), copy.scale.clone()]
                copy = cache.get("w", ("float8", w_fmt))
                saved += [copy.transposed(), copy.scale.clone()]
    wheres = torch.tensor([[call.step, call.call] for call in calls], dtype=torch.int64)
    return ys, wheres, saved


@quant_linear.register_fake
def _quant_linear_fake(xs, weights, biases, layers, compute_dtype, shared_fp8):
    x, saved = xs[0], []
    if shared_fp8:
        x_dtype, w_dtype = (FP8_DTYPES[f] for f in shared_fp8.split(","))
        saved = [x.new_empty((x.shape[1], x.shape[0]), dtype=x_dtype), x.new_empty((), dtype=torch.float32)]
        for weight in weights:
            saved += [weight.new_empty((weight.shape[1], weight.shape[0]), dtype=w_dtype),
                      weight.new_empty((), dtype=torch.float32)]
    return ([x.new_empty((x.shape[0], weight.shape[0]), dtype=compute_dtype) for weight in weights],
            torch.empty((len(weights), 2), dtype=torch.int64, device="cpu"), saved)


@torch.library.custom_op("fp4::quant_linear_backward", mutates_args=())
def quant_linear_backward(dys: List[torch.Tensor], x: Optional[torch.Tensor], weights: List[torch.Tensor],
                          layers: List[torch.Tensor], wheres: torch.Tensor, saved: List[torch.Tensor],
                          compute_dtype: torch.dtype, bias_dtype: torch.dtype, needs: List[bool]
                          ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """([dX_i], [dW_i], [db_i]) of the forward that returned `wheres`; needs = [dX, dW_1..k,
    db_1..k] and a gradient not needed is empty. x is None when the forward saved FP8 copies of X
    and the W_i instead (`saved`). Layers run last first, the order autograd runs separate ones in."""
    k = len(weights)
    calls = _group_calls(layers, compute_dtype, wheres)
    need_dx, need_dw, need_db = needs[0], needs[1:1 + k], needs[1 + k:]
    shared_x: dict = {}
    # Distinct empty tensors: a custom op's outputs may not alias one another.
    dxs = [dys[0].new_empty(0) for _ in range(k)]
    dws = [dys[0].new_empty(0) for _ in range(k)]
    dbs = [dys[0].new_empty(0) for _ in range(k)]
    with torch.autocast(dys[0].device.type, enabled=False):
        for i in reversed(range(k)):
            call, weight, dy = calls[i], weights[i], dys[i].to(compute_dtype)
            _take_observers(int(layers[i][0]), call)
            cache = OperandCache(("dy",) if need_dx and need_dw[i] else (), shared_x)
            x_i = x
            if saved:
                spec = call.specs["fprop"]
                if i == k - 1:
                    cache.put("x", ("float8", spec.a.fmt), Fp8Copy(None, saved[1], saved[0]))
                cache.put("w", ("float8", spec.b.fmt), Fp8Copy(None, saved[3 + 2 * i], saved[2 + 2 * i]))
                x_i = saved[0].t()  # stands for X: _run_gemm reads only its shape, the copy comes from the cache
            if need_dx:
                # ---- Dgrad: dX = dY . W, reduced over out_features (dY along dim -1, W along dim 0) ----
                dxs[i] = _run_gemm(call, "dgrad", dy, weight, cache=cache).to(compute_dtype)
            if need_dw[i]:
                # ---- Wgrad: dW = dY^T . X, reduced over tokens (dY and X along dim 0) ----
                dws[i] = _run_gemm(call, "wgrad", dy, x_i, cache=cache).to(weight.dtype)
            if need_db[i]:
                # The bias gradient is a reduction, not a GEMM: high precision, from the unquantized dY.
                dbs[i] = dy.float().sum(0).to(compute_dtype).to(bias_dtype)
    return dxs, dws, dbs


@quant_linear_backward.register_fake
def _quant_linear_backward_fake(dys, x, weights, layers, wheres, saved, compute_dtype, bias_dtype, needs):
    k = len(weights)
    dxs = [dy.new_empty((dy.shape[0], weights[0].shape[1]), dtype=compute_dtype) if needs[0] else dy.new_empty(0)
           for dy in dys]
    dws = [w.new_empty(w.shape) if needs[1 + i] else dys[0].new_empty(0) for i, w in enumerate(weights)]
    dbs = [dys[i].new_empty((dys[i].shape[1],), dtype=bias_dtype) if needs[1 + k + i] else dys[0].new_empty(0)
           for i in range(k)]
    return dxs, dws, dbs


def _setup_context(ctx, inputs, output):
    xs, weights, biases, layers, compute_dtype, shared_fp8 = inputs
    _, wheres, saved = output
    ctx.shared, ctx.k = bool(saved), len(weights)
    # One X for every layer (the xs hold the same values). With shared FP8 copies the
    # high-precision X is not kept: backward multiplies the copies.
    ctx.save_for_backward(*(() if ctx.shared else (xs[0],)), *weights, *layers, wheres, *saved)
    ctx.compute_dtype = compute_dtype
    ctx.bias_dtype = biases[0].dtype if biases else compute_dtype
    ctx.has_bias = bool(biases)


def _backward(ctx, dys, _dwheres, _dsaved):
    k, tensors = ctx.k, list(ctx.saved_tensors)
    x = None if ctx.shared else tensors.pop(0)
    weights, layers, wheres, saved = tensors[:k], tensors[k:2 * k], tensors[2 * k], tensors[2 * k + 1:]
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    needs = [any(need_x)] + [bool(n) for n in need_w] + (
        [bool(n) for n in need_b] if ctx.has_bias else [False] * k)
    dxs, dws, dbs = quant_linear_backward(list(dys), x, weights, layers, wheres, saved, ctx.compute_dtype,
                                          ctx.bias_dtype, needs)
    return ([dx if n else None for dx, n in zip(dxs, need_x)],
            [dw if n else None for dw, n in zip(dws, needs[1:1 + k])],
            list(dbs) if ctx.has_bias else [], [None] * k, None, None)


quant_linear.register_autograd(_backward, setup_context=_setup_context)
