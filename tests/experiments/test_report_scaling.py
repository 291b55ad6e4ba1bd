"""The scaling section: parameter counts, the per-group table, trends, extrapolation, files.

Expected numbers are computed by hand (or by numpy's own polyfit) from the synthetic inputs,
never by the code under test.
"""
import json
import sys
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import t as student_t

from fp4_experiments.report import scaling as S
from fp4_experiments.report.estimator import Estimate, RunCost, estimate
from fp4_experiments.report.runs import ReportError, load_runs

REPO = Path(__file__).resolve().parents[2]
LLAMA20M_RUNS = REPO / "results" / "mxfp4-ladder-llama20m" / "runs"
SIZES = {"llama-1m": 983_040, "llama-3m": 3_145_728, "llama-6m": 5_806_080, "llama-20m": 12_582_912}


# ----------------------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("name,expected", sorted(SIZES.items()))
def test_quantized_params_of_the_model_configs(name, expected):
    assert S.model_params(name) == expected


def test_quantized_params_by_hand_and_with_the_head():
    # llama-20m: h 384, 6 heads of 64, 2 KV heads -> kv_dim 128, MLP 1024, 8 layers.
    per_layer = 2 * 384 * 384 + 2 * 384 * 128 + 3 * 384 * 1024
    assert per_layer * 8 == 12_582_912
    cfg = dict(hidden_size=384, intermediate_size=1024, num_layers=8, num_heads=6, num_kv_heads=2,
               quantize_embedding=True, quantize_head=False)
    assert S.quantized_params(cfg) == 12_582_912  # the embedding is a lookup: never counted
    assert S.quantized_params(dict(cfg, quantize_head=True), vocab_size=8192) == 12_582_912 + 8192 * 384
    with pytest.raises(ValueError, match="vocabulary"):
        S.quantized_params(dict(cfg, quantize_head=True))


def test_run_params_prefers_the_summary_and_falls_back_to_the_config(tmp_path):
    g = {"model.hidden_size": 128, "model.intermediate_size": 384, "model.num_layers": 5, "model.num_heads": 4,
         "model.num_kv_heads": 2, "model.quantize_head": False}
    run = {"run": "r", "run_dir": str(tmp_path), "group_dict": g}
    assert S.run_params(run) == 983_040  # no summary.json: the formula
    (tmp_path / "summary.json").write_text(json.dumps({"linear_param_count": 123}))
    assert S.run_params(run) == 123
    with pytest.raises(ReportError, match="cannot count"):
        S.run_params({"run": "r", "run_dir": str(tmp_path / "none"), "group_dict": {}})


# ----------------------------------------------------------------------------- synthetic tables

def point(cfg, params, cost, se, budget_per_param=12.0, n=5, egroup=None, data="d"):
    """One scaling-table row; the interval is mean +- t(0.975, n-1) se (as the estimator makes it)."""
    half = student_t.ppf(0.975, n - 1) * se if n >= 2 and np.isfinite(se) else math.nan
    return {"configuration": cfg, "rank": (0, cfg), "ladder": cfg, "stabilizer": "none", "format": "mxfp4",
            "egroup_id": egroup or f"g{params}", "egroup": "", "model": f"m{params}", "data": data,
            "runs_kind": "fixed budget", "quantized_params": params, "tokens_per_param": budget_per_param,
            "budget_per_param": budget_per_param, "eq_cost_mean": cost, "eq_cost_lo": cost - half,
            "eq_cost_hi": cost + half, "eq_se": S._se(cost - half, cost + half, n), "n_seeds": n,
            "seeds": list(range(n)), "note": ""}


def table(points):
    return pd.DataFrame(points, columns=list(S.COLUMNS))


def test_se_is_backed_out_of_the_interval():
    p = point("wgrad", 1_000_000, 0.05, 0.013, n=4)
    assert p["eq_se"] == pytest.approx(0.013, rel=1e-12)
    assert math.isnan(S._se(0.0, 0.1, 1))


