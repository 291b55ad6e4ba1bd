"""experiments/diagnostics: the metrics against hand-computed cases, the collector, diagnose, training."""
import math

import pytest
import torch

from fp4.quantize import quantize_operand
from fp4.recipe import OperandSpec
from fp4_experiments.diagnostics.metrics import (ErrorConsistency, block_scales, coherence, operand_metrics,
                                                  output_metrics, step_correlation)


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
