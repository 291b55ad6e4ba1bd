"""fp4: the numerics core of fp4-ablate (formats, scales, rounding, transforms, quantized linear).

See fp4/linear.py for the design of the three GEMMs and docs/design.md for the exact semantics;
fp4/names.py is the vocabulary (Enums of every closed set of names), fp4/formats.py the one format
table, fp4/state.py the per-model state (ExecutionConfig: backend and real-FP8 switch, per model).
Names are loaded lazily so `import fp4` stays cheap and the submodules can be used on their own.
"""
from importlib import import_module

_EXPORTS = {
    "fake_quantize": "fp4.quantize",
    "quantize_operand": "fp4.quantize",
    "hadamard": "fp4.transforms",
    "Recipe": "fp4.recipe",
    "QuantLinear": "fp4.linear",
    "QuantState": "fp4.state",
    "ExecutionConfig": "fp4.state",
    **{name: "fp4.names" for name in (
        "Gemm", "Operand", "Ladder", "Stabilizer", "RecipeFormat", "OperandFormat", "Fp8Format",
        "UfpElement", "ScaleMode", "Rounding", "SignCadence", "SrOperands", "QuantBackend",
        "FP4_GEMMS", "GEMM_OPERANDS", "GEMM_TITLES", "GEMM_REDUCTION", "choices")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fp4' has no attribute {name!r}")
