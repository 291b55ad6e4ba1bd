"""One run on several processes (experiments/distributed.py): torchrun + gloo on the CPU.

Measured on the 2-core CPU (wgrad + SR, per-rank micro-batch 2, 6 steps, an evaluation every 3):
DDP and FSDP2 reproduce the one-process run to < 1e-6 relative (asserted; observed: the step-1
loss and every validation loss bit-identical, later train losses within 1 float32 ulp, 8e-8: the
gradient all-reduce sums in another order, the SR draws are the same); a 2-process run resumed
after a crash is bit-identical to the uninterrupted one, and resumed on 1 process within 1e-6.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_support import TINY

pytestmark = pytest.mark.slow

REL = 1e-6  # one-process vs 2-process loss tolerance (observed: <= 8e-8 relative, 1 float32 ulp)
STEPS = 6
COMMON = [*[o for o in TINY if not o.startswith(("model.num_layers", "train.batch_size",
                                                  "train.max_tokens", "train.eval_every"))],
          "model.num_layers=2", "train.batch_size=8", "train.micro_batch_size=2",
          f"train.max_tokens={STEPS * 8 * 64}", "train.eval_every_tokens=1536",
          "+ladder=wgrad", "+stabilizer=sr"]
TIMING = ("tokens_per_s", "step_time_s")

CRASH = """
import os, sys
from fp4_experiments.training import step as step_mod
_call = step_mod.TrainStep.__call__
def call(self, lr):
    if os.environ["RANK"] == "1" and self.quant_state.step == 4:
        raise RuntimeError("injected crash on rank 1 at step 4")
    return _call(self, lr)
step_mod.TrainStep.__call__ = call
from fp4_ablate.main import main
sys.exit(main())
"""


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(overrides, nproc=None, script=None, timeout=150):
    """`fp4-ablate run` in a subprocess: plain, or under torchrun with `nproc` processes."""
    target = [str(script)] if script else ["-m", "fp4_ablate"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    return subprocess.run([*launch, *target, "run", *overrides], env=_env(), timeout=timeout,
                          capture_output=True, text=True)


def _run_dir(results: Path) -> Path:
    (d,) = [p for p in results.iterdir() if p.is_dir()]
    return d


def _metrics(run_dir: Path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _close(a, b, rel=REL):
    return abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run (global batch 8, micro-batch 2 per rank) on 1 process, 2 DDP, 2 FSDP2."""
    root = tmp_path_factory.mktemp("dist")
    cache = root / "cache"
    out = {}
    for name, nproc, mode in (("one", None, "none"), ("ddp", 2, "ddp"), ("fsdp2", 2, "fsdp2")):
        results = root / name
        p = _run([*COMMON, f"cache_dir={cache}", f"results_dir={results}", f"parallel={mode}"],
                 nproc)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        out[name] = _run_dir(results)
    out["root"], out["cache"] = root, cache
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one_process(runs, mode):
    one, two = _metrics(runs["one"]), _metrics(runs[mode])
    assert [(m["kind"], m["step"], m["tokens"]) for m in one] == \
        [(m["kind"], m["step"], m["tokens"]) for m in two]
    assert len([m for m in one if m["kind"] == "train"]) == STEPS
    assert one[0]["loss"] == two[0]["loss"]  # same weights, same micro-batches, same SR draws
    for a, b in zip(one, two):
        key = "loss" if a["kind"] == "train" else "val_loss"
        assert _close(a[key], b[key]), (mode, a, b)
        if a["kind"] == "train":
            assert _close(a["grad_norm"], b["grad_norm"], 1e-5), (mode, a, b)
    s1 = json.loads((runs["one"] / "summary.json").read_text())
    s2 = json.loads((runs[mode] / "summary.json").read_text())
    for key in ("steps", "tokens_seen", "tokens_per_step", "epochs", "run_key"):
        assert s1[key] == s2[key], key
    assert (s1["world_size"], s1["parallel"], s1["micro_batch_per_rank"],
            s1["allreduce_dtype"]) == (1, "none", 2, None)
    assert (s2["world_size"], s2["parallel"], s2["micro_batch_per_rank"],
            s2["allreduce_dtype"]) == (2, mode, 2, "float32")