def test_trend_recovers_an_exact_slope():
    sizes = [983_040, 3_145_728, 5_806_080]
    pts = [point("wgrad", p, 0.08 - 0.03 * math.log10(p), se) for p, se in zip(sizes, [0.01, 0.02, 0.005])]
    f = S.trend(table(pts), "params")
    assert len(f) == 1
    r = f.iloc[0]
    assert r["reason"] == "" and r["weighted"] and (r["n_points"], r["n_x"], r["dof"]) == (3, 3, 1)
    assert r["slope"] == pytest.approx(-0.03, abs=1e-12)
    assert r["intercept"] == pytest.approx(0.08, abs=1e-10)
    assert r["slope_lo"] == pytest.approx(-0.03, abs=1e-9) and r["slope_hi"] == pytest.approx(-0.03, abs=1e-9)
    md = S.to_markdown(table(pts), [f])
    assert "| -3.00 [-3.00, -3.00] " in md and "no fit" not in md and "| group " not in md


def test_weighted_slope_and_interval_match_numpy_polyfit():
    sizes = np.array([1e6, 3e6, 6e6, 2e7, 5e7])
    cost = np.array([0.02, 0.05, 0.045, 0.08, 0.07])
    se = np.array([0.01, 0.02, 0.015, 0.01, 0.03])
    f = S.trend(table([point("fprop", p, c, s) for p, c, s in zip(sizes, cost, se)]), "params").iloc[0]
    # numpy: w multiplies the residuals (1/se), cov=True scales by chi2 / (n - 2).
    coef, cov = np.polyfit(np.log10(sizes), cost, 1, w=1 / se, cov=True)
    half = student_t.ppf(0.975, 3) * math.sqrt(cov[0, 0])
    assert f["slope"] == pytest.approx(coef[0], rel=1e-10)
    assert f["intercept"] == pytest.approx(coef[1], rel=1e-10)
    assert (f["slope_lo"], f["slope_hi"]) == (pytest.approx(coef[0] - half, rel=1e-9),
                                             pytest.approx(coef[0] + half, rel=1e-9))


def test_no_fit_with_two_sizes_and_no_extrapolation_from_it():
    pts = [point("wgrad", 983_040, 0.05, 0.01), point("wgrad", 3_145_728, 0.04, 0.01),
           point("wgrad", 3_145_728, 0.045, 0.01, egroup="other")]  # 3 points, 2 distinct sizes
    f = S.trend(table(pts), "params")
    assert len(f) == 1 and f.iloc[0]["reason"] == "2 distinct x, needs 3"
    assert math.isnan(f.iloc[0]["slope"])
    assert S.extrapolate(f, 6.98e9).empty
    md = S.to_markdown(table(pts), [f])
    assert "no fit: 2 distinct x, needs 3" in md
    assert "| group " in md and "| other " in md  # two groups of one model and budget: told apart by hash


def test_points_of_another_budget_are_a_separate_slice():
    pts = [point("wgrad", p, 0.01 * i, 0.01, budget_per_param=b)
           for i, (p, b) in enumerate([(983_040, 12.2), (3_145_728, 11.9), (5_806_080, 12.06)])]
    pts.append(point("wgrad", 12_582_912, 0.5, 0.01, budget_per_param=1.67))
    f = S.trend(table(pts), "params")
    assert list(f["n_points"]) == [1, 3]  # slices sorted by the held budget: 1.67, then ~12
    assert f.iloc[0]["reason"] == "1 distinct x, needs 3" and f.iloc[0]["held"] == "budget/param 1.67"
    assert f.iloc[1]["held"] == "budget/param 11.9-12.2" and f.iloc[1]["slope"] == pytest.approx(
        np.polyfit(np.log10([983_040, 3_145_728, 5_806_080]), [0.0, 0.01, 0.02], 1)[0], rel=1e-10)
    # Against tokens per parameter the parameter count is held: every size is its own one-point slice.
    g = S.trend(table(pts), "tokens_per_param")
    assert len(g) == 4 and (g["reason"] == "1 distinct x, needs 3").all()


