"""Recipe: which GEMM gets which operand spec, for every rung x stabilizer x format, and its errors."""
import itertools
import json

import pytest

from fp4 import quantize
from fp4.recipe import (FP4_FORMATS, FP8_FORMATS, GEMMS, LADDERS, MX_SCALE_MODES, RECIPE_FORMATS,
                        STABILIZERS, GemmSpec, HadamardSpec, OperandSpec, Recipe)

# Written out by hand (not derived from the module) so the test can disagree with it.
FP4_GEMMS_BY_RUNG = {"bf16": set(), "fp8": set(), "fprop": {"fprop"}, "dgrad": {"fprop", "dgrad"},
                     "wgrad": {"fprop", "dgrad", "wgrad"}}
OPERANDS = {"fprop": ("x", "w"), "dgrad": ("dy", "w"), "wgrad": ("dy", "x")}


def test_constants_agree_with_the_quantizer():
    assert set(MX_SCALE_MODES) == set(quantize.SCALE_MODES)
    assert set(FP4_FORMATS + FP8_FORMATS) == set(quantize.FORMATS)
    assert LADDERS == ("bf16", "fp8", "fprop", "dgrad", "wgrad")
    assert STABILIZERS == ("none", "sr", "rht", "h16", "h16_all")
    assert RECIPE_FORMATS == ("mxfp4", "nvfp4", "ufp4", "ufp4_e2m1", "ufp4_mx")


@pytest.mark.parametrize("ladder", LADDERS)
def test_ladder_moves_gemms_from_fp8_to_fp4(ladder):
    recipe = Recipe(ladder)
    for gemm in GEMMS:
        spec = recipe.specs[gemm]
        assert spec.name == gemm and tuple(spec.operands) == OPERANDS[gemm]
        for name, op in spec.operands.items():
            if ladder == "bf16":
                expected = None
            elif gemm in FP4_GEMMS_BY_RUNG[ladder]:
                expected = "mxfp4"
            else:
                expected = "e5m2" if name == "dy" else "e4m3"
            assert op.fmt == expected, (ladder, gemm, name)
            assert op.rounding == "nearest" and not op.block_2d
        assert spec.hadamard is None
    assert recipe.quantizes == (ladder != "bf16")


def test_fp8_formats_are_configurable():
    spec = Recipe("fprop", fp8_forward="e5m2", fp8_backward="e4m3").specs
    assert (spec["dgrad"].a.fmt, spec["dgrad"].b.fmt) == ("e4m3", "e5m2")
    assert (spec["wgrad"].a.fmt, spec["wgrad"].b.fmt) == ("e4m3", "e5m2")
    assert spec["fprop"].a.fmt == "mxfp4"


def test_sr_rounds_dy_of_wgrad_by_default_and_every_operand_with_all():
    specs = Recipe("wgrad", "sr").specs
    roundings = {(g, n): op.rounding for g in GEMMS for n, op in specs[g].operands.items()}
    assert {k for k, v in roundings.items() if v == "stochastic"} == {("wgrad", "dy")}
    assert specs["wgrad"].a.effective_scale_mode == "rceil" and specs["wgrad"].b.effective_scale_mode == "even"
    specs = Recipe("wgrad", "sr", sr_operands="all", stabilizer_gemms=["dgrad", "wgrad"]).specs
    stochastic = {(g, n) for g in GEMMS for n, op in specs[g].operands.items() if op.rounding == "stochastic"}
    assert stochastic == {("dgrad", "dy"), ("dgrad", "w"), ("wgrad", "dy"), ("wgrad", "x")}


@pytest.mark.parametrize("stabilizer, signs", [("rht", "step"), ("h16", "none")])
def test_hadamard_stabilizers_target_wgrad(stabilizer, signs):
    specs = Recipe("wgrad", stabilizer).specs
    assert specs["wgrad"].hadamard == HadamardSpec(16, signs)
    assert specs["fprop"].hadamard is None and specs["dgrad"].hadamard is None
    moved = Recipe("wgrad", stabilizer, stabilizer_gemms="dgrad", hadamard_block=32,
                   hadamard_signs="call").specs
    assert moved["dgrad"].hadamard == HadamardSpec(32, "call") and moved["wgrad"].hadamard is None


@pytest.mark.parametrize("ladder, stabilizer", list(itertools.product(
    ("bf16", "fp8", "fprop", "dgrad"), ("sr", "rht", "h16"))))
def test_stabilizer_on_a_non_fp4_gemm_is_inactive_not_an_error(ladder, stabilizer):
    recipe = Recipe(ladder, stabilizer)
    wgrad = recipe.specs["wgrad"]
    assert wgrad.hadamard is None and wgrad.a.rounding == wgrad.b.rounding == "nearest"
    assert any(note.startswith(f"{stabilizer} on Wgrad: inactive") for note in recipe.inactive)
    assert recipe.describe()["inactive"] == list(recipe.inactive)


