"""experiments/diagnostics: the metrics against hand-computed cases, the collector, diagnose, training."""
import math

import pytest
import torch

from fp4.quantize import quantize_operand
from fp4.recipe import OperandSpec
from fp4_experiments.diagnostics.metrics import (ErrorConsistency, block_scales, coherence, operand_metrics,
                                                  output_metrics, step_correlation)
from cli_support import train_records


def _block():
    # One MXFP4 block of 32: amax 7.9 -> floor scale 2^(floor(log2 7.9) - 2) = 2^0, so 7.9 clips to 6;
    # 30 values 1.25 round (ties to even) to 1.0; 0.2 is below half the smallest step 0.5: flushed.
    x = torch.tensor([[7.9] + [1.25] * 30 + [0.2]])
    return x


def test_operand_metrics_hand_computed_block():
    x = _block()
    op = OperandSpec("mxfp4", scale_mode="floor")
    q, scale = quantize_operand(x, "mxfp4", -1, scale_mode="floor")
    assert scale is None
    assert q.tolist() == [[6.0] + [1.0] * 30 + [0.0]]
    m = operand_metrics(x, q, op, -1)
    xx = 7.9 ** 2 + 30 * 1.25 ** 2 + 0.2 ** 2
    xq = 7.9 * 6 + 30 * 1.25
    ee = 1.9 ** 2 + 30 * 0.25 ** 2 + 0.2 ** 2
    assert m["bias"] == pytest.approx(xq / xx - 1, rel=1e-6)   # -0.223: shrinkage
    assert m["bias"] < -0.2
    assert m["rel_err"] == pytest.approx(math.sqrt(ee / xx), rel=1e-6)
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(xx / ee), rel=1e-6)
    assert m["flushed"] == pytest.approx(1 / 32)
    assert m["clipped"] == pytest.approx(1 / 32)               # only 7.9 > 6 * 2^0
    assert m["log2_scale_min"] == m["log2_scale_max"] == 0.0
    assert m["e8m0_hist"] == {0: 1}
    # rceil picks 2^1 (6 * 2 >= 7.9): nothing clips, and the scale summary says e = 1.
    op_r = OperandSpec("mxfp4", scale_mode="rceil")
    q_r, _ = quantize_operand(x, "mxfp4", -1, scale_mode="rceil")
    m_r = operand_metrics(x, q_r, op_r, -1)
    assert m_r["clipped"] == 0.0 and m_r["e8m0_hist"] == {1: 1}
    # A high-precision operand: no scale entries; an exact copy: zero error, no SQNR (infinite).
    m_hp = operand_metrics(x, x.clone(), OperandSpec(None), -1)
    assert m_hp["rel_err"] == 0.0 and m_hp["sqnr_db"] is None and m_hp["clipped"] is None


def test_block_scales_match_the_quantizer_for_every_format():
    torch.manual_seed(0)
    x = torch.randn(48, 64) * torch.logspace(-2, 2, 64)
    for op in (OperandSpec("mxfp4"), OperandSpec("nvfp4"), OperandSpec("nvfp4", block_2d=True),
               OperandSpec("e4m3"), OperandSpec("e1m2", scale_mode="fp32"), OperandSpec("int4")):
        for axis in (0, -1):
            q, ts = quantize_operand(x, op.fmt, axis, scale_mode=op.scale_mode, block_2d=op.block_2d)
            q = q.double() * (ts.double() if ts is not None else 1.0)
            s, _ = block_scales(x, op, axis)
            code = q / s
            # Every quantized value is (element grid value) x (the recomputed scale of its block).
            from fp4_experiments.diagnostics.metrics import _element_max
            assert bool((code.abs() <= _element_max(op.fmt) * (1 + 1e-6)).all()), (op, axis)
            m = operand_metrics(x, q, op, axis)
            assert 0 < m["rel_err"] < 0.3 and m["clipped"] >= 0.0


