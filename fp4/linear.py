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
micro-batches get distinct SR noise. (Activation recomputation would count a second call.)

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

Execution settings (fp4/state.py): the quantization backend and whether FP8 GEMMs may use
torch._scaled_mm come from the model's QuantState.execution (an ExecutionConfig), snapshotted per
call; there are no process-wide switches, so two models in one process each run as built.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fp4 import fp8_gemm
from fp4.names import Gemm, ScaleMode
from fp4.transforms import hadamard as hadamard_transform, hadamard_compute, random_signs
from fp4.probe import GemmObservation
from fp4.quantize import quantize_operand
from fp4.recipe import GEMM_OPERANDS, GEMM_TITLES, GEMMS, GemmSpec, HadamardSpec, OperandSpec, Recipe
# Re-exported: the per-model state lives in fp4.state (ExecutionConfig, QuantState, recording, seeds).
from fp4.state import ExecutionConfig, GemmRecord, QuantState, derive_seed, generator as _generator, record_gemms

__all__ = ["QuantLinear", "QuantState", "ExecutionConfig", "NonFiniteError", "GemmRecord", "record_gemms",
           "derive_seed", "gemm_path", "gemm_paths", "swap_linears", "REDUCTION_AXES"]

# The dim of each operand (in its natural layout X [T, in], W [out, in], dY [T, out]) that a GEMM
# reduces over, and so blocks along: (a, b) in product order.
REDUCTION_AXES = {Gemm.fprop: (-1, -1), Gemm.dgrad: (-1, 0), Gemm.wgrad: (0, 0)}


class NonFiniteError(FloatingPointError):
    """A GEMM operand or output holds NaN/Inf; says which layer, GEMM and operand."""

    def __init__(self, layer: str, gemm: str, operand: str):
        self.layer, self.gemm, self.operand = layer, gemm, operand
        super().__init__(f"non-finite values in layer {layer!r}, {GEMM_TITLES[gemm]} GEMM, operand {operand}")


class _GemmCall:
    """What one forward (and its backward) of one layer needs besides tensors: a snapshot, so the
    backward uses the step and call index of its own forward."""

    def __init__(self, module: "QuantLinear", compute_dtype: torch.dtype):
        state = module.state
        self.specs: Dict[str, GemmSpec] = module.recipe.specs
        self.layer, self.layer_index = module.name, module.layer_index
        self.seed, self.step = state.seed, state.step
        self.call = state.next_call(module.layer_index)
        self.check = module.check_finite if module.check_finite is not None else state.check_finite
        self.compute_dtype = compute_dtype
        # Read from the module's own state, never from a process-wide switch.
        self.execution: ExecutionConfig = state.execution
        self.quant_backend, self.real_fp8 = state.execution.quant_backend, state.execution.real_fp8
        self.records: List[list] = state.record_sinks()
        self.probe = state.probe  # fp4.probe observer; None = off (the only cost: one test per GEMM)

    def sr_generator(self, device, gemm: str, operand: str) -> torch.Generator:
        return _generator(device, "sr", self.seed, self.step, self.layer_index, gemm, operand, self.call)

    def signs(self, gemm: str, hadamard: HadamardSpec, device) -> Optional[torch.Tensor]:
        if hadamard.signs == "none":
            return None
        where = {"fixed": (), "step": (self.step,), "call": (self.step, self.call)}[hadamard.signs]
        generator = _generator(device, "signs", self.seed, *where, self.layer_index, gemm)
        # One +-1 vector of length `block`, shared by every block of the axis and both operands.
        return random_signs(hadamard.block, generator, device)


def gemm_path(spec: GemmSpec, device, dims=None, execution: Optional[ExecutionConfig] = None) -> str:
    """How one GEMM runs: "bf16", "fp4:mxfp4 (emulated)", "fp8:e5m2xe4m3 (torch._scaled_mm)", ...
    dims = (M, K, N) of the product when known (the real FP8 path needs K, N multiples of 16);
    execution: the model's ExecutionConfig (None: the defaults, real FP8 allowed)."""
    real_fp8 = (execution if execution is not None else ExecutionConfig()).real_fp8
    if spec.precision == "bf16":
        return "bf16"
    fmts = spec.a.fmt if spec.a.fmt == spec.b.fmt else f"{spec.a.fmt}x{spec.b.fmt}"
    if spec.precision == "fp4":
        return f"fp4:{fmts} (emulated)"
    real = (real_fp8 and spec.hadamard is None and spec.a.is_fp8 and spec.b.is_fp8
            and spec.a.rounding == spec.b.rounding == "nearest" and fp8_gemm.fp8_path_available(device)
            and (dims is None or fp8_gemm.dims_fit(*dims)))
    return f"fp8:{spec.a.fmt}x{spec.b.fmt} ({'torch._scaled_mm' if real else 'emulated'})"


