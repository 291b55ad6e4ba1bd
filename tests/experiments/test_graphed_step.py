"""The CUDA-graph step (experiments/training/graphed.py) on the CPU: what it replays, when it may.

A real capture needs CUDA (experiments/gpu/cuda_graph_check.py compares replayed and eager
operands bit for bit on the GPU). Here `capture` is a stand-in that records nothing and reruns the
captured function at each replay, after dropping the gradients as a replay's overwrite does: so
these tests check what the graphed step feeds the graph (static micro-batch buffers, the loss sum,
the learning rate, the optimizer without zeroing, the quantization clock) against the plain step.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fp4.linear import QuantState, swap_linears
from fp4.recipe import Recipe
from fp4_experiments.data import TrainLoader
from fp4_experiments.training import TrainStep, make_optimizer
from fp4_experiments.training.graphed import GraphedStep, graph_blockers, make_step, recipe_draws

from cli_support import run_cli

VOCAB, SEQ = 64, 16
CPU = torch.device("cpu")


class TinyLM(nn.Module):
    """The calls the graphed step makes of a transformers causal LM: input_ids or inputs_embeds,
    get_input_embeddings / get_output_embeddings (a tied head shares the table)."""

    def __init__(self, tied: bool = False):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.head = nn.Linear(32, VOCAB, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def get_input_embeddings(self):
        return self.emb

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids=None, inputs_embeds=None):
        h = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        h = h + self.down(torch.relu(self.up(h)))
        return SimpleNamespace(logits=self.head(h))


def _model(recipe: Recipe, tied: bool = False):
    torch.manual_seed(0)
    model, state = TinyLM(tied), QuantState(seed=3)
    swap_linears(model, recipe, state)
    return model, state


def _plain(model, state, n_micro=2):
    cfg = SimpleNamespace(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=5000).astype(np.int32)
    return TrainStep(model=model, step_model=model, optimizer=make_optimizer(model, cfg, CPU),
                     loader=TrainLoader(tokens, SEQ, 4, 0), quant_state=state,
                     autocast=contextlib.nullcontext, device=CPU, n_micro=n_micro, grad_clip=1.0)


def _rerun(model, log, graphed=None):
    """A capture that runs fn's Python once, as a real capture does (the gradients it leaves are
    the graph's static ones), and reruns fn at each replay. Like a real replay it then writes the
    results into those static tensors, which must still be the parameters' .grad (and the
    embedding outputs'), else the optimizer would not see them. A replay runs no Python, so it
    counts no calls: the rerun makes the captured calls' indices and leaves the counters as they
    were; its random draws come from the pool, re-seeded by the step."""
    def capture(fn, generators=()):
        log.append(("captured", len(generators)))
        state = graphed.plain.quant_state if graphed is not None else None
        captured_calls = state.call_counts() if state is not None else None
        fn()
        # The tensors the graph writes gradients into (not the input embedding's table: eager).
        tensors = [t for t in list(model.parameters()) + (graphed.static_embeds if graphed is not None else [])
                   if t.grad is not None]
        static = [t.grad for t in tensors]

        def replay():
            for t, g in zip(tensors, static):
                assert t.grad is g, "a replay writes the captured gradient tensors: .grad must still be them"
                t.grad = None
            calls = state.call_counts() if state is not None else None
            if state is not None:
                state.restore_call_counts(captured_calls)
            try:
                fn()
            finally:
                if state is not None:
                    state.restore_call_counts(calls)
            for t, g in zip(tensors, static):
                g.copy_(t.grad)
                t.grad = g
        return replay
    return capture


def _graphed(model, state, n_micro=2, log=None):
    graphed = GraphedStep(_plain(model, state, n_micro=n_micro), plain_steps=2)
    graphed.capture = _rerun(model, [] if log is None else log, graphed)
    return graphed


def _train(step, n=6):
    return [(r.loss, r.grad_norm) for r in (step(1e-2 * (1 - i / 10)) for i in range(n))]


@pytest.mark.parametrize("recipe, draws", [
    (Recipe("wgrad", "h16"), 0), (Recipe("fp8"), 0), (Recipe("bf16"), 0),
    # 2 micro-batches x 3 linears x 1 draw (SR on Wgrad's dY | Wgrad's random Hadamard signs)
    (Recipe("wgrad", "sr"), 2 * 3), (Recipe("wgrad", "rht"), 2 * 3),
], ids=["wgrad+h16", "fp8", "bf16", "wgrad+sr", "wgrad+rht"])
def test_graphed_step_trains_the_plain_steps_bits(recipe, draws):
    """The random draws too: the replays draw from the pool's generators, re-seeded each step."""
    ref_model, ref_state = _model(recipe)
    reference = _train(_plain(ref_model, ref_state))
    model, state = _model(recipe)
    log = []
    graphed = _graphed(model, state, log=log)
    got = _train(graphed)
    assert log == [("captured", draws)] and graphed.report["used"] and graphed.report["captured_at_step"] == 3
    assert graphed.report["random_draws"] == draws
    assert got == reference
    assert state.step == ref_state.step == 6
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    # The replayed steps leave the gradients in place (the graph overwrites them), the plain ones not.
    assert all(p.grad is not None for p in model.parameters())


