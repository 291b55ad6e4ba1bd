"""The training loop's parts, one at a time: setup, step, evaluation and crossing, divergence,
checkpoint, metrics. (The whole loop runs in test_runner.py and test_train_reliability.py.)"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fp4.linear import QuantState
from fp4_experiments.data import TrainLoader
from fp4_experiments.rundir import CHECKPOINT
from fp4_experiments.training import (DivergenceCheck, LoopState, StepResult, TrainStep,
                                      advance_clock, delete_checkpoint, evaluate,
                                      load_checkpoint, make_optimizer, perplexity,
                                      record_evaluation, save_checkpoint, setup_training)
from fp4_experiments.training.metrics import TrainLog

VOCAB, SEQ = 32, 8
CPU = torch.device("cpu")


class ToyLM(nn.Module):
    """Embedding and a linear head: enough for causal_lm_loss (`model(input_ids=).logits`)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.norm_bias = nn.Parameter(torch.zeros(16))
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.head(self.emb(input_ids) + self.norm_bias))


def _loader(batch_size=4, seed=0):
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=4000).astype(np.int32)
    return TrainLoader(tokens, SEQ, batch_size, seed)


def _train_cfg(**kw):
    base = dict(lr=1e-2, min_lr_ratio=0.1, warmup_tokens=0, max_tokens=10_000, weight_decay=0.1,
                beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0, check_finite=False,
                diverge_loss_ratio=2.0, diverge_ema=0.9)
    return SimpleNamespace(**{**base, **kw})


def _cfg(**kw):
    return SimpleNamespace(train=_train_cfg(**kw),
                           hardware=SimpleNamespace(autocast_dtype="bfloat16", compile=False))


def _step(model, loader, n_micro=1, optimizer=None, state=None):
    optimizer = optimizer or make_optimizer(model, _train_cfg(), CPU)
    return TrainStep(model=model, step_model=model, optimizer=optimizer, loader=loader,
                     quant_state=state or QuantState(seed=0), autocast=contextlib.nullcontext,
                     device=CPU, n_micro=n_micro, grad_clip=1.0)


# ----------------------------------------------------------------------------- setup

def test_optimizer_decays_matrices_only():
    torch.manual_seed(0)
    model = ToyLM()
    opt = make_optimizer(model, _train_cfg(weight_decay=0.25), CPU)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.25 and no_decay["weight_decay"] == 0.0
    assert {p.dim() for p in decay["params"]} == {2}
    assert {p.dim() for p in no_decay["params"]} == {1}      # biases and the norm-like vector
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_setup_resumes_the_checkpointed_loop_state(tmp_path):
    torch.manual_seed(0)
    model, loader, state = ToyLM(), _loader(), QuantState(seed=0)
    fresh = setup_training(_cfg(check_finite=True), model, loader, state, CPU, tmp_path,
                           resume=True)           # nothing to resume from: a fresh loop
    assert fresh.loop == LoopState() and state.check_finite is True
    assert fresh.step_model is model and fresh.ckpt_path == tmp_path / CHECKPOINT
    with fresh.autocast():                        # CPU: float32, no autocast
        assert not torch.is_autocast_enabled()
    _step(model, loader, optimizer=fresh.optimizer, state=state)(1e-2)
    loop = LoopState(step=1, tokens=32, best_ppl=12.5, evals=[{"tokens": 32, "ppl": 12.5}])
    save_checkpoint(fresh.ckpt_path, model, fresh.optimizer, loop, loader, state, CPU)

    model2, loader2, state2 = ToyLM(), _loader(), QuantState(seed=0)
    resumed = setup_training(_cfg(), model2, loader2, state2, CPU, tmp_path, resume=True)
    assert resumed.loop == loop
    assert resumed.optimizer.state_dict()["state"]             # Adam moments came back
    ignored = setup_training(_cfg(), ToyLM(), _loader(), QuantState(), CPU, tmp_path,
                             resume=False)
    assert ignored.loop == LoopState()


# ----------------------------------------------------------------------------- one step