def test_unweighted_when_a_point_has_no_interval_and_the_prediction_interval():
    x = np.array([1e6, 1e7, 1e8, 1e9])
    y = np.array([0.01, 0.04, 0.05, 0.09])
    pts = [point("dgrad", p, c, 0.01) for p, c in zip(x, y)]
    pts[1] = point("dgrad", x[1], y[1], math.nan, n=1)  # one seed: no interval
    f = S.trend(table(pts), "params")
    r = f.iloc[0]
    assert not r["weighted"] and r["note"].startswith("unweighted: 1 of 4 points")
    # Ordinary least squares by hand on X = log10 x = 6, 7, 8, 9.
    X = np.log10(x)
    b = ((X - X.mean()) * (y - y.mean())).sum() / ((X - X.mean()) ** 2).sum()
    a = y.mean() - b * X.mean()
    assert r["slope"] == pytest.approx(b, rel=1e-12)
    s2 = ((y - a - b * X) ** 2).sum() / 2
    x0 = math.log10(6.98e9)
    half = student_t.ppf(0.975, 2) * math.sqrt(s2 * (1 + 1 / 4 + (x0 - X.mean()) ** 2 / ((X - X.mean()) ** 2).sum()))
    p = S.extrapolate(f, 6.98e9, "llama3.1-8b").iloc[0]
    assert p["kind"] == S.EXTRAPOLATION and "EXTRAPOLATION" in p["kind"]
    assert p["cost"] == pytest.approx(a + b * x0, rel=1e-12)
    assert (p["pred_lo"], p["pred_hi"]) == (pytest.approx(a + b * x0 - half, rel=1e-10),
                                           pytest.approx(a + b * x0 + half, rel=1e-10))
    assert S.extrapolate(f, 3e7).iloc[0]["kind"] == "interpolation"
    md = S.to_markdown(table(pts), [f], S.extrapolate(f, 6.98e9, "llama3.1-8b"))
    section = md[md.index("EXTRAPOLATION (not a measurement)"):]
    assert "not a result" in section and "llama3.1-8b" in section
    assert "llama3.1-8b" not in md[:md.index("EXTRAPOLATION (not a measurement)")]


def test_scaling_table_from_an_estimate(tmp_path):
    model = {"model.hidden_size": 128, "model.intermediate_size": 384, "model.num_layers": 5, "model.num_heads": 4,
             "model.num_kv_heads": 2}

    def est_row(eg, ladder, target, n, baseline=False, mean=0.05):
        dirs = [str(tmp_path / f"{eg}-{ladder}-{target}-s{s}") for s in range(n)]
        return {"egroup_id": eg, "egroup": "", "model": "llama-1m", "data": "d", "ladder": ladder,
                "stabilizer": "none", "format": "mxfp4", "target_ppl": target, "label": ladder,
                "rank": (0 if ladder == "fp8" else 1,), "eq_cost_mean": mean, "eq_cost_lo": mean - 0.01,
                "eq_cost_hi": mean + 0.01, "eq_n": n, "per_seed": {s: mean for s in range(n)},
                "is_baseline": baseline, "run_dirs": dirs}

    rows = [est_row("a", "fp8", None, 3, baseline=True, mean=0.0), est_row("a", "wgrad", 200.0, 3),
            est_row("a", "wgrad", None, 2), est_row("b", "wgrad", None, 3)]  # group b: no FP8 curve
    runs = pd.DataFrame([{"run": Path(d).name, "run_dir": d, "group_dict": model, "tokens_seen": 10_000_000 + i,
                          "max_tokens": 11_796_480} for i, d in enumerate(d for r in rows for d in r["run_dirs"])])
    per_run = {d: RunCost(*([np.array([])] * 4), 0.05, 1, 0, 0) for r in rows for d in r["run_dirs"]}
    t = S.scaling_table(Estimate(pd.DataFrame(rows), per_run, {}, (0.5, 1.0), []), runs)
    assert len(t) == 1  # fp8 is the reference; group b has no baseline
    r = t.iloc[0]
    assert (r["configuration"], r["runs_kind"], r["n_seeds"]) == ("wgrad", "target ppl 200", 3)
    assert r["note"] == "fixed budget row (n=2) not used"
    assert r["quantized_params"] == 983_040 and r["budget_per_param"] == pytest.approx(12.0)
    assert r["tokens_per_param"] == pytest.approx((10_000_000 + 4) / 983_040)  # runs 3, 4, 5: mean 10,000,004
    assert t.attrs["skipped"] == ["llama-1m: no FP8 run with a usable curve, so no cost"]
    assert not S.has_points(t)
    with pytest.raises(ReportError, match="not in `runs`"):
        S.scaling_table(Estimate(pd.DataFrame(rows), per_run, {}, (0.5, 1.0), []), runs.iloc[:2])


