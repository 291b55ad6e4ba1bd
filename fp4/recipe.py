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
    h16_all  h16 on every GEMM (the MXFP4 paper's final recipe); stabilizer_gemms is all three

Sign cadences of a Hadamard transform (HadamardSpec.signs): "none" (unsigned), "fixed" (one random
vector drawn from the seed, layer and GEMM, then kept for the whole run), "step" (redrawn every
optimizer step), "call" (redrawn every GEMM call). Naming trap: "fixed" signs are *random-looking but
deterministic* -- the same bits every step of a run -- so a "fixed random Hadamard" is a deterministic
transform in the sense that matters for training, whatever a library calls it. Only "step" and "call"
are randomized in the sense of the paper's RHT (fresh randomness, so the quantization error decorrelates
across steps).

Formats (FORMAT_RECIPES): mxfp4 (E2M1, E8M0 scale per 32), nvfp4 (E2M1, E4M3 scale per 16 + FP32 tensor
scale; optionally 16x16 2D weight tiles), and the UFP4 paper's family, which by construction round dY
stochastically on every FP4 GEMM:

    ufp4       E1M2 (or INT4) elements, one unrounded FP32 scale per 16 (scale mode "fp32"), random
               Hadamard-16 with "step" signs on all FP4 GEMMs (the paper's RHT; "step" because it is
               the randomized cadence -- "fixed" would be one deterministic rotation)
    ufp4_e2m1  the paper's "strong E2M1" baseline: E2M1 elements, the same FP32 16-blocks, the
               random Hadamard on Wgrad only
    ufp4_mx    E1M2 / INT4 elements with MX scaling and a fixed-sign Hadamard-16 on all FP4 GEMMs
               (the earlier definition of ufp4)

A stabilizer's transform replaces the built-in one on the GEMMs it targets.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Iterable, Optional, Tuple, Union

from .formats import OPERAND_FORMATS
from .names import (FP4_GEMMS, GEMM_OPERANDS, GEMM_REDUCTION, GEMM_TITLES, Fp8Format, Gemm, Ladder,
                    OperandFormat, RecipeFormat, Rounding, ScaleMode, SignCadence, SrOperands, Stabilizer,
                    UfpElement, choices)

# The old tuple names, derived from fp4.names (the one vocabulary) so callers keep working.
LADDERS = choices(Ladder)
STABILIZERS = choices(Stabilizer)
RECIPE_FORMATS = choices(RecipeFormat)
GEMMS = choices(Gemm)
HADAMARD_SIGNS = choices(SignCadence)
ROUNDINGS = choices(Rounding)
FP8_FORMATS = choices(Fp8Format)
UFP4_ELEMENTS = choices(UfpElement)
FP4_FORMATS = tuple(f for f in choices(OperandFormat) if f not in FP8_FORMATS)
MX_FORMATS = tuple(n for n, f in OPERAND_FORMATS.items() if f.block_scale == "e8m0")  # E8M0 / 32 by default
SCALE_MODES = choices(ScaleMode)  # every block scale rule: the E8M0 (MX) ones and fp32
MX_SCALE_MODES = tuple(m for m in SCALE_MODES if m != ScaleMode.fp32)
# Stabilizers whose transform is a Hadamard (their sign cadence and block are tunable).
HADAMARD_STABILIZERS = (Stabilizer.rht.value, Stabilizer.h16.value, Stabilizer.h16_all.value)
SR_OPERANDS = choices(SrOperands)
TIE_RULE = "nearest-even"


@dataclass(frozen=True)
class FormatRecipe:
    """What a recipe format (fp4.names.RecipeFormat) fixes on its FP4 GEMMs, stabilizers aside.

    element: the operand format of every FP4 operand ("ufp4_element": the recipe's E1M2 / INT4 choice).
    scale_mode: its default block scale mode (None: the MX default, even / rceil by rounding).
    hadamard_gemms / signs: GEMMs with a built-in Hadamard-16 and its sign cadence.
    sr_dy: dY is always rounded stochastically."""

    element: str
    scale_mode: Optional[str] = None
    hadamard_gemms: Tuple[str, ...] = ()
    signs: Optional[str] = None
    sr_dy: bool = False


