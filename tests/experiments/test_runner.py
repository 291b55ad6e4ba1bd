"""The runner: every rung x stabilizer runs, statuses, exact resume, crossing interpolation."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fp4_experiments.rundir import run_dir_for
from fp4_experiments.runner import run_experiment
from fp4_experiments.training import interpolate_crossing, lr_at
from fp4_experiments.training import loop as loop_mod

LADDERS = ("bf16", "fp8", "fprop", "dgrad", "wgrad")
STABILIZERS = ("none", "sr", "rht", "h16")
TIMING = {"tokens_per_s", "step_time_s"}


def _metrics(run_dir: Path):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_crossing_is_linear_in_log_ppl():
    # log ppl goes from log 100 to log 25 over 1000 tokens; log 50 is exactly halfway.
    assert interpolate_crossing(1000, 100.0, 2000, 25.0, 50.0) == pytest.approx(1500.0)
    # target equal to the later point: the crossing is that evaluation.
    assert interpolate_crossing(0, 80.0, 500, 40.0, 40.0) == pytest.approx(500.0)
    t = interpolate_crossing(0, math.e ** 4, 400, math.e ** 2, math.e ** 3.5)
    assert t == pytest.approx(100.0)


def test_lr_schedule_depends_on_tokens_only():
    class T:
        lr, min_lr_ratio, warmup_tokens, max_tokens = 1.0, 0.1, 100, 1100
    assert lr_at(49, T) == pytest.approx(0.5)
    assert lr_at(100, T) == pytest.approx(1.0)
    assert lr_at(600, T) == pytest.approx(0.55)   # halfway through the cosine
    assert lr_at(1100, T) == pytest.approx(0.1)


@pytest.mark.parametrize("ladder", LADDERS)
def test_every_rung_and_stabilizer_runs(ladder, tiny, compose):
    for stab in STABILIZERS:
        cfg = compose(tiny(f"+ladder={ladder}", f"+stabilizer={stab}", "train.max_tokens=768",
                           "train.eval_every_tokens=512"))
        summary = run_experiment(cfg)
        assert summary["status"] == "completed", summary
        assert summary["ladder"] == ladder and summary["stabilizer"] == stab
        assert summary["steps"] == 3 and math.isfinite(summary["final_ppl"])
        paths = summary["gemm_paths"]
        fp4 = {"bf16": [], "fp8": [], "fprop": ["fprop"], "dgrad": ["fprop", "dgrad"],
               "wgrad": ["fprop", "dgrad", "wgrad"]}[ladder]
        for gemm in ("fprop", "dgrad", "wgrad"):
            assert paths[gemm]["precision"] == ("fp4" if gemm in fp4 else
                                                ("bf16" if ladder == "bf16" else "fp8")), paths


def test_run_directory_is_self_describing(tiny, compose):
    cfg = compose(tiny("train.target_ppl=1000000", "seed=3"))
    s = run_experiment(cfg)
    run_dir = run_dir_for(cfg)
    assert s["status"] == "reached" and s["tokens_to_target"] <= 1024
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["seed"] == 3 and meta["versions"]["torch"] and meta["device_name"]
    assert "git_commit" in meta
    assert (run_dir / "config.yaml").read_text().count("ladder:") == 1
    for key in ("param_count", "mean_tokens_per_s", "gemm_paths", "recipe", "torch_version",
                "device_name", "best_ppl", "epochs"):
        assert s[key] is not None, key
    assert json.loads((run_dir / "summary.json").read_text())["run_key"] == s["run_key"]
    # Where the wall time went: every part measured, together within this attempt's wall time.
    parts = s["time_s"]
    assert set(parts) == {"steps", "evaluation", "diagnostics", "checkpoints"}
    assert parts["steps"] > 0 and parts["evaluation"] > 0 and all(v >= 0 for v in parts.values())
    assert sum(parts.values()) <= s["wall_time_s"]
    # The same command again finds the finished run and does not train again.
    again = run_experiment(cfg)
    assert again == s


def test_absurd_learning_rate_diverges_not_crashes(tiny, compose):
    cfg = compose(tiny("+ladder=wgrad", "train.lr=1000", "train.max_tokens=5120",
                       "train.warmup_tokens=256"))
    s = run_experiment(cfg)
    assert s["status"] == "diverged", s
    assert s["diverged_at_tokens"] is not None and s["diverged_reason"]


def test_check_finite_names_layer_gemm_and_operand(tiny, compose, monkeypatch):
    import fp4_experiments.model as model_mod
    real = model_mod.causal_lm_loss

    def poisoned(model, input_ids, labels):
        # A NaN gradient enters every layer's backward through the loss.
        return real(model, input_ids, labels) * float("nan")

    monkeypatch.setattr("fp4_experiments.training.step.causal_lm_loss", poisoned)
    cfg = compose(tiny("+ladder=wgrad", "train.check_finite=true"))
    s = run_experiment(cfg)
    assert s["status"] == "diverged"
    reason = s["diverged_reason"].lower()
    assert "layers." in reason and any(g in reason for g in ("dgrad", "wgrad", "fprop"))
    assert "dy" in reason


class _Kill(Exception):
    pass


def test_resume_after_interruption_is_exact(tiny, compose, tmp_path, monkeypatch):
    base = ("+ladder=wgrad", "+stabilizer=sr", "train.max_tokens=4096")
    full = run_experiment(compose(tiny(*base, results=tmp_path / "a")))

    cfg = compose(tiny(*base, results=tmp_path / "b"))
    real_save = loop_mod.save_checkpoint
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:   # after the step-6 checkpoint, mid-run
            raise _Kill()

    monkeypatch.setattr(loop_mod, "save_checkpoint", save_then_die)
    with pytest.raises(_Kill):
        run_experiment(cfg)
    run_dir = run_dir_for(cfg)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    assert (run_dir / "traceback.txt").exists()
    assert (run_dir / "checkpoints" / "last.pt").exists()   # an unfinished run keeps it
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    resumed = run_experiment(cfg)
    assert "resumed from" in (run_dir / "run.log").read_text()
    # The failed attempt's traceback stays, renamed: a finished run has no traceback.txt.
    assert not (run_dir / "traceback.txt").exists()
    assert len(list(run_dir.glob("failed-attempt-*.txt"))) == 1
    assert not (run_dir / "checkpoints" / "last.pt").exists()   # a finished one does not

    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING} for m in ms]  # noqa: E731
    assert strip(_metrics(run_dir)) == strip(_metrics(run_dir_for(
        compose(tiny(*base, results=tmp_path / "a")))))
    for key in ("final_ppl", "best_ppl", "steps", "tokens_seen", "status"):
        assert resumed[key] == full[key], key


def test_wandb_offline(tiny, compose, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose(tiny("logger=wandb", "logger.tags=[test]", "train.max_tokens=1024"))
    s = run_experiment(cfg)
    run_dir = run_dir_for(cfg)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, list((run_dir / "wandb").iterdir())
    assert any(p.suffix == ".wandb" for p in offline[0].iterdir())
    assert s["status"] == "completed"


def test_git_commit_prefers_the_senders_word(tmp_path, monkeypatch):
    """A tree shipped to a GPU machine may carry a stale .git: FP4_ABLATE_GIT_COMMIT wins."""
    import re
    from fp4_experiments.rundir import git_commit
    monkeypatch.delenv("FP4_ABLATE_GIT_COMMIT", raising=False)
    commit, dirty = git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert git_commit(tmp_path) == (None, None)          # no repository there
    monkeypatch.setenv("FP4_ABLATE_GIT_COMMIT", "0123abc")
    assert git_commit() == ("0123abc", None)
    assert git_commit(tmp_path) == ("0123abc", None)
