"""Recipe: ladder rung x stabilizer x format -> one GemmSpec per GEMM of a linear layer.

A Recipe is pure data: it says, for each of the three GEMMs (Fprop, Dgrad, Wgrad; see
fp4/linear.py), in which format each operand is quantized, with which rounding and scale mode, and
which Hadamard transform (if any) runs along the GEMM's reduction axis first. QuantLinear reads
`recipe.specs` and does nothing else on its own, so `Recipe.describe()` is a complete account of the
numerics of a run.

The ladder (AMD, "Pretraining LLMs with MXFP4") moves one GEMM at a time from FP8 to FP4:

    bf16   no quantization at all (the reference; bit-identical to nn.Linear)
    fp8    Fprop, Dgrad, Wgrad in FP8 (E4M3 X and W, E5M2 dY, per-tensor current scaling)
    fprop  Fprop in FP4; Dgrad and Wgrad in FP8
    dgrad  Fprop and Dgrad in FP4; Wgrad in FP8
    wgrad  all three GEMMs in FP4

Stabilizers act only on GEMMs that run in FP4 (default target: Wgrad, the GEMM that reduces over
tokens and is the most sensitive). A stabilizer aimed at an FP8 or bf16 GEMM is not an error -- sweeps
cross every rung with every stabilizer -- it is recorded as inactive in `describe()`:

    none   round to nearest, ties to even, everywhere
    sr     stochastic rounding of dY (`sr_operands="all"`: of every operand of the targeted GEMMs)
    rht    random Hadamard transform, block 16, sign vector redrawn every training step
    h16    deterministic Hadamard transform, block 16, no signs

Sign cadences of a Hadamard transform (HadamardSpec.signs): "none" (unsigned), "fixed" (one random
vector drawn from the seed, layer and GEMM, then kept for the whole run), "step" (redrawn every
optimizer step), "call" (redrawn every GEMM call). Naming trap: "fixed" signs are *random-looking but
deterministic* -- the same bits every step of a run -- so a "fixed random Hadamard" is a deterministic
transform in the sense that matters for training, whatever a library calls it. Only "step" and "call"
are randomized in the sense of the paper's RHT (fresh randomness, so the quantization error decorrelates
across steps).

Formats: mxfp4 (E2M1, E8M0 scale per 32), nvfp4 (E2M1, E4M3 scale per 16 + FP32 tensor scale; optionally
16x16 2D weight tiles), ufp4 (E1M2 or symmetric INT4 elements with MX scaling; by construction it uses a
Hadamard-16 with fixed random signs on all FP4 GEMMs and stochastic rounding of dY).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Iterable, Optional, Tuple, Union

LADDERS = ("bf16", "fp8", "fprop", "dgrad", "wgrad")
STABILIZERS = ("none", "sr", "rht", "h16")
RECIPE_FORMATS = ("mxfp4", "nvfp4", "ufp4")
GEMMS = ("fprop", "dgrad", "wgrad")
GEMM_TITLES = {"fprop": "Fprop", "dgrad": "Dgrad", "wgrad": "Wgrad"}
# Operand names in product order: Fprop Y = X.W^T, Dgrad dX = dY.W, Wgrad dW = dY^T.X.
GEMM_OPERANDS = {"fprop": ("x", "w"), "dgrad": ("dy", "w"), "wgrad": ("dy", "x")}
# The reduction axis of each GEMM, in the words describe() uses.
GEMM_REDUCTION = {"fprop": "in_features", "dgrad": "out_features", "wgrad": "tokens"}
HADAMARD_SIGNS = ("none", "fixed", "step", "call")
ROUNDINGS = ("nearest", "stochastic")
FP8_FORMATS = ("e4m3", "e5m2")
FP4_FORMATS = ("mxfp4", "nvfp4", "e1m2", "int4")
MX_FORMATS = ("mxfp4", "e1m2", "int4")
MX_SCALE_MODES = ("floor", "ceil", "rceil", "even")
SR_OPERANDS = ("grad", "all")
UFP4_ELEMENTS = ("e1m2", "int4")
# Which GEMMs each rung runs in FP4; the others run in FP8 (bf16: none is quantized).
FP4_GEMMS = {"bf16": (), "fp8": (), "fprop": ("fprop",), "dgrad": ("fprop", "dgrad"), "wgrad": GEMMS}
TIE_RULE = "nearest-even"


def _check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(str, choices))}")


@dataclass(frozen=True)
class OperandSpec:
    """How one GEMM operand is quantized. fmt None = high precision (the compute dtype, untouched)."""

    fmt: Optional[str]
    rounding: str = "nearest"
    scale_mode: Optional[str] = None  # MX formats only; None = "even" (nearest) / "rceil" (stochastic)
    block_2d: bool = False  # NVFP4 16x16 weight tiles: W is quantized identically along dim 0 and -1

    def __post_init__(self):
        if self.fmt is not None:
            _check_choice("operand format", self.fmt, FP4_FORMATS + FP8_FORMATS)
        _check_choice("rounding", self.rounding, ROUNDINGS)
        if self.scale_mode is not None:
            _check_choice("scale mode", self.scale_mode, MX_SCALE_MODES)

    @property
    def is_fp4(self) -> bool:
        return self.fmt in FP4_FORMATS

    @property
    def is_fp8(self) -> bool:
        return self.fmt in FP8_FORMATS

    @property
    def effective_scale_mode(self) -> Optional[str]:
        """The scale rule actually used, with the contract's defaults resolved (for describe())."""
        if self.fmt in MX_FORMATS:
            return self.scale_mode or ("even" if self.rounding == "nearest" else "rceil")
        if self.fmt == "nvfp4":
            return "e4m3 block16 x fp32 tensor" + (" (16x16 tiles)" if self.block_2d else "")
        if self.is_fp8:
            return "per-tensor current (amax / fmt_max)"
        return None