def test_train_step_sets_lr_counts_micro_batches_and_advances_quant_clock():
    torch.manual_seed(0)
    model, loader, state = ToyLM(), _loader(batch_size=2), QuantState(seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    step = _step(model, loader, n_micro=3, state=state)
    r = step(0.005)
    assert isinstance(r, StepResult) and r.lr == 0.005 and r.dt > 0
    assert all(g["lr"] == 0.005 for g in step.optimizer.param_groups)
    assert loader.state_dict() == _advanced(_loader(batch_size=2), 3).state_dict()
    assert state.step == 1
    assert math.isfinite(r.loss) and r.grad_norm > 0
    assert all(p.grad is None for p in model.parameters())      # zeroed for the next step
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _advanced(loader, n):
    for _ in range(n):
        loader.next_batch()
    return loader


def test_micro_batches_average_to_the_full_batch_loss():
    torch.manual_seed(0)
    ref = ToyLM()
    a, b = ToyLM(), ToyLM()
    a.load_state_dict(ref.state_dict())
    b.load_state_dict(ref.state_dict())
    full = _step(a, _loader(batch_size=4), n_micro=1)(1e-2)
    # Two micro-batches of 2 read the same 4 windows as one batch of 4 (same loader order).
    split = _step(b, _loader(batch_size=2), n_micro=2)(1e-2)
    assert split.loss == pytest.approx(full.loss, rel=1e-6)
    assert split.grad_norm == pytest.approx(full.grad_norm, rel=1e-5)


def test_advance_clock_leaves_the_warm_up_steps_out_of_throughput():
    loop = LoopState(untimed_steps=2)
    for dt in (5.0, 4.0, 1.0, 1.0):
        advance_clock(loop, 100, dt)
    assert (loop.step, loop.tokens, loop.train_time_s) == (4, 400, 11.0)
    assert (loop.timed_tokens, loop.timed_time_s) == (200, 2.0)


# ----------------------------------------------------------------------------- evaluate and cross

def test_evaluate_is_the_token_weighted_mean_loss_and_restores_train_mode():
    torch.manual_seed(0)
    model = ToyLM().train()
    val = torch.randint(0, VOCAB, (5, SEQ + 1))
    got = evaluate(model, val, batch_size=2, device=CPU, autocast=contextlib.nullcontext)
    with torch.no_grad():
        logits = model(input_ids=val[:, :-1]).logits
        want = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), val[:, 1:].reshape(-1))
    assert got == pytest.approx(want.item(), rel=1e-6)
    assert model.training
    assert perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert perplexity(1e6) == math.exp(700.0)                   # capped, not an overflow


def test_record_evaluation_tracks_best_and_interpolates_the_crossing():
    loop = LoopState(tokens=1000)
    # First evaluation: interpolated from (0 tokens, vocab-size perplexity).
    assert record_evaluation(loop, 200.0, target=100.0, vocab_size=400) is None
    assert (loop.best_ppl, loop.best_ppl_tokens, loop.last_eval_ppl) == (200.0, 1000, 200.0)
    loop.tokens = 2000
    assert record_evaluation(loop, 300.0, target=100.0, vocab_size=400) is None
    assert loop.best_ppl == 200.0 and loop.last_eval_ppl == 300.0   # best kept, last updated
    loop.tokens = 3000
    crossed = record_evaluation(loop, 75.0, target=150.0, vocab_size=400)
    # log ppl from log 300 (2000) to log 75 (3000): log 150 is exactly halfway.
    assert crossed == pytest.approx(2500.0)
    assert [e["ppl"] for e in loop.evals] == [200.0, 300.0, 75.0]
    first = LoopState(tokens=1000)
    t = record_evaluation(first, 25.0, target=100.0, vocab_size=400)
    assert t == pytest.approx(500.0)                       # log 400 -> log 25, halfway at log 100
    assert record_evaluation(LoopState(tokens=10), 1.0, target=None, vocab_size=400) is None


# ----------------------------------------------------------------------------- divergence

def _check(**kw):
    args = dict(ratio=2.0, ema=0.9, warmup_tokens=0, vocab_size=512)
    return DivergenceCheck(**{**args, **kw})


