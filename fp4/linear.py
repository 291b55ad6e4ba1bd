"""QuantLinear: nn.Linear whose three GEMMs are quantized as a Recipe says (emulated FP4, real or emulated FP8).

The three GEMMs of a linear layer
=================================
With X: [T, in] (T = batch x seq tokens; any leading shape is flattened), W: [out, in]:

    Fprop   Y  = X . W^T     reduction over in_features    X blocks along dim -1, W along dim -1
    Dgrad   dX = dY . W      reduction over out_features   dY blocks along dim -1, W along dim 0
    Wgrad   dW = dY^T . X    reduction over tokens         dY blocks along dim 0,  X along dim 0

A block scale (MXFP4: one E8M0 per 32 elements; NVFP4: one E4M3 per 16) is a factor inside the dot
product, so the hardware can apply it to a partial sum only if the block lies along the reduction
axis. Hence each operand is blocked along *its GEMM's* reduction axis: W along in for Fprop but along
out for Dgrad, dY along out for Dgrad but along tokens for Wgrad, X along tokens for Wgrad.

Why the high-precision X and W are saved for backward
=====================================================
Wgrad needs X blocked along tokens, and Fprop's copy is blocked along in; re-blocking a quantized X
would round twice, baking the first error into the second. So forward saves the unquantized X (in
the compute dtype) and W (the master weight), as Transformer Engine does, and backward quantizes each
operand from high precision once per GEMM along that GEMM's axis: dY twice, X a second time.
Per-tensor FP8 is the same along any axis, so an FP8 dY is quantized once and shared by both GEMMs;
NVFP4 16x16 weight tiles make W's Fprop and Dgrad copies identical.

Per-tensor scales, like the hardware's alpha
============================================
`quantize_operand` returns grid values (q * 2^e, q * s_b, or the FP8 q) and, for NVFP4 and FP8, the
per-tensor scale (s_g, s) separately. The grid values are exact in bf16, so the GEMM's products are
exact and its accumulation is fp32 as on tensor cores; the fp32 result is multiplied by
alpha = s_A * s_B (and the bias added) before the one rounding to the compute dtype -- bf16 under
autocast, else the input's dtype. The real FP8 path (fp4/fp8_gemm.py) gives torch._scaled_mm the same
operands and scales. Results are then cast to the dtype of what they are the gradient of (dW of an
fp32 master weight is bf16-rounded, as under autocast). X is quantized from its compute-dtype copy,
W from the master weight.

Stabilizers and reproducible randomness
=======================================
A Hadamard transform is applied to *both* operands of a GEMM along its reduction axis with the same
signs, so the exact product is unchanged while outliers are spread over the block before the block
amax. A reduction length that is not a multiple of the Hadamard block is zero-padded here and the
GEMM runs over the padded length (the transformed pad is not zero; cutting it off would change the
product). Every random draw comes from a torch.Generator seeded by a hash of where it is used, never
from the global RNG, so a run resumed at QuantState.step reproduces the same bits:
    SR uniforms        (seed, step, layer_index, GEMM, operand, call)
    signs "fixed"      (seed, layer_index, GEMM)              the same every step: deterministic
    signs "step"       (seed, step, layer_index, GEMM)        fresh every optimizer step
    signs "call"       (seed, step, layer_index, GEMM, call)  fresh every forward call
"call" counts the layer's forwards within the step (reset by advance_step), so gradient-accumulation
micro-batches get distinct SR noise. (An activation-checkpointing recomputation reuses its
forward's index: QuantState.replaying.)

Data parallelism (experiments/distributed.py). Under DDP every rank holds the whole weight. Under
FSDP2 (fully_shard per decoder layer) the layer's pre-forward hook all-gathers the parameters and
registers the unsharded tensors before QuantLinear.forward reads self.weight, so W is quantized
from the full weight, never a shard (in parallel.param_dtype: a bf16 copy of the fp32 master weight
on CUDA by default); backward re-gathers it before this layer's backward runs. Each rank's Wgrad
quantizes its *local* dY and X along its local tokens (its micro-batch), exactly as one process with
that micro-batch would; dW is then averaged over the ranks (all-reduce / reduce-scatter in fp32)
after quantization, so the reduction across ranks is high precision. QuantState.next_call gives
rank r's c-th call of a step the index c * N + r (the same micro-batch's index in one process).

The bf16 recipe is F.linear itself: outputs and gradients are bit-identical to nn.Linear's.
Debugging: QuantState.check_finite raises NonFiniteError naming layer, GEMM and operand;
record_gemms() (every model) or state.record_gemms() (one model) lists what every GEMM did.

Where the code lives. fp4/gemm.py runs one GEMM (quantize both operands along the reduction axis,
multiply, observe); fp4/linear_op.py makes Fprop and the backward (Dgrad, Wgrad, bias) two
torch.library custom ops with fake implementations, so torch.compile traces a decoder layer
without graph breaks and without a guard on the step, the call counter or the layer: the ops are
opaque to the compiler and run the same Python in a compiled step as in eager (bit-identical
quantized operands; tests/fp4/test_compile.py). This module is the nn.Linear around them.

Execution settings (fp4/state.py): the quantization backend and whether FP8 GEMMs may use
torch._scaled_mm come from the model's QuantState.execution (an ExecutionConfig), snapshotted per
call; there are no process-wide switches, so two models in one process each run as built.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fp4 import linear_op
# Re-exported: one GEMM's execution lives in fp4.gemm, the per-model state in fp4.state.
from fp4.gemm import (REDUCTION_AXES, NonFiniteError, _GemmCall, _check_finite, _record, fp8_shared_copies,
                      gemm_path, gemm_paths)
from fp4.recipe import Recipe
from fp4.state import ExecutionConfig, GemmRecord, QuantState, derive_seed, record_gemms

__all__ = ["QuantLinear", "shared_input_linears", "QuantState", "ExecutionConfig", "NonFiniteError", "GemmRecord",
           "record_gemms", "derive_seed", "gemm_path", "gemm_paths", "swap_linears", "REDUCTION_AXES"]

class _Probe(torch.autograd.Function):
    """Identity whose backward checks/records the gradient passing through (bf16 path, debug only)."""

    @staticmethod
    def forward(ctx, tensor, on_grad: Callable[[torch.Tensor], None], copy: bool = False):
        ctx.on_grad = on_grad
        # A layer output gets a copy: a view made inside a Function may not be modified in place.
        return tensor.clone() if copy else tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        ctx.on_grad(grad)
        return grad, None, None


class QuantLinear(nn.Linear):
    """Drop-in nn.Linear (same parameters and state_dict keys) running Fprop/Dgrad/Wgrad per `recipe`.

    Set `check_finite` (here, or on the shared QuantState) to raise NonFiniteError naming the layer,
    the GEMM and the operand as soon as one holds NaN/Inf; None defers to the state.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, recipe: Recipe,
                 state: Optional[QuantState] = None, layer_index: int = 0, name: str = "",
                 execution: Optional[ExecutionConfig] = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = recipe
        self.state = _state_for(recipe, state, execution)
        self.layer_index = int(layer_index)
        self.name = name or f"linear{self.layer_index}"
        self.check_finite: Optional[bool] = None
        fprop = recipe.specs["fprop"]
        self._fp8_formats = f"{fprop.a.fmt},{fprop.b.fmt}"  # what _shared_fp8 names when it shares
        self._register()

    def _register(self) -> None:
        # The custom ops' handle on this layer (fp4/linear_op.py): a CPU tensor, not a buffer.
        self.op_layer = linear_op.register_layer(self)
        _RECIPES[id(self.recipe)] = self.recipe

    def __setstate__(self, state) -> None:
        # A deep copy or unpickled layer is a new layer: it must not answer to the original's handle.
        super().__setstate__(state)
        self._register()

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe, state: Optional[QuantState] = None,
                    layer_index: int = 0, name: str = "",
                    execution: Optional[ExecutionConfig] = None) -> "QuantLinear":
        """Wrap an existing nn.Linear, sharing its Parameter objects (ties and optimizers stay valid)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, recipe=recipe,
                  state=state, layer_index=layer_index, name=name, execution=execution, device="meta")
        new.weight = linear.weight
        if linear.bias is not None:
            new.bias = linear.bias
        return new

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        device_type = x.device.type
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.recipe.quantizes:
            return self._forward_unquantized(x)
        compute_dtype = self._compute_dtype(x)
        x2d = x.reshape(-1, self.in_features).to(compute_dtype)
        return _quant_linears([self], [x2d], compute_dtype, self._shared_fp8(x2d), x.shape[:-1])[0]

    def _shared_fp8(self, x2d: torch.Tensor) -> str:
        """"<X's>,<W's FP8 format>" when Fprop's FP8 copies can serve backward (fp4.gemm.fp8_shared_copies),
        else "". Not while a probe watches or finiteness is checked: those read the high-precision X in
        Wgrad. Decided per forward from the recipe, device, shapes and state (a compiled layer guards
        on them: the few combinations each compile once)."""
        state = self.state
        if state.probe is not None or state.check_finite or self.check_finite or not state.execution.real_fp8:
            return ""
        device = x2d.device
        # A Python branch, not an argument: once dynamo makes the row count symbolic (a second batch
        # size, e.g. the short last evaluation batch) this is a guard, and _fp8_shares still gets
        # only constants.
        tokens_fit = True if x2d.shape[0] % 16 == 0 else False
        if not _fp8_shares(id(self.recipe), device.type, device.index, tokens_fit,
                           self.in_features, self.out_features):
            return ""
        return self._fp8_formats

    def _forward_unquantized(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 rung: exactly F.linear; with checking/recording on, identity probes watch the grads."""
        check = self.check_finite if self.check_finite is not None else self.state.check_finite
        if not check and not self.state.record_sinks():
            return F.linear(x, self.weight, self.bias)
        call = _GemmCall(self, self._compute_dtype(x))
        records = call.records
        backward = [g for g, needed in (("dgrad", x.requires_grad), ("wgrad", self.weight.requires_grad)) if needed]

        def on_dy(dy):
            for gemm in backward:
                if check:
                    _check_finite(dy, call, gemm, "dy")
                for sink in records:
                    _record(sink, call, gemm, "bf16")

        def on_output_grad(gemm):
            return lambda grad: _check_finite(grad, call, gemm, "output") if check else None

        if check:
            _check_finite(x, call, "fprop", "x")
            _check_finite(self.weight, call, "fprop", "w")
        for sink in records:
            _record(sink, call, "fprop", "bf16")
        x_in = _Probe.apply(x, on_output_grad("dgrad")) if x.requires_grad else x
        w_in = _Probe.apply(self.weight, on_output_grad("wgrad")) if self.weight.requires_grad else self.weight
        y = F.linear(x_in, w_in, self.bias)
        if check:
            _check_finite(y, call, "fprop", "output")
        return _Probe.apply(y, on_dy, True) if y.requires_grad else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}, layer_index={self.layer_index}, name={self.name!r}"


