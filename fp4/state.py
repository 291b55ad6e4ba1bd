"""Per-model state of the quantized linears: how GEMMs execute, where the step is, what was recorded.

Nothing here is process-wide. Two models built in one process with different settings each do what
they were built with, because every setting a GEMM reads travels with the model:

    ExecutionConfig   *how* the numerics are executed, never *what* they are: the quantization
                      backend (Triton kernels or the torch reference, bit-identical for RNE) and
                      whether FP8 GEMMs may run on FP8 tensor cores (torch._scaled_mm). Frozen, like
                      torchao's Float8LinearConfig carrying `emulate`.
    QuantState        shared by all QuantLinears of one model: seed, optimizer step, per-step call
                      counters, check_finite, the ExecutionConfig, and an optional GEMM recorder.

Reproducible randomness: every random draw (stochastic rounding, Hadamard signs) is seeded by
derive_seed(identity of the draw), a hash stable across processes and platforms, so a run resumed
at QuantState.step reproduces the same bits (fp4/linear.py lists the identities).

Random draws inside a CUDA graph. A replayed graph does not run the Python that seeds a fresh
generator per draw; its kernels read the state of the generators registered with it at capture.
`GeneratorPool` lists one step's draws in order (an uncaptured pass), then stands one persistent
generator in for each (the graph registers them) and, before every replay, seeds each as its draw's
fresh generator would be seeded at the new step: the replay then draws what the plain step draws.
QuantState.generator_pool is set only while a pass of the step is being listed, captured (or, in
the CPU tests, replayed); every other forward draws from fresh generators.

Recording. `record_gemms()` collects a GemmRecord per operand of every GEMM run inside the block,
for every model (a debugging aid); `state.record_gemms()` collects only that model's. Both are
observers: they never change what a GEMM computes. The process-wide sink is a plain module global
rather than a contextvars.ContextVar on purpose: autograd runs CUDA backward passes on its own
device threads, which do not see the caller's context variables, so a ContextVar would silently
drop the Dgrad / Wgrad records.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterator, List, Optional

import torch

from .names import QuantBackend, choices

__all__ = ["ExecutionConfig", "QuantState", "GemmRecord", "GeneratorPool", "record_gemms", "derive_seed",
           "generator"]


@dataclass(frozen=True)
class ExecutionConfig:
    """How one model's GEMMs are executed (not what they compute).

    quant_backend: fp4.quantize.quantize_operand's backend, "auto" | "torch" | "triton".
    real_fp8: allow torch._scaled_mm for GEMMs whose operands are both FP8 (it is used only where the
        device has FP8 tensor cores and the shapes fit; otherwise the same GEMM is emulated).
    """

    quant_backend: QuantBackend = QuantBackend.auto
    real_fp8: bool = True

    def __post_init__(self):
        if self.quant_backend not in choices(QuantBackend):
            raise ValueError(f"unknown quant_backend {self.quant_backend!r}; "
                             f"valid: {', '.join(choices(QuantBackend))}")
        # Normalized to the member (a word and a member give equal configs) and a real bool.
        object.__setattr__(self, "quant_backend", QuantBackend(str(self.quant_backend)))
        object.__setattr__(self, "real_fp8", bool(self.real_fp8))


@dataclass(frozen=True)
class GemmRecord:
    """One operand of one GEMM call, as actually executed (see record_gemms)."""

    layer: str
    layer_index: int
    gemm: str                 # "fprop" | "dgrad" | "wgrad"
    operand: str              # "x" | "w" | "dy"
    fmt: Optional[str]        # None = high precision
    rounding: str
    scale_mode: Optional[str]
    block_2d: bool
    axis: int                 # the operand's dim that was blocked (its GEMM's reduction axis)
    hadamard: Optional[str]   # "16:step" etc., None without transform
    path: str                 # as gemm_paths() words it
    step: int
    call: int
    quant_backend: str = QuantBackend.auto.value  # the ExecutionConfig the call ran under


_RECORDS: Optional[List[GemmRecord]] = None  # set by record_gemms(); None = recording off, zero cost


@contextlib.contextmanager
def record_gemms() -> Iterator[List[GemmRecord]]:
    """Collect a GemmRecord per operand of every GEMM run inside the block, for every model."""
    global _RECORDS
    previous, records = _RECORDS, []
    _RECORDS = records
    try:
        yield records
    finally:
        _RECORDS = previous


class QuantState:
    """Shared mutable state of all QuantLinears of a model: seed, optimizer step, per-step call counters,
    plus the model's ExecutionConfig (fixed for its life: build another model to change it)."""

    def __init__(self, seed: int = 0, step: int = 0, check_finite: bool = False,
                 execution: Optional[ExecutionConfig] = None, rank: int = 0, world_size: int = 1):
        self.seed = int(seed)
        self.set_rank(rank, world_size)
        self._replay = False
        self.check_finite = bool(check_finite)
        self.execution = execution if execution is not None else ExecutionConfig()
        if not isinstance(self.execution, ExecutionConfig):
            raise TypeError(f"execution must be an ExecutionConfig, got {type(self.execution).__name__}")
        self._step, self._calls, self._offsets = int(step), {}, {}
        self._records: Optional[List[GemmRecord]] = None
        # fp4.probe: called with a GemmObservation after every quantized GEMM; None = off, zero cost.
        # An observer only (never changes a GEMM); snapshotted at each layer's forward, as the recorder.
        self.probe: Optional[Callable] = None
        # Set while a CUDA graph of the step is listed / captured (GeneratorPool); None = fresh generators.
        self.generator_pool: Optional["GeneratorPool"] = None

    def generator(self, device, parts: tuple, step_at: Optional[int], call_at: Optional[int] = None,
                  layer: Optional[int] = None) -> torch.Generator:
        """The generator of one random draw: seeded by derive_seed(*parts), where parts[step_at] is
        the optimizer step and parts[call_at] the call index of `layer` (None: the draw does not
        depend on it). From the pool while one is set."""
        if self.generator_pool is not None:
            return self.generator_pool.take(device, parts, step_at, call_at, layer)
        return generator(device, *parts)

    def call_base(self, layer_index: int) -> int:
        """The call index the layer's next forward in this step would get (next_call without counting)."""
        call = self._calls.get(layer_index, 0)
        offset = self._offsets.get(layer_index, 0)
        return offset + (call * self.world_size + self.rank if self.world_size > 1 else call)

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step, self._calls, self._offsets = int(value), {}, {}

    def advance_step(self) -> None:
        """Called by the training loop after each optimizer step."""
        self.step = self._step + 1

    def set_rank(self, rank: int, world_size: int) -> None:
        """Data-parallel position of this process (experiments/distributed.py): it enters the
        identity of every draw through the call index (next_call), never the seed."""
        rank, world_size = int(rank), int(world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size

    def next_call(self, layer_index: int) -> int:
        """The call index of the layer's next forward in this step: its local count when
        world_size == 1 (so a one-process run keeps its seeds); with N ranks, the local count c on
        rank r is the *global* index c * N + r, that of the micro-batch the single-process loader
        would have given as the (c * N + r)-th of the step (experiments/data/loader.py deals
        micro-batch c * N + r to rank r). So SR uniforms (and "call" signs) differ per rank and a
        micro-batch gets the draws it would get in one process with the same micro-batch size;
        "fixed" / "step" signs have no call index and agree on every rank."""
        if self._replay:  # recomputing the last forward (activation checkpointing): its index
            call = self._calls.get(layer_index, 1) - 1
        else:
            call = self._calls.get(layer_index, 0)
            self._calls[layer_index] = call + 1
        offset = self._offsets.get(layer_index, 0)  # calls counted for all ranks (skip_calls)
        return offset + (call * self.world_size + self.rank if self.world_size > 1 else call)

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Inside: a layer's forward reuses the call index of its last forward instead of counting a
        new call, so an activation-checkpointing recomputation (which runs right after the forward
        it repeats, in that micro-batch's backward) draws the same SR uniforms and signs and
        reproduces the forward exactly (torch.utils.checkpoint's context_fn, distributed.py)."""
        previous, self._replay = self._replay, True
        try:
            yield
        finally:
            self._replay = previous

    def call_counts(self) -> dict:
        """A copy of this process's per-layer call counters (restore with restore_call_counts)."""
        return dict(self._calls)

    def restore_call_counts(self, counts: dict) -> None:
        self._calls = dict(counts)

    def skip_calls(self, counts: dict) -> None:
        """Count {layer_index: n} calls of this step as made, on behalf of all ranks together (an
        evaluation split over the ranks makes, in all, the calls one process would make)."""
        for layer, n in counts.items():
            self._offsets[int(layer)] = self._offsets.get(int(layer), 0) + int(n)

    def _calls_made(self) -> dict:
        """Per layer, the calls of this step so far as one process counts them (all ranks)."""
        layers = set(self._calls) | set(self._offsets)
        return {l: self._offsets.get(l, 0) + self._calls.get(l, 0) * self.world_size
                for l in sorted(layers)}

    def record_sinks(self) -> List[List[GemmRecord]]:
        """The record lists a GEMM call started now appends to (snapshotted at its forward)."""
        return [r for r in (_RECORDS, self._records) if r is not None]

    @contextlib.contextmanager
    def record_gemms(self) -> Iterator[List[GemmRecord]]:
        """Like the module-level record_gemms(), for this model's GEMMs only."""
        previous, records = self._records, []
        self._records = records
        try:
            yield records
        finally:
            self._records = previous

    @contextlib.contextmanager
    def probe_gemms(self, probe: Callable) -> Iterator[Callable]:
        """Set `probe` (fp4.probe) for the GEMMs of forwards started inside the block."""
        previous, self.probe = self.probe, probe
        try:
            yield probe
        finally:
            self.probe = previous

    # The ExecutionConfig is not training state: a checkpoint resumes on whatever hardware runs it.
    # The calls already made in the step (an evaluation after the step's update makes some) are
    # kept, so a resumed run numbers the next calls as the uninterrupted one; rank-independent.
    def state_dict(self) -> dict:
        state = {"seed": self.seed, "step": self._step}
        calls = self._calls_made()
        if calls:
            state["calls"] = calls
        return state

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.step = int(state["step"])
        self.skip_calls(state.get("calls", {}))


def derive_seed(*parts) -> int:
    """A 63-bit seed from the identity of a random draw (stable across processes and platforms)."""
    # Enum members enter as their plain value: the seed of a draw must not depend on whether a caller
    # wrote Gemm.wgrad or "wgrad" (repr() of a member differs from repr() of its value).
    parts = tuple(p.value if isinstance(p, Enum) else p for p in parts)
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(device: torch.device, *parts) -> torch.Generator:
    """A torch.Generator on `device` seeded by derive_seed(*parts)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*parts))
    return gen


class GeneratorPool:
    """Persistent generators standing in for the fresh ones of one step's random draws (see the
    module docstring: random draws inside a CUDA graph).

    listing (the start): `take` notes each draw (its parts, where the step and the call index are
        in them, its layer) and hands out the fresh generator it would get anyway;
    `freeze(make, call_base)`: one persistent generator per listed draw, built by make(device)
        (the graph registers them before its capture); call_base(layer) is each layer's first call
        index in the listed pass. From then on `take` hands the generators out in the listed order,
        and a draw that differs from the listed one (other than in step and call) raises (the
        capture then fails and the plain step goes on);
    `rewind()`: start the order again (before each pass that takes);
    `reseed(step, call_base)`: seed each generator as derive_seed of its draw at `step`, with its
        call index moved to start from call_base(layer) (a step after an evaluation starts its
        calls where the evaluation's left off): the state a fresh generator of that draw starts
        from in the plain step."""

    def __init__(self):
        self.draws: List[tuple] = []          # (device, parts, step_at, call_at, layer) in the order taken
        self.generators: List[torch.Generator] = []
        self.frozen = False
        self._next = 0
        self._bases: dict = {}

    def take(self, device, parts: tuple, step_at: Optional[int], call_at: Optional[int] = None,
             layer: Optional[int] = None) -> torch.Generator:
        draw = (torch.device(device), tuple(parts), step_at, call_at, layer)
        if not self.frozen:
            self.draws.append(draw)
            return generator(device, *parts)
        i = self._next
        if i >= len(self.draws) or not self._same(self.draws[i], draw):
            listed = self.draws[i][1] if i < len(self.draws) else "none"
            raise RuntimeError(f"random draw {i} of the step is {parts}, but the listed pass drew {listed}: "
                               "the step does not draw in a fixed order")
        self._next += 1
        return self.generators[i]

    @staticmethod
    def _same(a: tuple, b: tuple) -> bool:
        if a[0] != b[0] or a[2:] != b[2:] or len(a[1]) != len(b[1]):
            return False
        return all(x == y for k, (x, y) in enumerate(zip(a[1], b[1])) if k not in (a[2], a[3]))

    def freeze(self, make: Callable[[torch.device], torch.Generator],
               call_base: Optional[Callable[[int], int]] = None) -> List[torch.Generator]:
        self.generators = [make(device) for device, *_ in self.draws]
        layers = {d[4] for d in self.draws if d[3] is not None}
        self._bases = {layer: call_base(layer) if call_base is not None else 0 for layer in layers}
        self.frozen, self._next = True, 0
        return self.generators

    def rewind(self) -> None:
        self._next = 0

    def reseed(self, step: int, call_base: Optional[Callable[[int], int]] = None) -> None:
        for (_, parts, step_at, call_at, layer), gen in zip(self.draws, self.generators):
            parts = list(parts)
            if step_at is not None:
                parts[step_at] = int(step)
            if call_at is not None and call_base is not None:
                parts[call_at] = parts[call_at] - self._bases[layer] + call_base(layer)
            gen.manual_seed(derive_seed(*parts))