def gemm_paths(recipe: Recipe, device, execution: Optional[ExecutionConfig] = None) -> Dict[str, str]:
    """Per GEMM, the path its GEMMs take on `device` under `execution` (a QuantState's; None: the
    defaults). FP8: for shapes with K, N multiples of 16."""
    return {gemm: gemm_path(recipe.specs[gemm], torch.device(device), execution=execution) for gemm in GEMMS}


def _check_finite(tensor: torch.Tensor, call: _GemmCall, gemm: str, operand: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(call.layer, gemm, operand)


def _pad_axis(tensor: torch.Tensor, axis: int, multiple: int) -> torch.Tensor:
    pad = -tensor.shape[axis] % multiple
    if pad == 0:
        return tensor
    return F.pad(tensor, (0, pad) if axis == -1 else (0, 0, 0, pad))


def _quantize(call: _GemmCall, gemm: str, name: str, tensor: torch.Tensor, op: OperandSpec, axis: int,
              hadamard: Optional[HadamardSpec], signs, cache: dict):
    """(grid values in the compute dtype, per-tensor scale or None) of one operand."""
    if op.fmt is None:
        if hadamard is not None:
            tensor = hadamard_transform(tensor, block=hadamard.block, axis=axis, signs=signs)
        return tensor.to(call.compute_dtype), None
    # Per-tensor FP8 is the same along any axis: dY's FP8 copy serves Dgrad and Wgrad.
    key = (name, op.fmt) if op.is_fp8 and hadamard is None and op.rounding == "nearest" else None
    if key is not None and key in cache:
        return cache[key]
    generator = call.sr_generator(tensor.device, gemm, name) if op.rounding == "stochastic" else None
    grid, scale = quantize_operand(
        tensor, op.fmt, axis, rounding=op.rounding, scale_mode=op.scale_mode, generator=generator,
        block_2d=op.block_2d, hadamard_block=hadamard.block if hadamard is not None else None,
        hadamard_signs=signs, backend=call.quant_backend)
    # FP32 block scales (scale mode "fp32") make grid values q * s that are float32, not bfloat16,
    # numbers: they stay float32 and the GEMM runs in float32, standing in for hardware that applies s
    # in float32 to each block's partial sum (a true float32 matmul: TF32 must stay off, torch's
    # default). Every other grid value is exact in the compute dtype.
    keep_fp32 = op.scale_mode == ScaleMode.fp32
    result = (grid if keep_fp32 else grid.to(call.compute_dtype), scale)
    if key is not None:
        cache[key] = result
    return result


def _run_gemm(call: _GemmCall, gemm: str, a: torch.Tensor, b: torch.Tensor,
              bias: Optional[torch.Tensor] = None, cache: Optional[dict] = None) -> torch.Tensor:
    """op(a) @ op(b) for one GEMM. a and b come in their natural layout (X, W, dY), reduced along
    REDUCTION_AXES[gemm]; op transposes so that the reduction is a's last and b's first dim."""
    spec, (name_a, name_b), (a_axis, b_axis) = call.specs[gemm], GEMM_OPERANDS[gemm], REDUCTION_AXES[gemm]
    cache = {} if cache is None else cache
    probe, inputs, observed = call.probe, (a, b), None
    if call.check:
        _check_finite(a, call, gemm, name_a)
        _check_finite(b, call, gemm, name_b)
    dims = (a.shape[a_axis + 1], a.shape[a_axis], b.shape[b_axis + 1])  # (M, K, N); axis -1 -> other dim 0
    path = gemm_path(spec, a.device, dims, call.execution)
    hadamard, signs = spec.hadamard, None
    if hadamard is not None:
        signs = call.signs(gemm, hadamard, a.device)
        a, b = _pad_axis(a, a_axis, hadamard.block), _pad_axis(b, b_axis, hadamard.block)
    if path.endswith("(torch._scaled_mm)"):
        operands = []
        for tensor, name, fmt in ((a, name_a, spec.a.fmt), (b, name_b, spec.b.fmt)):
            key = ("float8", name, fmt)  # per-tensor: dY's FP8 copy serves Dgrad and Wgrad
            if key not in cache:
                cache[key] = fp8_gemm.quantize_fp8(tensor, fmt, backend=call.quant_backend)
            operands.append(cache[key])
        (qa, sa), (qb, sb) = operands
        if probe is not None:
            observed = (qa.float() * sa, qb.float() * sb)
        out = fp8_gemm.fp8_mm(qa if a_axis == -1 else qa.t(), sa, qb if b_axis == 0 else qb.t(), sb,
                              out_dtype=torch.float32 if bias is not None else call.compute_dtype)
        if bias is not None:
            out = out + bias.float()
    else:
        a_grid, scale_a = _quantize(call, gemm, name_a, a, spec.a, a_axis, hadamard, signs, cache)
        b_grid, scale_b = _quantize(call, gemm, name_b, b, spec.b, b_axis, hadamard, signs, cache)
        if probe is not None:
            observed = tuple(g.float() if s is None else g.float() * s for g, s in ((a_grid, scale_a), (b_grid, scale_b)))
        if a_grid.dtype != b_grid.dtype:  # one float32 (FP32-scaled) operand: the GEMM runs in float32
            a_grid, b_grid = a_grid.float(), b_grid.float()
        out = fp8_gemm.emulated_scaled_mm(a_grid if a_axis == -1 else a_grid.t(), scale_a,
                                          b_grid if b_axis == 0 else b_grid.t(), scale_b, bias)
    out = out.to(call.compute_dtype)
    if probe is not None:
        _observe(probe, call, gemm, path, inputs, (a, b), observed, out, bias, signs)
    for records in call.records:
        _record(records, call, gemm, path)
    if call.check:
        _check_finite(out, call, gemm, "output")
    return out


@torch.no_grad()
def _observe(probe, call: _GemmCall, gemm: str, path: str, inputs, padded, quantized, out, bias, signs) -> None:
    """Hand the GEMM to the probe (fp4/probe.py): reads only, draws nothing, changes nothing."""
    spec = call.specs[gemm]
    axes = REDUCTION_AXES[gemm]
    if spec.hadamard is not None:  # what the quantizer saw: the padded operand, transformed in float32
        quantized_from = tuple(hadamard_compute(t, block=spec.hadamard.block, axis=axis, signs=signs)
                               for t, axis in zip(padded, axes))
    else:
        quantized_from = inputs
    probe(GemmObservation(call.layer, call.layer_index, gemm, tuple(map(str, GEMM_OPERANDS[gemm])), axes,
                          call.step, call.call, path, spec, inputs, quantized_from, quantized, out, bias))


def _record(records: list, call: _GemmCall, gemm: str, path: str) -> None:
    spec = call.specs[gemm]
    hadamard = f"{spec.hadamard.block}:{spec.hadamard.signs}" if spec.hadamard is not None else None
    for (name, op), axis in zip(spec.operands.items(), REDUCTION_AXES[gemm]):
        records.append(GemmRecord(call.layer, call.layer_index, gemm, name, op.fmt, op.rounding,
                                   op.effective_scale_mode, op.block_2d, axis, hadamard, path,
                                   call.step, call.call, str(call.quant_backend)))


class _QuantLinearFunction(torch.autograd.Function):
    """Fprop in forward; Dgrad then Wgrad in backward, each quantized per its GemmSpec."""

    @staticmethod
    def forward(ctx, x, weight, bias, call: _GemmCall):
        # Autocast off inside: the casts are explicit (grid values -> compute dtype, fp32 alpha).
        with torch.autocast(x.device.type, enabled=False):
            # ---- Fprop: Y = X . W^T, reduced over in_features (X and W blocked along dim -1) ----
            y = _run_gemm(call, "fprop", x, weight, bias=bias)
        ctx.save_for_backward(x, weight)  # high precision: backward re-quantizes along its own axes
        ctx.call, ctx.bias_dtype = call, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        call, cache = ctx.call, {}
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.to(call.compute_dtype)
            if ctx.needs_input_grad[0]:
                # ---- Dgrad: dX = dY . W, reduced over out_features (dY along dim -1, W along dim 0) ----
                dx = _run_gemm(call, "dgrad", dy, weight, cache=cache).to(x.dtype)
            if ctx.needs_input_grad[1]:
                # ---- Wgrad: dW = dY^T . X, reduced over tokens (dY and X along dim 0) ----
                dw = _run_gemm(call, "wgrad", dy, x, cache=cache).to(weight.dtype)
            if ctx.needs_input_grad[2]:
                # The bias gradient is a reduction, not a GEMM: high precision, from the unquantized dY.
                db = dy.float().sum(0).to(call.compute_dtype).to(ctx.bias_dtype)
        return dx, dw, db, None


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
        call = _GemmCall(self, self._compute_dtype(x))
        x2d = x.reshape(-1, self.in_features).to(call.compute_dtype)
        y = _QuantLinearFunction.apply(x2d, self.weight, self.bias, call)
        return y.reshape(*x.shape[:-1], self.out_features)

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
