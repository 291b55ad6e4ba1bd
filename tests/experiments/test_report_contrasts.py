"""The longer ladder's report: format as a varied key (one table, one FP8 baseline for every format),
the contrasts table, and contrasts on both estimators, on synthetic fixed-budget run directories.

The curves are log-linear, loss = 10 - log(t / k): the configuration needs k times the FP8 tokens
for every loss, and the estimator's fit is exact on such curves (tests/experiments/test_estimator.py),
so its per-run cost is k - 1 and an equivalent-token contrast is k_a / k_b - 1, by hand.
"""
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fp4_experiments.report import make_report  # noqa: E402
from fp4_experiments.report.contrasts import CONTRASTS, EACH  # noqa: E402
from fp4_experiments.report.runs import load_runs  # noqa: E402

from test_report import write_run  # noqa: E402  (tests/experiments has no __init__.py)

EVALS = 1000.0 * np.arange(1, 21)  # every 1000 tokens up to the 20000-token budget
TARGET = round(math.exp(10.0) / 12_000, 6)  # FP8 (k = 1) crosses it at 12000 tokens
# (ladder, stabilizer, format): k of seed 1, k of seed 2 -- the longer ladder's twelve configurations.
KS = {
    ("bf16", "none", "mxfp4"): (0.98, 0.99), ("fp8", "none", "mxfp4"): (1.0, 1.0),
    ("fprop", "none", "mxfp4"): (1.10, 1.12), ("dgrad", "none", "mxfp4"): (1.12, 1.15),
    ("wgrad", "none", "mxfp4"): (1.15, 1.20), ("wgrad", "sr", "mxfp4"): (1.08, 1.14),
    ("wgrad", "rht", "mxfp4"): (1.10, 1.18), ("wgrad", "h16", "mxfp4"): (1.09, 1.16),
    ("wgrad", "h16_all", "mxfp4"): (1.05, 1.10), ("wgrad", "none", "nvfp4"): (1.06, 1.09),
    ("wgrad", "none", "ufp4"): (1.04, 1.06), ("wgrad", "none", "ufp4_e2m1"): (1.08, 1.11),
}
CONTRASTS_EXPECTED = [  # (contrast, kind, format), in the report's order
    ("fprop (mxfp4) vs fp8", "ladder step", "mxfp4"),
    ("dgrad (mxfp4) vs fprop (mxfp4)", "ladder step", "mxfp4"),
    ("wgrad (mxfp4) vs dgrad (mxfp4)", "ladder step", "mxfp4"),
    ("wgrad+sr (mxfp4) vs wgrad (mxfp4)", "stabilizer", "mxfp4"),
    ("wgrad+rht (mxfp4) vs wgrad (mxfp4)", "stabilizer", "mxfp4"),
    ("wgrad+h16 (mxfp4) vs wgrad (mxfp4)", "stabilizer", "mxfp4"),
    ("wgrad+h16_all (mxfp4) vs wgrad (mxfp4)", "stabilizer", "mxfp4"),
    ("wgrad+h16_all (mxfp4) vs wgrad+h16 (mxfp4)", "stabilizer scope", "mxfp4"),
    ("wgrad (nvfp4) vs wgrad (mxfp4)", "format", "nvfp4 vs mxfp4"),
    ("wgrad (ufp4) vs wgrad (ufp4_e2m1)", "format", "ufp4 vs ufp4_e2m1"),
]
SIDES = {  # contrast -> (a, b) keys of KS
    "fprop (mxfp4) vs fp8": (("fprop", "none", "mxfp4"), ("fp8", "none", "mxfp4")),
    "wgrad (nvfp4) vs wgrad (mxfp4)": (("wgrad", "none", "nvfp4"), ("wgrad", "none", "mxfp4")),
    "wgrad (ufp4) vs wgrad (ufp4_e2m1)": (("wgrad", "none", "ufp4"), ("wgrad", "none", "ufp4_e2m1")),
    "wgrad+h16_all (mxfp4) vs wgrad+h16 (mxfp4)": (("wgrad", "h16_all", "mxfp4"), ("wgrad", "h16", "mxfp4")),
}


def format_node(fmt: str, fp8_backward: str = "e5m2") -> str:
    return f"format:\n  name: {fmt}\n  scale_mode: null\n  fp8_forward: e4m3\n  fp8_backward: {fp8_backward}\n"