def test_output_metrics_hand_computed():
    y_exact = torch.tensor([3.0, 4.0])
    m = output_metrics(0.9 * y_exact, y_exact)  # pure shrinkage by 10%
    assert m["cos"] == pytest.approx(1.0)
    assert m["rel_err"] == pytest.approx(0.1)
    assert m["bias"] == pytest.approx(-0.1)
    m = output_metrics(torch.tensor([3.0, 4.0]) + torch.tensor([4.0, -3.0]) * 0.5, y_exact)  # orthogonal error
    assert m["bias"] == pytest.approx(0.0, abs=1e-12)
    assert m["rel_err"] == pytest.approx(0.5)
    assert m["cos"] == pytest.approx(1 / math.sqrt(1.25))


def test_consistency_identical_and_independent_errors():
    torch.manual_seed(0)
    e = torch.randn(64, 64)
    assert coherence([e] * 8) == pytest.approx(1.0)
    assert step_correlation(e, e) == pytest.approx(1.0)
    k, n = 16, 64 * 64
    errors = [torch.randn(n) for _ in range(k)]
    # Independent errors: ||sum|| ~ sqrt(k) ||e||, so coherence ~ 1/sqrt(k) = 0.25; with 4096 elements
    # its relative spread is ~1/sqrt(2n) ~ 1%: a 5% tolerance.
    assert coherence(errors) == pytest.approx(1 / math.sqrt(k), rel=0.05)
    assert abs(step_correlation(errors[0], errors[1])) < 0.06  # ~N(0, 1/sqrt(n)) = 0.016
    tracker = ErrorConsistency()
    for t, err in enumerate(errors):
        half = err / 2
        tracker.add("k", half)
        tracker.add("k", half)   # two micro-batches: the step's error is their sum
        tracker.end_step()
    assert tracker.steps("k") == k
    assert tracker.coherence("k") == pytest.approx(coherence(errors), rel=1e-9)
    assert abs(tracker.step_corr("k")) < 0.03
    same = ErrorConsistency()
    for _ in range(4):
        same.add("w", e)
        same.end_step()
    assert same.coherence("w") == pytest.approx(1.0) and same.step_corr("w") == pytest.approx(1.0)


# ---------------------------------------------------------------- training, diagnose, report

def test_training_diagnostics_observe_only_and_write_jsonl(tiny, compose, tmp_path):
    import json
    from pathlib import Path
    from fp4_experiments.runner import run_experiment
    from fp4_experiments.rundir import run_key
    plain = compose(tiny("+ladder=wgrad", "+stabilizer=sr", results=tmp_path / "a"))
    probed = compose(tiny("+ladder=wgrad", "+stabilizer=sr", "diagnostics.every_steps=3", "diagnostics.window=2",
                          "diagnostics.layers=[mlp]", results=tmp_path / "b"))
    assert run_key(plain) == run_key(probed)  # diagnostics is not an experiment key
    sa, sb = run_experiment(plain), run_experiment(probed)
    da, db = next(Path(tmp_path / "a").iterdir()), next(Path(tmp_path / "b").iterdir())
    # Bit for bit the same training (losses, gradient norms, validation losses).
    assert train_records(da) == train_records(db)
    assert sa["best_ppl"] == sb["best_ppl"] and sa["steps"] == sb["steps"] == 10
    assert not (da / "diagnostics.jsonl").exists()
    recs = [json.loads(l) for l in (db / "diagnostics.jsonl").read_text().splitlines()]
    windows = [r for r in recs if r["kind"] == "consistency"]
    recs = [r for r in recs if r["kind"] == "gemm"]
    assert sorted({r["step"] for r in recs}) == [3, 6, 9]
    # Windows 3..4, 6..7, 9..10 (the SR noise of the window's later steps is drawn as without the probe).
    assert sorted({(r["first_step"], r["step"]) for r in windows}) == [(3, 4), (6, 7), (9, 10)]
    assert len(windows) == 3 * 3 * 3 and {r["layer"] for r in windows} == {r["layer"] for r in recs}
    # layers=[mlp]: gate/up/down of the one layer, three GEMMs each, once per step (no accumulation).
    assert {r["layer"] for r in recs} == {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                          "model.layers.0.mlp.down_proj"}
    assert len(recs) == 3 * 3 * 3
    for r in recs:
        assert 0 < r["out.rel_err"] < 1 and 0.5 < r["out.cos"] <= 1
        a, b = {"fprop": ("x", "w"), "dgrad": ("dy", "w"), "wgrad": ("dy", "x")}[r["gemm"]]
        assert r[f"{a}.rel_err"] > 0 and r[f"{b}.clipped"] is not None


