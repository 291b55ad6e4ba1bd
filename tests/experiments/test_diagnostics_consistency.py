"""Error consistency across steps (experiments/diagnostics/consistency.py, the training windows, the
report's table): hand-computed cases, the weight-space error under random Hadamard signs, the training
hook end to end (bit-exact training, records in range, resume inside a window), the config checks."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli_support import TINY, train_records
from fp4.transforms import hadamard_compute, random_signs
from fp4_experiments.diagnostics.consistency import Window, hadamard_signs, untransform, weight_error
from fp4_experiments.diagnostics.metrics import ErrorConsistency


def _window(errors, key=("wgrad", "layer", 0)):
    w = Window(first=10, k=len(errors))
    for t, e in enumerate(errors):
        w.tracker.add(key, e)
        done = w.end_step(10 + t)
    assert done
    (rec,) = w.records()
    return rec


# ---------------------------------------------------------------- the arithmetic, by hand

def test_identical_errors_give_correlation_one_and_coherence_one():
    torch.manual_seed(0)
    e = torch.randn(32, 48)
    rec = _window([e] * 4)
    assert rec["step_corr"] == pytest.approx(1.0, abs=1e-6)
    assert rec["coherence"] == pytest.approx(1.0, abs=1e-6)
    assert (rec["kind"], rec["step"], rec["first_step"], rec["last_step"], rec["k"]) == ("consistency", 13, 10, 13, 4)
    assert rec["error"] == "out" and rec["gemm"] == "wgrad"


def test_hand_computed_opposite_and_orthogonal_errors():
    e = torch.tensor([1.0, -1.0, 2.0, 0.0])
    # e then -e: the sum is zero (coherence 0), and the two are perfectly anti-correlated.
    rec = _window([e, -e])
    assert rec["coherence"] == pytest.approx(0.0, abs=1e-7) and rec["step_corr"] == pytest.approx(-1.0)
    # [1, 0] then [0, 1]: ||sum|| = sqrt(2), sum of norms 2 -> 1/sqrt(2); centred, [.5, -.5] vs [-.5, .5]: -1.
    rec = _window([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
    assert rec["coherence"] == pytest.approx(1 / math.sqrt(2)) and rec["step_corr"] == pytest.approx(-1.0)


def test_independent_errors_give_one_over_sqrt_k():
    torch.manual_seed(1)
    k, n = 4, 64 * 64
    rec = _window([torch.randn(n) for _ in range(k)])
    # ||e_t||^2 and ||sum e_t||^2 / k are chi-square with n degrees of freedom: each norm has relative
    # sd 1/sqrt(2n) = 1.1%, the ratio ~1.6%; 5% is three sd.
    assert rec["coherence"] == pytest.approx(1 / math.sqrt(k), rel=0.05)
    # Each corr ~ N(0, 1/sqrt(n)) = 0.016; their mean over 3 pairs ~0.009: 0.05 is over five sd.
    assert abs(rec["step_corr"]) < 0.05


def test_window_holds_a_running_sum_and_the_previous_error_in_float32():
    key, e = ("fprop", "layer", 0), torch.randn(16, 32, dtype=torch.float64)
    w = Window(first=1, k=3)
    w.tracker.add(key, e)
    assert w.tracker.held_bytes() == 16 * 32 * 4          # the open step's accumulator
    w.end_step(1)
    assert w.tracker.held_bytes() == 2 * 16 * 32 * 4      # running sum + previous error
    w.tracker.add(key, e)
    assert w.tracker.held_bytes() == 3 * 16 * 32 * 4
    assert not w.end_step(2) and w.next_step == 3


# ---------------------------------------------------------------- the weight operand in W's coordinates

@pytest.mark.parametrize("axis", [-1, 0])
def test_signs_are_recovered_and_the_transform_inverted(axis):
    torch.manual_seed(2)
    w = torch.randn(40, 24)                               # neither length a multiple of 16
    pad = [0, (-24) % 16, 0, 0] if axis == -1 else [0, 0, 0, (-40) % 16]
    w_pad = F.pad(w, pad)
    signs = random_signs(16, torch.Generator().manual_seed(5))
    transformed = hadamard_compute(w_pad, 16, axis, signs)
    assert torch.equal(hadamard_signs(w, transformed, 16, axis), signs)
    e = torch.randn_like(w_pad)
    assert torch.allclose(untransform(hadamard_compute(e, 16, axis, signs), 16, axis, signs), e, atol=1e-5)


def _observations(recipe, shape=(64, 48)):
    from fp4.linear import QuantLinear, QuantState
    torch.manual_seed(0)
    state = QuantState(seed=3)
    layer = QuantLinear(shape[1], shape[0], bias=False, recipe=recipe, state=state, name="lin")
    seen = []
    with state.probe_gemms(seen.append):
        layer(torch.randn(40, shape[1], requires_grad=True)).backward(torch.randn(40, shape[0]))
    return layer.weight.detach(), {o.gemm: o for o in seen}


def test_weight_error_is_the_effective_weight_error_under_random_signs():
    from fp4.recipe import Recipe
    w, obs = _observations(Recipe("wgrad", "rht", stabilizer_gemms=("fprop", "dgrad", "wgrad"), hadamard_signs="call"))
    for gemm in ("fprop", "dgrad"):
        o, axis = obs[gemm], obs[gemm].axes[1]
        e = weight_error(o)
        signs = hadamard_signs(w, o.quantized_from[1], 16, axis)
        # The recovered signs are the GEMM's: they reproduce what the quantizer saw, bit for bit.
        assert torch.equal(hadamard_compute(w, 16, axis, signs), o.quantized_from[1]), gemm
        # W + e is the effective weight: rotated by the GEMM's R it is what the GEMM multiplied, Q(W R).
        assert torch.allclose(hadamard_compute(w + e, 16, axis, signs), o.quantized[1], atol=1e-5), gemm
        # ... and not the quantizer-coordinate error (a random R is not the identity).
        assert not torch.allclose(e, o.quantized[1] - o.quantized_from[1], atol=1e-3), gemm
        assert 0.01 < float(e.norm() / w.norm()) < 0.5
    # Fprop and Dgrad block W along different axes under different signs: two different errors.
    assert not torch.allclose(weight_error(obs["fprop"]), weight_error(obs["dgrad"]), atol=1e-3)


def test_weight_error_keeps_w_shape_through_padding():
    from fp4.recipe import Recipe
    w, obs = _observations(Recipe("wgrad", "h16_all"), shape=(40, 24))
    for gemm in ("fprop", "dgrad"):
        assert weight_error(obs[gemm]).shape == w.shape, gemm


# ---------------------------------------------------------------- training, end to end

# Windows of 3 steps at steps 4 and 8 of the 10-step tiny run, checkpoints at 3, 6, 9; random
# Hadamard signs redrawn every step on all three GEMMs (the weight operands go through the inverse).
RHT_ALL = ["+ladder=wgrad", "+stabilizer=rht", "stabilizer.gemms=[fprop,dgrad,wgrad]"]
WINDOWS = ["diagnostics.every_steps=4", "diagnostics.window=3"]


def _records(run_dir: Path, kind=None):
    recs = [json.loads(l) for l in (run_dir / "diagnostics.jsonl").read_text().splitlines()]
    return [r for r in recs if kind is None or r["kind"] == kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """{name: run directory} of three fixed-budget tiny runs: fp8, wgrad/rht-all, and the same with
    consistency windows."""
    from fp4_ablate.hydra_app import compose
    from fp4_experiments.runner import run_experiment
    from fp4_experiments.rundir import run_dir_for
    root = tmp_path_factory.mktemp("consistency")
    out = {}
    for name, extra in (("fp8", []), ("plain", RHT_ALL), ("probed", RHT_ALL + WINDOWS)):
        cfg = compose([*TINY, f"cache_dir={cache_dir}", f"results_dir={root / name}", *extra])
        run_experiment(cfg)
        out[name] = run_dir_for(cfg)
    return out


def test_windows_train_the_same_bits(runs):
    assert train_records(runs["plain"]) == train_records(runs["probed"])
    assert not (runs["plain"] / "diagnostics.jsonl").exists()


def test_windows_write_consistency_records_in_range(runs):
    cons = _records(runs["probed"], "consistency")
    assert sorted({(r["first_step"], r["last_step"], r["step"]) for r in cons}) == [(4, 6, 6), (8, 10, 10)]
    # 7 quantized linears x 3 GEMMs per window.
    assert len(cons) == 2 * 7 * 3
    for r in cons:
        assert r["k"] == 3 and r["error"] == {"wgrad": "out", "fprop": "w", "dgrad": "w"}[r["gemm"]]
        assert -1 <= r["step_corr"] <= 1 and 0 < r["coherence"] <= 1 + 1e-6
    assert sorted({r["step"] for r in _records(runs["probed"], "gemm")}) == [4, 8]


class _Kill(Exception):
    pass


def test_resume_inside_a_window_drops_it(runs, tmp_path, cache_dir, monkeypatch):
    """Killed at the last evaluation (after step 10, whose window 8..10 has just been written; last
    checkpoint at step 9): the resumed run cuts the record back and, resuming at step 10 inside that
    window, writes none for it. Everything else is the uninterrupted run's, value for value."""
    from fp4_ablate.hydra_app import compose
    from fp4_experiments.runner import run_experiment
    from fp4_experiments.rundir import run_dir_for
    from fp4_experiments.training import loop as loop_mod
    cfg = compose([*TINY, f"cache_dir={cache_dir}", f"results_dir={tmp_path}", *RHT_ALL, *WINDOWS])
    real_evaluate, calls = loop_mod.evaluate, {"n": 0}

    def evaluate_then_die(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the evaluation after step 10
            raise _Kill()
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "evaluate", evaluate_then_die)
    with pytest.raises(_Kill):
        run_experiment(cfg)
    run_dir = run_dir_for(cfg)
    assert {r["first_step"] for r in _records(run_dir, "consistency")} == {4, 8}  # 8..10 written
    monkeypatch.setattr(loop_mod, "evaluate", real_evaluate)
    run_experiment(cfg)
    assert "resumed from" in (run_dir / "run.log").read_text()
    full = _records(runs["probed"])
    assert _records(run_dir) == [r for r in full if not (r["kind"] == "consistency" and r["first_step"] == 8)]