def _feed_train(check, losses, tokens_per_step=100):
    loop = LoopState()
    for loss in losses:
        advance_clock(loop, tokens_per_step, 0.0)
        out = check.after_step(loop, loss, 1.0)
        if out is not None:
            return out, loop
    return None, loop


def _feed_eval(check, val_losses, tokens_per_eval=1000):
    loop = LoopState()
    for v in val_losses:
        loop.tokens += tokens_per_eval
        out = check.after_eval(loop, v)
        if out is not None:
            return out, loop
        record_evaluation(loop, perplexity(v), None, 512)
    return None, loop


def test_divergence_train_rules():
    healthy = [6.3 - 0.01 * i + 0.2 * math.sin(i) for i in range(300)]   # noisy, falling
    assert _feed_train(_check(), healthy)[0] is None
    out, loop = _feed_train(_check(), [3.0] * 20 + [8.0] * 30)
    assert out.status == "diverged" and "smoothed train loss" in out.diverged_reason
    assert loop.loss_ema > 2.0 * loop.best_loss_ema and out.diverged_at_tokens == loop.tokens
    # During warmup the best is not tracked, so a falling-then-rising start does not fire.
    assert _feed_train(_check(warmup_tokens=10_000), [3.0] * 20 + [8.0] * 30)[0] is None
    out, _ = _feed_train(_check(), [3.0, float("nan")])
    assert out.diverged_reason == "non-finite loss at step 2"
    loop = LoopState(step=7)
    assert "gradient norm at step 7" in _check().after_step(loop, 3.0, float("inf")).diverged_reason


def test_divergence_validation_rules():
    # Real validation curves of the tests' tiny runs (vocab 512) and of the demo at lr=0.3
    # (vocab 2048): never diverged.
    for curve, vocab in (([6.136, 5.827, 5.69, 5.647], 512), ([6.187], 512),
                         ([7.263, 6.762, 6.742, 6.697, 6.691, 6.681, 6.662, 6.564], 2048)):
        assert _feed_eval(_check(vocab_size=vocab), curve)[0] is None, curve
    # A blow-up against the best so far (5.5 -> 11.5 nats: ppl x 400)...
    out, loop = _feed_eval(_check(), [6.0, 5.5, 6.2, 11.5, 5.0])
    assert out.status == "diverged" and out.diverged_at_tokens == 4000
    assert "best loss 5.500" in out.diverged_reason and len(loop.evals) == 3
    assert loop.best_ppl == pytest.approx(math.exp(5.5))       # the exploded eval is no best
    # ...or, at the first evaluation, against the uniform guess (the tiny model at lr=0.3).
    out, _ = _feed_eval(_check(), [15.222])
    assert "uniform-guess loss 6.238" in out.diverged_reason
    assert _feed_eval(_check(), [12.4])[0] is None              # below 2 x log 512 = 12.48
    out, _ = _feed_eval(_check(), [6.0, float("nan")])
    assert out.diverged_reason == "non-finite validation loss"


# ----------------------------------------------------------------------------- checkpoint