def test_a_tied_table_gets_the_plain_steps_gradient_with_one_micro_batch():
    recipe = Recipe("wgrad", "h16")
    ref_model, ref_state = _model(recipe, tied=True)
    reference = _train(_plain(ref_model, ref_state, n_micro=1))
    model, state = _model(recipe, tied=True)
    graphed = _graphed(model, state, n_micro=1)
    assert _train(graphed) == reference and graphed.report["used"]
    assert torch.equal(model.emb.weight, ref_model.emb.weight)


def test_loader_position_after_graphed_steps_is_the_plain_steps():
    recipe = Recipe("wgrad", "h16")
    ref_model, ref_state = _model(recipe)
    plain = _plain(ref_model, ref_state)
    _train(plain, 5)
    model, state = _model(recipe)
    graphed = _graphed(model, state)
    _train(graphed, 5)
    assert graphed.plain.loader.state_dict() == plain.loader.state_dict()


@pytest.mark.parametrize("stabilizer", ["h16", "sr"])
def test_a_failed_capture_falls_back_to_the_plain_step_and_says_why(stabilizer):
    recipe = Recipe("wgrad", stabilizer)
    ref_model, ref_state = _model(recipe)
    reference = _train(_plain(ref_model, ref_state), 4)
    model, state = _model(recipe)

    def failing(fn, generators=()):
        fn()  # a capture that ran some of the work before failing must not leave its traces
        raise RuntimeError("operation not permitted when stream is capturing")

    graphed = GraphedStep(_plain(model, state), capture=failing, plain_steps=1)
    assert _train(graphed, 4) == reference
    assert graphed.report["used"] is False
    assert "capture failed: RuntimeError: operation not permitted" in graphed.report["blockers"][0]
    assert state.generator_pool is None  # the plain steps after it draw from fresh generators


def test_what_blocks_a_graph_is_named():
    assert graph_blockers(device="cuda", draws=[]) == []
    assert "not CUDA" in graph_blockers(device="cpu", draws=[])[0]
    sr = graph_blockers(device="cuda", draws=["sr:wgrad.dy"], rng_in_graphs=False)
    assert len(sr) == 1 and "sr:wgrad.dy" in sr[0]
    assert graph_blockers(device="cuda", draws=["sr:wgrad.dy"], rng_in_graphs=True) == []
    assert "parallel=ddp" in graph_blockers(device="cuda", draws=[], parallel="ddp", world_size=2)[0]
    assert "check_finite" in graph_blockers(device="cuda", draws=[], check_finite=True)[0]
    assert recipe_draws(_model(Recipe("wgrad", "rht"))[0]) == ["signs:wgrad:step"]
    assert recipe_draws(_model(Recipe("wgrad", "h16"))[0]) == []


def _cfg(cuda_graphs, every_steps=None, check_finite=False, compile=False):
    return SimpleNamespace(hardware=SimpleNamespace(cuda_graphs=cuda_graphs, compile=compile),
                           diagnostics=SimpleNamespace(every_steps=every_steps),
                           train=SimpleNamespace(check_finite=check_finite))


def test_make_step_picks_the_graph_only_where_nothing_blocks_it(monkeypatch):
    import fp4_experiments.training.graphed as graphed_module
    monkeypatch.setattr(graphed_module, "graph_rng_supported", lambda: False)  # as the CPU wheel
    model, state = _model(Recipe("wgrad", "h16"))
    plain = _plain(model, state)
    cuda = torch.device("cuda")  # a device name only: nothing runs here
    step, report = make_step(_cfg(None), plain, model, cuda)
    assert isinstance(step, GraphedStep) and report is step.report
    assert make_step(_cfg(None), plain, model, CPU) == (plain, None)
    assert make_step(_cfg(False), plain, model, cuda) == (plain, None)
    step, report = make_step(_cfg(None, compile=None), plain, model, cuda)  # null: compiled on CUDA
    assert isinstance(step, GraphedStep) and report["blockers"] == []
    step, report = make_step(_cfg(None, every_steps=5), plain, model, cuda)  # observed steps run plain
    assert isinstance(step, GraphedStep) and report["blockers"] == []
    sr_model, sr_state = _model(Recipe("wgrad", "sr"))
    sr_plain = _plain(sr_model, sr_state)
    step, report = make_step(_cfg(None), sr_plain, sr_model, cuda)
    assert step is sr_plain and "sr:wgrad.dy" in report["blockers"][0]
    with pytest.raises(ValueError, match="hardware.cuda_graphs=true"):
        make_step(_cfg(True), sr_plain, sr_model, cuda)
    monkeypatch.setattr(graphed_module, "graph_rng_supported", lambda: True)  # as torch 2.11 on CUDA
    assert isinstance(make_step(_cfg(None), sr_plain, sr_model, cuda)[0], GraphedStep)
    with pytest.raises(ValueError, match="not CUDA"):
        make_step(_cfg(True), plain, model, CPU)
    tied, tied_state = _model(Recipe("wgrad", "h16"), tied=True)
    step, report = make_step(_cfg(None), _plain(tied, tied_state, n_micro=2), tied, cuda)
    assert report["used"] is False and "tied embedding" in report["blockers"][0]
    assert isinstance(make_step(_cfg(None), _plain(tied, tied_state, n_micro=1), tied, cuda)[0], GraphedStep)