# ---------------------------------------------------------------- config checks

@pytest.mark.parametrize("overrides, fragment", [
    (["diagnostics.every_steps=3"], "diagnostics.window=4 must be 0 (no consistency windows) or in [2, "
                                    "diagnostics.every_steps=3]"),
    (["diagnostics.every_steps=50", "diagnostics.window=1"], "diagnostics.window=1 must be 0"),
    (["diagnostics.window=-1"], "diagnostics.window=-1 must be 0"),
    (["diagnostics.every_steps=-5"], "diagnostics.every_steps=-5 must be >= 1"),
])
def test_bad_windows_are_refused(compose, overrides, fragment):
    from fp4_experiments.validate import ConfigError, validate_config
    with pytest.raises(ConfigError, match="invalid configuration") as err:
        validate_config(compose(["hardware=cpu", *overrides]), environment=False)
    assert fragment in str(err.value)


def test_good_windows_pass(compose):
    from fp4_experiments.validate import validate_config
    for overrides in (["+diagnostics=on"], ["diagnostics.every_steps=3", "diagnostics.window=3"],
                      ["diagnostics.every_steps=3", "diagnostics.window=0"], []):
        validate_config(compose(["hardware=cpu", *overrides]), environment=False)


# ---------------------------------------------------------------- the report

