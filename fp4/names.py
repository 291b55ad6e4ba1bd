"""The one vocabulary of fp4-ablate: every closed set of names (GEMMs, operands, ladder rungs,
stabilizers, formats, scale modes, roundings, sign cadences, backends) and the tables keyed by them.

Why Enums of strings. Each class is a `(str, Enum)` whose member *name* equals its lowercase
*value*: OmegaConf resolves an Enum-typed config field by member name, so the YAML word `fp8`
must be the member `fp8`; and a str Enum compares and hashes equal to its value, so every
function of fp4 keeps accepting plain strings ("wgrad" == Gemm.wgrad, {"wgrad": 1}[Gemm.wgrad]).
`__str__` / `__format__` return the value, so f-strings, logs and json.dumps write the plain word
(json.dumps of a str subclass already writes its value).

Every literal list of valid names inside fp4/ is derived from these classes with `choices()`
(e.g. recipe.LADDERS = choices(Ladder)); a new rung, stabilizer or format is added here once.
This module imports nothing but the standard library, so configs and experiments may import it
without pulling in torch.
"""
from __future__ import annotations

from enum import Enum
from typing import Dict, Tuple, Type

__all__ = ["NameEnum", "Gemm", "Operand", "Ladder", "Stabilizer", "RecipeFormat", "OperandFormat", "Fp8Format",
           "UfpElement", "ScaleMode", "Rounding", "SignCadence", "SrOperands", "QuantBackend",
           "FP4_GEMMS", "GEMM_OPERANDS", "GEMM_TITLES", "GEMM_REDUCTION", "choices"]


class NameEnum(str, Enum):
    """A name whose str() / format() / json form is its plain value (the base of every choice
    Enum of the project, here and in the experiment layer)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Gemm(NameEnum):
    """The three GEMMs of a linear layer: Fprop Y = X.W^T, Dgrad dX = dY.W, Wgrad dW = dY^T.X."""
    fprop = "fprop"
    dgrad = "dgrad"
    wgrad = "wgrad"


class Operand(NameEnum):
    """GEMM operands: activations X, weight W, output gradient dY."""
    x = "x"
    w = "w"
    dy = "dy"


class Ladder(NameEnum):
    """Rungs of the FP8 -> FP4 ladder (which GEMMs run in FP4: FP4_GEMMS)."""
    bf16 = "bf16"
    fp8 = "fp8"
    fprop = "fprop"
    dgrad = "dgrad"
    wgrad = "wgrad"


class Stabilizer(NameEnum):
    """none: RNE everywhere; sr: stochastic rounding; rht: random Hadamard (signs per step);
    h16: deterministic Hadamard-16 (no signs) on the targeted GEMMs (default Wgrad);
    h16_all: the same transform on every FP4 GEMM (the MXFP4 paper's final recipe)."""
    none = "none"
    sr = "sr"
    rht = "rht"
    h16 = "h16"
    h16_all = "h16_all"


class RecipeFormat(NameEnum):
    """FP4 family of a recipe (fp4/recipe.py): mxfp4, nvfp4; ufp4 = the UFP4 paper's recipe (uniform
    E1M2 / INT4 grid, one FP32 scale per 16, RHT on every FP4 GEMM, SR on dY); ufp4_e2m1 = its
    "strong E2M1" baseline (E2M1, same scales, RHT on Wgrad only, SR on dY); ufp4_mx = the uniform
    grid with MX (E8M0 per 32) scales and a fixed-sign Hadamard-16 on every FP4 GEMM."""
    mxfp4 = "mxfp4"
    nvfp4 = "nvfp4"
    ufp4 = "ufp4"
    ufp4_e2m1 = "ufp4_e2m1"
    ufp4_mx = "ufp4_mx"


class OperandFormat(NameEnum):
    """Format of one quantized operand (fp4.quantize.FORMATS). mxfp4 = E2M1 elements with MX scales
    only (the OCP format); e2m1 / e1m2 / int4 name an element grid whose block scale the scale mode
    picks (MX E8M0 per 32 by default, or fp32 per 16). e2m1 with an MX mode is exactly mxfp4."""
    mxfp4 = "mxfp4"
    nvfp4 = "nvfp4"
    e1m2 = "e1m2"
    int4 = "int4"
    e4m3 = "e4m3"
    e5m2 = "e5m2"
    e2m1 = "e2m1"


class Fp8Format(NameEnum):
    e4m3 = "e4m3"
    e5m2 = "e5m2"


class UfpElement(NameEnum):
    """Uniform 4-bit grids of the ufp4 format: E1M2 (0..1.75 step .25) or symmetric INT4 (+-7)."""
    e1m2 = "e1m2"
    int4 = "int4"


class ScaleMode(NameEnum):
    """Block scale rule (fp4.scaling). floor / ceil / rceil / even: one E8M0 scale per 32 (MX);
    fp32: one unrounded FP32 scale per 16, fp32(block amax / grid max) (the UFP4 paper's)."""
    floor = "floor"
    ceil = "ceil"
    rceil = "rceil"
    even = "even"
    fp32 = "fp32"


class Rounding(NameEnum):
    nearest = "nearest"
    stochastic = "stochastic"


class SignCadence(NameEnum):
    """Hadamard sign vector: none (unsigned), fixed (drawn once per run: deterministic), step
    (redrawn every optimizer step), call (redrawn every GEMM call)."""
    none = "none"
    fixed = "fixed"
    step = "step"
    call = "call"


class SrOperands(NameEnum):
    """Which operands the sr stabilizer rounds stochastically: grad (dY only) or all."""
    grad = "grad"
    all = "all"


class QuantBackend(NameEnum):
    """quantize_operand backend: auto (Triton on CUDA where verified), torch (reference), triton."""
    auto = "auto"
    torch = "torch"
    triton = "triton"


def choices(enum_cls: Type[Enum]) -> Tuple[str, ...]:
    """The plain string values of an Enum class, in declaration order (for messages and checks)."""
    return tuple(member.value for member in enum_cls)


# Which GEMMs each rung runs in FP4; the others run in FP8 (bf16: none is quantized).
FP4_GEMMS: Dict[Ladder, Tuple[Gemm, ...]] = {
    Ladder.bf16: (),
    Ladder.fp8: (),
    Ladder.fprop: (Gemm.fprop,),
    Ladder.dgrad: (Gemm.fprop, Gemm.dgrad),
    Ladder.wgrad: (Gemm.fprop, Gemm.dgrad, Gemm.wgrad),
}
# Operand names in product order: Fprop Y = X.W^T, Dgrad dX = dY.W, Wgrad dW = dY^T.X.
GEMM_OPERANDS: Dict[Gemm, Tuple[Operand, Operand]] = {
    Gemm.fprop: (Operand.x, Operand.w),
    Gemm.dgrad: (Operand.dy, Operand.w),
    Gemm.wgrad: (Operand.dy, Operand.x),
}
GEMM_TITLES: Dict[Gemm, str] = {Gemm.fprop: "Fprop", Gemm.dgrad: "Dgrad", Gemm.wgrad: "Wgrad"}
# The reduction axis of each GEMM, in the words Recipe.describe() uses.
GEMM_REDUCTION: Dict[Gemm, str] = {Gemm.fprop: "in_features", Gemm.dgrad: "out_features",
                                   Gemm.wgrad: "tokens"}