@dataclass(frozen=True)
class HadamardSpec:
    """Block Hadamard along a GEMM's reduction axis, applied to both operands before quantization."""

    block: int = 16
    signs: str = "none"  # "none" | "fixed" | "step" | "call"; see the module docstring

    def __post_init__(self):
        _check_choice("Hadamard sign cadence", self.signs, HADAMARD_SIGNS)
        if self.block < 2 or self.block & (self.block - 1):
            raise ValueError(f"Hadamard block must be a power of two >= 2, got {self.block}")


@dataclass(frozen=True)
class GemmSpec:
    """One GEMM: operand a then b in product order (names in GEMM_OPERANDS[name])."""

    name: str
    a: OperandSpec
    b: OperandSpec
    hadamard: Optional[HadamardSpec] = None

    @property
    def title(self) -> str:
        return GEMM_TITLES[self.name]

    @property
    def operands(self) -> Dict[str, OperandSpec]:
        """{"x": spec, "w": spec} for Fprop, {"dy", "w"} for Dgrad, {"dy", "x"} for Wgrad."""
        name_a, name_b = GEMM_OPERANDS[self.name]
        return {name_a: self.a, name_b: self.b}

    @property
    def precision(self) -> str:
        if self.a.is_fp4 or self.b.is_fp4:
            return "fp4"
        if self.a.is_fp8 or self.b.is_fp8:
            return "fp8"
        return "bf16"


