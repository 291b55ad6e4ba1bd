"""The step's forward and backward as one captured CUDA graph, replayed every step.

Why: on CUDA a quantized step is bound by the host. Every QuantLinear runs its Fprop and its
backward as custom ops whose Python (operand specs, kernel launches, FP8 scales) costs a few
hundred microseconds per call, so a llama-150m step spent longer launching kernels than the GPU
spent running them (experiments/gpu/host_probe.py). A CUDA graph records the kernels of one
forward+backward once and replays them with one launch: the Python runs at capture only
(measured on an H200: the compiled wgrad+h16 step of llama-150m 285 -> 238 ms, results/bench/).

The attention must not change while capturing: experiments/attention.py keeps the mask None
(SDPA's is_causal) whatever transformers thinks of a capturing stream, and `_MaskWatch` refuses a
capture whose decoder layers still see another mask than uncaptured.

What a replay computes. The same kernels on the same addresses: the custom ops' quantizers, the
GEMMs, the compiled layers' fused kernels. The bits equal those of the step it was captured from
wherever that step's bits depend only on its inputs and on its random draws' seeds. The draws
(stochastic rounding, random Hadamard signs) are seeded in Python per call from (step, call)
(fp4/state.py), which a replay does not run; so the capture takes them from a GeneratorPool: an
uncaptured pass lists the step's draws in order, one persistent CUDA generator per draw is
registered with the graph, and before every replay each is seeded as its draw's fresh generator
would be at the new step (its call index, too, moved to where the step's calls begin: an
evaluation after the previous step counts its forwards into this one). The replay's kernels read those generators' seeds (PyTorch's graph-safe
RNG), so it draws what the plain step draws. Where this torch cannot register a generator with a
graph, a recipe that draws keeps the plain step.

Also blocked: data parallelism (the gradient hooks of DDP / FSDP2 communicate outside the graph),
train.check_finite (reads values on the host). A step that GEMM observers watch (diagnostics'
probes every diagnostics.every_steps steps, record_gemms) runs their Python per GEMM: it is a plain
step among the replays. Memory: the graph's private pool keeps one step's activations for the
run's life, so such a plain step (and an evaluation) allocates its own beside them: a probed step
needs up to twice a step's activation memory. `graph_blockers` names what blocks a run; hardware.cuda_graphs=null uses the graph when
nothing does, true refuses to start otherwise (experiments/validate.py), false never uses it.

Mechanics, as in PyTorch's "partial-network capture". The attempt's first `plain_steps` steps run
as TrainStep (they compile the layers, JIT the Triton kernels and let the allocator settle). The
next step captures: gradients set to None, then each micro-batch's forward from the input
embedding's output to the loss, and its backward, are recorded reading static buffers, so every
parameter's .grad becomes a static tensor the replay rewrites (never accumulated into: it was None
at capture). The input embedding itself runs eagerly around the graph: its CUDA backward sorts the
token ids and reads a count back to the host (pytorch/pytorch#82886), which no graph can hold. So
each step looks the micro-batches up in the embedding, copies the outputs and the labels into the
buffers, replays, hands the replay's gradient of those outputs to the embedding's backward (the
same op as in the plain step, so the same bits; a tied table gets the head's part from the graph
and adds its own, the same two-term sum), and runs clipping and the optimizer eagerly as
TrainStep does; the gradients are not zeroed (the replay overwrites them). With a tied table and
several micro-batches the sum's order would change: blocked. If the capture fails, the run goes on
with the plain step and says why (summary.json cuda_graph).
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, List, Optional, Sequence

import torch

from fp4.linear import QuantLinear
from fp4.state import GeneratorPool
from ..model import causal_lm_loss
from .step import StepResult, TrainStep

log = logging.getLogger("fp4_experiments.train")

PLAIN_STEPS = 2  # steps of an attempt before the capture: the first compiles, the second checks


def recipe_draws(model: torch.nn.Module) -> List[str]:
    """What the model's quantized linears draw at random each step (their recipes' random_draws)."""
    return sorted({d for m in model.modules() if isinstance(m, QuantLinear) for d in m.recipe.random_draws})


def graph_rng_supported() -> bool:
    """Whether this torch registers a generator with a CUDA graph (graph-safe RNG of one's own generators)."""
    return hasattr(torch.cuda.CUDAGraph, "register_generator_state")


def graph_blockers(*, device, draws, parallel: str = "none", world_size: int = 1, check_finite: bool = False,
                   has_embedding: bool = True, tied_accumulation: bool = False,
                   rng_in_graphs: Optional[bool] = None) -> List[str]:
    """Why a run's step cannot be replayed as a CUDA graph with the bits of the plain step; [] when it can.
    rng_in_graphs: whether random draws can be replayed (None: graph_rng_supported())."""
    blockers = []
    if torch.device(device).type != "cuda":
        blockers.append(f"the run is on {torch.device(device).type}, not CUDA")
    rng_in_graphs = graph_rng_supported() if rng_in_graphs is None else rng_in_graphs
    if draws and not rng_in_graphs:
        blockers.append(f"the recipe draws random numbers per step and call ({', '.join(draws)}) and this "
                        "torch cannot register generators with a CUDA graph: a replay would repeat the "
                        "captured draws")
    if str(parallel) != "none" or world_size > 1:
        blockers.append(f"parallel={parallel} with {world_size} process(es): gradient communication runs "
                        "outside a graph")
    if check_finite:
        blockers.append("train.check_finite reads values on the host")
    if not has_embedding:
        blockers.append("the model has no input embedding (get_input_embeddings) to keep outside the graph")
    if tied_accumulation:
        blockers.append("a tied embedding with several micro-batches would sum its gradients in another order")
    return blockers


def _embedding_facts(model: torch.nn.Module, n_micro: int):
    """(has an input embedding, tied to the output head while micro-batches accumulate)."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    if embedding is None:
        return False, False
    head = get_out() if callable(get_out) else None
    tied = head is not None and getattr(head, "weight", None) is embedding.weight
    return True, tied and n_micro > 1


def _release(device) -> None:
    if torch.device(device).type == "cuda":
        import gc
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def cuda_capture(fn: Callable[[], None], generators: Sequence[torch.Generator] = ()) -> Callable[[], None]:
    """Record fn's kernels into a CUDA graph (fn's Python runs once, its kernels do not); returns replay.
    `generators`: the ones fn draws from, registered before the capture begins, so that each replay
    reads their seed and offset at that moment."""
    graph = torch.cuda.CUDAGraph()
    for gen in generators:
        graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def make_step(cfg, plain: TrainStep, model: torch.nn.Module, device, dist=None):
    """(the step the loop runs, summary.json's cuda_graph entry): a GraphedStep when
    hardware.cuda_graphs allows it (null: whenever nothing blocks it) and nothing blocks it, else
    `plain`. The entry is None where no graph was considered (off, or not CUDA)."""
    setting = getattr(cfg.hardware, "cuda_graphs", None)
    if setting is False or (setting is None and torch.device(device).type != "cuda"):
        return plain, None
    has_embedding, tied_accumulation = _embedding_facts(model, plain.n_micro)
    blockers = graph_blockers(
        device=device, draws=recipe_draws(model),
        parallel=dist.mode if dist is not None else "none",
        world_size=dist.world_size if dist is not None else 1,
        check_finite=bool(cfg.train.check_finite),
        has_embedding=has_embedding, tied_accumulation=tied_accumulation)
    if blockers:
        if setting:  # validate.check_cuda_graphs refuses this before any work; a model can still differ
            raise ValueError("hardware.cuda_graphs=true but the step cannot be a CUDA graph: " + "; ".join(blockers))
        log.info("step: no CUDA graph (%s); plain step", "; ".join(blockers))
        return plain, {"used": False, "blockers": blockers, "captured_at_step": None, "capture_s": None,
                       "random_draws": None}
    graphed = GraphedStep(plain)
    return graphed, graphed.report


class _MaskWatch:
    """What attention mask the decoder layers are handed, per phase (warm-up, capture).

    transformers builds the causal mask in the model's eager forward, and some versions build a
    full mask instead of None (SDPA's is_causal) while a CUDA stream captures (5.17:
    `_ignore_causal_mask_sdpa` gives up whenever `is_tracing()`, which includes
    `torch.cuda.is_current_stream_capturing()`). The graph would then replay another attention
    than the plain step computes, so a capture whose masks differ from the warm-up's is refused."""

    def __init__(self, model: torch.nn.Module):
        from .compile import decoder_layers
        self.seen: dict = {}
        self.current: Optional[str] = None
        try:
            first = decoder_layers(model)[0]
        except (ValueError, IndexError):
            first = None  # no decoder layers to watch (small test models)
        self.handle = None if first is None else first.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.current is not None:
            mask = kwargs.get("attention_mask")
            self.seen.setdefault(self.current, set()).add(None if mask is None else (tuple(mask.shape), mask.dtype))

    @contextlib.contextmanager
    def phase(self, name: str):
        self.current = name
        try:
            yield
        finally:
            self.current = None

    def differs(self) -> Optional[str]:
        warm, captured = self.seen.get("warm-up"), self.seen.get("capture")
        if warm == captured:
            return None
        return (f"the decoder layers got attention mask {sorted(map(str, captured or []))} while capturing but "
                f"{sorted(map(str, warm or []))} uncaptured (this transformers builds the causal mask differently "
                "while a stream captures): the graph would replay another attention")

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()


class GraphedStep:
    """TrainStep's callable interface; steps after the first `plain_steps` replay a captured graph.

    `capture(fn, generators) -> replay` records fn drawing from `generators` (cuda_capture on CUDA;
    tests pass a stand-in). `report` is summary.json's cuda_graph entry for the attempt."""

    def __init__(self, plain: TrainStep, capture: Callable = cuda_capture, plain_steps: int = PLAIN_STEPS):
        self.plain, self.capture, self.plain_steps = plain, capture, plain_steps
        self.steps = 0
        self.replay: Optional[Callable[[], None]] = None
        self.pool: Optional[GeneratorPool] = None
        self.failed: Optional[str] = None
        self.report = {"used": False, "blockers": [], "captured_at_step": None, "capture_s": None,
                       "random_draws": None}

    @property
    def optimizer(self):
        return self.plain.optimizer

    @optimizer.setter
    def optimizer(self, value) -> None:  # the bench's gradient snapshots stand in for it
        self.plain.optimizer = value

    def __call__(self, lr: float) -> StepResult:
        self.steps += 1
        observed = self._observed()
        if self.failed is None and self.replay is None and self.steps > self.plain_steps and not observed:
            return self._capture_and_step(lr)
        if self.replay is None:
            return self.plain(lr)
        if observed:
            return self._plain_between_replays(lr)
        return self._replayed(lr, time.perf_counter())

    def _observed(self) -> bool:
        """Whether GEMM observers watch this step (diagnostics' probes, record_gemms): they run in
        each GEMM's Python, which a replay does not run, so such a step is a plain one."""
        state = self.plain.quant_state
        return state.probe is not None or bool(state.record_sinks())

    def _plain_between_replays(self, lr: float) -> StepResult:
        """An observed step among replays: the plain step (the same bits), with the graph's
        gradient tensors set aside so that it does not accumulate onto the last replay's, and put
        back afterwards for the next replay to overwrite."""
        params = list(self.plain.model.parameters())
        static = [q.grad for q in params]
        for q in params:
            q.grad = None
        try:
            return self.plain(lr)
        finally:
            for q, grad in zip(params, static):
                q.grad = grad

    def _batches(self):
        p = self.plain
        return [tuple(t.to(p.device, non_blocking=True) for t in p.loader.next_batch()) for _ in range(p.n_micro)]

    def _embed(self, batches):
        """The input embedding's forward, eager, outside the graph: (its outputs, the labels)."""
        p = self.plain
        embedding = p.model.get_input_embeddings()
        with p.autocast():
            return [embedding(ids) for ids, _ in batches], [labels for _, labels in batches]

    def _capture_and_step(self, lr: float) -> StepResult:
        p, t0 = self.plain, time.perf_counter()
        batches = self._batches()
        embeds, labels = self._embed(batches)
        # The graph's inputs: the embedding outputs as leaves whose .grad the replay writes, and
        # the labels. The embedding's backward stays eager: on CUDA it sorts the token ids and
        # reads a count back to the host, which no graph can hold (pytorch/pytorch#82886).
        self.static_embeds = [e.detach().clone().requires_grad_(True) for e in embeds]
        self.static_labels = [l.clone() for l in labels]
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=p.device)
        p.optimizer.zero_grad(set_to_none=True)
        calls = p.quant_state.call_counts()

        def forward_backward():
            self.loss_sum.zero_()
            for e, l in zip(self.static_embeds, self.static_labels):
                with p.autocast():
                    loss = causal_lm_loss(p.step_model, None, l, inputs_embeds=e) / p.n_micro
                loss.backward()
                self.loss_sum += loss.detach().float()

        masks, pool, generators = _MaskWatch(p.step_model), GeneratorPool(), []
        try:
            with masks.phase("warm-up"), self._drawing(pool):  # lists the step's random draws
                self._warm_up(forward_backward, calls)
            # The warm-up left the call counters where the step began: each layer's first call index.
            generators = pool.freeze(lambda device: torch.Generator(device=device), p.quant_state.call_base)
            with masks.phase("capture"), self._drawing(pool):  # the draws take the pool's generators
                self.replay = self.capture(forward_backward, generators)
            self.failed = masks.differs()
        except Exception as err:  # the plain step stands in; the run says why
            self.failed = f"{type(err).__name__}: {err}".strip()
        finally:
            masks.close()
        if self.failed is not None:  # outside the except: its traceback no longer holds the graph
            self.report["blockers"] = [f"capture failed: {self.failed}"]
            log.warning("CUDA graph capture failed (%s); training goes on with the plain step", self.failed)
            p.quant_state.restore_call_counts(calls)
            p.optimizer.zero_grad(set_to_none=True)
            self.replay, self.static_embeds, self.static_labels = None, [], []
            pool = generators = None
            _release(p.device)  # a failed capture's private memory pool, before the step needs it
            return p.step_from_batches(lr, batches, t0)
        # Parameters the graph gives no gradient (the untied embedding table): their gradient is
        # made fresh by the eager embedding backward each step.
        self.outside = [q for q in p.model.parameters() if q.grad is None]
        self.pool = pool
        # A replay runs no Python and counts no calls: from here on the counters stay where the
        # step began, which is where the draws of each replay start (after an evaluation's calls).
        p.quant_state.restore_call_counts(calls)
        self.report.update(used=True, random_draws=len(pool.draws), captured_at_step=self.steps, capture_s=time.perf_counter() - t0)
        log.info("step: CUDA graph of forward+backward (the input embedding eager) captured at this "
                 "attempt's step %d in %.1f s; replayed from here on", self.steps, self.report["capture_s"])
        return self._replayed(lr, t0, (embeds, labels))

    @contextlib.contextmanager
    def _drawing(self, pool: GeneratorPool):
        """The model's random draws come from `pool` inside (from its start when it is frozen)."""
        state = self.plain.quant_state
        pool.rewind()
        state.generator_pool = pool
        try:
            yield
        finally:
            state.generator_pool = None

    def _warm_up(self, forward_backward, calls) -> None:
        """Run the captured function once for real, uncaptured (on a side stream on CUDA, as
        PyTorch's capture recipe asks): the compiled layers see the embedding outputs as leaves
        here for the first time, and dynamo's recompilation for them (constant folding reads values
        on the host) must happen outside the capture. Its gradients and calls are then undone."""
        p = self.plain
        if p.device.type == "cuda":
            side = torch.cuda.Stream(p.device)
            side.wait_stream(torch.cuda.current_stream(p.device))
            with torch.cuda.stream(side):
                forward_backward()
            torch.cuda.current_stream(p.device).wait_stream(side)
            torch.cuda.synchronize(p.device)
        else:
            forward_backward()
        p.quant_state.restore_call_counts(calls)
        p.optimizer.zero_grad(set_to_none=True)
        for e in self.static_embeds:
            e.grad = None

    def _replayed(self, lr: float, t0: float, inputs=None) -> StepResult:
        p = self.plain
        embeds, labels = inputs if inputs is not None else self._embed(self._batches())
        with torch.no_grad():
            for dst, src in zip(self.static_embeds, embeds):
                dst.copy_(src)
            for dst, src in zip(self.static_labels, labels):
                dst.copy_(src)
        # This step's draws, read by the replay's kernels: at this step, each layer's calls
        # starting where this step's began (an evaluation after the last step made some).
        self.pool.reseed(p.quant_state.step, p.quant_state.call_base)
        with self._drawing(self.pool):  # (no Python draws on CUDA; a test's stand-in replay does)
            self.replay()
        for q in self.outside:
            q.grad = None
        torch.autograd.backward(embeds, [e.grad for e in self.static_embeds])
        return p.finish_step(lr, self.loss_sum, t0, zero_grad=False)
