"""The real `fp4-ablate` entry point: Hydra behaviour, bad input, the demo, sweep + report."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_support import REPO, TINY, run_cli


def test_top_level_help_and_unknown_command():
    r = run_cli("--help")
    assert r.returncode == 0 and "sweep" in r.stdout and "report" in r.stdout
    r = run_cli("trian")
    assert r.returncode == 2 and "run, sweep, report" in r.stderr


def test_run_help_and_cfg_job_behave_like_hydra():
    r = run_cli("run", "--help")
    assert r.returncode == 0, r.stderr
    assert "ladder" in r.stdout and "stabilizer" in r.stdout and "model" in r.stdout
    r = run_cli("run", "--cfg", "job", "+ladder=wgrad", "+stabilizer=h16", "model=llama-20m")
    assert r.returncode == 0, r.stderr
    assert "name: wgrad" in r.stdout and "name: h16" in r.stdout and "hidden_size: 384" in r.stdout


@pytest.mark.parametrize("args, expected", [
    (["train.lr_peak=1"], ["train.lr_peak", "Valid keys under train", "lr"]),
    (["+ladder=wgrd"], ["ladder/wgrd", "wgrad", "fprop"]),
    (["format.scale_mode=flor"], ["format.scale_mode='flor'", "floor", "rceil", "even"]),
    (["+stabilizer=h16", "stabilizer.hadamard_signs=sometimes"], ["hadamard_signs", "step", "fixed"]),
])
def test_bad_input_fails_before_any_work(tmp_path, args, expected):
    runs = tmp_path / "runs"
    r = run_cli("run", f"results_dir={runs}", f"cache_dir={tmp_path / 'cache'}", *args)
    assert r.returncode != 0
    for text in expected:
        assert text in r.stderr, (text, r.stderr)
    assert not runs.exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_demo_reaches_its_target_through_the_cli(tmp_path):
    """`fp4-ablate run` on the default (demo) config, exactly as the README says."""
    t0 = time.time()
    r = run_cli("run", f"results_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}",
                "train.progress_bar=false")
    elapsed = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    (summary_path,) = (tmp_path / "runs").glob("fp8-none-mxfp4-demo-s0-*/summary.json")
    s = json.loads(summary_path.read_text())
    assert s["status"] == "reached", s
    assert "parameters" in r.stdout
    print(f"demo: {elapsed:.1f} s wall, reached at {s['tokens_to_target']:,.0f} tokens")


@pytest.mark.slow
def test_sweep_then_report_and_resume_after_kill(tmp_path, cache_dir):
    common = [*TINY, f"cache_dir={cache_dir}", "train.max_tokens=3072",
              "train.target_ppl=420"]
    # An uninterrupted sweep of the default grid.
    a = tmp_path / "a" / "runs"
    r = run_cli("sweep", *common, f"results_dir={a}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from fp4_experiments.sweep import DEFAULT_GRID
    n = len(DEFAULT_GRID)
    assert f"[sweep {n}/{n}]" in r.stdout and f"sweep finished: {n}/{n}" in r.stdout
    r = run_cli("report", str(a), "--out", str(tmp_path / "a" / "report"))
    assert r.returncode == 0, r.stderr
    rows_a = list(csv.DictReader(open(tmp_path / "a" / "report" / "table.csv")))
    assert len(rows_a) == n
    assert (tmp_path / "a" / "report" / "table.md").exists()
    assert list((tmp_path / "a" / "report").glob("*.png"))

    # The same sweep killed in the middle, then run again: it completes only what is missing.
    b = tmp_path / "b" / "runs"
    cmd = [sys.executable, "-m", "fp4_ablate", "sweep", *common, f"results_dir={b}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        done = list(b.glob("*/summary.json"))
        ckpts = [p for p in b.glob("*/checkpoints/last.pt")
                 if not (p.parent.parent / "summary.json").exists()]
        if len(done) >= 2 and ckpts:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = {p.parent.name for p in b.glob("*/summary.json")}
    assert 2 <= len(finished_before) < n
    r = run_cli("sweep", *common, f"results_dir={b}")
    assert r.returncode == 0, r.stdout[-3000:]
    assert r.stdout.count("already finished") >= len(finished_before)
    assert len(list(b.glob("*/summary.json"))) == n
    r = run_cli("report", str(b), "--out", str(tmp_path / "b" / "report"))
    assert r.returncode == 0, r.stderr
    rows_b = list(csv.DictReader(open(tmp_path / "b" / "report" / "table.csv")))
    # Everything but throughput (wall-clock dependent) must equal the uninterrupted sweep's.
    token_cols = ["label", "ladder", "stabilizer", "format", "n_runs", "n_reached", "n_diverged",
                  "n_not_reached", "tokens_mean", "cost_mean", "best_ppl", "diverged_at"]
    assert [{c: r[c] for c in token_cols} for r in rows_a] == \
           [{c: r[c] for c in token_cols} for r in rows_b]


def test_sweep_records_a_failure_and_goes_on(tmp_path, cache_dir):
    common = [*TINY, f"cache_dir={cache_dir}", "train.max_tokens=1024",
              f"results_dir={tmp_path / 'runs'}"]
    # More validation tokens than the validation split holds: known only once the data is
    # prepared, so the precheck passes, each job fails (before its run directory) and the
    # sweep goes on to the next, then exits 1 naming both.
    r = run_cli("sweep", *common, "+ladder=fp8,wgrad", "data.val_tokens=10000000",
                "sweep.seeds=1")
    assert r.returncode == 1, r.stdout[-2000:]
    assert "FAILED job 0" in r.stdout and "FAILED job 1" in r.stdout
    assert r.stdout.count("data.val_tokens=10000000") >= 2
    assert not list((tmp_path / "runs").glob("*/"))


def test_slurm_and_local_gpu_launchers_compose():
    r = run_cli("sweep", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_node=1", "--cfg", "hydra")
    assert r.returncode == 0, r.stderr
    assert "submitit" in r.stdout and "partition: gpu" in r.stdout
    r = run_cli("sweep", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "--cfg", "hydra")
    assert r.returncode == 0, r.stderr
    assert "JoblibLauncher" in r.stdout and "n_jobs: 2" in r.stdout


def test_gpu_slots_are_exclusive(tmp_path):
    from fp4_experiments.gpu_slots import gpu_slot
    with gpu_slot(2, tmp_path) as a:
        with gpu_slot(2, tmp_path) as b:
            assert {a, b} == {0, 1}
    with gpu_slot(2, tmp_path) as c:
        assert c == 0


def test_jobs_per_gpu_spreads_slots_over_gpus(tmp_path, monkeypatch):
    """sweep.jobs_per_gpu=2 on 2 GPUs: 4 slots, the first two on different GPUs, then doubled up."""
    import torch
    from omegaconf import OmegaConf
    import fp4_experiments.sweep as sweep
    from fp4_experiments.gpu_slots import gpu_slot
    from fp4_ablate.main import _parallel_launcher

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(sweep, "run_experiment", lambda cfg, ov, **kw: {"device": cfg.hardware.device})
    def cfg():  # each sweep job composes its own config
        return OmegaConf.create({"hardware": {"device": "cuda"}, "cache_dir": str(tmp_path),
                                 "sweep": {"jobs_per_gpu": 2}})
    devices = []
    with gpu_slot(4, tmp_path / "gpu-slots") as held:
        assert held == 0
        devices.append(sweep._run_on_free_gpu(cfg(), [])["device"])       # slot 1
        with gpu_slot(4, tmp_path / "gpu-slots") as held2:
            assert held2 == 1
            devices.append(sweep._run_on_free_gpu(cfg(), [])["device"])   # slot 2
    assert devices == ["cuda:1", "cuda:0"]
    assert _parallel_launcher(2) == ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _parallel_launcher(1) == []
    assert _parallel_launcher(6) == ["hydra/launcher=joblib", "hydra.launcher.n_jobs=6"]


def test_jobs_per_gpu_is_validated(tmp_path):
    r = run_cli("sweep", "sweep.jobs_per_gpu=0", f"results_dir={tmp_path}")
    assert r.returncode != 0 and "sweep.jobs_per_gpu=0 must be >= 1" in r.stderr


# The bench's own tests (plan, names, tables, the CPU refusal): tests/experiments/test_bench.py.
