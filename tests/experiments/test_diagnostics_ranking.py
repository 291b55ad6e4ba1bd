"""The rank-agreement check between `fp4-ablate diagnose` and full runs (experiments/diagnostics/ranking.py)."""
import math
from pathlib import Path

import pytest
from scipy import stats

from fp4_experiments.diagnostics import ranking

REPO = Path(__file__).resolve().parents[2]


def _diag(drift):
    return {"configs": [{"config": c, "weight_drift": v} for c, v in drift.items()],
            "gemms": [{"config": c, "gemm": "wgrad", "out.rel_err": v} for c, v in drift.items()]}


def test_names_and_a_perfect_ranking(tmp_path):
    assert ranking.config_name("wgrad", "sr") == "wgrad_sr"
    assert ranking.config_name("fp8", "none") == "fp8"
    table = tmp_path / "table.csv"
    table.write_text("ladder,stabilizer,cost_mean,eq_cost_mean\nfp8,none,,-0.01\n"
                     "fprop,none,0.1,0.09\ndgrad,none,0.2,0.05\nwgrad,none,0.3,0.2\nwgrad,sr,0.4,0.3\n")
    costs = ranking.full_run_costs(table)
    assert costs["fp8"]["cost_mean"] == 0.0  # the baseline costs nothing by definition
    rows = ranking.rank_agreement(_diag({"fp8": 1, "fprop": 2, "dgrad": 3, "wgrad": 4, "wgrad_sr": 5}),
                                  costs, ["weight_drift"])
    by_cost = {r["cost"]: r for r in rows}
    assert by_cost["cost_mean"]["rho"] == pytest.approx(1.0)
    # Exact permutation p of a perfect ranking: the identity and its reverse out of 5! orderings.
    assert by_cost["cost_mean"]["p_perm"] == pytest.approx(2 / 120)
    assert by_cost["eq_cost_mean"]["rho"] == pytest.approx(stats.spearmanr([1, 2, 3, 4, 5],
                                                                           [-0.01, .09, .05, .2, .3]).statistic)


def test_fisher_interval():
    lo, hi = ranking.fisher_interval(0.5, 7)
    se = math.sqrt(1.06 / 4)
    assert lo == pytest.approx(math.tanh(math.atanh(0.5) - 1.959963985 * se))
    assert hi == pytest.approx(math.tanh(math.atanh(0.5) + 1.959963985 * se))
    assert lo < 0.5 < hi


def test_committed_diagnose_against_committed_ladder():
    import json
    diag = json.loads((REPO / "results/diagnose-llama20m/warm-diagnose.json").read_text())
    costs = ranking.full_run_costs(REPO / "results/mxfp4-ladder-llama20m/report/table.csv")
    rows = ranking.rank_agreement(diag, costs)
    drift = next(r for r in rows if r["metric"] == "weight_drift" and r["cost"] == "cost_mean")
    assert drift["n"] == 7 and -1 <= drift["lo"] <= drift["rho"] <= drift["hi"] <= 1


def test_a_table_of_several_groups_needs_a_model_and_formats_stay_apart(tmp_path):
    """A report over two models lists each configuration twice, and the wgrad rows of other formats
    share ladder and stabilizer with MXFP4's: neither may overwrite another row's cost."""
    assert ranking.config_name("wgrad", "none", "nvfp4") == "nvfp4_wgrad"
    assert ranking.config_name("wgrad", "h16", "mxfp4") == "wgrad_h16"
    table = tmp_path / "table.csv"
    table.write_text("model,group,ladder,stabilizer,format,cost_mean,eq_cost_mean\n"
                     "m1,a,fp8,none,mxfp4,,0\nm1,a,wgrad,none,mxfp4,0.5,0.4\n"
                     "m3,b,fp8,none,mxfp4,,0\nm3,b,wgrad,none,mxfp4,0.2,0.1\nm3,b,wgrad,none,ufp4,0.05,0.04\n")
    with pytest.raises(ValueError, match="2 experiment groups.*--model"):
        ranking.full_run_costs(table)
    with pytest.raises(ValueError, match="'m9'.*m1, m3"):
        ranking.full_run_costs(table, "m9")
    costs = ranking.full_run_costs(table, "m3")
    assert costs == {"fp8": {"cost_mean": 0.0, "eq_cost_mean": 0.0}, "wgrad": {"cost_mean": 0.2, "eq_cost_mean": 0.1},
                     "ufp4_wgrad": {"cost_mean": 0.05, "eq_cost_mean": 0.04}}
    with pytest.raises(SystemExit):  # the command line: a usage error, exit 2, before any output
        ranking.main([str(tmp_path / "d.json"), str(table)])
