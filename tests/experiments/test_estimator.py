"""The equivalent-token estimator, seeds-needed and baseline-outlier rules on synthetic curves.

Expected numbers are computed by hand from the synthetic inputs, never by the code under test.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fp4_experiments.report import make_report
from fp4_experiments.report.estimator import (isotonic_decreasing, monotone_fit, parse_window, run_cost)
from fp4_experiments.report.stats import baseline_outliers, robust_z, seeds_needed

from test_report import write_run  # noqa: E402  (tests/experiments has no __init__.py)


def power_law(t):
    return 3.0 + 40.0 * np.asarray(t, dtype=float) ** -0.25


def test_power_law_curve_scaled_by_k_costs_k_minus_1_at_the_knots():
    # Config's loss is L(t / k): at its evaluation k * t_i it has the baseline's loss at t_i.
    k = 1.3
    base_t = 1000.0 * np.arange(1, 21)
    fit = monotone_fit(base_t, power_law(base_t))
    cfg_t = k * base_t
    c = run_cost(list(zip(cfg_t, power_law(cfg_t / k))), fit, trained_tokens=cfg_t[-1], window=(0.0, 1.0))
    assert np.allclose(c.cost, k - 1, rtol=0, atol=1e-9)
    assert c.n_used == 20 and c.n_below == 0 and c.n_above == 0
    assert c.mean == pytest.approx(0.3, abs=1e-9)


def test_log_linear_curve_scaled_by_k_is_exact_everywhere_and_out_of_range_is_counted():
    # L(t) = 10 - log t is linear in log t, so the piecewise-linear fit is exact between knots too.
    k = 1.25
    base_t = np.array([100.0, 200, 400, 800, 1600])
    fit = monotone_fit(base_t, 10 - np.log(base_t))
    cfg_t = np.array([90.0, 150, 333, 700, 1111, 1900, 2100])  # k t inside [100, 1600] iff t in [125, 1280]
    c = run_cost(list(zip(cfg_t, 10 - np.log(cfg_t / k))), fit, trained_tokens=2100, window=(0.0, 1.0))
    inside = (cfg_t / k >= 100) & (cfg_t / k <= 1600)
    assert list(inside) == [False, True, True, True, True, True, False]
    assert np.allclose(c.cost[inside], 0.25, atol=1e-9)
    assert np.isnan(c.cost[~inside]).all()
    # 90/1.25 = 72 < 100 first FP8 eval: loss above the fit's max; 2100/1.25 = 1680 > 1600: below its min.
    assert (c.n_above, c.n_below, c.n_used) == (1, 1, 5)
    # The window [0.5, 1] x 2100 = [1050, 2100] keeps 1111 and 1900 (in range) and 2100 (below range).
    w = run_cost(list(zip(cfg_t, 10 - np.log(cfg_t / k))), fit, trained_tokens=2100, window=(0.5, 1.0))
    assert (w.n_used, w.n_below, w.n_above) == (2, 1, 0) and w.mean == pytest.approx(0.25, abs=1e-9)


def test_monotone_fit_never_increases_and_pools_violations():
    fitted, blocks = isotonic_decreasing([5.0, 4.0, 4.4, 3.0, 3.0, 2.0])
    # 4.0, 4.4 pool to 4.2; the tie 3.0, 3.0 pools to one block.
    assert np.allclose(fitted, [5.0, 4.2, 4.2, 3.0, 3.0, 2.0])
    assert blocks == [(0, 1), (1, 3), (3, 5), (5, 6)]
    rng = np.random.default_rng(0)
    t = 1e4 * np.arange(1, 60)
    y = power_law(t) + rng.normal(0, 0.05, len(t))
    assert (np.diff(y) > 0).any()  # the noisy curve rises somewhere
    fit = monotone_fit(t, y)
    assert (np.diff(fit.loss) < 0).all() and (np.diff(fit.log_tokens) > 0).all()
    dense = np.exp(np.linspace(fit.log_tokens[0], fit.log_tokens[-1], 2000))
    assert (np.diff(fit.loss_at(dense)) <= 1e-12).all()
    # Knots of pooled blocks at the block's mean log tokens: 200 and 300 pool to sqrt(200*300).
    f2 = monotone_fit([100, 200, 300, 400], [5.0, 4.0, 4.4, 3.0])
    assert np.exp(f2.log_tokens[1]) == pytest.approx(math.sqrt(200 * 300))
    assert f2.loss[1] == pytest.approx(4.2)
    assert np.isnan(f2.tokens_at([5.1, 2.9])).all() and np.isnan(f2.loss_at([50, 500])).all()


def test_seeds_needed_by_hand():
    # sd 0.03: t(0.975,10)=2.228 -> 2.228*0.03/sqrt(11)=0.02015 > 0.02; t(0.975,11)=2.201 -> 0.01906 <= 0.02.
    sd = float(np.std([-0.03, 0.0, 0.03], ddof=1))
    assert sd == pytest.approx(0.03)
    assert seeds_needed(sd) == 12
    # sd 0.01: n=3: 4.303*0.01/1.732 = 0.0248 > 0.02; n=4: 3.182*0.01/2 = 0.0159 -> 4.
    assert seeds_needed(0.01) == 4
    assert seeds_needed(0.0) == 2 and seeds_needed(float("nan")) is None


def test_outlier_flag_on_a_planted_outlier():
    tokens = {0: 100.0, 1: 102.0, 2: 98.0, 3: 101.0, 4: 130.0}
    # Seed 4 against the others 100, 102, 98, 101: median 100.5, |dev| 0.5 1.5 2.5 0.5 -> MAD 1.0,
    # z = (130 - 100.5) / 1.4826 = 19.9.
    assert baseline_outliers(tokens) == {4: pytest.approx(29.5 / 1.4826)}
    # Seed 0 against 102, 98, 101, 130: median 101.5, |dev| 0.5 3.5 0.5 28.5 -> MAD 2.0, z = -0.506.
    assert robust_z(tokens)[0] == pytest.approx(-1.5 / (2 * 1.4826))
    assert baseline_outliers({0: 100.0, 1: 102.0, 2: 98.0}) == {}  # too few seeds for a rule


def _curve_run(root, ladder, seed, k, status, tokens_seen, target=None, stabilizer="none", key="abcd1234"):
    """A run whose val loss is the power law at t / k, evaluated every 1000 tokens up to tokens_seen."""
    d = write_run(root, ladder, stabilizer, seed, tokens=tokens_seen, target=target or 30.0, key=key)
    ts = 1000.0 * np.arange(1, int(tokens_seen // 1000) + 1)
    lines = [json.dumps({"kind": "eval", "step": int(i + 1) * 10, "tokens": float(t), "epoch": 0,
                         "val_loss": float(power_law(t / k)), "val_ppl": float(np.exp(power_law(t / k)))})
             for i, t in enumerate(ts)]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    s = json.loads((d / "summary.json").read_text())
    s.update(status=status, steps=len(ts) * 10, tokens_seen=int(tokens_seen))
    if status == "completed":
        s.update(target_ppl=None, tokens_to_target=None)
    (d / "summary.json").write_text(json.dumps(s))
    return d


def test_fixed_budget_runs_alone_give_a_cost(tmp_path):
    # No target anywhere (status completed): no tokens-to-target table, but the estimator works.
    root = tmp_path / "runs"
    for seed, k in ((1, 1.2), (2, 1.1)):
        _curve_run(root, "fp8", seed, 1.0, "completed", 20_000)
        _curve_run(root, "wgrad", seed, k, "completed", 20_000)
    rep = make_report(root, out_dir=tmp_path / "rep", profiles=())
    row = rep.estimate.table.query("ladder == 'wgrad'").iloc[0]
    # Window [10000, 20000]: evaluations at 12k..20k (1000 apart) are k x a baseline knot for k = 1.2
    # (12k/1.2 = 10k ...), between knots otherwise; the per-seed means are close to k - 1.
    assert row["eq_n"] == 2 and sorted(row["per_seed"]) == [1, 2]
    assert row["per_seed"][1] == pytest.approx(0.2, abs=2e-3) and row["per_seed"][2] == pytest.approx(0.1, abs=2e-3)
    assert "Equivalent-token cost" in rep.markdown and (tmp_path / "rep" / "eq_cost.csv").exists()
    assert any(f.startswith("eqcost_") and f.endswith(".png") for f in rep.files)


def test_target_runs_use_the_fixed_budget_fp8_twin_and_the_table_carries_the_columns(tmp_path):
    root = tmp_path / "runs"
    target = float(np.exp(power_law(15_000)))  # FP8 (k=1) reaches it at 15k tokens, wgrad (k=1.2) at 18k
    for seed in (1, 2):
        _curve_run(root, "fp8", seed, 1.0, "completed", 30_000, key="ca1b0000")
        _curve_run(root, "fp8", seed, 1.0, "reached", 15_000, target=target)
        _curve_run(root, "wgrad", seed, 1.2, "reached", 18_000, target=target)
    for d in root.iterdir():  # tokens_to_target where the curves cross
        s = json.loads((d / "summary.json").read_text())
        if s["status"] == "reached":
            s["tokens_to_target"] = 15_000.0 if s["ladder"] == "fp8" else 18_000.0
            (d / "summary.json").write_text(json.dumps(s))
    rep = make_report(root, out_dir=tmp_path / "rep", profiles=())
    t = rep.table.set_index("label")
    # Every wgrad evaluation t is 1.2 x a baseline evaluation only for t in 12k, 18k; the window
    # [9k, 18k] averages 9k..18k; on a power law the linear-in-log fit is within 1e-3 of k - 1.
    assert t.loc["wgrad (mxfp4)", "eq_cost_mean"] == pytest.approx(0.2, abs=1e-3)
    assert t.loc["wgrad (mxfp4)", "cost_mean"] == pytest.approx(0.2)
    assert t.loc["fp8", "eq_cost_mean"] == pytest.approx(0.0, abs=1e-12)  # identical twin curve
    assert t.loc["wgrad (mxfp4)", "eq_n"] == 2
    # The target FP8 runs were measured against the fixed-budget twins, which reach 30k tokens.
    assert all(b.endswith("ca1b0000") for b in rep.estimate.baseline_of.values())
    header = (tmp_path / "rep" / "table.csv").read_text().splitlines()[0].split(",")
    assert {"eq_cost_mean", "eq_cost_lo", "eq_cost_hi", "eq_n"} <= set(header)
    assert "equivalent-token cost" in (tmp_path / "rep" / "table.md").read_text()
    assert "equivalent-token cost" in (tmp_path / "rep" / "table.tex").read_text()


def test_parse_window():
    assert parse_window("0.5,1.0") == (0.5, 1.0) and parse_window("1,1") == (1.0, 1.0)
    for bad in ("0.5", "0.8,0.2", "-0.1,1", "0,1.5"):
        with pytest.raises(ValueError):
            parse_window(bad)