@pytest.mark.parametrize("element", ["e1m2", "int4"])
def test_ufp4_mx_has_fixed_sign_hadamard_everywhere_and_sr_on_dy(element):
    specs = Recipe("wgrad", "none", "ufp4_mx", ufp4_element=element).specs
    for gemm in GEMMS:
        assert specs[gemm].hadamard == HadamardSpec(16, "fixed")
        for name, op in specs[gemm].operands.items():
            assert op.fmt == element
            assert op.rounding == ("stochastic" if name == "dy" else "nearest")
    # h16 replaces the transform on its GEMM only; FP8 GEMMs of a lower rung get none of ufp4's extras.
    specs = Recipe("wgrad", "h16", "ufp4_mx").specs
    assert specs["wgrad"].hadamard.signs == "none" and specs["fprop"].hadamard.signs == "fixed"
    specs = Recipe("fprop", "none", "ufp4_mx").specs
    assert specs["dgrad"].hadamard is None and specs["dgrad"].a == OperandSpec("e5m2")


def test_nvfp4_2d_weights_only_tile_the_weight():
    specs = Recipe("wgrad", format="nvfp4", nvfp4_2d_weights=True).specs
    tiled = {(g, n) for g in GEMMS for n, op in specs[g].operands.items() if op.block_2d}
    assert tiled == {("fprop", "w"), ("dgrad", "w")}
    assert all(op.scale_mode is None for g in GEMMS for op in specs[g].operands.values())


def test_scale_mode_reaches_mx_operands():
    specs = Recipe("wgrad", scale_mode="floor").specs
    assert {op.scale_mode for g in GEMMS for op in specs[g].operands.values()} == {"floor"}
    assert Recipe("fprop", scale_mode="floor").specs["dgrad"].a.scale_mode is None  # FP8 has none


@pytest.mark.parametrize("kwargs, listed", [
    (dict(ladder="fp6"), "bf16, fp8, fprop, dgrad, wgrad"),
    (dict(stabilizer="rotate"), "none, sr, rht, h16"),
    (dict(format="mxfp6"), "mxfp4, nvfp4, ufp4"),
    (dict(fp8_forward="e3m4"), "e4m3, e5m2"),
    (dict(scale_mode="round"), "floor, ceil, rceil, even"),
    (dict(sr_operands="weights"), "grad, all"),
    (dict(stabilizer_gemms=["fprop", "gemm2"]), "fprop, dgrad, wgrad"),
    (dict(hadamard_signs="random"), "none, fixed, step, call"),
    (dict(ufp4_element="e2m1"), "e1m2, int4"),
])
def test_bad_names_raise_value_error_listing_choices(kwargs, listed):
    with pytest.raises(ValueError, match=listed):
        Recipe(**kwargs)


def test_bad_hadamard_block_and_operand_spec():
    with pytest.raises(ValueError, match="power of two"):
        Recipe(hadamard_block=12)
    with pytest.raises(ValueError, match="stochastic"):
        OperandSpec("mxfp4", rounding="up")


def test_describe_is_json_and_complete_for_every_combination():
    for ladder, stabilizer, fmt in itertools.product(LADDERS, STABILIZERS, RECIPE_FORMATS):
        recipe = Recipe(ladder, stabilizer, fmt, seed=3)
        described = json.loads(json.dumps(recipe.describe()))
        assert described["tie_rule"] == "nearest-even"
        assert (described["ladder"], described["stabilizer"], described["format"]) == (ladder, stabilizer, fmt)
        for gemm in GEMMS:
            entry = described["gemms"][gemm]
            for name in OPERANDS[gemm]:
                assert entry[name]["fmt"] == recipe.specs[gemm].operands[name].fmt
    described = Recipe("wgrad", "rht", "ufp4_mx").describe()
    assert described["gemms"]["wgrad"]["hadamard"] == {"block": 16, "signs": "step"}
    assert described["gemms"]["fprop"]["hadamard"] == {"block": 16, "signs": "fixed"}
    assert described["gemms"]["wgrad"]["dy"]["scale_mode"] == "rceil"
    assert described["gemms"]["fprop"]["precision"] == "fp4"


def test_recipe_equality_and_repr():
    assert Recipe("wgrad", "h16", seed=1) == Recipe("wgrad", "h16", seed=1)
    assert Recipe("wgrad", "h16", seed=1) != Recipe("wgrad", "h16", seed=2)
    assert "ladder='wgrad'" in repr(Recipe("wgrad")) and Recipe("dgrad", "sr").name == "dgrad-sr-mxfp4"
    assert GemmSpec("dgrad", OperandSpec("e5m2"), OperandSpec("e4m3")).precision == "fp8"


def test_random_draws_names_what_a_step_draws():
    # What decides whether a step can be replayed as a CUDA graph.
    assert Recipe("wgrad", "h16").random_draws == ()
    assert Recipe("fp8").random_draws == () and Recipe("wgrad").random_draws == ()
    assert Recipe("wgrad", "sr").random_draws == ("sr:wgrad.dy",)
    assert Recipe("wgrad", "sr", sr_operands="all").random_draws == ("sr:wgrad.dy", "sr:wgrad.x")
    assert Recipe("wgrad", "rht").random_draws == ("signs:wgrad:step",)
    assert Recipe("wgrad", "h16", hadamard_signs="fixed").random_draws == ("signs:wgrad:fixed",)
    ufp4 = Recipe("wgrad", format="ufp4_mx").random_draws
    assert "sr:wgrad.dy" in ufp4 and "signs:fprop:fixed" in ufp4
