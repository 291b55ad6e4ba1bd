"""fp4: the numerics core of fp4-ablate (formats, scales, rounding, transforms, quantized linear).

See fp4/linear.py for the design of the three GEMMs and docs/design.md for the exact semantics.
Names are loaded lazily so `import fp4` stays cheap and the submodules can be used on their own.
"""
from importlib import import_module

_EXPORTS = {
    "fake_quantize": "fp4.quantize",
    "quantize_operand": "fp4.quantize",
    "hadamard": "fp4.transforms",
    "Recipe": "fp4.recipe",
    "QuantLinear": "fp4.linear",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fp4' has no attribute {name!r}")
