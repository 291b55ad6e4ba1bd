"""Tests of `fp4-ablate report` on synthetic run directories (docs/design.md section 2).

Every expected number is computed by hand in the test from the synthetic inputs, never
by calling the code under test.
"""
import csv
import json
import math
from pathlib import Path

import pytest

from fp4_experiments.report import (HardwareProfileError, MissingBaselineError, NoRunsError, ReportError,
                                    make_report)
from fp4_experiments.report.runs import load_runs
from fp4_experiments.report.stats import TargetMismatchWarning, mean_ci, net_speedup, summarize, t_ppf
from fp4_experiments.report.tables import latex_escape
from fp4_experiments.report.throughput import (HardwareProfile, gemm_precisions, load_profile, modeled_gain)

MODEL, DATA, TARGET = "tiny_llama", "syn", 30.0
FP4_GEMMS = {"bf16": (), "fp8": (), "fprop": ("fprop",), "dgrad": ("fprop", "dgrad"),
             "wgrad": ("fprop", "dgrad", "wgrad")}
FLOPS = {"fprop": 2e8, "dgrad": 2e8, "wgrad": 2e8}


def write_run(root, ladder, stabilizer, seed, status="reached", tokens=None, tps=1e6, target=TARGET,
              native=False, device="cpu", best_ppl=None, best_at=None, diverged_at=None, fmt="mxfp4",
              model=MODEL, key="abcd1234", summary=True, shared=None, config="", name=None):
    """One run directory as the training loop writes it, with a curve consistent with its summary."""
    d = Path(root) / (name or f"{ladder}-{stabilizer}-{fmt}-{model}-s{seed}-{key}")
    d.mkdir(parents=True)
    suffix = "(hipBLASLt)" if native else "(emulated)"
    paths = {g: (f"bf16 (torch.matmul)" if ladder == "bf16" else
                 f"fp4:{fmt} {suffix}" if g in FP4_GEMMS[ladder] else f"fp8:e4m3xe4m3 {suffix}")
             for g in ("fprop", "dgrad", "wgrad")}
    end = {"reached": tokens, "not_reached": best_at, "diverged": diverged_at}[status]
    evals = []
    for i in range(1, 11):
        t = end * i / 10
        ppl = (target * (tokens / t) ** 0.3 if status == "reached" else
               best_ppl * (end / t) ** 0.3 if status == "not_reached" else 80.0 / i ** 0.2)
        evals.append({"kind": "eval", "step": i * 10, "tokens": t, "epoch": 0, "val_loss": math.log(ppl),
                      "val_ppl": ppl})
    lines = [json.dumps({"kind": "train", "step": 1, "tokens": 100, "epoch": 0, "loss": 7.0, "lr": 1e-3,
                         "grad_norm": 1.0, "tokens_per_s": tps, "step_time_s": 0.1})]
    lines += [json.dumps(e) for e in evals]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "config.yaml").write_text(f"seed: {seed}\nladder:\n  name: {ladder}\n" + config)
    (d / "meta.json").write_text(json.dumps({"run_key": key, "git_commit": "c0ffee", "git_dirty": False,
                                             "device_name": device, "hostname": "h", "seed": seed,
                                             "started_at": "2025-01-01T00:00:00"}))
    if summary:
        s = {"status": status, "run_key": key, "ladder": ladder, "stabilizer": stabilizer, "format": fmt,
             "model": model, "data": DATA, "seed": seed, "target_ppl": target, "max_tokens": 10_000,
             "tokens_to_target": tokens if status == "reached" else None, "steps": 100,
             "tokens_seen": end, "best_ppl": best_ppl if best_ppl else target * 0.99,
             "best_ppl_tokens": best_at if best_at else end, "final_ppl": evals[-1]["val_ppl"],
             "diverged_at_tokens": diverged_at, "diverged_reason": "loss" if diverged_at else None,
             "mean_tokens_per_s": tps, "mean_step_time_s": 0.1, "param_count": 1, "linear_param_count": 1,
             "gemm_flops_per_token": FLOPS, "tokens_per_step": 100, "epochs": 0.1, "device_name": device,
             "torch_version": "2.x", "git_commit": "c0ffee", "gemm_paths": paths, "recipe": {},
             "wall_time_s": 1.0}
        if shared is not None:
            s["gpu_shared_by"] = shared
        (d / "summary.json").write_text(json.dumps(s))
    return d


def profile_yaml(tmp_path):
    p = tmp_path / "toy.yaml"
    p.write_text("name: toy\nvendor: test\npeak_tflops: {bf16: 500, fp8: 1000, fp4: 2000}\nsource: made up\n")
    return p


@pytest.fixture
def sweep(tmp_path):
    """Seeds 1 and 2: fp8 1000/1200 tokens, wgrad 1300/1500, wgrad+h16 1100/1320, bf16 950/1140,
    fprop one diverged + one not reached, dgrad both diverged."""
    root = tmp_path / "results" / "runs"
    for seed, fp8, wg, h16, bf in ((1, 1000, 1300, 1100, 950), (2, 1200, 1500, 1320, 1140)):
        write_run(root, "fp8", "none", seed, tokens=fp8, tps=1e6)
        write_run(root, "wgrad", "none", seed, tokens=wg, tps=1.25e6)
        write_run(root, "wgrad", "h16", seed, tokens=h16, tps=1 / 8.5e-7)
        write_run(root, "bf16", "none", seed, tokens=bf, tps=5e5)
    write_run(root, "fprop", "none", 1, status="diverged", diverged_at=500)
    write_run(root, "fprop", "none", 2, status="not_reached", best_ppl=31.5, best_at=1800)
    write_run(root, "dgrad", "none", 1, status="diverged", diverged_at=500)
    write_run(root, "dgrad", "none", 2, status="diverged", diverged_at=700)
    return root