# Recipes by id(), so that _fp8_shares takes only Python constants (a Recipe is not one to dynamo).
_RECIPES: dict = {}


@torch.compiler.assume_constant_result
def _fp8_shares(recipe_id: int, device_type: str, device_index: Optional[int], tokens_fit: bool,
                in_features: int, out_features: int) -> bool:
    # A constant for the compiler (of the recipe, device and sizes): traced as its value. Called only
    # with real FP8 allowed by the model's ExecutionConfig.
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    return fp8_shared_copies(_RECIPES[recipe_id].specs, device, 16 if tokens_fit else 1, in_features,
                             out_features, ExecutionConfig(real_fp8=True))


def shared_input_linears(x: torch.Tensor, linears: Sequence[nn.Module]) -> List[torch.Tensor]:
    """[linear(x) for linear in linears], for sibling linears that read the same X (q/k/v, gate/up),
    with X quantized once per orientation for all of them: one Fprop copy and one Wgrad copy instead
    of one each per linear, as a fused projection would. Every output and gradient has the bits of
    the separate calls (dX too: autograd adds the linears' dX_i as it adds separate layers'). Only
    deterministic copies are shared (round to nearest, Hadamard without random signs); SR uniforms
    and signs stay each linear's own (fp4.gemm.OperandCache).

    QuantLinears of one recipe and QuantState with the same in_features and all or none with a
    bias run as one group; anything else (plain modules, the unquantized bf16 recipe, mixed
    recipes) is called one by one."""
    first = linears[0] if linears else None
    grouped = (isinstance(first, QuantLinear) and first.recipe.quantizes and all(
        isinstance(m, QuantLinear) and m.recipe is first.recipe and m.state is first.state
        and m.in_features == first.in_features and (m.bias is None) == (first.bias is None) for m in linears))
    if not grouped:
        return [linear(x) for linear in linears]
    compute_dtype = first._compute_dtype(x)
    # One cast per linear, as separate calls make: autograd then adds their dX as it adds separate
    # layers' (in x's dtype, last layer first); the op quantizes only the first.
    xs = [x.reshape(-1, first.in_features).to(compute_dtype) for _ in linears]
    shared = {m._shared_fp8(xs[0]) for m in linears}
    if len(shared) != 1:  # the layers' FP8 copies must all serve backward, or none
        return [linear(x) for linear in linears]
    return _quant_linears(linears, xs, compute_dtype, shared.pop(), x.shape[:-1])