_UFP4_ELEMENT = "ufp4_element"
# ufp4 uses "step" signs: the UFP4 paper's transform is a *random* Hadamard (RHT), and "step" is the
# cadence here that is randomized (fresh signs every optimizer step, as the rht stabilizer); "fixed"
# signs would be one deterministic rotation for the whole run. ufp4_mx keeps the fixed-sign
# Hadamard of the earlier ufp4 definition, so its runs stay comparable.
FORMAT_RECIPES: Dict[str, FormatRecipe] = {
    RecipeFormat.mxfp4.value: FormatRecipe(OperandFormat.mxfp4.value),
    RecipeFormat.nvfp4.value: FormatRecipe(OperandFormat.nvfp4.value),
    RecipeFormat.ufp4.value: FormatRecipe(_UFP4_ELEMENT, ScaleMode.fp32.value, GEMMS, SignCadence.step.value, True),
    RecipeFormat.ufp4_e2m1.value: FormatRecipe(OperandFormat.e2m1.value, ScaleMode.fp32.value, (Gemm.wgrad.value,),
                                               SignCadence.step.value, True),
    RecipeFormat.ufp4_mx.value: FormatRecipe(_UFP4_ELEMENT, None, GEMMS, SignCadence.fixed.value, True),
}
assert tuple(FORMAT_RECIPES) == RECIPE_FORMATS


def _check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(str, choices))}")


