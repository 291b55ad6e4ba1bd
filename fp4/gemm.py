"""One GEMM of a quantized linear, executed: operands quantized per its GemmSpec, then the product.

fp4/linear.py is the design document (which operand is blocked along which axis, why X and W are
saved in high precision, the per-tensor alphas, the identities of the random draws). This module is
what runs it for one call: `_GemmCall` is what a layer's forward (and its backward) needs besides
tensors -- layer identity, step and call index, the ExecutionConfig, the observers -- and
`_run_gemm` quantizes a GEMM's two operands along their reduction axes and multiplies them. The
custom ops of fp4/linear_op.py call it; nothing here knows about autograd or torch.compile.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from fp4 import fp8_gemm
from fp4.names import Gemm, ScaleMode
from fp4.transforms import hadamard as hadamard_transform, hadamard_compute, random_signs
from fp4.probe import GemmObservation
from fp4.quantize import quantize_operand
from fp4.recipe import GEMM_OPERANDS, GEMM_TITLES, GEMMS, GemmSpec, HadamardSpec, OperandSpec, Recipe
from fp4.state import ExecutionConfig, GemmRecord


# The dim of each operand (in its natural layout X [T, in], W [out, in], dY [T, out]) that a GEMM
# reduces over, and so blocks along: (a, b) in product order.
REDUCTION_AXES = {Gemm.fprop: (-1, -1), Gemm.dgrad: (-1, 0), Gemm.wgrad: (0, 0)}


class NonFiniteError(FloatingPointError):
    """A GEMM operand or output holds NaN/Inf; says which layer, GEMM and operand."""

    def __init__(self, layer: str, gemm: str, operand: str):
        self.layer, self.gemm, self.operand = layer, gemm, operand
        super().__init__(f"non-finite values in layer {layer!r}, {GEMM_TITLES[gemm]} GEMM, operand {operand}")


class _GemmCall:
    """What one forward (and its backward) of one layer needs besides tensors.

    Built at the layer's forward, where it takes the next call index of the step (`where=None`), or
    in its backward from the (step, call) the forward returned (`where`), so Dgrad and Wgrad draw
    from the identities of their own forward even if the state's step moved on. Settings and
    observers are read from the layer's QuantState when the call is built: never from a
    process-wide switch.
    """

    def __init__(self, module, compute_dtype: torch.dtype, where: Optional[tuple] = None):
        state = module.state
        self.specs: Dict[str, GemmSpec] = module.recipe.specs
        self.layer, self.layer_index = module.name, module.layer_index
        self.seed = state.seed
        self.generator = state.generator  # fresh generators, or a CUDA graph's pool (GeneratorPool)
        if where is None:
            self.step, self.call = state.step, state.next_call(module.layer_index)
        else:
            self.step, self.call = (int(v) for v in where)
        self.check = module.check_finite if module.check_finite is not None else state.check_finite
        self.compute_dtype = compute_dtype
        self.execution: ExecutionConfig = state.execution
        self.quant_backend, self.real_fp8 = state.execution.quant_backend, state.execution.real_fp8
        self.records: List[list] = state.record_sinks()
        self.probe = state.probe  # fp4.probe observer; None = off (the only cost: one test per GEMM)

    def sr_generator(self, device, gemm: str, operand: str) -> torch.Generator:
        return self.generator(device, ("sr", self.seed, self.step, self.layer_index, gemm, operand, self.call),
                              2, 6, self.layer_index)

    def signs(self, gemm: str, hadamard: HadamardSpec, device) -> Optional[torch.Tensor]:
        if hadamard.signs == "none":
            return None
        where = {"fixed": (), "step": (self.step,), "call": (self.step, self.call)}[hadamard.signs]
        generator = self.generator(device, ("signs", self.seed, *where, self.layer_index, gemm),
                                   2 if where else None, 3 if len(where) == 2 else None, self.layer_index)
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
              hadamard: Optional[HadamardSpec], signs, cache: "OperandCache"):
    """(grid values in the compute dtype, per-tensor scale or None) of one operand."""
    if op.fmt is None:
        if hadamard is not None:
            tensor = hadamard_transform(tensor, block=hadamard.block, axis=axis, signs=signs)
        return tensor.to(call.compute_dtype), None
    key = _deterministic_key(op, axis, hadamard)
    made = cache.get(name, key) if key is not None else None
    if made is not None:
        return made
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
    return cache.put(name, key, result) if key is not None else result


def _deterministic_key(op: OperandSpec, axis: int, hadamard: Optional[HadamardSpec]) -> Optional[tuple]:
    """What an operand's quantization depends on besides its values, when that is all: round to
    nearest and a Hadamard without random signs (SR uniforms and signs are drawn per layer, GEMM and
    call, so such a copy is never reused). Per-tensor FP8 without a transform is the same along any
    axis, so one copy of dY serves Dgrad and Wgrad."""
    if op.rounding != "nearest" or (hadamard is not None and hadamard.signs != "none"):
        return None
    per_tensor = op.is_fp8 and hadamard is None
    return ("grid", op, None if per_tensor else axis, hadamard.block if hadamard is not None else None)


class OperandCache:
    """The quantized copies of the operands of one op call (a layer's forward or its backward) that
    another GEMM of the call will read, so that no copy is made twice: dY's per-tensor FP8 copy serves
    Dgrad and Wgrad, Fprop's FP8 copies of X and W serve the backward.

    `shared` is the table of X's copies. Sibling layers that read the same X (q/k/v, gate/up:
    fp4.linear.shared_input_linears) run in one op call and pass one table, so X is quantized once
    per orientation for all of them -- only where that is bit-identical to quantizing it per layer
    (keys exist for deterministic quantization only: _deterministic_key). Other copies are kept
    only when no axis enters the key (the next GEMM of the call can read them); the rest die with
    their GEMM, as without a cache."""

    def __init__(self, both_layouts=(), shared: Optional[dict] = None):
        # The operands whose FP8 copy is needed in both layouts in this call (the caller knows: dY
        # when Dgrad and Wgrad both run; X and W when Fprop's copies serve backward).
        self.both_layouts = tuple(both_layouts)
        self._own: dict = {}
        self._shared = shared

    def _table(self, name: str) -> dict:
        return self._shared if name == "x" and self._shared is not None else self._own

    def get(self, name: str, key: tuple):
        return self._table(name).get((name, *key))

    def put(self, name: str, key: tuple, value):
        axis_free = key[0] == "float8" or key[2] is None
        if axis_free or self._table(name) is self._shared:
            self._table(name)[(name, *key)] = value
        return value


class Fp8Copy:
    """One operand's FP8 copy under per-tensor scaling: q (its layout) and q^T, each made at most once.

    Per-tensor FP8 is the same along any axis, so one copy serves every GEMM of the layer that uses
    the operand in that format (dY: Dgrad and Wgrad; with fp8_shared_copies, X and W: Fprop and the
    backward). A copy saved for backward may hold only q^T (all the backward needs of X and W)."""

    def __init__(self, q: Optional[torch.Tensor], scale: torch.Tensor, q_t: Optional[torch.Tensor] = None):
        self.q, self.scale, self.q_t = q, scale, q_t

    def transposed(self) -> torch.Tensor:
        if self.q_t is None:
            self.q_t = self.q.t().contiguous()
        return self.q_t

    def natural(self) -> torch.Tensor:
        return self.q if self.q is not None else self.q_t.t()


def _fp8_copy(cache: OperandCache, tensor: Optional[torch.Tensor], name: str, fmt: str, backend) -> Fp8Copy:
    key = ("float8", fmt)
    copy = cache.get(name, key)
    if copy is None:
        if name in cache.both_layouts and tensor.dim() == 2:
            q, q_t, scale = fp8_gemm.quantize_fp8_both(tensor, fmt, backend=backend)  # one cast-transpose pass
            copy = Fp8Copy(q, scale, q_t)
        else:
            q, scale = fp8_gemm.quantize_fp8(tensor, fmt, backend=backend)
            copy = Fp8Copy(q, scale)
        cache.put(name, key, copy)
    return copy


def fp8_shared_copies(specs: Dict[str, GemmSpec], device, tokens: int, in_features: int, out_features: int,
                      execution: ExecutionConfig) -> bool:
    """Whether Fprop's FP8 copies of X and W can serve Wgrad and Dgrad: all three GEMMs run on the
    FP8 tensor cores with X (and W) in the same format in forward and backward. Then backward needs
    no high-precision X at all (it would quantize X to the same bits), so the layer saves X^T in FP8
    (1 byte per element instead of 2) and quantizes X and W once per step instead of twice."""
    fprop, dgrad, wgrad = (specs[g] for g in GEMMS)
    dims = {Gemm.fprop: (tokens, in_features, out_features), Gemm.dgrad: (tokens, out_features, in_features),
            Gemm.wgrad: (out_features, tokens, in_features)}
    real = all(gemm_path(specs[g], device, dims[g], execution).endswith("(torch._scaled_mm)") for g in GEMMS)
    return real and wgrad.b.fmt == fprop.a.fmt and dgrad.b.fmt == fprop.b.fmt


def _run_gemm(call: _GemmCall, gemm: str, a: torch.Tensor, b: torch.Tensor,
              bias: Optional[torch.Tensor] = None, cache: Optional["OperandCache"] = None) -> torch.Tensor:
    """op(a) @ op(b) for one GEMM. a and b come in their natural layout (X, W, dY), reduced along
    REDUCTION_AXES[gemm]; op transposes so that the reduction is a's last and b's first dim."""
    spec, (name_a, name_b), (a_axis, b_axis) = call.specs[gemm], GEMM_OPERANDS[gemm], REDUCTION_AXES[gemm]
    cache = OperandCache() if cache is None else cache
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
        copies = [_fp8_copy(cache, tensor, name, fmt, call.quant_backend)
                  for tensor, name, fmt in ((a, name_a, spec.a.fmt), (b, name_b, spec.b.fmt))]
        (ca, cb) = copies
        if probe is not None:
            observed = (ca.natural().float() * ca.scale, cb.natural().float() * cb.scale)
        # _scaled_mm wants op(a) row-major and op(b) column-major: op(a) = a (rows of q) or a^T (rows
        # of q^T); op(b) = b^T (q viewed transposed) or b (q^T viewed transposed). No copy is made here.
        qa = ca.q if a_axis == -1 else ca.transposed()
        qb = cb.q.t() if b_axis == -1 else cb.transposed().t()
        out = fp8_gemm.fp8_mm(qa, ca.scale, qb, cb.scale,
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