def test_only_rank_zero_writes_the_run_directory(runs):
    for mode in ("ddp", "fsdp2"):
        names = sorted(p.name for p in runs[mode].iterdir())
        assert names == sorted(p.name for p in runs["one"].iterdir()), names
        assert not list(runs[mode].glob("traceback*"))
        # One writer: each record once (two writers would interleave or duplicate lines).
        steps = [(m["kind"], m["step"]) for m in _metrics(runs[mode])]
        assert len(steps) == len(set(steps))
        assert (runs[mode] / "run.log").read_text().count("parameters (") == 1


def test_crashing_rank_fails_the_run_and_it_resumes_on_two_or_one(runs, tmp_path):
    """Rank 1 raises at step 4 (after the sharded step-3 checkpoint): the run ends `failed` with
    rank 1's traceback, no hang; resumed on 2 ranks it equals the uninterrupted 2-rank run
    exactly, resumed on 1 process (DCP resharding) it equals it to the tolerance."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    results = tmp_path / "crashed"
    args = [*COMMON, f"cache_dir={runs['cache']}", f"results_dir={results}", "parallel=fsdp2"]
    p = _run(args, 2, script, timeout=120)
    assert p.returncode != 0
    run_dir = _run_dir(results)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "injected crash on rank 1" in summary["error"]
    assert "injected crash on rank 1" in (run_dir / "traceback.rank1.txt").read_text()
    assert (run_dir / "checkpoints" / "last.dcp" / "extra.pt").exists()
    assert not (run_dir / "checkpoints" / "last.pt").exists()

    one_rank = tmp_path / "one_rank"
    shutil.copytree(results, one_rank)
    p = _run(args, 2)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from" in (run_dir / "run.log").read_text()
    assert _metrics(run_dir) == _metrics(runs["fsdp2"])
    assert not (run_dir / "checkpoints").exists()  # finished: the checkpoint is dropped
    assert list(run_dir.glob("failed-attempt-*.rank1.txt"))

    p = _run([*args[:-2], f"results_dir={one_rank}", "parallel=none"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    resumed, full = _metrics(_run_dir(one_rank)), _metrics(runs["fsdp2"])
    assert [(m["kind"], m["step"]) for m in resumed] == [(m["kind"], m["step"]) for m in full]
    for a, b in zip(resumed, full):
        key = "loss" if a["kind"] == "train" else "val_loss"
        assert _close(a[key], b[key]), (a, b)


@pytest.mark.parametrize("stabilizer", ["sr", "sr_fprop"])
def test_activation_checkpointing_replays_the_forward_exactly(runs, tmp_path, stabilizer):
    """The recomputed forward reuses its call index: the same SR draws (dY in Wgrad; with
    sr_operands=all on every GEMM also X and W in Fprop, the one recipe whose forward draws
    random numbers), so the run is bit-identical to the one without."""
    extra = [] if stabilizer == "sr" else ["stabilizer.sr_operands=all",
                                           "stabilizer.gemms=[fprop,dgrad,wgrad]"]
    reference = runs["one"]
    if extra:
        p = _run([*COMMON, *extra, f"cache_dir={runs['cache']}", f"results_dir={tmp_path / 'a'}"])
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        reference = _run_dir(tmp_path / "a")
    p = _run([*COMMON, *extra, f"cache_dir={runs['cache']}", f"results_dir={tmp_path / 'b'}",
              "parallel.activation_checkpointing=true"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert _metrics(_run_dir(tmp_path / "b")) == _metrics(reference)


# -- in one process: data split and draw identities ------------------------------------------

def test_ranks_read_disjoint_slices_of_the_one_process_order():
    from fp4_experiments.data import TrainLoader
    tokens = torch.arange(65 * 37).numpy()
    one = TrainLoader(tokens, 64, 2, seed=5)
    ranks = [TrainLoader(tokens, 64, 2, seed=5, rank=r, world_size=3) for r in range(3)]
    for _ in range(10):  # past an epoch boundary (37 windows)
        for r in ranks:
            x, _ = r.next_batch()
            assert torch.equal(x, one.next_batch()[0])
        states = [r.state_dict() for r in ranks]
        assert states[0] == states[1] == states[2] == one.state_dict()
    assert ranks[0].epoch == one.epoch > 1


def _wgrad(state, x, dy, recipe):
    from fp4.linear import QuantLinear
    torch.manual_seed(0)
    layer = QuantLinear(64, 32, bias=False, recipe=recipe, state=state)
    x = x.clone().requires_grad_(True)
    layer(x).backward(dy)
    return layer.weight.grad


def test_sr_draws_differ_per_rank_and_follow_the_one_process_call_index():
    from fp4.linear import QuantState
    from fp4.recipe import Recipe
    recipe = Recipe(ladder="wgrad", stabilizer="sr", seed=3)
    x, dy = torch.randn(64, 64), torch.randn(64, 32)
    rank0, rank1 = QuantState(3, rank=0, world_size=2), QuantState(3, rank=1, world_size=2)
    g0, g1 = _wgrad(rank0, x, dy, recipe), _wgrad(rank1, x, dy, recipe)
    assert not torch.equal(g0, g1)  # same operands, independent SR noise
    # Rank 1's first micro-batch draws what the one-process run's second one draws.
    one = QuantState(3)
    one.next_call(0)
    assert torch.equal(g1, _wgrad(one, x, dy, recipe))
    # One process, rank 0 of 1: today's identities (call 0 of layer 0).
    assert torch.equal(_wgrad(QuantState(3, rank=0, world_size=1), x, dy, recipe),
                       _wgrad(QuantState(3), x, dy, recipe))


@pytest.mark.parametrize("signs", ["fixed", "step"])
def test_hadamard_signs_agree_on_every_rank(signs):
    from fp4.linear import QuantLinear, QuantState, _GemmCall
    from fp4.recipe import Recipe
    recipe = Recipe(ladder="wgrad", stabilizer="rht", hadamard_signs=signs, seed=3)
    drawn = []
    for rank in range(4):
        state = QuantState(3, step=7, rank=rank, world_size=4)
        layer = QuantLinear(64, 32, recipe=recipe, state=state, layer_index=2)
        call = _GemmCall(layer, torch.float32)
        drawn.append(call.signs("wgrad", recipe.specs["wgrad"].hadamard, torch.device("cpu")))
    assert all(torch.equal(drawn[0], s) for s in drawn[1:])
    assert drawn[0].abs().eq(1).all() and (drawn[0] < 0).any()


def test_parallel_config_is_checked(compose, tiny, monkeypatch):
    from fp4_experiments.validate import ConfigError, validate_config
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="parallel=none"):
        validate_config(compose(tiny()), environment=False)
    with pytest.raises(ConfigError, match="WORLD_SIZE=2"):
        validate_config(compose(tiny("parallel=ddp", "train.batch_size=6",
                                     "train.micro_batch_size=2")), environment=False)
    validate_config(compose(tiny("parallel=ddp", "train.batch_size=8",
                                 "train.micro_batch_size=2")), environment=False)
    with pytest.raises(ConfigError, match="param_dtype"):
        validate_config(compose(tiny("parallel=ddp", "parallel.param_dtype=bfloat16")),
                        environment=False)


def test_activation_checkpointing_recomputes_sr_fprop_with_the_same_draws():
    """The hazard and its fix, on one QuantLinear with SR of X and W in Fprop: a recomputation
    counted as a new call (plain torch.utils.checkpoint) draws other noise than the forward it
    repeats, so its output (and the gradients computed from it) differ; under
    QuantState.replaying (what wrap_model's context_fn enters) they are bit-identical."""
    import contextlib
    from torch.utils.checkpoint import checkpoint
    from fp4.linear import QuantLinear, QuantState
    from fp4.recipe import Recipe
    recipe = Recipe(ladder="wgrad", stabilizer="sr", sr_operands="all",
                    stabilizer_gemms=["fprop", "dgrad", "wgrad"], seed=3)
    assert {"sr:fprop.x", "sr:fprop.w"} <= set(recipe.random_draws)
    x0, dy = torch.randn(64, 64), torch.randn(64, 32)

    def grads(mode):
        state = QuantState(3)
        torch.manual_seed(0)
        layer = QuantLinear(64, 32, bias=False, recipe=recipe, state=state)
        x = x0.clone().requires_grad_(True)
        if mode == "plain":
            y = layer(x)
        else:
            recompute = state.replaying() if mode == "replay" else contextlib.nullcontext()
            y = checkpoint(layer, x, use_reentrant=False,
                           context_fn=lambda: (contextlib.nullcontext(), recompute))
        y.backward(dy)
        return layer.weight.grad, x.grad

    plain, replayed, counted = grads("plain"), grads("replay"), grads("counted")
    assert all(torch.equal(a, b) for a, b in zip(plain, replayed))
    assert not all(torch.equal(a, b) for a, b in zip(plain, counted))


def test_run_key_has_only_the_parallel_settings_that_change_numerics(compose, tiny):
    """World size, mode, timeout and activation checkpointing are not in the key (a run resumes
    on any number of ranks, under ddp or fsdp2 in float32); fsdp2 computing in bf16/fp16 is."""
    from fp4_experiments.rundir import experiment_dict, run_key
    base = run_key(compose(tiny()))                      # tiny: hardware=cpu
    same = [("parallel=ddp",), ("parallel=fsdp2",), ("parallel=fsdp2", "parallel.timeout_s=60",
            "parallel.activation_checkpointing=true"), ("parallel=fsdp2", "hardware.device=auto",
            "parallel.param_dtype=float32")]
    for extra in same:
        assert run_key(compose(tiny(*extra))) == base, extra
    assert "parallel" not in experiment_dict(compose(tiny("parallel=fsdp2")))
    # bf16 parameters: W is quantized from a rounded copy of the master weight.
    for extra, dtype in [(("hardware.device=auto",), "bfloat16"),
                         (("hardware.device=cuda",), "bfloat16"),
                         (("hardware.device=auto", "hardware.autocast_dtype=float16"), "float16"),
                         (("parallel.param_dtype=bfloat16",), "bfloat16")]:
        cfg = compose(tiny("parallel=fsdp2", *extra))
        assert experiment_dict(cfg)["parallel"] == {"param_dtype": dtype}, extra
        assert run_key(cfg) != base, extra
    assert run_key(compose(tiny("parallel=fsdp2", "hardware.device=auto"))) == \
        run_key(compose(tiny("parallel=fsdp2", "parallel.param_dtype=bfloat16")))
    # One process on any hardware: no parallel entry at all, so keys are what they were.
    assert run_key(compose(tiny("hardware.device=auto"))) == base


def test_committed_single_process_run_keys_are_unchanged():
    """The key recomputed from a committed run's config.yaml (written before parallel existed)
    is the one its summary.json recorded."""
    from omegaconf import OmegaConf
    from fp4_experiments.rundir import run_key
    runs = sorted((Path(__file__).resolve().parents[2] / "results" / "mxfp4-ladder-llama20m" /
                   "runs").glob("*/config.yaml"))[:8]
    assert runs
    for config in runs:
        recorded = json.loads((config.parent / "summary.json").read_text())["run_key"]
        assert run_key(OmegaConf.load(config)) == recorded, config.parent.name