@dataclass(frozen=True)
class OperandSpec:
    """How one GEMM operand is quantized. fmt None = high precision (the compute dtype, untouched)."""

    fmt: Optional[str]
    rounding: str = "nearest"
    # Block-scaled element formats only; None = "even" (nearest) / "rceil" (stochastic); "fp32" = FP32 / 16.
    scale_mode: Optional[str] = None
    block_2d: bool = False  # NVFP4 16x16 weight tiles: W is quantized identically along dim 0 and -1

    def __post_init__(self):
        if self.fmt is not None:
            _check_choice("operand format", self.fmt, FP4_FORMATS + FP8_FORMATS)
        _check_choice("rounding", self.rounding, ROUNDINGS)
        if self.scale_mode is not None:
            _check_choice("scale mode", self.scale_mode, SCALE_MODES)
            valid = OPERAND_FORMATS[self.fmt].scale_modes if self.fmt is not None else ()
            if self.scale_mode not in valid:
                raise ValueError(f"scale mode {self.scale_mode!r} is not valid for operand format {self.fmt!r} "
                                 f"(valid: {', '.join(valid) or 'none'})")

    @property
    def is_fp4(self) -> bool:
        return self.fmt in FP4_FORMATS

    @property
    def is_fp8(self) -> bool:
        return self.fmt in FP8_FORMATS

    @property
    def effective_scale_mode(self) -> Optional[str]:
        """The scale rule actually used, with the contract's defaults resolved (for describe())."""
        if self.fmt in MX_FORMATS:  # MX by default; "fp32" reads as itself
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
        name_a, name_b = map(str, GEMM_OPERANDS[self.name])  # plain-str keys: describe() stays plain data
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
      scale_mode: block scale rule of every block-scaled element operand (None: the format's own --
        fp32 for ufp4 / ufp4_e2m1, else "even" for nearest, "rceil" under SR); "fp32" is refused by mxfp4.
      sr_operands: "grad" (dY only) or "all" (every operand of the GEMMs the stabilizer targets).
      stabilizer_gemms: GEMMs the stabilizer targets (default ("wgrad",)).
      hadamard_block: block of every Hadamard transform (default 16).
      hadamard_signs: sign cadence of the rht / h16 / h16_all stabilizer's transform (defaults "step" /
        "none"); a format's built-in transform keeps its own (FORMAT_RECIPES). "fixed" is deterministic.
      nvfp4_2d_weights: NVFP4 W in 16x16 tiles so Fprop and Dgrad see the same quantized weight.
      ufp4_element: "e1m2" or "int4" (symmetric +-7), the grid of ufp4 and ufp4_mx.
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
            _check_choice("scale mode", scale_mode, SCALE_MODES)
        _check_choice("sr_operands", sr_operands, SR_OPERANDS)
        if hadamard_signs is not None:
            _check_choice("Hadamard sign cadence", hadamard_signs, HADAMARD_SIGNS)
        _check_choice("ufp4 element", ufp4_element, UFP4_ELEMENTS)
        if stabilizer_gemms is None:
            # h16_all is h16 aimed at every GEMM (only the FP4 ones are affected).
            stabilizer_gemms = GEMMS if stabilizer == Stabilizer.h16_all else ("wgrad",)
        elif isinstance(stabilizer_gemms, str):
            stabilizer_gemms = (stabilizer_gemms,)
        stabilizer_gemms = tuple(str(g).lower() for g in stabilizer_gemms)
        for gemm in stabilizer_gemms:
            _check_choice("GEMM", gemm, GEMMS)
        if stabilizer == Stabilizer.h16_all and set(stabilizer_gemms) != set(GEMMS):
            raise ValueError(f"stabilizer h16_all acts on every GEMM; stabilizer_gemms={list(stabilizer_gemms)} "
                             "contradicts it (use h16 with stabilizer_gemms)")
        HadamardSpec(hadamard_block)  # validates the block early, whatever the stabilizer

        # Stored as plain strings (an Enum member passed in becomes its value), so repr(), __eq__ and
        # describe() read the same whether the caller used fp4.names members or words.
        ladder, stabilizer, format, fp8_forward, fp8_backward, sr_operands, ufp4_element = map(
            str, (ladder, stabilizer, format, fp8_forward, fp8_backward, sr_operands, ufp4_element))
        scale_mode = None if scale_mode is None else str(scale_mode)
        hadamard_signs = None if hadamard_signs is None else str(hadamard_signs)
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
        fp4_fmt = self._fp4_element()
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
        if self.scale_mode is not None and self.format == "nvfp4" and FP4_GEMMS[self.ladder]:
            inactive.append(f"scale_mode={self.scale_mode}: inactive (nvfp4 has E4M3 block scales, not MX)")
        if self.hadamard_signs is not None and self.stabilizer not in HADAMARD_STABILIZERS:
            inactive.append(f"hadamard_signs={self.hadamard_signs}: inactive (stabilizer {self.stabilizer} "
                            "has no Hadamard transform)")
        if self.nvfp4_2d_weights and self.format != "nvfp4":
            inactive.append("nvfp4_2d_weights: inactive (format is not nvfp4)")
        self.inactive = tuple(inactive)
        return specs

    def _fp4_element(self) -> str:
        element = FORMAT_RECIPES[self.format].element
        return self.ufp4_element if element == _UFP4_ELEMENT else element

    def _fp4_gemm(self, gemm: str, names, fp4_fmt: str, inactive: list):
        targeted = self.stabilizer != "none" and gemm in self.stabilizer_gemms
        built_in = FORMAT_RECIPES[self.format]
        # Stochastic rounding: the ufp4 formats always round dY stochastically; sr adds dY (or all).
        sr_names = {"dy"} if built_in.sr_dy else set()
        if targeted and self.stabilizer == "sr":
            wanted = set(names) if self.sr_operands == "all" else {"dy"} & set(names)
            if not wanted:
                inactive.append(f"sr on {GEMM_TITLES[gemm]}: inactive (no gradient operand; "
                                "use sr_operands='all')")
            sr_names |= wanted
        # Hadamard: the format's built-in transform, replaced on targeted GEMMs by rht / h16 / h16_all.
        signs = built_in.signs if gemm in built_in.hadamard_gemms else None
        if targeted and self.stabilizer in HADAMARD_STABILIZERS:
            signs = self.hadamard_signs or ("step" if self.stabilizer == "rht" else "none")
        hadamard = HadamardSpec(self.hadamard_block, signs) if signs is not None else None
        operands = []
        for name in names:
            rounding = "stochastic" if name in sr_names else "nearest"
            operands.append(OperandSpec(
                fp4_fmt, rounding,
                scale_mode=(self.scale_mode or built_in.scale_mode) if fp4_fmt in MX_FORMATS else None,
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
        A step that draws can still be replayed as a CUDA graph if its draws' generators are re-seeded
        before each replay (fp4.state.GeneratorPool)."""
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
            "fp4_element": OPERAND_FORMATS[self._fp4_element()].element.name,
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
