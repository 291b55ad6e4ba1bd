"""fp4.names: the one vocabulary (Enum member names == values, plain-string behaviour, tables)."""
import json

import pytest
from omegaconf import OmegaConf
from dataclasses import dataclass

import fp4
from fp4 import names
from fp4.names import (FP4_GEMMS, GEMM_OPERANDS, GEMM_REDUCTION, GEMM_TITLES, Gemm, Ladder, Operand,
                       QuantBackend, Stabilizer, choices)
from fp4.recipe import GEMMS, LADDERS, STABILIZERS, Recipe

ENUMS = [getattr(names, n) for n in ("Gemm", "Operand", "Ladder", "Stabilizer", "RecipeFormat",
                                     "OperandFormat", "Fp8Format", "UfpElement", "ScaleMode", "Rounding",
                                     "SignCadence", "SrOperands", "QuantBackend")]


@pytest.mark.parametrize("enum_cls", ENUMS, ids=lambda e: e.__name__)
def test_member_names_are_their_lowercase_values(enum_cls):
    for member in enum_cls:
        assert member.name == member.value == member.value.lower()
        assert str(member) == f"{member}" == member.value
        assert member == member.value and hash(member) == hash(member.value)
        assert json.dumps({"k": member}) == json.dumps({"k": member.value})
    assert choices(enum_cls) == tuple(m.value for m in enum_cls)
    assert all(type(c) is str for c in choices(enum_cls))


def test_tables_cover_their_enums():
    assert set(FP4_GEMMS) == set(Ladder) and FP4_GEMMS[Ladder.wgrad] == tuple(Gemm)
    assert set(GEMM_OPERANDS) == set(GEMM_TITLES) == set(GEMM_REDUCTION) == set(Gemm)
    assert GEMM_OPERANDS[Gemm.wgrad] == (Operand.dy, Operand.x)
    # Plain-string lookups keep working.
    assert FP4_GEMMS["dgrad"] == ("fprop", "dgrad") and GEMM_TITLES["wgrad"] == "Wgrad"


def test_old_tuples_derive_from_the_enums():
    assert LADDERS == choices(Ladder) and STABILIZERS == choices(Stabilizer) and GEMMS == choices(Gemm)
    assert fp4.Ladder is Ladder and fp4.choices is choices


def test_recipe_accepts_members_and_words_alike():
    a = Recipe(Ladder.wgrad, Stabilizer.rht, names.RecipeFormat.nvfp4)
    b = Recipe("wgrad", "rht", "nvfp4")
    assert a == b and repr(a) == repr(b) and a.describe() == b.describe()
    assert type(a.ladder) is str and json.dumps(a.describe())
    with pytest.raises(ValueError, match="bf16, fp8, fprop, dgrad, wgrad"):
        Recipe("fp6")


def test_omegaconf_resolves_yaml_words_to_members():
    @dataclass
    class Hw:
        quant_backend: QuantBackend = QuantBackend.auto

    cfg = OmegaConf.merge(OmegaConf.structured(Hw), OmegaConf.create({"quant_backend": "triton"}))
    assert cfg.quant_backend is QuantBackend.triton


def test_random_draw_seeds_do_not_depend_on_member_or_word():
    from fp4.linear import derive_seed
    assert derive_seed("sr", 1, 2, Gemm.wgrad, Operand.dy) == derive_seed("sr", 1, 2, "wgrad", "dy")