@pytest.mark.parametrize("args, fragment", [
    (["+ladder=wgrad", "+stabilizer=sr", "hardware.cuda_graphs=true"], "sr:wgrad.dy"),
    (["+ladder=wgrad", "hardware=cpu", "hardware.cuda_graphs=true"], "not CUDA"),
])
def test_cuda_graphs_true_is_refused_before_any_work(args, fragment, tmp_path):
    r = run_cli("run", "train=demo", "tokenizer.vocab_size=512", f"results_dir={tmp_path / 'r'}",
                f"cache_dir={tmp_path / 'c'}", *args)
    assert r.returncode == 2 and "hardware.cuda_graphs=true" in r.stderr and fragment in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(32, 32)

    def forward(self, h, attention_mask=None):
        return h + self.mlp(h)


class MaskedLM(TinyLM):
    """Like a transformers model whose mask depends on capturing: a full mask while `capturing`."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Block()])
        self.capturing = False

    def forward(self, input_ids=None, inputs_embeds=None):
        h = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        mask = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).tril() if self.capturing else None
        return SimpleNamespace(logits=self.head(self.model.layers[0](h, attention_mask=mask)))


def test_draws_after_an_evaluation_start_where_its_calls_left_off():
    """An evaluation after a step counts its forwards into the next step (their SR call indices);
    the replayed draws must start there too, as the plain step's do."""
    def train(step, state, n=7):
        out = []
        for i in range(n):
            out.append((lambda r: (r.loss, r.grad_norm))(step(1e-2 * (1 - i / 10))))
            if i in (1, 3, 4):  # an evaluation of 2 batches after steps 2, 4 and 5
                state.skip_calls({layer: 2 for layer in range(3)})
        return out

    ref_model, ref_state = _model(Recipe("wgrad", "sr"))
    reference = train(_plain(ref_model, ref_state), ref_state)
    model, state = _model(Recipe("wgrad", "sr"))
    graphed = _graphed(model, state)
    assert train(graphed, state) == reference and graphed.report["used"]
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_observed_steps_among_replays_are_plain_steps_with_the_same_bits_and_records():
    """Diagnostics probe some steps (here 2, 3, 5 and 6): those run as plain steps, the capture
    waits for an unobserved step, and the replays after an observed step overwrite gradients that
    the plain step did not accumulate onto."""
    from fp4.state import record_gemms

    def train(step, state, n=8):
        out, records = [], []
        for i in range(1, n + 1):
            observe = record_gemms() if i in (2, 3, 5, 6) else contextlib.nullcontext([])
            with observe as recs:
                r = step(1e-2 * (1 - i / 20))
            out.append((r.loss, r.grad_norm))
            records.append(len(recs))
        return out, records

    recipe = Recipe("wgrad", "sr")
    ref_model, ref_state = _model(recipe)
    reference, ref_records = train(_plain(ref_model, ref_state), ref_state)
    model, state = _model(recipe)
    log = []
    graphed = _graphed(model, state, log=log)
    got, records = train(graphed, state)
    assert got == reference and records == ref_records and ref_records[1] > 0
    assert graphed.report["captured_at_step"] == 4 and len(log) == 1
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mask_while_capturing", [False, True])
def test_a_capture_that_sees_another_attention_mask_is_refused(mask_while_capturing):
    torch.manual_seed(0)
    ref, model = MaskedLM(), MaskedLM()
    model.load_state_dict(ref.state_dict())
    reference = _train(_plain(ref, QuantState(seed=3)), 4)
    graphed = GraphedStep(_plain(model, QuantState(seed=3)), plain_steps=1)
    rerun = _rerun(model, [], graphed)

    def capture(fn, generators=()):
        model.capturing = mask_while_capturing
        try:
            return rerun(fn, generators)
        finally:
            model.capturing = False

    graphed.capture = capture
    assert _train(graphed, 4) == reference
    assert graphed.report["used"] is (not mask_while_capturing)
    if mask_while_capturing:
        assert "attention mask" in graphed.report["blockers"][0] and graphed.replay is None