def test_training_diagnostics_cut_back_on_resume(tmp_path):
    import json
    from types import SimpleNamespace
    from fp4.linear import QuantState
    from fp4_experiments.diagnostics.training import DIAGNOSTICS, TrainingDiagnostics
    path = tmp_path / DIAGNOSTICS
    # A consistency record carries its window's last step: the window 4..5 ended after the checkpoint.
    path.write_text("".join(json.dumps({"kind": "gemm", "step": s}) + "\n" for s in (2, 4, 6)) +
                    "".join(json.dumps({"kind": "consistency", "first_step": f, "step": f + 1}) + "\n" for f in (2, 4)))
    cfg = SimpleNamespace(every_steps=2, window=2, layers=None)
    hook = TrainingDiagnostics(cfg, QuantState(), tmp_path, start_step=4)  # resumed at step 4
    hook.close()
    assert [(json.loads(l)["kind"], json.loads(l)["step"]) for l in path.read_text().splitlines()] == [
        ("gemm", 2), ("gemm", 4), ("consistency", 3)]
    assert not TrainingDiagnostics(SimpleNamespace(every_steps=None, layers=None), QuantState(), tmp_path, 0).due(2)
    TrainingDiagnostics(cfg, QuantState(), tmp_path, start_step=0).close()  # a fresh run starts over
    assert path.read_text() == ""


def test_report_has_a_diagnostics_section(tiny, compose, tmp_path):
    from fp4_experiments.report import make_report
    from fp4_experiments.runner import run_experiment
    results = tmp_path / "runs"
    for extra in ((), ("+ladder=wgrad", "diagnostics.every_steps=2"),
                  ("+ladder=wgrad", "+stabilizer=rht", "diagnostics.every_steps=2")):
        run_experiment(compose(tiny(*extra, "diagnostics.window=2", "train.target_ppl=1e9", results=results)))
    report = make_report(results, tmp_path / "report", profiles=())
    text = report.markdown
    assert "## GEMM quantization diagnostics" in text
    per_gemm = text.split("### Per GEMM", 1)[1].split("###", 1)[0]
    rows = [l for l in per_gemm.splitlines() if l.startswith("| wgrad/")]
    assert len(rows) == 6  # 2 configurations x 3 GEMMs; the fp8 run has no diagnostics
    assert (tmp_path / "report" / "diagnostics.csv").exists() and (tmp_path / "report" / "diagnostics.png").exists()
    # Published runs hold their diagnostics gzipped: the same section, byte for byte.
    import gzip
    for plain in results.glob("*/diagnostics.jsonl"):
        plain.with_name(plain.name + ".gz").write_bytes(gzip.compress(plain.read_bytes()))
        plain.unlink()
    again = make_report(results, tmp_path / "report-gz", profiles=()).markdown
    section = lambda t: t.split("## GEMM quantization diagnostics", 1)[1].split("\n## ", 1)[0]
    assert section(again) == section(text)
    assert (tmp_path / "report-gz" / "diagnostics.csv").read_bytes() == (tmp_path / "report" / "diagnostics.csv").read_bytes()