def test_files_and_csv(tmp_path):
    sizes = [983_040, 3_145_728, 5_806_080]
    pts = [point(c, p, 0.01 * i + (c == "fprop") * 0.05, 0.01) for c in ("wgrad", "fprop") for i, p in enumerate(sizes)]
    t = table(pts)
    fits = [S.trend(t, "params"), S.trend(t, "tokens_per_param")]
    files = S.write_files(tmp_path, t, fits, S.extrapolate(fits[0], 6.98e9, "llama3.1-8b"))
    assert sorted(files) == ["scaling.csv", "scaling_extrapolation.csv", "scaling_params.png",
                             "scaling_tokens_per_param.png", "scaling_trends.csv"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for n, p in files.items() if n.endswith(".png"))
    back = pd.read_csv(files["scaling.csv"])
    assert list(back["quantized_params"]) == sizes * 2 and back["seeds"].iloc[0] == "0;1;2;3;4"
    trends = pd.read_csv(files["scaling_trends.csv"])
    assert not any(c.startswith("_") for c in trends.columns) and len(trends) == 2 + 6
    assert (pd.read_csv(files["scaling_extrapolation.csv"])["kind"] == S.EXTRAPOLATION).all()
    assert S.has_points(t)


# ----------------------------------------------------------------------------- real run directories

@pytest.mark.skipif(not LLAMA20M_RUNS.is_dir(), reason="committed llama-20m runs not present")
def test_scaling_table_on_the_committed_llama20m_runs(tmp_path):
    runs, _ = load_runs(LLAMA20M_RUNS, include_completed=True)
    est = estimate(runs)
    t = S.scaling_table(est, runs)
    assert set(t["configuration"]) == {"bf16", "fprop (mxfp4)", "dgrad (mxfp4)", "wgrad (mxfp4)",
                                       "wgrad+sr (mxfp4)", "wgrad+rht (mxfp4)", "wgrad+h16 (mxfp4)"}
    assert (t["quantized_params"] == 12_582_912).all() and (t["n_seeds"] == 5).all()
    assert np.allclose(t["budget_per_param"], 20_971_520 / 12_582_912)
    wgrad = runs[(runs["ladder"] == "wgrad") & (runs["stabilizer"] == "none")]
    row = t[t["configuration"] == "wgrad (mxfp4)"].iloc[0]
    assert row["tokens_per_param"] == pytest.approx(wgrad["tokens_seen"].mean() / 12_582_912)
    est_row = est.table[(est.table["label"] == "wgrad (mxfp4)")].iloc[0]
    assert row["eq_cost_mean"] == est_row["eq_cost_mean"]
    fits = S.trend(t, "params")
    assert len(fits) == 7 and (fits["reason"] == "1 distinct x, needs 3").all()
    assert "Against quantized-linear parameters: 7 configuration/held-value pair(s) with a single point" in \
        S.to_markdown(t, [fits])
    assert S.extrapolate(fits, 6.98e9).empty and not S.has_points(t)
    files = S.write_files(tmp_path, t, [fits])
    assert {"scaling.csv", "scaling_params.png"} <= set(files)