def _quant_linears(linears: Sequence[QuantLinear], xs: List[torch.Tensor], compute_dtype: torch.dtype,
                   shared_fp8: str, lead_shape) -> List[torch.Tensor]:
    """The Fprop op for k >= 1 QuantLinears (all or none with a bias) on their casts xs of one X;
    outputs reshaped to lead_shape + (out_features,)."""
    biases = [m.bias for m in linears] if linears[0].bias is not None else []
    ys, _, _ = linear_op.quant_linear(xs, [m.weight for m in linears], biases, [m.op_layer for m in linears],
                                      compute_dtype, shared_fp8)
    return [y.reshape(*lead_shape, m.out_features) for y, m in zip(ys, linears)]


def _state_for(recipe: Recipe, state: Optional[QuantState], execution: Optional[ExecutionConfig]) -> QuantState:
    """The QuantState a layer uses. `execution` is a convenience for callers that let the layer make
    its state; given with a state, it must agree with it (the state is the one source of truth)."""
    if state is None:
        return QuantState(seed=recipe.seed, execution=execution)
    if execution is not None and execution != state.execution:
        raise ValueError(f"execution={execution} disagrees with the QuantState's {state.execution}; "
                         "build the QuantState with it instead")
    return state


def swap_linears(module: nn.Module, recipe: Recipe, state: Optional[QuantState] = None,
                 predicate: Optional[Callable[[str], bool]] = None,
                 execution: Optional[ExecutionConfig] = None) -> int:
    """Replace, in place, every plain nn.Linear submodule whose qualified name passes `predicate` by a
    QuantLinear sharing its parameters; layer_index counts them in module order. Returns the count.
    All of them share `state` (made from recipe.seed and `execution` when None).

    Only exact nn.Linear instances are swapped: subclasses (e.g. MultiheadAttention's out_proj, whose
    weight is used without calling its forward) and QuantLinears already swapped are left alone.
    """
    state = _state_for(recipe, state, execution)
    targets = [(name, child) for name, child in module.named_modules()
               if name and type(child) is nn.Linear and (predicate is None or predicate(name))]
    for index, (name, linear) in enumerate(targets):
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, QuantLinear.from_linear(linear, recipe, state, index, name))
    return len(targets)
