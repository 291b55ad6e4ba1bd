"""The in-training hook: `diagnostics.every_steps=N` probes every N-th optimizer step, and from it a
window of `diagnostics.window=k` consecutive steps for error consistency.

Probed steps are ordinary training steps with an fp4 probe (fp4/probe.py) installed on the model's
QuantState: a probe only reads the GEMMs' tensors and draws no random number, so the run trains the
same bits as without diagnostics (tests/experiments/test_diagnostics*.py check it, windows included),
and the diagnostics cost time only on probed steps. Two kinds of record go to diagnostics.jsonl in the
run directory (S counts optimizer steps from 1 as metrics.jsonl does; a record is written once its
step is done):

* at every step S = N, 2N, ...: for each quantized GEMM of the selected layers (`diagnostics.layers`)

      {"kind": "gemm", "step": S, "layer", "layer_index", "gemm", "call", "path",
       "<operand>.<metric>" ..., "out.cos", "out.rel_err", "out.bias"}

* with k > 0, the window S .. S + k - 1 (k <= N: windows never overlap): per (GEMM, layer) one
  {"kind": "consistency", "step": S + k - 1, "first_step": S, "last_step", ...} record with the
  step-to-step correlation and the coherence ||sum e_t|| / sum ||e_t|| of the Wgrad output error and
  of the Fprop and Dgrad weight-operand errors (consistency.py says why these and not the Fprop /
  Dgrad outputs). Steps S + 1 .. S + k - 1 run the consistency probe alone (the exact float64 Wgrad
  product and the weight-operand errors; no operand metrics).

Cost. Memory, during a window only: per selected layer and GEMM a float32 running sum and the
previous step's error, each the size of the layer's weight, plus the open step's accumulator: 3 x 3
x 4 bytes = 36 bytes per weight element at most (the window's ErrorConsistency; everything is freed
once the window's records are written), plus float64 temporaries for one tensor at a time.
`diagnostics.layers` bounds it on a large model. Time on the CPU demo (2 cores, `fp4-ablate run
+ladder=wgrad +stabilizer=h16 +diagnostics=on`, measured): a probed step ~2.2-2.6x a plain one, a
window's later steps ~1.4x (about two thirds of that is fp4's probe recomputing the Hadamard
transform of Wgrad's operands for `quantized_from`, which these steps do not read); at every_steps=50,
window=4: 4.6-5.7% of the optimizer steps' time, 2-3% of the run's wall time.

Resume. diagnostics.jsonl is cut back to the checkpoint's step like metrics.jsonl
(rundir.MetricsWriter); a consistency record carries its window's last step, so a window that had
not ended by the checkpoint loses any record it wrote after it. The resumed run does not reopen such a
window (its first steps' errors are gone: only steps S = N, 2N, ... open one), so it is dropped, never
written from part of its steps; a window is likewise dropped when training stops inside it. Under data
parallelism only rank 0 probes, its own micro-batches. The bf16 recipe has no quantized GEMM (it runs
F.linear): its runs write an empty file.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, List, Optional

from ..rundir import MetricsWriter
from .collect import Collector, layer_selector
from .consistency import ConsistencyProbe, Window

DIAGNOSTICS = "diagnostics.jsonl"
# A published finished run may hold it gzipped (`gzip -9 <run>/diagnostics.jsonl`: ~6x smaller, so a
# results folder of many runs stays small enough to travel with the repo); readers take either.
DIAGNOSTICS_GZ = DIAGNOSTICS + ".gz"


def _all(probes):
    """One probe callback running each of `probes` in turn (the first one computes the exact product
    the others then find cached on the observation)."""
    def probe(obs) -> None:
        for p in probes:
            p(obs)
    return probe


class TrainingDiagnostics:
    def __init__(self, diag_cfg, quant_state, run_dir: Path, start_step: int):
        every = getattr(diag_cfg, "every_steps", None) if diag_cfg is not None else None
        self.every = int(every or 0)
        self.k = int(getattr(diag_cfg, "window", 0) or 0) if self.every > 0 else 0
        layers = getattr(diag_cfg, "layers", None) if diag_cfg is not None else None
        self.layers = list(layers) if layers else None
        self.quant_state = quant_state
        self.window: Optional[Window] = None
        self.writer: Optional[MetricsWriter] = None
        if self.every > 0:
            self.writer = MetricsWriter(Path(run_dir) / DIAGNOSTICS,
                                        truncate_after_step=start_step if start_step else None)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def _window_at(self, step: int) -> Optional[Window]:
        """The window step `step` belongs to: the open one if it expects this step, a new one at a
        due step; None otherwise (a window that missed a step is dropped, not mended)."""
        if self.window is not None and self.window.next_step != step:
            self.window = None
        if self.window is None and self.k and self.due(step):
            self.window = Window(step, self.k)
        return self.window

    @contextlib.contextmanager
    def observe(self, loop) -> Iterator[None]:
        """Wrap one optimizer step (the one that makes loop.step + 1); probes it if it is due or in a
        consistency window."""
        step = loop.step + 1
        collector = Collector(self.layers) if self.due(step) else None
        window = self._window_at(step)
        probes: List = [p for p in (collector,) if p is not None]
        if window is not None:
            probes.append(ConsistencyProbe(window.tracker, layer_selector(self.layers)))
        if not probes:
            yield
            return
        with self.quant_state.probe_gemms(_all(probes)):
            yield
        if collector is not None:
            for rec in collector.take():
                self.writer.write({"kind": "gemm", **rec, "step": step})
        if window is not None and window.end_step(step):
            for rec in window.records():
                self.writer.write(rec)
            self.window = None  # frees the window's tensors

    def close(self) -> None:
        self.window = None  # a window still open when training stops is dropped
        if self.writer is not None:
            self.writer.close()