def test_an_empty_estimate_gives_an_empty_section_and_no_files(tmp_path):
    t = S.scaling_table(Estimate(pd.DataFrame(), {}, {}, (0.5, 1.0), []), pd.DataFrame())
    fits = [S.trend(t, "params"), S.trend(t, "tokens_per_param")]
    pred = S.extrapolate(fits[0], S.model_params(S.PAPER_MODEL), S.PAPER_MODEL)
    assert t.empty and all(f.empty for f in fits) and pred.empty and not S.has_points(t)
    assert "No configuration has a cost" in S.to_markdown(t, fits, pred)
    assert S.write_files(tmp_path, t, fits, pred) == {}


def test_make_report_writes_the_scaling_section_across_three_model_sizes(tmp_path):
    """Three experiment groups (llama-1m / 3m / 6m, 12 tokens per quantized parameter each), fixed
    budget, curves loss = 10 - log(t / k) so each run's equivalent-token cost is k - 1 exactly; k of
    wgrad falls by 0.05 per tenfold parameters: make_report finds the three points and the slope."""
    import yaml
    from fp4_experiments.report import make_report
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_report import write_run  # tests/experiments has no __init__.py
    root = tmp_path / "runs"
    params = {"llama-1m": 983_040, "llama-3m": 3_145_728, "llama-6m": 5_806_080}
    for model, p in params.items():
        node = yaml.safe_load((REPO / "configs" / "model" / f"{model}.yaml").read_text())
        config = "model:\n" + "".join(f"  {k}: {v}\n" for k, v in node.items()) + "format:\n  name: mxfp4\n"
        budget = 12 * p
        k_wgrad = 1.10 - 0.05 * math.log10(p / 1e6)
        for ladder, ks in (("fp8", (1.0, 1.0)), ("wgrad", (k_wgrad - 0.01, k_wgrad + 0.01))):
            for seed, k in zip((1, 2), ks):
                d = write_run(root, ladder, "none", seed, tokens=budget, model=model, key=model[-2:] + "00aa",
                              config=config)
                evals = budget * np.arange(1, 21) / 20
                (d / "metrics.jsonl").write_text("".join(
                    json.dumps({"kind": "eval", "step": i + 1, "tokens": float(t), "epoch": 0,
                                 "val_loss": 10 - math.log(t / k), "val_ppl": math.exp(10 - math.log(t / k))}) + "\n"
                    for i, t in enumerate(evals)))
                s = json.loads((d / "summary.json").read_text())
                s.update(status="completed", target_ppl=None, tokens_to_target=None, tokens_seen=budget,
                         max_tokens=budget, best_ppl=math.exp(10 - math.log(budget / k)), best_ppl_tokens=budget,
                         linear_param_count=p)
                (d / "summary.json").write_text(json.dumps(s))
    rep = make_report(root, out_dir=tmp_path / "rep", profiles=())
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Scaling: cost versus model size" in text and "EXTRAPOLATION" in text
    table = pd.read_csv(tmp_path / "rep" / "scaling.csv")
    wgrad = table[table.ladder == "wgrad"].sort_values("quantized_params")
    assert list(wgrad.quantized_params) == sorted(params.values())
    assert np.allclose(wgrad.tokens_per_param, 12.0)
    assert np.allclose(wgrad.eq_cost_mean, [0.10 - 0.05 * np.log10(p / 1e6) for p in sorted(params.values())])
    fits = pd.read_csv(tmp_path / "rep" / "scaling_trends.csv")
    fit = fits[(fits.configuration == "wgrad (mxfp4)") & (fits.x == "params")].iloc[0]
    assert fit.n_x == 3 and fit.slope == pytest.approx(-0.05, abs=1e-9)
    assert rep.files["scaling_params.png"].exists()