def curve_run(root, ladder, stabilizer, fmt, seed, k, status="completed", config=None, key="10ca1ade"):
    """A fixed-budget run (no target) whose loss is 10 - log(t / k) at every evaluation."""
    d = write_run(root, ladder, stabilizer, seed, tokens=20_000, fmt=fmt, key=key,
                  config=format_node(fmt) if config is None else config)
    lines = [json.dumps({"kind": "eval", "step": 10 * (i + 1), "tokens": float(t), "epoch": 0,
                         "val_loss": 10 - math.log(t / k), "val_ppl": math.exp(10 - math.log(t / k))})
             for i, t in enumerate(EVALS)]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    s = json.loads((d / "summary.json").read_text())
    s.update(status=status, target_ppl=None, tokens_to_target=None, steps=10 * len(EVALS), tokens_seen=20_000,
             max_tokens=20_000, best_ppl=math.exp(10 - math.log(20_000 / k)), best_ppl_tokens=20_000,
             diverged_at_tokens=20_000 if status == "diverged" else None)
    (d / "summary.json").write_text(json.dumps(s))
    return d


@pytest.fixture
def longer_ladder(tmp_path):
    root = tmp_path / "runs"
    for (ladder, stab, fmt), ks in KS.items():
        for seed, k in zip((1, 2), ks):
            curve_run(root, ladder, stab, fmt, seed, k)
    return root


def tokens_to(k: float) -> float:
    """The post-hoc crossing of TARGET by the curve of k, the training loop's rule written out."""
    ppl = [math.exp(10 - math.log(t / k)) for t in EVALS]
    i = next(i for i, p in enumerate(ppl) if p <= TARGET)
    t0, p0, t1, p1 = EVALS[i - 1], ppl[i - 1], EVALS[i], ppl[i]
    return t0 + (t1 - t0) * (math.log(p0) - math.log(TARGET)) / (math.log(p0) - math.log(p1))


def test_the_twelve_configurations_are_one_table_against_one_fp8(longer_ladder, tmp_path):
    rep = make_report(longer_ladder, out_dir=tmp_path / "rep", profiles=(), target_ppl=TARGET)
    t = rep.table
    assert list(t.label) == ["bf16", "fp8", "fprop (mxfp4)", "dgrad (mxfp4)", "wgrad (mxfp4)", "wgrad+sr (mxfp4)",
                             "wgrad+rht (mxfp4)", "wgrad+h16 (mxfp4)", "wgrad+h16_all (mxfp4)", "wgrad (nvfp4)",
                             "wgrad (ufp4)", "wgrad (ufp4_e2m1)"]
    assert t.group.eq("").all() and rep.runs.group_id.nunique() == 1  # one experiment, formats included
    fp8_dirs = sorted(rep.runs[rep.runs.ladder == "fp8"].run_dir)
    assert all(r == fp8_dirs for r in t.baseline_dirs)
    nv = t.set_index("label").loc["wgrad (nvfp4)"]
    assert nv.cost_per_seed == {1: pytest.approx(tokens_to(1.06) / tokens_to(1.0) - 1),
                                2: pytest.approx(tokens_to(1.09) / tokens_to(1.0) - 1)}
    assert nv.eq_cost_mean == pytest.approx((0.06 + 0.09) / 2, abs=1e-9) and nv.format == "nvfp4"
    with open(tmp_path / "rep" / "table.csv") as f:
        assert [r["format"] for r in csv.DictReader(f)][-3:] == ["nvfp4", "ufp4", "ufp4_e2m1"]