def row(table, label, target=TARGET):
    r = table[(table.label == label) & (table.target_ppl == target)]
    assert len(r) == 1, (label, list(table.label))
    return r.iloc[0]


# ---------------------------------------------------------------- statistics

@pytest.mark.parametrize("df,q", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (29, 2.045),
                                  (1e9, 1.960)])
def test_t_quantiles_match_tables(df, q):
    assert t_ppf(0.975, df) == pytest.approx(q, abs=6e-4)
    assert t_ppf(0.025, df) == pytest.approx(-q, abs=6e-4)


def test_t_quantile_other_levels():
    assert t_ppf(0.995, 5) == pytest.approx(4.032, abs=6e-4)
    assert t_ppf(0.95, 10) == pytest.approx(1.812, abs=6e-4)
    assert t_ppf(0.5, 3) == 0.0


def test_mean_ci_by_hand():
    # 1..5: sd = sqrt(2.5); half = 2.7764451 * sqrt(2.5) / sqrt(5)
    m = mean_ci([1, 2, 3, 4, 5])
    assert (m.mean, m.n) == (3.0, 5)
    assert m.hi - 3.0 == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    # 1..10: sd = sqrt(82.5/9); df 9 -> 2.2621572
    m = mean_ci(range(1, 11))
    assert m.hi - 5.5 == pytest.approx(2.2621572 * math.sqrt(82.5 / 9) / math.sqrt(10), rel=1e-6)
    one = mean_ci([7.0])
    assert one.mean == 7.0 and math.isnan(one.lo) and math.isnan(one.hi)


def test_net_speedup_paper_headline():
    net = net_speedup(1.20, 0.085)
    assert net == pytest.approx(1.20 / 1.085)
    assert net == pytest.approx(1.10599, abs=1e-5)
    assert f"{(net - 1) * 100:+.1f}%" == "+10.6%"


def test_tokens_and_paired_cost(sweep):
    runs, issues = load_runs(sweep)
    assert issues == [] and len(runs) == 12
    table, warnings, _ = summarize(runs)
    assert warnings == []
    wg = row(table, "wgrad (mxfp4)")
    assert wg.tokens_mean == 1400 and wg.n_reached == 2
    # tokens: sd(1300, 1500) = 141.421; half = 12.7062 * 141.421 / sqrt(2) = 1270.62
    assert wg.tokens_hi - 1400 == pytest.approx(12.706205 * 100, rel=1e-6)
    # paired: 1300/1000 - 1 = 0.30, 1500/1200 - 1 = 0.25 -> 0.275; sd = 0.0353553, half = 12.7062 * 0.025
    assert wg.cost_per_seed == {1: pytest.approx(0.30), 2: pytest.approx(0.25)}
    assert wg.cost_mean == pytest.approx(0.275)
    assert wg.cost_hi - 0.275 == pytest.approx(12.706205 * 0.025, rel=1e-5)
    h16 = row(table, "wgrad+h16 (mxfp4)")
    assert h16.cost_mean == pytest.approx(0.10)  # 1100/1000 and 1320/1200: both exactly +10%
    assert h16.cost_hi - h16.cost_lo == pytest.approx(0.0, abs=1e-12)
    assert row(table, "bf16").cost_mean == pytest.approx(-0.05)
    assert list(table.label) == ["bf16", "fp8", "fprop (mxfp4)", "dgrad (mxfp4)", "wgrad (mxfp4)",
                                 "wgrad+h16 (mxfp4)"]


# ---------------------------------------------------------------- throughput model

def test_modeled_gain_by_hand(tmp_path):
    prof = load_profile(profile_yaml(tmp_path))
    # T_fp8 = 1e-6 s/token; each FP4 GEMM saves 2e8 * (1/1e15 - 1/2e15) = 1e-7 s/token.
    full = gemm_precisions("wgrad")
    assert modeled_gain(1e6, FLOPS, full, prof) == pytest.approx(1e-6 / 7e-7)
    # h16: + t_extra = 1/tps(h16) - 1/tps(none) = 8.5e-7 - 8e-7 = 5e-8 -> T = 7.5e-7, gain 4/3
    assert modeled_gain(1e6, FLOPS, full, prof, t_extra=5e-8) == pytest.approx(4 / 3)
    assert modeled_gain(1e6, FLOPS, gemm_precisions("fprop"), prof) == pytest.approx(1 / 0.9)
    # bf16: each GEMM costs 2e8 * (1/5e14 - 1/1e15) = 2e-7 more -> T = 1.6e-6, gain 0.625
    assert modeled_gain(1e6, FLOPS, gemm_precisions("bf16"), prof) == pytest.approx(0.625)


