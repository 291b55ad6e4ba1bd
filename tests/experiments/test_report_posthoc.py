"""`fp4-ablate report --target-ppl`: a post-hoc target for fixed-budget runs, on synthetic run
directories (and, for the crossing rule, on the committed llama-20m ladder).

Every expected number is computed by hand in the test from the synthetic inputs (the crossing
formula written out, the calibration mean over the chosen evaluations), never by the code under test.
"""
import csv
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fp4_experiments.calibrate import calibrate  # noqa: E402
from fp4_experiments.report import ReportError, make_report  # noqa: E402
from fp4_experiments.report.cli import main as report_main  # noqa: E402
from fp4_experiments.report.posthoc import first_crossing, parse_target  # noqa: E402
from fp4_experiments.report.runs import load_runs  # noqa: E402
from fp4_experiments.report.stats import TargetMismatchWarning  # noqa: E402

from test_report import write_run  # noqa: E402  (tests/experiments has no __init__.py)

REPO = Path(__file__).resolve().parents[2]
LADDER_RUNS = REPO / "results" / "mxfp4-ladder-llama20m" / "runs"
TOKENS = (1000.0, 2000.0, 3000.0, 4000.0, 5000.0)


def fixed_run(root, ladder, seed, ppls, stabilizer="none", status="completed", diverged_at=None, vocab=512,
              key="f1xed000"):
    """A run trained without a target: evaluations at TOKENS with the given perplexities."""
    d = write_run(root, ladder, stabilizer, seed, tokens=5000, key=key)
    lines = [json.dumps({"kind": "eval", "step": 10 * (i + 1), "tokens": t, "epoch": 0, "val_loss": math.log(p),
                         "val_ppl": p}) for i, (t, p) in enumerate(zip(TOKENS, ppls))]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    s = json.loads((d / "summary.json").read_text())
    s.update(status=status, target_ppl=None, tokens_to_target=None, steps=10 * len(ppls), tokens_seen=5000,
             max_tokens=5000, best_ppl=min(ppls), best_ppl_tokens=TOKENS[ppls.index(min(ppls))],
             final_ppl=ppls[-1], diverged_at_tokens=diverged_at, diverged_reason="loss" if diverged_at else None)
    (d / "summary.json").write_text(json.dumps(s))
    (d / "data.json").write_text(json.dumps({"tokenizer": {"vocab_size": vocab}}))
    return d


def crossing(t0, p0, t1, p1, target):
    """The training loop's rule, written out: linear in log-ppl between the two evaluations."""
    return t0 + (t1 - t0) * (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(p1))


@pytest.fixture
def fixed(tmp_path):
    root = tmp_path / "runs"
    fixed_run(root, "fp8", 1, [100.0, 60.0, 40.0, 30.0, 25.0])
    fixed_run(root, "fp8", 2, [110.0, 70.0, 45.0, 32.0, 26.0])
    fixed_run(root, "wgrad", 1, [120.0, 80.0, 55.0, 45.0, 38.0])  # T = 50 between 3000 (55) and 4000 (45)
    fixed_run(root, "wgrad", 2, [130.0, 90.0, 70.0, 60.0, 52.0])  # ends above 50: not reached
    fixed_run(root, "dgrad", 1, [45.0, 30.0, 25.0, 24.0, 23.0])   # crosses at the first evaluation
    fixed_run(root, "dgrad", 2, [100.0, 60.0, 48.0, 40.0, 35.0], status="diverged", diverged_at=3000)
    fixed_run(root, "fprop", 1, [100.0, 60.0, 55.0, 52.0, 51.0], status="diverged", diverged_at=4500)
    fixed_run(root, "fprop", 2, [100.0, 55.0, 51.0, 49.0, 30.0], status="diverged", diverged_at=4000)
    return root