class Recipe:
    """Ladder rung x stabilizer x format, resolved into `.specs` = {"fprop", "dgrad", "wgrad"} -> GemmSpec.

    Overrides (keyword only):
      fp8_forward / fp8_backward: FP8 element of X and W / of dY on FP8 GEMMs (e4m3 / e5m2).
      scale_mode: MX scale rule for every MX operand (None: "even" for nearest, "rceil" under SR).
      sr_operands: "grad" (dY only) or "all" (every operand of the GEMMs the stabilizer targets).
      stabilizer_gemms: GEMMs the stabilizer targets (default ("wgrad",)).
      hadamard_block: block of every Hadamard transform (default 16).
      hadamard_signs: sign cadence of the rht / h16 stabilizer's transform (defaults "step" / "none");
        ufp4's built-in transform keeps "fixed". Remember "fixed" is deterministic.
      nvfp4_2d_weights: NVFP4 W in 16x16 tiles so Fprop and Dgrad see the same quantized weight.
      ufp4_element: "e1m2" or "int4" (symmetric +-7).
    """

    def __init__(self, ladder: str = "fp8", stabilizer: str = "none", format: str = "mxfp4", seed: int = 0,
                 *, fp8_forward: str = "e4m3", fp8_backward: str = "e5m2", scale_mode: Optional[str] = None,
                 sr_operands: str = "grad", stabilizer_gemms: Optional[Union[str, Iterable[str]]] = None,
                 hadamard_block: int = 16, hadamard_signs: Optional[str] = None,
                 nvfp4_2d_weights: bool = False, ufp4_element: str = "e1m2"):
        _check_choice("ladder rung", ladder, LADDERS)
        _check_choice("stabilizer", stabilizer, STABILIZERS)
        _check_choice("format", format, RECIPE_FORMATS)
        _check_choice("fp8_forward format", fp8_forward, FP8_FORMATS)
        _check_choice("fp8_backward format", fp8_backward, FP8_FORMATS)
        if scale_mode is not None:
            _check_choice("scale mode", scale_mode, MX_SCALE_MODES)
        _check_choice("sr_operands", sr_operands, SR_OPERANDS)
        if hadamard_signs is not None:
            _check_choice("Hadamard sign cadence", hadamard_signs, HADAMARD_SIGNS)
        _check_choice("ufp4 element", ufp4_element, UFP4_ELEMENTS)
        if stabilizer_gemms is None:
            stabilizer_gemms = ("wgrad",)
        elif isinstance(stabilizer_gemms, str):
            stabilizer_gemms = (stabilizer_gemms,)
        stabilizer_gemms = tuple(str(g).lower() for g in stabilizer_gemms)
        for gemm in stabilizer_gemms:
            _check_choice("GEMM", gemm, GEMMS)
        HadamardSpec(hadamard_block)  # validates the block early, whatever the stabilizer

        self.ladder, self.stabilizer, self.format, self.seed = ladder, stabilizer, format, int(seed)
        self.fp8_forward, self.fp8_backward, self.scale_mode = fp8_forward, fp8_backward, scale_mode
        self.sr_operands, self.stabilizer_gemms = sr_operands, stabilizer_gemms
        self.hadamard_block, self.hadamard_signs = int(hadamard_block), hadamard_signs
        self.nvfp4_2d_weights, self.ufp4_element = bool(nvfp4_2d_weights), ufp4_element
        self.inactive: Tuple[str, ...] = ()
        self.specs: Dict[str, GemmSpec] = self._build_specs()

    # -- construction -------------------------------------------------------------------------------
    def _kwargs(self) -> dict:
        return dict(ladder=self.ladder, stabilizer=self.stabilizer, format=self.format, seed=self.seed,
                    fp8_forward=self.fp8_forward, fp8_backward=self.fp8_backward, scale_mode=self.scale_mode,
                    sr_operands=self.sr_operands, stabilizer_gemms=list(self.stabilizer_gemms),
                    hadamard_block=self.hadamard_block, hadamard_signs=self.hadamard_signs,
                    nvfp4_2d_weights=self.nvfp4_2d_weights, ufp4_element=self.ufp4_element)

    def _build_specs(self) -> Dict[str, GemmSpec]:
        inactive = []
        fp4_fmt = {"mxfp4": "mxfp4", "nvfp4": "nvfp4", "ufp4": self.ufp4_element}[self.format]
        specs = {}
        for gemm in GEMMS:
            names = GEMM_OPERANDS[gemm]
            if self.ladder == "bf16":
                operands = [OperandSpec(None) for _ in names]
                hadamard = None
            elif gemm not in FP4_GEMMS[self.ladder]:
                # FP8 GEMM: E4M3 forward tensors, E5M2 gradient; per-tensor scaling, nearest-even.
                operands = [OperandSpec(self.fp8_backward if n == "dy" else self.fp8_forward) for n in names]
                hadamard = None
            else:
                operands, hadamard = self._fp4_gemm(gemm, names, fp4_fmt, inactive)
            if self.stabilizer != "none" and gemm in self.stabilizer_gemms and gemm not in FP4_GEMMS[self.ladder]:
                precision = "bf16" if self.ladder == "bf16" else "fp8"
                inactive.append(f"{self.stabilizer} on {GEMM_TITLES[gemm]}: inactive ({precision} GEMM; "
                                "stabilizers act only on FP4 GEMMs)")
            specs[gemm] = GemmSpec(gemm, operands[0], operands[1], hadamard)
        if self.scale_mode is not None and self.format == "nvfp4" and self.ladder in ("fprop", "dgrad", "wgrad"):
            inactive.append(f"scale_mode={self.scale_mode}: inactive (nvfp4 has E4M3 block scales, not MX)")
        if self.hadamard_signs is not None and self.stabilizer not in ("rht", "h16"):
            inactive.append(f"hadamard_signs={self.hadamard_signs}: inactive (stabilizer {self.stabilizer} "
                            "has no Hadamard transform)")
        if self.nvfp4_2d_weights and self.format != "nvfp4":
            inactive.append("nvfp4_2d_weights: inactive (format is not nvfp4)")
        self.inactive = tuple(inactive)
        return specs

    def _fp4_gemm(self, gemm: str, names, fp4_fmt: str, inactive: list):
        targeted = self.stabilizer != "none" and gemm in self.stabilizer_gemms
        # Stochastic rounding: ufp4 always rounds dY stochastically; the sr stabilizer adds dY (or all).
        sr_names = {"dy"} if self.format == "ufp4" else set()
        if targeted and self.stabilizer == "sr":
            wanted = set(names) if self.sr_operands == "all" else {"dy"} & set(names)
            if not wanted:
                inactive.append(f"sr on {GEMM_TITLES[gemm]}: inactive (no gradient operand; "
                                "use sr_operands='all')")
            sr_names |= wanted
        # Hadamard: ufp4's built-in fixed-sign transform, replaced on targeted GEMMs by rht / h16.
        signs = "fixed" if self.format == "ufp4" else None
        if targeted and self.stabilizer in ("rht", "h16"):
            signs = self.hadamard_signs or ("step" if self.stabilizer == "rht" else "none")
        hadamard = HadamardSpec(self.hadamard_block, signs) if signs is not None else None
        operands = []
        for name in names:
            rounding = "stochastic" if name in sr_names else "nearest"
            operands.append(OperandSpec(
                fp4_fmt, rounding,
                scale_mode=self.scale_mode if fp4_fmt in MX_FORMATS else None,
                block_2d=self.nvfp4_2d_weights and fp4_fmt == "nvfp4" and name == "w"))
        return operands, hadamard

    # -- reporting ----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.ladder}-{self.stabilizer}-{self.format}"

    @property
    def quantizes(self) -> bool:
        """False when no GEMM quantizes or transforms anything (the bf16 rung): QuantLinear is then
        exactly nn.Linear."""
        return any(spec.precision != "bf16" or spec.hadamard is not None for spec in self.specs.values())

    @property
    def random_draws(self) -> Tuple[str, ...]:
        """What this recipe draws from random generators during a step (stochastic rounding, random
        Hadamard signs), e.g. ("sr:wgrad.dy", "signs:wgrad:step"); () when the step is deterministic.
        A step that draws nothing can be replayed as a captured CUDA graph."""
        draws = []
        for gemm, spec in self.specs.items():
            draws += [f"sr:{gemm}.{name}" for name, op in spec.operands.items() if op.rounding == "stochastic"]
            if spec.hadamard is not None and spec.hadamard.signs != "none":
                draws.append(f"signs:{gemm}:{spec.hadamard.signs}")
        return tuple(draws)

    def describe(self) -> dict:
        """JSON-able account of the numerics; every run records it in summary.json."""
        gemms = {}
        for gemm, spec in self.specs.items():
            entry = {"precision": spec.precision, "reduction_axis": GEMM_REDUCTION[gemm],
                     "hadamard": asdict(spec.hadamard) if spec.hadamard else None}
            for name, op in spec.operands.items():
                entry[name] = {"fmt": op.fmt, "rounding": op.rounding,
                               "scale_mode": op.effective_scale_mode, "block_2d": op.block_2d}
            gemms[gemm] = entry
        return {
            "name": self.name, "ladder": self.ladder, "stabilizer": self.stabilizer, "format": self.format,
            "seed": self.seed, "tie_rule": TIE_RULE,
            "fp4_element": {"mxfp4": "e2m1", "nvfp4": "e2m1", "ufp4": self.ufp4_element}[self.format],
            "fp8": {"forward": self.fp8_forward, "backward": self.fp8_backward,
                    "scaling": "per-tensor current (amax / fmt_max)"},
            "scale_mode": self.scale_mode, "sr_operands": self.sr_operands,
            "stabilizer_gemms": list(self.stabilizer_gemms), "hadamard_block": self.hadamard_block,
            "hadamard_signs": self.hadamard_signs, "nvfp4_2d_weights": self.nvfp4_2d_weights,
            "gemms": gemms, "inactive": list(self.inactive),
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._kwargs().items())
        return f"Recipe({args})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Recipe) and self._kwargs() == other._kwargs()

    def __hash__(self) -> int:
        return hash(repr(self))