def test_modeled_table_and_h100_refuses(sweep, tmp_path):
    # The model reads isolated tokens/s (a bench), here equal to the fixture's own tokens/s.
    bench = _bench_json(tmp_path / "bench.json", [
        ("fp8", "none", "eager", 1e6), ("wgrad", "none", "eager", 1.25e6), ("wgrad", "h16", "eager", 1 / 8.5e-7),
        ("bf16", "none", "eager", 5e5), ("fprop", "none", "eager", 1e6), ("dgrad", "none", "eager", 1e6)])
    rep = make_report(sweep, out_dir=tmp_path / "rep", profiles=(str(profile_yaml(tmp_path)), "h100"),
                      throughput=bench)
    t = rep.table
    wg, h16 = row(t, "wgrad (mxfp4)"), row(t, "wgrad+h16 (mxfp4)")
    assert wg.gain_source == "modeled:toy" and wg.gain == pytest.approx(1 / 0.7)
    assert wg.net == pytest.approx((1 / 0.7) / 1.275)
    assert h16.t_extra_s_per_token == pytest.approx(5e-8)
    assert h16.gain == pytest.approx(4 / 3) and h16.net == pytest.approx((4 / 3) / 1.10)
    assert row(t, "bf16").gain == pytest.approx(0.625)
    assert math.isnan(wg.gain_h100) and "no FP4" in wg.note_h100
    # FP8 -> BF16 on H100 is modelable: 2e8 * (1/989.5e12 - 1/1979e12) * 3 added to 1e-6
    extra = 3 * 2e8 * (1 / 989.5e12 - 1 / 1979e12)
    assert row(t, "bf16").gain_h100 == pytest.approx(1e-6 / (1e-6 + extra))
    with pytest.raises(HardwareProfileError, match="no FP4"):
        modeled_gain(1e6, FLOPS, gemm_precisions("wgrad"), load_profile("h100"))
    assert "n/a: h100 has no FP4 peak" in rep


def test_shipped_profiles_are_dense_datasheet_figures():
    for name, fp8, fp4 in (("mi355x", 5000, 10100), ("b200", 4500, 9000), ("gb200", 5000, 10000)):
        p = load_profile(name)
        assert (p.peak_tflops["fp8"], p.peak_tflops["fp4"]) == (fp8, fp4) and "datasheet" in p.source
    assert load_profile("h100").peak_tflops["fp4"] is None
    with pytest.raises(HardwareProfileError, match="unknown hardware profile"):
        load_profile("nope")


def test_measured_gain_and_headline(tmp_path):
    root = tmp_path / "runs"
    for seed, base in ((1, 1000), (2, 2000)):
        write_run(root, "fp8", "none", seed, tokens=base, tps=1000, native=True, device="MI355X")
        write_run(root, "wgrad", "h16", seed, tokens=base * 1.085, tps=1200, native=True, device="MI355X")
    rep = make_report(root, out_dir=tmp_path / "rep")
    r = row(rep.table, "wgrad+h16 (mxfp4)")
    assert r.gain_source == "measured" and r.gain == pytest.approx(1.2)
    assert r.cost_mean == pytest.approx(0.085) and r.net == pytest.approx(1.2 / 1.085)
    assert "+20.0% (measured)" in rep and "+10.6%" in rep
    # A user-measured gain overrides, labelled `user`.
    rep = make_report(root, out_dir=tmp_path / "rep2", step_speedup=1.25)
    r = row(rep.table, "wgrad+h16 (mxfp4)")
    assert r.gain_source == "user" and r.net == pytest.approx(1.25 / 1.085)


def test_step_speedup_per_configuration_from_the_cli(sweep, tmp_path, capsys):
    """`--step-speedup wgrad=1.25`: the wgrad rows (every stabilizer) take the user gain, the
    other FP4 rows keep their own (measured, as these runs are one unshared device)."""
    from fp4_experiments.report.cli import main
    assert main([str(sweep), "--out", str(tmp_path / "rep"), "--step-speedup", "wgrad=1.25"]) == 0
    with open(tmp_path / "rep" / "table.csv") as f:
        by_label = {r["label"]: r for r in csv.DictReader(f)}
    for label in ("wgrad (mxfp4)", "wgrad+h16 (mxfp4)"):
        assert by_label[label]["gain_source"] == "user" and float(by_label[label]["gain"]) == 1.25
    assert by_label["fprop (mxfp4)"]["gain_source"] != "user"
    assert "(--step-speedup wgrad=1.25)" in capsys.readouterr().out
    # one bare ratio still covers every FP4 row
    assert main([str(sweep), "--out", str(tmp_path / "rep2"), "--step-speedup", "1.2"]) == 0
    with open(tmp_path / "rep2" / "table.csv") as f:
        assert {r["gain_source"] for r in csv.DictReader(f) if r["ladder"] in ("fprop", "wgrad")} == {"user"}


@pytest.mark.parametrize("arg,message", [
    ("wgrd=1.2", "names no configuration of these runs: wgrd; valid keys: *, dgrad, dgrad+none, fprop"),
    ("fp8=1.2", "names no configuration of these runs: fp8;"),  # no FP4 GEMM, no user gain
    ("wgrad=fast", "'fast' is not a number"),
    ("wgrad=0", "the gain must be > 0"),
])
def test_step_speedup_bad_values_name_the_problem(sweep, tmp_path, capsys, arg, message):
    from fp4_experiments.report.cli import main
    try:  # argparse exits 2 on a malformed value; a well-formed unknown key returns 2
        rc = main([str(sweep), "--out", str(tmp_path / "rep"), "--step-speedup", arg])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()


# ---------------------------------------------------------------- table rows

def test_nonconverged_and_diverged_rows(sweep, tmp_path):
    rep = make_report(sweep, out_dir=tmp_path / "rep")
    lines = {}
    for l in rep.splitlines():  # the first table of a group is the main one
        if l.startswith("| "):
            lines.setdefault(l.split("|")[1].strip(), l)
    assert "diverged at 500 tokens; did not converge (best ppl 31.5 at 1.80k tokens)" in lines["fprop (mxfp4)"]
    assert "diverged at 500 / 700 tokens" in lines["dgrad (mxfp4)"]
    assert "0/2" in lines["dgrad (mxfp4)"] and "n/a (did not converge)" in lines["dgrad (mxfp4)"]
    assert "1.40k ± 1.27k" in lines["wgrad (mxfp4)"] and "+27.5% ± 31.8%" in lines["wgrad (mxfp4)"]
    assert "0 (baseline)" in lines["fp8"]


