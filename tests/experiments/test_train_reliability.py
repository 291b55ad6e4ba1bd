"""Reliability of whole runs: validation blow-ups diverge, one process per run directory, and a
finished run drops its checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cli_support import REPO, run_cli
from fp4_experiments.rundir import CHECKPOINT, run_dir_for
from fp4_experiments.runlock import LOCK, RunLocked, run_lock
from fp4_experiments.runner import run_experiment

HERE = Path(__file__).resolve().parent


def _metrics(run_dir: Path):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_exploding_validation_perplexity_is_diverged(tiny, compose):
    # lr=0.3 (100x the demo's) on the tiny model: the train-loss EMA stays under 2x its best,
    # but the first evaluation's perplexity is ~4e6 for a 512-token vocabulary.
    cfg = compose(tiny("train.lr=0.3", "train.max_tokens=8192"))
    s = run_experiment(cfg)
    assert s["status"] == "diverged", s
    assert s["diverged_at_tokens"] == 1024 and s["steps"] == 4
    assert "validation loss" in s["diverged_reason"] and "uniform-guess" in s["diverged_reason"]
    (ev,) = [m for m in _metrics(run_dir_for(cfg)) if m["kind"] == "eval"]
    assert ev["val_ppl"] > 512 ** 2


def test_lock_is_exclusive_and_names_its_holder(tmp_path):
    with run_lock(tmp_path) as path:
        assert path == tmp_path / LOCK
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["started_at"]
        # flock is per open file: a second open, even in this process, is refused.
        with pytest.raises(RunLocked, match=f"pid {os.getpid()} on "):
            with run_lock(tmp_path):
                pass
    assert path.read_text() == ""          # released and emptied
    with run_lock(tmp_path):               # free again
        pass


# A training process that holds the lock and waits at its first step until `release` exists.
_HOLDER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {here!r})
    from cli_support import TINY
    from fp4_ablate.hydra_app import compose
    from fp4_experiments.runner import run_experiment
    from fp4_experiments.training import step as step_mod
    real = step_mod.TrainStep.__call__
    def gated(self, lr):
        while not os.path.exists({release!r}):
            time.sleep(0.05)
        return real(self, lr)
    step_mod.TrainStep.__call__ = gated
    s = run_experiment(compose([*TINY, *{overrides!r}]))
    print(json.dumps(s))
""")

# A second process on the same run, through run_experiment(wait=True) as a sweep job calls it.
_WAITER = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.path.insert(0, {here!r})
    from cli_support import TINY
    from fp4_ablate.hydra_app import compose
    from fp4_experiments.runner import run_experiment
    s = run_experiment(compose([*TINY, *{overrides!r}]), wait=True)
    print(json.dumps(s))
""")


def _spawn(template: str, stderr: Path | None = None, **kw) -> subprocess.Popen:
    code = template.format(here=str(HERE), **kw)
    cmd = [sys.executable, "-c", code]
    if stderr is None:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    with open(stderr, "w") as err:   # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)


def _wait_for_holder(run_dir: Path, pid: int, proc: subprocess.Popen, timeout=120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if json.loads((run_dir / LOCK).read_text())["pid"] == pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("the first process never took the run lock")


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (err or "")[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_second_run_command_on_a_training_run_exits_3(tmp_path, cache_dir, compose, tiny):
    overrides = [f"cache_dir={cache_dir}", f"results_dir={tmp_path / 'runs'}"]
    run_dir = run_dir_for(compose(tiny(results=tmp_path / "runs")))
    release = tmp_path / "release"
    first = _spawn(_HOLDER, overrides=overrides, release=str(release))
    try:
        _wait_for_holder(run_dir, first.pid, first)
        r = run_cli("run", *tiny(results=tmp_path / "runs"))
        assert r.returncode == 3, (r.stdout, r.stderr)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "being trained by another process" in lines[0]
        assert f"pid {first.pid} on " in lines[0]
    finally:
        release.touch()
    s = _finish(first)
    assert s["status"] == "completed"
    steps = [m["step"] for m in _metrics(run_dir) if m["kind"] == "train"]
    assert steps == list(range(1, s["steps"] + 1))       # one process trained it, once
    assert json.loads((run_dir / "summary.json").read_text())["wall_time_s"] == s["wall_time_s"]


def test_a_sweep_job_waits_for_the_lock_then_skips(tmp_path, cache_dir, compose, tiny):
    overrides = [f"cache_dir={cache_dir}", f"results_dir={tmp_path / 'runs'}"]
    run_dir = run_dir_for(compose(tiny(results=tmp_path / "runs")))
    release = tmp_path / "release"
    first = _spawn(_HOLDER, overrides=overrides, release=str(release))
    try:
        _wait_for_holder(run_dir, first.pid, first)
        err_log = tmp_path / "second.err"
        second = _spawn(_WAITER, overrides=overrides, stderr=err_log)
        deadline = time.time() + 120
        while "waiting for the run lock" not in err_log.read_text():
            assert second.poll() is None and time.time() < deadline, err_log.read_text()
            time.sleep(0.1)
        assert f"held by pid {first.pid} on " in err_log.read_text()
    finally:
        release.touch()
    s1, s2 = _finish(first), _finish(second)
    assert s1["status"] == "completed" and s2 == s1      # found finished: returned, not re-run
    steps = [m["step"] for m in _metrics(run_dir) if m["kind"] == "train"]
    assert steps == list(range(1, s1["steps"] + 1))


def test_finished_run_drops_its_checkpoint_unless_asked(tiny, compose, tmp_path):
    cfg = compose(tiny(results=tmp_path / "a"))
    s = run_experiment(cfg)
    run_dir = run_dir_for(cfg)
    assert s["status"] == "completed"
    assert not (run_dir / CHECKPOINT).exists() and not (run_dir / "checkpoints").exists()
    log_before = (run_dir / "run.log").read_text()
    assert run_experiment(cfg) == s                          # still skipped: summary present
    assert (run_dir / "run.log").read_text() == log_before   # nothing ran
    forced = run_experiment(compose(tiny("sweep.force=true", results=tmp_path / "a")))
    assert forced["status"] == "completed" and forced["wall_time_s"] != s["wall_time_s"]
    assert forced["final_ppl"] == s["final_ppl"]
    assert not (run_dir / CHECKPOINT).exists()

    keep = compose(tiny("train.keep_final_checkpoint=true", results=tmp_path / "b"))
    assert run_dir_for(keep).name == run_dir.name            # not part of the run key
    kept = run_experiment(keep)
    assert (run_dir_for(keep) / CHECKPOINT).exists()
    import torch
    ckpt = torch.load(run_dir_for(keep) / CHECKPOINT, weights_only=False)
    assert ckpt["loop"]["step"] == kept["steps"]             # the final state, not a periodic one
