"""Format is a varied key of an experiment, and irrelevant to the rungs without an FP4 GEMM.

The premise, proven on real (tiny, CPU) runs: the FP8 rung of format=mxfp4, nvfp4, ufp4 and
ufp4_e2m1 trains the same numbers, because a format node changes an FP8 GEMM only through
format.fp8_forward / fp8_backward (fp4/recipe.py: the FP4 element, scales, built-in SR and
Hadamard are built in `_fp4_gemm`, reached only for the rung's FP4 GEMMs).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fp4_experiments.report.runs import load_runs
from fp4_experiments.rundir import run_dir_for
from fp4_experiments.runner import run_experiment

TIMING = {"tokens_per_s", "step_time_s"}
FORMATS = ("mxfp4", "nvfp4", "ufp4", "ufp4_e2m1")


def _metrics(run_dir: Path):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


@pytest.mark.parametrize("ladder", ("fp8", "bf16"))
def test_rungs_without_fp4_gemms_train_the_same_numbers_in_every_format(ladder, tiny, compose):
    dirs = {}
    for fmt in FORMATS:
        cfg = compose(tiny(f"+ladder={ladder}", f"format={fmt}", "train.max_tokens=1024",
                           "train.eval_every_tokens=512"))
        s = run_experiment(cfg)
        assert s["status"] == "completed" and s["format"] == fmt
        dirs[fmt] = run_dir_for(cfg)
    assert len({d.name for d in dirs.values()}) == len(FORMATS)  # four run keys, four directories
    ref = _metrics(dirs["mxfp4"])
    assert any(r["kind"] == "eval" for r in ref) and any(r["kind"] == "train" for r in ref)
    for fmt in FORMATS[1:]:
        assert _metrics(dirs[fmt]) == ref, fmt
    # So the report counts them as one cell: one experiment group, duplicates of one seed.
    runs, issues = load_runs(next(iter(dirs.values())).parent, include_completed=True)
    assert len(runs) == 1 and runs.group_id.nunique() == 1
    assert len(issues) == len(FORMATS) - 1 and all("duplicate of" in i.problem for i in issues)
    assert all("format.name" in i.problem for i in issues)  # the config differs there, and says so


def test_fp4_rung_does_change_with_the_format(tiny, compose):
    # The control: the same comparison on the wgrad rung must see a difference, or the test above
    # could pass on a format override that never reached the recipe.
    a, b = (compose(tiny("+ladder=wgrad", f"format={fmt}", "train.max_tokens=1024",
                         "train.eval_every_tokens=512")) for fmt in ("mxfp4", "nvfp4"))
    run_experiment(a), run_experiment(b)
    assert _metrics(run_dir_for(a)) != _metrics(run_dir_for(b))