def test_out_of_budget_seed_kept_as_a_bound(sweep, tmp_path):
    """A seed that ran out of budget is right-censored: the cost over the converged seeds says
    so (n=1), and the row gives the mean with that seed at its bound (a lower bound)."""
    write_run(sweep, "wgrad", "sr", 1, tokens=1100)                                    # +10% vs 1000
    write_run(sweep, "wgrad", "sr", 2, status="not_reached", best_ppl=30.5, best_at=1800)  # > 1800/1200-1
    table, _, _ = summarize(load_runs(sweep)[0])
    sr = row(table, "wgrad+sr (mxfp4)")
    assert sr.cost_mean == pytest.approx(0.10) and sr.n_paired == 1
    assert sr.cost_censored == {2: pytest.approx(0.50)}
    assert sr.cost_mean_bound == pytest.approx(0.30)
    assert math.isnan(row(table, "wgrad (mxfp4)").cost_mean_bound)  # nothing censored
    rep = make_report(sweep, out_dir=tmp_path / "rep")
    line = next(l for l in rep.splitlines() if l.startswith("| wgrad+sr"))
    assert "+10.0% (n=1)" in line and "(n=1) (n=1)" not in line
    assert "seed 2 > +50.0%" in line and ">= +30.0%" in line
    with open(tmp_path / "rep" / "table.csv") as f:
        by_label = {r["label"]: r for r in csv.DictReader(f)}
    assert float(by_label["wgrad+sr (mxfp4)"]["cost_mean_bound"]) == pytest.approx(0.30)


def test_contrasts_pair_neighbours_by_seed(sweep, tmp_path):
    from fp4_experiments.report.contrasts import contrasts
    runs = load_runs(sweep)[0]
    paired = contrasts(runs, summarize(runs)[2]).set_index("contrast")
    h16 = paired.loc["wgrad+h16 (mxfp4) vs wgrad (mxfp4)"]
    # 1100/1300 - 1 and 1320/1500 - 1, paired by seed
    assert h16.per_seed == {1: pytest.approx(1100 / 1300 - 1), 2: pytest.approx(1320 / 1500 - 1)}
    assert h16["mean"] == pytest.approx((1100 / 1300 + 1320 / 1500) / 2 - 1) and h16.kind == "stabilizer"
    # Every seed of the fprop and dgrad rungs missed: counted and named, not dropped.
    step = paired.loc["wgrad (mxfp4) vs dgrad (mxfp4)"]
    assert step.n == 0 and step.missed == ["seed 1: dgrad (mxfp4) diverged", "seed 2: dgrad (mxfp4) diverged"]
    assert paired.loc["fprop (mxfp4) vs fp8"].missed == ["seed 1: fprop (mxfp4) diverged",
                                                         "seed 2: fprop (mxfp4) not_reached"]
    assert "wgrad+sr (mxfp4) vs wgrad (mxfp4)" not in paired.index  # no sr runs, no row
    rep = make_report(sweep, out_dir=tmp_path / "rep")
    assert "## Paired contrasts" in rep and (tmp_path / "rep" / "contrasts.csv").exists()
    with open(tmp_path / "rep" / "contrasts.csv") as f:
        rows = {r["contrast"]: r for r in csv.DictReader(f)}
    assert rows["wgrad+h16 (mxfp4) vs wgrad (mxfp4)"]["per_seed"] == "1:-0.153846;2:-0.12"


def test_contrast_verdict_needs_the_interval_to_exclude_zero(tmp_path):
    from fp4_experiments.report.contrasts import contrasts, to_markdown
    root = tmp_path / "runs"
    for seed, fprop, dgrad in ((1, 1100, 1100), (2, 1110, 1000), (3, 1090, 1200)):
        write_run(root, "fp8", "none", seed, tokens=1000)
        write_run(root, "fprop", "none", seed, tokens=fprop)
        write_run(root, "dgrad", "none", seed, tokens=dgrad)
    runs = load_runs(root)[0]
    md = {l.split("|")[1].strip(): l for l in to_markdown(contrasts(runs, summarize(runs)[2])).splitlines()
          if l.startswith("| ")}
    assert "+10.0% [+7.5%, +12.5%] (n=3)" in md["fprop (mxfp4) vs fp8"] and "costlier" in md["fprop (mxfp4) vs fp8"]
    assert "no difference resolved" in md["dgrad (mxfp4) vs fprop (mxfp4)"]


# ---------------------------------------------------------------- bad inputs