def test_posthoc_tokens_to_target_interpolate_exactly_as_training(fixed, tmp_path):
    rep = make_report(fixed, out_dir=tmp_path / "rep", profiles=(), target_ppl=50)
    runs = rep.runs.set_index("run")
    by = {(r.ladder, r.seed): r for r in runs.itertuples()}
    assert by["fp8", 1].tokens_to_target == pytest.approx(crossing(2000, 60, 3000, 40, 50), rel=1e-12)
    assert by["fp8", 2].tokens_to_target == pytest.approx(crossing(2000, 70, 3000, 45, 50), rel=1e-12)
    assert by["wgrad", 1].tokens_to_target == pytest.approx(crossing(3000, 55, 4000, 45, 50), rel=1e-12)
    assert by["wgrad", 2].status == "not_reached" and math.isnan(by["wgrad", 2].tokens_to_target)
    # Before the first evaluation the loop interpolates from (0 tokens, vocabulary size).
    assert by["dgrad", 1].tokens_to_target == pytest.approx(crossing(0, 512, 1000, 45, 50), rel=1e-12)
    # Diverged at 3000 tokens: the 48 logged there is the evaluation that diverged, never a crossing.
    assert by["dgrad", 2].status == "diverged"
    # fprop 1 diverged at 4500 and stayed above 50 before it; fprop 2's 49 at 4000 is the evaluation that
    # diverged (and 30 came after it): neither crossed, both stay diverged.
    assert by["fprop", 1].status == "diverged" and by["fprop", 2].status == "diverged"
    assert set(runs.target_ppl) == {50.0} and runs.target_posthoc.all()
    wg = rep.table.set_index("label").loc["wgrad (mxfp4)"]
    assert wg.cost_mean == pytest.approx(crossing(3000, 55, 4000, 45, 50) / crossing(2000, 60, 3000, 40, 50) - 1)
    assert wg.n_reached == 1 and wg.n_not_reached == 1
    # Labelled as post-hoc where the table is read, and recorded where it is machine-read.
    assert "target ppl=50 (post-hoc target" in rep.markdown and "`--target-ppl 50`" in rep.markdown
    with open(tmp_path / "rep" / "table.csv") as f:
        assert {r["target_source"] for r in csv.DictReader(f)} == {"post-hoc"}
    prov = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert prov["posthoc_target"]["argument"] == "50"
    assert prov["posthoc_target"]["targets"][0]["target_ppl"] == 50.0
    assert all(r["target_posthoc"] for r in prov["runs"])
    assert "## Calibration runs" not in rep.markdown  # they are rows now


def test_a_diverged_run_that_crossed_first_is_reached(tmp_path):
    root = tmp_path / "runs"
    fixed_run(root, "fp8", 1, [100.0, 60.0, 40.0, 30.0, 25.0])
    fixed_run(root, "wgrad", 1, [100.0, 60.0, 45.0, 44.0, 90.0], status="diverged", diverged_at=5000)
    runs = make_report(root, out_dir=tmp_path / "rep", profiles=(), target_ppl=50).runs
    wg = runs[runs.ladder == "wgrad"].iloc[0]
    # A run trained to 50 would have stopped at the crossing, before it diverged.
    assert wg.status == "reached" and wg.tokens_to_target == pytest.approx(crossing(2000, 60, 3000, 45, 50))


def test_runs_trained_with_a_target_keep_theirs(fixed, tmp_path):
    for seed, fp8, wg in ((1, 1000, 1300), (2, 1200, 1500)):  # target 30 (test_report's default)
        write_run(fixed, "fp8", "none", seed, tokens=fp8)
        write_run(fixed, "wgrad", "none", seed, tokens=wg)
    with pytest.warns(TargetMismatchWarning):  # two targets of one model and data: said, never mixed
        rep = make_report(fixed, out_dir=tmp_path / "rep", profiles=(), target_ppl=50)
    trained = rep.runs[~rep.runs.target_posthoc.astype(bool)]
    assert len(trained) == 4 and set(trained.target_ppl) == {30.0}
    assert sorted(trained.tokens_to_target) == [1000, 1200, 1300, 1500]
    t30 = rep.table[rep.table.target_ppl == 30.0].set_index("label")
    assert t30.loc["wgrad (mxfp4)"].cost_mean == pytest.approx((0.30 + 0.25) / 2)
    assert not t30.target_posthoc.any() and rep.table[rep.table.target_ppl == 50.0].target_posthoc.all()
    titles = [l for l in rep.markdown.splitlines() if l.startswith("## model=")]
    assert len(titles) == 2 and sum("post-hoc" in t for t in titles) == 1
    assert "target ppl=30," in next(t for t in titles if "post-hoc" not in t)
    with open(tmp_path / "rep" / "table.csv") as f:
        assert {(r["target_ppl"], r["target_source"]) for r in csv.DictReader(f)} == {
            ("30.0", "trained"), ("50.0", "post-hoc")}