def _consistency_rows(markdown: str):
    section = markdown.split("### Error consistency across steps", 1)[1]
    return [l.split(" | ") for l in section.splitlines() if l.startswith("| wgrad/")]


def test_report_of_fixed_budget_runs_has_the_consistency_table(runs, tmp_path):
    """No run has a target: the report is the estimator's alone, and the diagnostics section too."""
    from fp4_experiments.report import make_report
    results = tmp_path / "runs"
    for name in ("fp8", "probed"):
        shutil.copytree(runs[name], results / runs[name].name)
    report = make_report(results, tmp_path / "report", profiles=())
    assert "## GEMM quantization diagnostics" in report.markdown
    rows = _consistency_rows(report.markdown)
    assert [(r[0], r[1], r[2], r[6], r[7], r[8]) for r in rows] == [
        ("| wgrad/rht/mxfp4", "fprop", "w", "3", "2", "1 |"), ("| wgrad/rht/mxfp4", "dgrad", "w", "3", "2", "1 |"),
        ("| wgrad/rht/mxfp4", "wgrad", "out", "3", "2", "1 |")]
    cons = _records(runs["probed"], "consistency")
    wgrad = [r["coherence"] for r in cons if r["gemm"] == "wgrad"]
    assert float(rows[2][4]) == pytest.approx(sum(wgrad) / len(wgrad), abs=5e-5)  # one run: mean of its records
    for f in ("diagnostics_consistency.csv", "diagnostics_consistency.png", "diagnostics.csv"):
        assert (tmp_path / "report" / f).stat().st_size > 0, f


def test_report_with_targets_includes_fixed_budget_runs(runs, tiny, compose, tmp_path):
    """Runs with a target make the tokens-to-target report; a fixed-budget run beside them still has its
    diagnostics summarized (under its experiment group's label)."""
    from fp4_experiments.report import make_report
    from fp4_experiments.runner import run_experiment
    results = tmp_path / "runs"
    run_experiment(compose(tiny("train.target_ppl=1e9", results=results)))
    shutil.copytree(runs["probed"], results / runs["probed"].name)
    report = make_report(results, tmp_path / "report", profiles=())
    assert not report.runs.empty  # the targeted report, not the estimator-only one
    rows = _consistency_rows(report.markdown)
    assert len(rows) == 3 and all(r[0].startswith("| wgrad/rht/mxfp4 (") for r in rows)