def test_corrupt_and_incomplete_runs_excluded_by_name(sweep):
    bad = write_run(sweep, "wgrad", "none", 3, tokens=99_999)
    (bad / "metrics.jsonl").write_text((bad / "metrics.jsonl").read_text() + '{"kind": "eval", "tok')
    garbage = write_run(sweep, "wgrad", "none", 4, tokens=99_999)
    (garbage / "summary.json").write_text("{not json")
    running = write_run(sweep, "wgrad", "none", 5, tokens=99_999, summary=False)
    nokeys = write_run(sweep, "wgrad", "none", 6, tokens=99_999)
    (nokeys / "summary.json").write_text(json.dumps({"status": "reached", "ladder": "wgrad"}))
    nometrics = write_run(sweep, "wgrad", "none", 7, tokens=99_999)
    (nometrics / "metrics.jsonl").unlink()
    midline = write_run(sweep, "wgrad", "none", 8, tokens=99_999)
    text = (midline / "metrics.jsonl").read_text().splitlines()
    (midline / "metrics.jsonl").write_text("\n".join(text[:3] + ["<<garbage>>"] + text[3:]) + "\n")
    failed = write_run(sweep, "wgrad", "none", 9, tokens=99_999)
    s = json.loads((failed / "summary.json").read_text())
    (failed / "summary.json").write_text(json.dumps(dict(s, status="failed", error="CUDA OOM")))
    runs, issues = load_runs(sweep)
    by = {i.name: i.problem for i in issues}
    assert by[midline.name].startswith("metrics.jsonl line 4: invalid JSON")
    assert "failed run: CUDA OOM" in by[failed.name]
    assert [i.name for i in issues if i.incomplete] == [running.name]
    assert "truncated last line" in by[bad.name]
    assert "summary.json: invalid JSON" in by[garbage.name]
    assert by[running.name].startswith("incomplete") and "last eval at 99,999" in by[running.name]
    assert "missing required keys" in by[nokeys.name] and "seed" in by[nokeys.name]
    assert by[nometrics.name] == "metrics.jsonl missing"
    assert len(runs) == 12  # nothing of seeds 3..7 got in
    table, _, _ = summarize(runs, issues)
    assert row(table, "wgrad (mxfp4)").tokens_mean == 1400


def test_calibration_runs_are_named_apart_not_as_faults(sweep, tmp_path):
    # FP8 runs without a target (status completed) feed `fp4-ablate calibrate`; in the same results
    # directory as the grid they are listed as calibration runs, not as corrupt or excluded ones.
    calib = write_run(sweep, "fp8", "none", 0, tokens=5_000, key="ca1b0000")
    s = json.loads((calib / "summary.json").read_text())
    (calib / "summary.json").write_text(json.dumps(dict(s, status="completed", target_ppl=None,
                                                        tokens_to_target=None)))
    runs, issues = load_runs(sweep)
    (issue,) = issues
    assert issue.calibration and not issue.incomplete and issue.name == calib.name
    report = make_report(sweep, out_dir=tmp_path / "out", profiles=())
    assert "0 excluded, 0 incomplete, 1 calibration runs (no target)" in report.markdown
    assert "## Calibration runs" in report.markdown and "## Excluded" not in report.markdown
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["excluded"] == [] and [Path(p).name for p in data["calibration"]] == [calib.name]


def test_mismatched_targets_are_separate_groups(sweep, tmp_path):
    a = write_run(sweep, "fp8", "none", 1, tokens=2000, target=25.0, key="ffff0000")
    b = write_run(sweep, "wgrad", "none", 1, tokens=2400, target=25.0, key="ffff0000")
    with pytest.warns(TargetMismatchWarning) as w:
        rep = make_report(sweep, out_dir=tmp_path / "rep")
    msg = str(w[0].message)
    assert "target_ppl=25" in msg and "target_ppl=30" in msg and a.name in msg and b.name in msg
    assert row(rep.table, "wgrad (mxfp4)", 25.0).cost_mean == pytest.approx(0.2)  # 2400/2000, never mixed
    assert row(rep.table, "wgrad (mxfp4)", 30.0).cost_mean == pytest.approx(0.275)
    assert "target ppl=25" in rep and "target ppl=30" in rep and "## Warnings" in rep


def test_missing_baseline_error_names_the_combination(sweep, tmp_path):
    write_run(sweep, "wgrad", "none", 3, tokens=1500)
    broken = write_run(sweep, "fp8", "none", 3, tokens=1000)
    (broken / "summary.json").write_text("garbage")
    with pytest.raises(MissingBaselineError) as e:
        make_report(sweep, out_dir=tmp_path / "rep")
    msg = str(e.value)
    assert f"model={MODEL} data={DATA} target_ppl=30 seed=3" in msg and "wgrad-none-mxfp4" in msg
    assert broken.name in msg  # the excluded fp8 run is pointed at
    assert isinstance(e.value, ReportError) and e.value.missing == [(MODEL, DATA, 30.0, 3)]


def test_unpaired_runs_are_excluded_on_request(tmp_path):
    """A ladder in progress: seed 3's FP8 run is still to come. --unpaired exclude leaves its runs
    out, listed with the excluded run dirs, and reports seeds 1-2 as they are."""
    root = tmp_path / "results" / "runs"
    for seed in (1, 2):
        write_run(root, "fp8", "none", seed, tokens=1000)
        write_run(root, "wgrad", "none", seed, tokens=1000 + 100 * seed)
    waiting = write_run(root, "wgrad", "none", 3, tokens=5000)
    with pytest.raises(MissingBaselineError):
        make_report(root, out_dir=tmp_path / "rep")
    rep = make_report(root, out_dir=tmp_path / "rep", unpaired="exclude")
    assert row(rep.table, "wgrad (mxfp4)").cost_mean == pytest.approx(0.15)  # (0.1 + 0.2) / 2, seed 3 out
    assert f"`{waiting.name}`: no FP8 run of its experiment group and seed" in rep
    assert "1 excluded" in rep
    assert [i.name for i in rep.issues] == [waiting.name]
    with pytest.raises(ReportError, match="unpaired 'skip': choose one of error, exclude"):
        make_report(root, out_dir=tmp_path / "rep2", unpaired="skip")
    assert not (tmp_path / "rep2").exists()


