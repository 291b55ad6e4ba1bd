"""The in-training hook: `diagnostics.every_steps=N` probes every N-th optimizer step.

The probed step is an ordinary training step with the fp4 probe (fp4/probe.py) installed on the
model's QuantState: the probe only reads the GEMMs' tensors, so the run trains the same bits as
without diagnostics (tests/experiments/test_diagnostics.py checks it), and the diagnostics cost time
only on probed steps. For each quantized GEMM of the selected layers (`diagnostics.layers`) one record

    {"kind": "gemm", "step": S, "layer", "layer_index", "gemm", "call", "path",
     "<operand>.<metric>" ..., "out.cos", "out.rel_err", "out.bias"}

is appended to diagnostics.jsonl in the run directory; S counts optimizer steps from 1 as
metrics.jsonl does (the record is written once step S is done). On resume the file is cut back to
the checkpoint's step, like metrics.jsonl (rundir.MetricsWriter). The bf16 recipe has no quantized
GEMM (it runs F.linear): its runs write an empty file. Error consistency across steps is not
computed here (it would hold a copy of every weight gradient between probes); `fp4-ablate diagnose`
measures it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

from ..rundir import MetricsWriter
from .collect import Collector

DIAGNOSTICS = "diagnostics.jsonl"


class TrainingDiagnostics:
    def __init__(self, diag_cfg, quant_state, run_dir: Path, start_step: int):
        every = getattr(diag_cfg, "every_steps", None) if diag_cfg is not None else None
        self.every = int(every or 0)
        layers = getattr(diag_cfg, "layers", None) if diag_cfg is not None else None
        self.layers = list(layers) if layers else None
        self.quant_state = quant_state
        self.writer: Optional[MetricsWriter] = None
        if self.every > 0:
            self.writer = MetricsWriter(Path(run_dir) / DIAGNOSTICS,
                                        truncate_after_step=start_step if start_step else None)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    @contextlib.contextmanager
    def observe(self, loop) -> Iterator[None]:
        """Wrap one optimizer step (the one that makes loop.step + 1); probes it if it is due."""
        step = loop.step + 1
        if not self.due(step):
            yield
            return
        collector = Collector(self.layers)
        with self.quant_state.probe_gemms(collector):
            yield
        for rec in collector.take():
            self.writer.write({"kind": "gemm", **rec, "step": step})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