def test_calibrate_target_is_fp4_ablate_calibrates_rule(tmp_path):
    root = tmp_path / "runs"
    fixed_run(root, "fp8", 1, [100.0, 60.0, 40.0, 30.0, 25.0])
    fixed_run(root, "fp8", 2, [110.0, 70.0, 45.0, 32.0, 26.0])
    fixed_run(root, "wgrad", 1, [120.0, 80.0, 55.0, 45.0, 38.0])
    fixed_run(root, "wgrad", 2, [130.0, 90.0, 50.0, 40.0, 35.0])
    # F = 0.5 of 5000 tokens = 2500, halfway between 2000 and 3000 in log-ppl: sqrt(60 * 40), sqrt(70 * 45);
    # then the geometric mean over the two seeds, rounded to 2 decimals as calibrate prints it.
    expected = round(math.exp((math.log(math.sqrt(60 * 40)) + math.log(math.sqrt(70 * 45))) / 2), 2)
    assert expected == 52.44  # (60 * 40 * 70 * 45) ** 0.25 = 52.436
    assert calibrate(root, 0.5)["target_ppl"] == expected  # the command's own answer
    rep = make_report(root, out_dir=tmp_path / "rep", profiles=(), target_ppl="calibrate:0.5")
    assert set(rep.runs.target_ppl) == {expected}
    fp8_1 = rep.runs[(rep.runs.ladder == "fp8") & (rep.runs.seed == 1)].iloc[0]
    assert fp8_1.tokens_to_target == pytest.approx(crossing(2000, 60, 3000, 40, expected))
    assert f"ppl {expected:g}: `fp4-ablate calibrate --fraction 0.5`'s rule" in rep.markdown
    assert f"target ppl={expected:g} (post-hoc target" in rep.markdown
    # Default fraction 0.7: 3500 tokens, halfway between 3000 and 4000.
    default = round(math.exp((math.log(math.sqrt(40 * 30)) + math.log(math.sqrt(45 * 32))) / 2), 2)
    assert default == 36.26  # (40 * 30 * 45 * 32) ** 0.25 = 36.256
    rep = make_report(root, out_dir=tmp_path / "rep2", profiles=(), target_ppl="calibrate")
    assert set(rep.runs.target_ppl) == {default} and default == calibrate(root, 0.7)["target_ppl"]
    prov = json.loads((tmp_path / "rep2" / "report.json").read_text())["posthoc_target"]
    assert prov["argument"] == "calibrate:0.7" and prov["targets"][0]["fraction"] == 0.7
    assert len(prov["targets"][0]["fp8_ppl"]) == 2


def test_calibrate_without_fp8_runs_is_a_clear_error(tmp_path, capsys):
    root = tmp_path / "runs"
    fixed_run(root, "wgrad", 1, [120.0, 80.0, 55.0, 45.0, 38.0])
    with pytest.raises(ReportError, match="has no FP8 run"):
        make_report(root, out_dir=tmp_path / "rep", profiles=(), target_ppl="calibrate")
    assert report_main([str(root), "--out", str(tmp_path / "rep"), "--target-ppl", "calibrate"]) == 2
    assert "has no FP8 run" in capsys.readouterr().err and not (tmp_path / "rep").exists()


@pytest.mark.parametrize("bad", ["0", "-3", "abc", "nan", "inf", "", "calibrate:0", "calibrate:1.5",
                                 "calibrate:x", "calibrated"])
def test_bad_target_is_a_usage_error_before_any_file(fixed, tmp_path, capsys, bad):
    out = tmp_path / "rep"
    with pytest.raises(SystemExit) as e:
        report_main([str(fixed), "--out", str(out), "--target-ppl", bad])
    assert e.value.code == 2 and "--target-ppl" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["runs"]


def test_parse_target():
    assert parse_target("41.5").ppl == 41.5 and parse_target("41.5").fraction is None
    assert parse_target("calibrate").fraction == 0.7 and parse_target("calibrate:1").fraction == 1.0
    assert parse_target(" calibrate:0.25 ").describe() == "calibrate:0.25"


def test_the_rule_reproduces_every_crossing_the_committed_ladder_recorded():
    """The committed llama-20m runs trained to ppl 237.88: read back from their curves, the post-hoc
    rule gives the very tokens_to_target the training loop wrote (float equality), and no crossing for
    the one run that ran out of budget."""
    runs, _ = load_runs(LADDER_RUNS)
    vocab = json.loads((LADDER_RUNS / runs.run[0] / "data.json").read_text())["tokenizer"]["vocab_size"]
    reached = runs[runs.status == "reached"]
    assert len(reached) == 39
    for r in reached.itertuples():
        assert first_crossing(r.curve, r.target_ppl, lambda: vocab) == r.tokens_to_target, r.run
    (miss,) = runs[runs.status == "not_reached"].itertuples()
    assert first_crossing(miss.curve, miss.target_ppl, lambda: vocab) is None