def test_several_results_dirs_are_one_set(tmp_path):
    """Two folders (two ladders, say) give the report one folder of all their runs would."""
    a, b, both = tmp_path / "a" / "runs", tmp_path / "b" / "runs", tmp_path / "both" / "runs"
    for root, seeds in ((a, (1,)), (b, (2,)), (both, (1, 2))):
        for seed in seeds:
            write_run(root, "fp8", "none", seed, tokens=1000)
            write_run(root, "wgrad", "none", seed, tokens=1000 + 100 * seed)
    one = make_report(both, out_dir=tmp_path / "one")
    two = make_report([a, b], out_dir=tmp_path / "two")
    assert (tmp_path / "two" / "table.csv").read_bytes() == (tmp_path / "one" / "table.csv").read_bytes()
    assert row(two.table, "wgrad (mxfp4)").cost_mean == pytest.approx(0.15)
    assert f"Results: `{a}, {b}`" in two
    with pytest.raises(ReportError, match=f"no such directory: {tmp_path / 'c'}"):
        make_report([a, tmp_path / "c"], out_dir=tmp_path / "three")


def test_runs_that_read_different_data_are_never_pooled(tmp_path):
    """Same config, different data: a glob (`data.path=dir/*.json.gz`) that found fewer files on one
    machine. data.json tells them apart; the report makes them two groups instead of one table."""
    root = tmp_path / "results" / "runs"
    def data(run, n_train):
        (run / "data.json").write_text(json.dumps({"n_train_tokens": n_train, "n_val_tokens": 100,
                                                   "tokenizer": {"name": "bpe", "fingerprint": "f00d"}}))
    for seed in (1, 2):
        data(write_run(root, "fp8", "none", seed, tokens=1000), 5000)
        data(write_run(root, "wgrad", "none", seed, tokens=1100), 5000)
    same = make_report(root, out_dir=tmp_path / "rep")
    assert len(same.table) == 2 and set(same.runs["group"]) == {""}  # one group, key unchanged
    data(write_run(root, "fp8", "none", 3, tokens=1000), 4000)
    data(write_run(root, "wgrad", "none", 3, tokens=1900), 4000)
    split = make_report(root, out_dir=tmp_path / "rep2")
    assert split.runs.groupby("group_id")["seed"].apply(sorted).tolist() in ([[1, 1, 2, 2], [3, 3]],
                                                                              [[3, 3], [1, 1, 2, 2]])
    assert "data.trained_on=4000 train / 100 validation tokens" in split
    assert sorted(split.table["cost_mean"].dropna().round(3).tolist()) == [0.0, 0.0, 0.1, 0.9]


