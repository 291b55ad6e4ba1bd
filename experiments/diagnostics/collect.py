"""The probe callback of the diagnostics: one flat record per observed GEMM, plus error consistency.

`Collector(layers=...)` is an fp4 probe (fp4/probe.py): install it with
`quant_state.probe_gemms(collector)`. For each GEMM of a selected layer it appends a record

    {"step", "layer", "layer_index", "gemm", "call", "path",
     "<operand>.<metric>" for both operands (operand metrics, experiments/diagnostics/metrics.py),
     "out.cos", "out.rel_err", "out.bias"}

With `consistency=True` it also feeds an ErrorConsistency (float64) with the errors that are
comparable across steps (consistency.feed): per (GEMM, layer, layer_index) the Wgrad
output error dW - dW* and the Fprop and Dgrad weight-operand errors W_eff - W; call `end_step()`
after each optimizer step. (`fp4-ablate diagnose` uses it so; training uses consistency.Window.)
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch

from .consistency import feed as feed_consistency
from .metrics import (ErrorConsistency, e8m0_histogram, host_floats, operand_from_sums, operand_sums,
                      output_from_sums, output_sums)

OPERAND_KEYS = ("rel_err", "sqnr_db", "bias", "flushed", "clipped", "log2_scale_min", "log2_scale_median",
                "log2_scale_max")
OUTPUT_KEYS = ("cos", "rel_err", "bias")


def layer_selector(layers: Optional[Sequence[Union[str, int]]]):
    """None / empty: every layer. Else a layer is selected when its layer_index is one of the ints
    or its qualified name contains one of the strings (e.g. "mlp", "layers.0.", "q_proj")."""
    if not layers:
        return lambda name, index: True
    indices = {int(v) for v in layers if isinstance(v, int) or (isinstance(v, str) and v.isdigit())}
    parts = [str(v) for v in layers if not (isinstance(v, int) or (isinstance(v, str) and v.isdigit()))]
    return lambda name, index: index in indices or any(p in name for p in parts)


class Collector:
    def __init__(self, layers: Optional[Sequence[Union[str, int]]] = None, consistency: bool = False,
                 e8m0_hist: bool = False):
        self.selected = layer_selector(layers)
        self._pending: List[tuple] = []  # (record, {operand or "out": sums}) until take()
        self.consistency = ErrorConsistency() if consistency else None
        self.e8m0_hist = e8m0_hist

    def __call__(self, obs) -> None:
        if not self.selected(obs.layer, obs.layer_index):
            return
        rec: Dict[str, object] = {"step": obs.step, "layer": obs.layer, "layer_index": obs.layer_index,
                                  "gemm": obs.gemm, "call": obs.call, "path": obs.path}
        # Sums only (device tensors, no sync): take() turns every pending record into numbers at once.
        sums: Dict[str, dict] = {}
        ops = (obs.spec.a, obs.spec.b)
        for name, x, q, op, axis in zip(obs.operands, obs.quantized_from, obs.quantized, ops, obs.axes):
            sums[name] = operand_sums(x, q, op, axis)
            if self.e8m0_hist:
                hist = e8m0_histogram(x, op, axis)
                if hist is not None:
                    rec[f"{name}.e8m0_hist"] = hist
        sums["out"] = output_sums(obs.output, obs.exact())
        if self.consistency is not None:
            feed_consistency(self.consistency, obs)
        self._pending.append((rec, sums))

    def end_step(self) -> None:
        if self.consistency is not None:
            self.consistency.end_step()

    def take(self) -> List[Dict[str, object]]:
        """The records since the last take, their metrics moved to the host in one transfer."""
        pending, self._pending = self._pending, []
        flat = [t for _, sums in pending for d in sums.values() for t in d.values() if isinstance(t, torch.Tensor)]
        values = iter(host_floats(flat))
        records = []
        for rec, sums in pending:
            host = {name: {k: next(values) if isinstance(v, torch.Tensor) else v for k, v in d.items()}
                    for name, d in sums.items()}
            for name, d in host.items():
                if name == "out":
                    rec.update({f"out.{k}": v for k, v in output_from_sums(d).items()})
                else:
                    m = operand_from_sums(d)
                    rec.update({f"{name}.{key}": m[key] for key in OPERAND_KEYS})
            records.append(rec)
        return records


def mean_by(records: Sequence[Dict[str, object]], keys: Sequence[str]) -> List[Dict[str, object]]:
    """Group records by `keys` and average every numeric column (None values skipped), in first-seen
    order; each row gets n = the number of records averaged."""
    groups: Dict[tuple, List[Dict[str, object]]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    rows = []
    for group, recs in groups.items():
        row: Dict[str, object] = dict(zip(keys, group))
        columns = [c for c in recs[0] if c not in keys]
        for c in columns:
            values = [r.get(c) for r in recs if isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)]
            if values and c not in ("step", "layer_index", "call"):
                row[c] = sum(values) / len(values)
            elif c == "path":
                row[c] = recs[0][c]
        row["n"] = len(recs)
        rows.append(row)
    return rows
