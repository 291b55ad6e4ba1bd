"""`hardware.compile=true`: the runner compiles each decoder layer (experiments/training/compile.py).

With the aot_eager backend (traced forward and backward, run op by op) a compiled run must train the
same bits as the eager run, for every kind of recipe; the run records what compiling cost. Inductor
needs a C++ toolchain on the CPU and fuses the unquantized ops (other rounding), so it is exercised
by the GPU bench, not here.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def _losses(run_dir: Path):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


@pytest.mark.parametrize("cell", ["wgrad_sr", "fp8"])
def test_compiled_run_trains_the_eager_bits(cell, compose, tiny, tmp_path):
    from fp4_experiments.rundir import run_dir_for
    from fp4_experiments.runner import run_experiment
    from fp4_experiments.training.compile import reset_compiler

    extra = [f"+ablation={cell}", "model.num_layers=2"]
    eager_cfg = compose(tiny(*extra, results=tmp_path / "eager"))
    compiled_cfg = compose(tiny(*extra, "hardware.compile=true", "hardware.compile_backend=aot_eager",
                                results=tmp_path / "compiled"))
    eager = run_experiment(eager_cfg)
    reset_compiler()
    compiled = run_experiment(compiled_cfg)
    assert eager["status"] == compiled["status"] == "completed"
    assert eager["run_key"] == compiled["run_key"]  # hardware is not part of the experiment
    assert _losses(run_dir_for(eager_cfg)) == _losses(run_dir_for(compiled_cfg))
    assert eager["compile"] is None
    report = compiled["compile"]
    assert report["backend"] == "aot_eager" and report["graph_breaks"] == 0
    # One graph for both decoder layers in training, one more for the no_grad evaluation (and
    # perhaps one with a dynamic size): not one per layer.
    assert 1 <= report["graphs"] <= 3 and report["compile_s"] >= 0


def test_unknown_compile_backend_is_refused_before_any_work(compose, tiny, tmp_path):
    from hydra.errors import ConfigCompositionException
    with pytest.raises(ConfigCompositionException) as err:
        compose(tiny("hardware.compile_backend=tensorrt", results=tmp_path / "r"))
    text = f"{err.value} {err.value.__cause__}"
    assert "hardware.compile_backend=tensorrt" in text and "inductor, aot_eager, eager" in text
    assert not (tmp_path / "r").exists()