def test_diagnose_end_to_end_on_the_demo_model(tmp_path, cache_dir):
    """`fp4-ablate diagnose` through the CLI entry point on the demo model (one layer), CPU."""
    import csv
    import time
    from fp4_ablate.main import main
    out = tmp_path / "diag"
    t0 = time.perf_counter()
    code = main(["diagnose", "--configs", "fp8,wgrad,wgrad_sr,wgrad_h16", "--steps", "3", "--out", str(out),
                 "hardware=cpu", "model.num_layers=1", "train.batch_size=4", f"cache_dir={cache_dir}"])
    assert code == 0
    assert time.perf_counter() - t0 < 60
    for f in ("diagnose.md", "diagnose_gemms.csv", "diagnose_configs.csv", "diagnose.json", "diagnose.png"):
        assert (out / f).stat().st_size > 0, f
    gemms = list(csv.DictReader(open(out / "diagnose_gemms.csv")))
    assert [(r["config"], r["gemm"]) for r in gemms] == [
        (c, g) for c in ("fp8", "wgrad", "wgrad_sr", "wgrad_h16") for g in ("fprop", "dgrad", "wgrad")]
    by = {(r["config"], r["gemm"]): r for r in gemms}
    # FP4 Wgrad is far less accurate than FP8 Wgrad on the same weights and batches.
    assert float(by["wgrad", "wgrad"]["out.rel_err"]) > 1.5 * float(by["fp8", "wgrad"]["out.rel_err"])
    assert by["wgrad", "wgrad"]["path"].startswith("fp4") and by["fp8", "wgrad"]["path"].startswith("fp8")
    # SR on dY: the dY operand of Wgrad loses its magnitude bias (unbiased rounding), RNE keeps one.
    assert abs(float(by["wgrad_sr", "wgrad"]["a.bias"])) < abs(float(by["wgrad", "wgrad"]["a.bias"]))
    configs = {r["config"]: r for r in csv.DictReader(open(out / "diagnose_configs.csv"))}
    assert set(configs) == {"fp8", "wgrad", "wgrad_sr", "wgrad_h16"}
    for r in configs.values():
        assert 0 < float(r["weight_drift"]) and 0 < float(r["dW_err_coherence"]) <= 1
    # More FP4 GEMMs: further from the exact-gradient trajectory than FP8.
    assert float(configs["wgrad"]["weight_drift"]) > float(configs["fp8"]["weight_drift"])


def test_probed_gemms_and_windows_never_sync_until_the_records_are_taken(monkeypatch):
    """A probed step computes every metric on the device and moves them to the host in one transfer
    (Collector.take, ErrorConsistency.results): on a GPU shared by many runs each host sync waits for
    the others' time slices (a sync per metric made a probed step 100x a plain one). Any sync inside
    the probe callbacks or the window's end_step fails here, also on the CPU."""
    from torch import nn
    from fp4.linear import QuantLinear, QuantState
    from fp4.recipe import Recipe
    from fp4_experiments.diagnostics.collect import Collector

    def refuse(*args, **kwargs):
        raise AssertionError("a host sync inside the probe")

    class Strict(Collector):
        def __call__(self, obs):
            with monkeypatch.context() as m:
                for name in ("item", "tolist", "cpu", "__float__", "__int__", "numpy"):
                    m.setattr(torch.Tensor, name, refuse)
                super().__call__(obs)

        def end_step(self):
            with monkeypatch.context() as m:
                for name in ("item", "tolist", "cpu", "__float__", "__int__", "numpy"):
                    m.setattr(torch.Tensor, name, refuse)
                super().end_step()

    for recipe in (Recipe("wgrad", "h16"), Recipe("fp8", "none"), Recipe("wgrad", "none", "nvfp4")):
        torch.manual_seed(0)
        state = QuantState(seed=3)
        model = nn.Sequential(QuantLinear(64, 96, recipe=recipe, state=state, layer_index=0, name="a"), nn.GELU(),
                              QuantLinear(96, 64, recipe=recipe, state=state, layer_index=1, name="b"))
        collector = Strict(consistency=True)
        for _ in range(3):
            with state.probe_gemms(collector):
                y = model(torch.randn(32, 64))
            y.square().mean().backward()
            collector.end_step()
            state.advance_step()
        records = collector.take()
        # 3 steps x (Fprop and Wgrad of both layers + Dgrad of the second: X of the first needs none)
        assert len(records) == 3 * 5 and all(isinstance(r["out.cos"], float) for r in records)
        results = collector.consistency.results()
        assert results and all(isinstance(coh, float) for corr, coh in results.values())
