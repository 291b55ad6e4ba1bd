"""Run by test_kernels_compile.py in a subprocess (TRITON_INTERPRET unset): call the kernels'
launchers on small CPU tensors with Triton's launch replaced by a compile for CUDA sm_90, and
print one JSON line per distinct kernel variant: {"kernel", "constexprs", "ok", "error"}.

The launch is replaced at JITFunction.run: it receives exactly the arguments a real launch gets,
so the signature (pointer dtypes, integer widths) and the constexprs are the launcher's own. The
outputs the launchers return are then garbage (nothing ran); only the compile results count."""
import itertools
import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)  # the H100 / H200 the kernels are benchmarked on
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8"}
results = {}


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def compile_instead(self, *args, grid, warmup, **kwargs):
    values = dict(zip(self.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in self.arg_names})
    signature, constexprs = {}, {}
    for param, name in zip(self.params, self.arg_names):
        value = values.get(name, param.default)
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = _type(value)
    key = (self.fn.__name__, json.dumps(constexprs, sort_keys=True, default=str))
    if key in results:
        return None
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    try:
        triton.compile(ASTSource(fn=self, signature=signature, constexprs=constexprs),
                       target=TARGET, options=options)
        results[key] = None
    except Exception as err:  # noqa: BLE001 -- every failure is reported, none is raised here
        results[key] = f"{type(err).__name__}: {str(err)[:2000]}"
    return None


def main() -> int:
    JITFunction.run = compile_instead
    from fp4.kernels import triton_quantize_operand_ex
    from fp4.kernels.fp8_quant import fp8_quantize, fp8_quantize_t
    x = torch.randn(64, 128).to(torch.bfloat16)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for fmt in ("e4m3", "e5m2"):
        fp8_quantize_t(x, fmt)
        for rounding in ("nearest", "stochastic"):
            fp8_quantize(x, fmt, rounding=rounding, generator=gen(), return_fp8=True)
    # One variant per kernel branch: MX (KIND 0), NVFP4 (1), a per-tensor format (2), the FP32
    # block scales; nearest and stochastic, with and without the fused Hadamard, both axes.
    for (fmt, mode), axis, rounding, hb in itertools.product(
            (("mxfp4", None), ("nvfp4", None), ("e4m3", None), ("e1m2", "fp32")),
            (-1, 0), ("nearest", "stochastic"), (None, 16)):
        if fmt == "e4m3" and hb:
            continue
        triton_quantize_operand_ex(x, fmt, axis, rounding, mode, gen(), False, hb,
                                   torch.ones(hb) if hb else None, return_scales=fmt != "e4m3")
    for (name, consts), error in sorted(results.items()):
        print(json.dumps({"kernel": name, "constexprs": consts, "ok": error is None, "error": error}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