def test_duplicates_and_empty(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    with pytest.raises(NoRunsError):
        make_report(root, out_dir=tmp_path / "rep")
    write_run(root, "fp8", "none", 1, tokens=1000, key="aaaa0000")
    newer = write_run(root, "fp8", "none", 1, tokens=1100, key="bbbb0000")
    meta = json.loads((newer / "meta.json").read_text())
    (newer / "meta.json").write_text(json.dumps(dict(meta, started_at="2025-02-01T00:00:00")))
    runs, issues = load_runs(root)
    assert list(runs.run) == [newer.name] and "duplicate of " + newer.name in issues[0].problem


# ---------------------------------------------------------------- outputs

def test_files_written(sweep, tmp_path):
    out = tmp_path / "rep"
    rep = make_report(sweep, out_dir=out)
    for f in ("table.md", "table.csv", "table.tex", "report.md", "report.json"):
        assert (out / f).is_file(), f
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"cost_{MODEL}_{DATA}_ppl30.png", f"eqcost_{MODEL}_{DATA}.png", f"ppl_{MODEL}_{DATA}_ppl30.png"]
    assert (out / "eq_cost.csv").is_file()
    assert all((out / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    with open(out / "table.csv") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    assert float(rows["wgrad (mxfp4)"]["cost_mean"]) == pytest.approx(0.275)
    assert float(rows["wgrad (mxfp4)"]["tokens_mean"]) == 1400.0 and rows["dgrad (mxfp4)"]["tokens_mean"] == ""
    tex = (out / "table.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"+27.5\% $\pm$ 31.8\%" in tex
    assert latex_escape("a_b 5% & c") == r"a\_b 5\% \& c"
    prov = json.loads((out / "report.json").read_text())
    assert prov["git_commits"] == ["c0ffee"] and prov["devices"] == ["cpu"] and len(prov["runs"]) == 12
    assert prov["command"] and all(r["baseline"].startswith("fp8-none") for r in prov["runs"])
    assert (out / "table.md").read_text() in rep.markdown
    # Default output dir: <results_dir>/../report
    assert make_report(sweep).out_dir == sweep.parent / "report"


def test_wandb_offline(sweep, tmp_path, monkeypatch):
    wdir = tmp_path / "wb"
    wdir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wdir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    rep = make_report(sweep, out_dir=tmp_path / "rep", wandb=True)
    runs = list((wdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert rep.wandb_dir and Path(rep.wandb_dir).name == runs[0].name


# ---------------------------------------------------------------- runs that shared a GPU

def _bench_json(path, rows):
    steps = [{"model": MODEL, "ladder": lad, "stabilizer": stab, "mode": mode, "tokens_per_s": tps}
             for lad, stab, mode, tps in rows]
    path.write_text(json.dumps({"meta": {"device_name": "GPU Y", "command": "fp4-ablate bench"},
                                "kernels": [], "steps": steps}))
    return path


def test_shared_gpu_runs_model_the_gain_from_isolated_throughput(tmp_path):
    root = tmp_path / "runs"
    for seed, fp8, wg, h16 in ((1, 1000, 1300, 1100), (2, 1200, 1500, 1320)):
        # Native GEMMs on one device: without sharing these tokens/s would be a measured gain.
        write_run(root, "fp8", "none", seed, tokens=fp8, tps=5e4, native=True, device="GPU X", shared=8)
        write_run(root, "wgrad", "none", seed, tokens=wg, tps=9e4, native=True, device="GPU X", shared=8)
        write_run(root, "wgrad", "h16", seed, tokens=h16, tps=2e4, native=True, device="GPU X", shared=8)
    prof = str(profile_yaml(tmp_path))
    rep = make_report(root, out_dir=tmp_path / "rep0", profiles=(prof,))
    w = row(rep.table, "wgrad (mxfp4)")
    assert math.isnan(w["gain_measured"]) and math.isnan(w["gain_toy"]) and math.isnan(w["gain"])
    assert "--throughput" in w["note_toy"] and "GPU shared by 8" in rep.markdown
    bench = _bench_json(tmp_path / "bench.json", [
        ("fp8", "none", "eager", 1e6), ("wgrad", "none", "eager", 1.25e6),
        ("wgrad", "h16", "eager", 1 / 8.5e-7), ("fp8", "none", "cuda_graph", 9e9)])
    rep = make_report(root, out_dir=tmp_path / "rep1", profiles=(prof,), throughput=bench)
    w, h = row(rep.table, "wgrad (mxfp4)"), row(rep.table, "wgrad+h16 (mxfp4)")
    # T_fp8 = 1e-6 s/token (the eager bench row, not the graphed one); all three GEMMs move to
    # FP4: 6e8 FLOP * (1/2e15 - 1/1e15) = -3e-7 -> T = 7e-7.
    assert w["gain"] == pytest.approx(1 / 0.7) and w["gain_source"] == "modeled:toy"
    assert w["tokens_per_s_isolated"] == 1.25e6 and w["tokens_per_s"] == pytest.approx(9e4)
    # h16 pays its isolated overhead: 8.5e-7 - 8e-7 = 5e-8 s/token -> T = 7.5e-7.
    assert h["gain"] == pytest.approx(1 / 0.75)
    assert "GPU Y" in rep.markdown and "tokens/s alone" in rep.markdown
    prov = json.loads((tmp_path / "rep1" / "report.json").read_text())
    assert prov["throughput"]["tokens_per_s"]["tiny_llama/fp8/none"] == 1e6
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ReportError, match="--throughput"):
        make_report(root, out_dir=tmp_path / "rep2", profiles=(prof,), throughput=tmp_path / "bad.json")


def test_shared_gpu_read_from_the_config_of_older_runs(tmp_path):
    root = tmp_path / "runs"
    d = write_run(root, "fp8", "none", 1, tokens=1000)
    (d / "config.yaml").write_text("seed: 1\nsweep:\n  id: s1\n  jobs_per_gpu: 6\n")
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "device": "cuda:0"}))
    e = write_run(root, "wgrad", "none", 1, tokens=1000)   # a CPU run: never shared
    (e / "config.yaml").write_text("seed: 1\nsweep:\n  id: s1\n  jobs_per_gpu: 6\n")
    runs, _ = load_runs(root)
    assert dict(zip(runs.ladder, runs.gpu_shared_by)) == {"fp8": 6, "wgrad": 1}


def test_net_speedup_unbounded_where_the_cost_interval_passes_minus_100_percent():
    assert net_speedup(1.2, -1.0) == math.inf and net_speedup(1.2, -1.5) == math.inf
    from fp4_experiments.report.tables import fmt_ratio_pct
    assert fmt_ratio_pct(math.inf) == "unbounded"


# ---------------------------------------------------------------- experiment groups, integrity, outputs

def test_two_experiment_groups_in_one_directory_never_mix(tmp_path):
    """Runs with another train.lr are another experiment: their FP8 run is never the baseline of
    the first sweep's rows (before, the newest FP8 run of a seed became everyone's baseline)."""
    root = tmp_path / "runs"
    lr_a, lr_b = "train:\n  lr: 0.002\n", "train:\n  lr: 0.01\n"
    for seed, fp8, wg in ((1, 1000, 1300), (2, 1200, 1500)):
        write_run(root, "fp8", "none", seed, tokens=fp8, config=lr_a, key="aaaa0000")
        write_run(root, "wgrad", "none", seed, tokens=wg, config=lr_a, key="aaaa0000")
    for seed, fp8, wg in ((1, 2000, 2200), (2, 2000, 2400)):
        d = write_run(root, "fp8", "none", seed, tokens=fp8, config=lr_b, key="bbbb0000")
        meta = json.loads((d / "meta.json").read_text())
        (d / "meta.json").write_text(json.dumps(dict(meta, started_at="2025-06-01T00:00:00")))  # newest
        write_run(root, "wgrad", "none", seed, tokens=wg, config=lr_b, key="bbbb0000")
    runs, issues = load_runs(root)
    assert issues == [] and len(runs) == 8 and runs.group_id.nunique() == 2
    rep = make_report(root, out_dir=tmp_path / "rep", profiles=())
    wgrad = rep.table[rep.table.label == "wgrad (mxfp4)"].set_index("group")
    (label_a,) = [g for g in wgrad.index if "train.lr=0.002" in g]
    (label_b,) = [g for g in wgrad.index if "train.lr=0.01" in g]
    assert wgrad.loc[label_a].cost_mean == pytest.approx((0.30 + 0.25) / 2)   # 1300/1000, 1500/1200
    assert wgrad.loc[label_b].cost_mean == pytest.approx((0.10 + 0.20) / 2)   # 2200/2000, 2400/2000
    prov = json.loads((tmp_path / "rep" / "report.json").read_text())
    for r in prov["runs"]:  # every baseline is of the run's own group (key8 aaaa/bbbb is the lr here)
        assert r["baseline"].startswith("fp8-none") and r["baseline"][-8:] == r["run"][-8:]
    assert sorted(prov["groups"]) == sorted([label_a, label_b])
    assert f"group {label_a}" in rep and f"group {label_b}" in rep and "2 experiment groups" in rep
    assert len(list((tmp_path / "rep").glob("ppl_*.png"))) == 2  # one figure per group, not overwritten
    with open(tmp_path / "rep" / "table.csv") as f:
        assert {r["group"] for r in csv.DictReader(f)} == {label_a, label_b}


def test_true_duplicate_is_named_as_such(sweep):
    import shutil
    orig = next(p for p in sweep.iterdir() if p.name.startswith("wgrad-none-mxfp4-tiny_llama-s1"))
    copy = sweep / (orig.name + "-copy")
    shutil.copytree(orig, copy)
    runs, issues = load_runs(sweep)
    assert len(runs) == 12  # still one run per configuration and seed
    (issue,) = issues
    assert issue.name in (orig.name, copy.name)
    assert "same run key abcd1234: the same experiment twice" in issue.problem


def test_summary_contradicted_by_metrics_is_corrupt(sweep):
    cut = write_run(sweep, "wgrad", "none", 3, tokens=1400, config="train:\n  log_every_steps: 10\n")
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:6]) + "\n")  # records up to step 50 of 100
    ahead = write_run(sweep, "wgrad", "none", 4, tokens=1400)
    s = json.loads((ahead / "summary.json").read_text())
    (ahead / "summary.json").write_text(json.dumps(dict(s, steps=60)))  # metrics go on to step 100
    runs, issues = load_runs(sweep)
    by = {i.name: i.problem for i in issues}
    assert by[cut.name].startswith("summary.json says 100 steps but the last record of metrics.jsonl is at "
                                   "step 50 (logged every 10)")
    assert by[ahead.name].startswith("metrics.jsonl reaches step 100, past the 60 steps summary.json says")
    assert len(runs) == 12