def test_contrasts_on_both_estimators(longer_ladder, tmp_path):
    rep = make_report(longer_ladder, out_dir=tmp_path / "rep", profiles=(), target_ppl=TARGET)
    for table in (rep.contrasts, rep.eq_contrasts):
        assert list(zip(table.contrast, table.kind, table.format)) == CONTRASTS_EXPECTED
        assert (table.n == 2).all() and table.missed.map(len).eq(0).all()
    tok, eq = rep.contrasts.set_index("contrast"), rep.eq_contrasts.set_index("contrast")
    for name, (a, b) in SIDES.items():
        for i, seed in enumerate((1, 2)):
            ka, kb = KS[a][i], KS[b][i]
            assert tok.loc[name].per_seed[seed] == pytest.approx(tokens_to(ka) / tokens_to(kb) - 1, rel=1e-9)
            # (1 + c_a) / (1 + c_b) - 1 with c = k - 1
            assert eq.loc[name].per_seed[seed] == pytest.approx(ka / kb - 1, abs=1e-9)
        d = [KS[a][i] / KS[b][i] - 1 for i in (0, 1)]
        half = 12.706205 * np.std(d, ddof=1) / math.sqrt(2)  # t(0.975, 1) * sd / sqrt(2)
        assert eq.loc[name]["mean"] == pytest.approx(np.mean(d), abs=1e-9)
        assert eq.loc[name]["hi"] - eq.loc[name]["mean"] == pytest.approx(half, rel=1e-6)
    assert eq.target_ppl.isna().all() and (tok.target_ppl == TARGET).all()
    md = rep.markdown
    assert "## Paired contrasts on the equivalent-token cost" in md
    assert "fixed budget (no target), nvfp4 vs mxfp4:" in md and f"target ppl={TARGET:g}, ufp4 vs ufp4_e2m1:" in md
    with open(tmp_path / "rep" / "eq_contrasts.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "data", "target_ppl", "format", "contrast", "kind", "n", "mean", "lo", "hi",
                             "seeds_for_2pct", "per_seed", "missed"]  # one estimator group: no egroup column
    assert {r["target_ppl"] for r in rows} == {""} and len(rows) == len(CONTRASTS_EXPECTED)


def test_a_fixed_budget_experiment_gets_contrasts_without_a_target(longer_ladder, tmp_path):
    rep = make_report(longer_ladder, out_dir=tmp_path / "rep", profiles=())
    assert "no tokens-to-target table" in rep.markdown  # the estimator's report only ...
    assert list(rep.eq_contrasts.contrast) == [c for c, _, _ in CONTRASTS_EXPECTED]  # ... with its contrasts
    assert "## Paired contrasts on the equivalent-token cost" in rep.markdown
    assert (tmp_path / "rep" / "eq_contrasts.csv").is_file() and "eq_contrasts.csv" in rep.files


def test_a_seed_without_a_cost_is_named(longer_ladder, tmp_path):
    d = next(longer_ladder.glob("wgrad-none-mxfp4-*-s2-*"))
    s = json.loads((d / "summary.json").read_text())
    (d / "summary.json").write_text(json.dumps(dict(s, status="diverged", diverged_at_tokens=20_000)))
    eq = make_report(longer_ladder, out_dir=tmp_path / "rep", profiles=()).eq_contrasts.set_index("contrast")
    row = eq.loc["wgrad+sr (mxfp4) vs wgrad (mxfp4)"]
    assert row.n == 1 and row.missed == ["seed 2: wgrad (mxfp4) (diverged: no equivalent-token cost)"]
    assert list(row.per_seed) == [1]


def test_fp8_runs_of_other_formats_are_duplicates_but_fp8_formats_split_groups(tmp_path):
    root = tmp_path / "runs"
    curve_run(root, "fp8", "none", "mxfp4", 1, 1.0)
    nv = curve_run(root, "fp8", "none", "nvfp4", 1, 1.0, key="0f0f0f0f")  # its own run key, as in a sweep
    meta = json.loads((nv / "meta.json").read_text())
    (nv / "meta.json").write_text(json.dumps(dict(meta, started_at="2025-06-01T00:00:00")))  # the newest
    wg = curve_run(root, "wgrad", "none", "ufp4", 1, 1.1)
    runs, issues = load_runs(root, include_completed=True)
    assert runs.group_id.nunique() == 1 and sorted(runs.run) == sorted([nv.name, wg.name])
    (dup,) = issues
    assert "duplicate of " + nv.name in dup.problem and "format.name" in dup.problem
    # Another E5M2 / E4M3 choice changes the FP8 GEMMs themselves: another experiment.
    curve_run(root, "wgrad", "none", "mxfp4", 1, 1.1, config=format_node("mxfp4", fp8_backward="e4m3"))
    runs, _ = load_runs(root, include_completed=True)
    assert runs.group_id.nunique() == 2 and any("format.fp8_backward=e4m3" in g for g in runs.group)


def test_the_contrasts_table_is_generic_over_triples():
    # Within-format contrasts bind both sides to each format; cross-format ones name theirs.
    assert all((a[2] == EACH) == (b[2] == EACH) for a, b, _ in CONTRASTS)
    assert {(a, b) for a, b, k in CONTRASTS if k == "format"} == {
        (("wgrad", "none", "nvfp4"), ("wgrad", "none", "mxfp4")),
        (("wgrad", "none", "ufp4"), ("wgrad", "none", "ufp4_e2m1"))}