def test_checkpoint_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    model, loader, state = ToyLM(), _loader(), QuantState(seed=3)
    opt = make_optimizer(model, _train_cfg(), CPU)
    _step(model, loader, optimizer=opt, state=state)(1e-2)
    loop = LoopState(step=1, tokens=32, loss_ema=3.5)
    path = tmp_path / CHECKPOINT
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    save_checkpoint(path, model, opt, loop, loader, state, CPU)
    expect = (torch.rand(3), random.random(), np.random.rand())
    mode = path.stat().st_mode & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]   # no temporary file left

    model2, loader2, state2 = ToyLM(), _loader(), QuantState(seed=0)
    opt2 = make_optimizer(model2, _train_cfg(), CPU)
    got = load_checkpoint(path, model2, opt2, loader2, state2, CPU)
    assert got == loop and state2.step == 1 and state2.seed == 3
    assert loader2.state_dict() == loader.state_dict()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    again = (torch.rand(3), random.random(), np.random.rand())   # every RNG state came back
    assert torch.equal(again[0], expect[0]) and again[1:] == expect[1:]
    # The next step after loading equals the next step without the round trip.
    r1 = _step(model, loader, optimizer=opt, state=state)(1e-2)
    r2 = _step(model2, loader2, optimizer=opt2, state=state2)(1e-2)
    assert (r1.loss, r1.grad_norm) == (r2.loss, r2.grad_norm)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, loader, state = ToyLM(), _loader(), QuantState()
    opt = make_optimizer(model, _train_cfg(), CPU)
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, model, opt, LoopState(step=1), loader, state, CPU)
    real_save = torch.save

    def torn(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError):
        save_checkpoint(path, model, opt, LoopState(step=2), loader, state, CPU)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path, model, opt, loader, state, CPU).step == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert delete_checkpoint(path) is True
    assert not path.exists() and not path.parent.exists()         # the empty directory too
    assert delete_checkpoint(path) is False


# ----------------------------------------------------------------------------- metrics

def test_train_log_records_and_cuts_back_on_resume(tmp_path):
    seen = []
    log = TrainLog(tmp_path, LoopState(), seen.append, log_every_steps=3)
    loop = LoopState()
    for _ in range(7):
        advance_clock(loop, 10, 0.5)
        log.train_record(loop, 0.1, StepResult(2.0, 1.0, 1e-3, 0.5), 10)
    log.eval_record(loop, 0.1, math.log(9.0), 9.0)
    log.close()
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 3, 6]
    assert recs[0]["tokens_per_s"] == 20.0 and recs[-1]["val_ppl"] == 9.0
    assert seen == recs
    # Resuming at step 3 keeps what the checkpoint had seen and nothing after it.
    TrainLog(tmp_path, LoopState(step=3), lambda r: None).close()
    kept = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [1, 3]
    TrainLog(tmp_path, LoopState(), lambda r: None).close()      # a fresh start: empty
    assert (tmp_path / "metrics.jsonl").read_text() == ""


# ----------------------------------------------------------------------------- the wiring

def test_trainer_goes_on_past_the_target_and_keeps_the_final_checkpoint(tmp_path, monkeypatch):
    from fp4_experiments.training import loop as loop_mod
    tc = _train_cfg(max_tokens=8 * 32, target_ppl=1e9, stop_at_target=False, batch_size=4,
                    micro_batch_size=2, eval_every_tokens=3 * 32, eval_batch_size=4,
                    checkpoint_every_steps=3, log_every_steps=2, keep_final_checkpoint=True)
    cfg = SimpleNamespace(train=tc, model=SimpleNamespace(seq_len=SEQ),
                          hardware=SimpleNamespace(autocast_dtype="bfloat16", compile=False))
    saves, seen = [], []
    real_save = loop_mod.save_checkpoint
    monkeypatch.setattr(loop_mod, "save_checkpoint",
                        lambda path, model, opt, loop, *a: (saves.append(loop.step),
                                                            real_save(path, model, opt, loop, *a)))
    torch.manual_seed(0)
    val = torch.randint(0, VOCAB, (6, SEQ + 1))
    trainer = loop_mod.Trainer(cfg=cfg, model=ToyLM(), loader=_loader(batch_size=2), val=val,
                               vocab_size=VOCAB, quant_state=QuantState(), device=CPU,
                               run_dir=tmp_path, resume=False, on_metrics=seen.append)
    out = trainer.run()
    loop = trainer.loop
    # Reached at the first evaluation (3 steps of 32 tokens), then trained on to the budget.
    assert out.status == "reached" and out.tokens_to_target == 96.0
    assert (loop.step, loop.tokens) == (8, 256)
    assert [e["tokens"] for e in loop.evals] == [96, 192, 256]   # every 96 tokens and the end
    assert saves == [3, 6, 8]                    # periodic, then the final (keep_final_checkpoint)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["loop"]["step"] == 8
    assert [r["step"] for r in seen if r["kind"] == "train"] == [1, 2, 4, 6, 8]