def test_report_replaces_its_output_directory(sweep, tmp_path):
    out = tmp_path / "rep"
    make_report(sweep, out_dir=out, profiles=())
    (out / "ppl_an_old_group.png").write_bytes(b"stale")
    (out / "sub").mkdir()
    before = sorted(p.name for p in out.iterdir())
    make_report(sweep, out_dir=out, profiles=())
    after = sorted(p.name for p in out.iterdir())
    assert "ppl_an_old_group.png" not in after and "sub" not in after
    assert set(before) - set(after) == {"ppl_an_old_group.png", "sub"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left over
    assert json.loads((out / "report.json").read_text())["out_dir"] == str(out.resolve())
    # A directory that is not a report is never replaced.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ReportError, match="not an earlier report"):
        make_report(sweep, out_dir=other, profiles=())
    assert (other / "notes.txt").read_text() == "keep me"


def test_missing_or_unwritable_directories_are_one_clear_line(tmp_path, capsys):
    from fp4_experiments.calibrate import main as calibrate_main
    from fp4_experiments.report.cli import main as report_main
    missing = tmp_path / "nope"
    assert report_main([str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"fp4-ablate report: no such directory: {missing}"
    assert calibrate_main([str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"fp4-ablate calibrate: no such directory: {missing}"
    root = tmp_path / "runs"
    write_run(root, "fp8", "none", 1, tokens=1000)
    (tmp_path / "afile").write_text("")
    assert report_main([str(root), "--out", str(tmp_path / "afile" / "rep")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fp4-ablate report: cannot write the report to {tmp_path}/afile/rep")


def test_no_gain_columns_without_a_bench(sweep, tmp_path):
    """CPU runs: their own tokens/s are no basis for a step gain, so without --throughput or
    --step-speedup the gain and net-speedup columns are left out, and the text says why."""
    rep = make_report(sweep, out_dir=tmp_path / "rep", profiles=(str(profile_yaml(tmp_path)),))
    header = next(l for l in rep.splitlines() if l.startswith("| configuration"))
    assert "step gain" not in header and "net speedup" not in header
    assert "Step gain and net speedup: left out of the table: no isolated bench" in rep
    assert "Modeled step gain / net speedup per hardware profile" not in rep
    assert rep.table[rep.table.ladder != "fp8"].gain.isna().all()
    assert "net speedup" not in (tmp_path / "rep" / "table.tex").read_text()
    rep = make_report(sweep, out_dir=tmp_path / "rep2", profiles=(), step_speedup=1.2)
    header = next(l for l in rep.splitlines() if l.startswith("| configuration"))
    assert "step gain" in header and "net speedup" in header and "left out of the table" not in rep


def test_t_quantiles_agree_with_scipy():
    from scipy import stats
    for p, df in ((0.975, 1), (0.975, 4), (0.995, 7), (0.9, 30)):
        assert t_ppf(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-12)
    assert t_ppf(0.975, 4) == pytest.approx(2.7764451, abs=1e-7)
