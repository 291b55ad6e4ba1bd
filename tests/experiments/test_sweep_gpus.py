"""sweep.gpus_per_run=K: each sweep job's run on K torchrun processes (experiments/sweep.py) on a
locked group of K GPUs (experiments/gpu_slots.py); on the CPU, K gloo ranks.

The lock logic and the CUDA wiring are tested with fake GPU counts (no GPU here); the end-to-end
sweep runs on the CPU: 2 cells x 2 gloo ranks, then a sweep with a failing job and a finished one.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_support import TINY, run_cli

SHORT = [*[o for o in TINY if not o.startswith(("train.max_tokens", "train.eval_every",
                                                 "train.warmup"))],
         "train.max_tokens=768", "train.warmup_tokens=256", "train.eval_every_tokens=768"]


# -- group locks --------------------------------------------------------------------------------

def test_groups_of_two_out_of_four_never_overlap(tmp_path, monkeypatch):
    from fp4_experiments.gpu_slots import release_group, try_gpu_group
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    a = try_gpu_group(2, 4, tmp_path)
    b = try_gpu_group(2, 4, tmp_path)
    assert (a.indices, b.indices) == ([0, 1], [2, 3])
    assert (a.cuda_visible_devices, b.cuda_visible_devices) == ("0,1", "2,3")
    assert try_gpu_group(2, 4, tmp_path) is None          # all four taken
    assert try_gpu_group(4, 4, tmp_path) is None          # a group of another size too
    release_group(a)
    c = try_gpu_group(2, 4, tmp_path)
    assert c.indices == [0, 1]
    for g in (b, c):
        release_group(g)
    with pytest.raises(ValueError, match="must divide the 4 visible GPUs"):
        try_gpu_group(3, 4, tmp_path)


def test_a_group_never_shares_a_gpu_with_a_one_gpu_job(tmp_path, monkeypatch):
    """One-GPU seats hold their GPU's device lock shared; a group holds its GPUs exclusively."""
    from fp4_experiments.gpu_slots import gpu_slot, release_group, try_gpu_group
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with gpu_slot(4, tmp_path, n_gpus=4) as seat:             # seat 0: GPU 0
        assert seat == 0
        group = try_gpu_group(2, 4, tmp_path)
        assert group.indices == [2, 3]                        # not 0-1, where the seat is
        with gpu_slot(4, tmp_path, n_gpus=4) as seat2:        # seats on GPUs 2, 3 count as taken
            assert seat2 == 1
        assert try_gpu_group(2, 4, tmp_path) is None
        release_group(group)
    # Two seats per GPU (jobs_per_gpu=2) still share a GPU between themselves.
    with gpu_slot(8, tmp_path, n_gpus=4) as s0, gpu_slot(8, tmp_path, n_gpus=4) as s1:
        with gpu_slot(8, tmp_path, n_gpus=4) as s2, gpu_slot(8, tmp_path, n_gpus=4) as s3:
            with gpu_slot(8, tmp_path, n_gpus=4) as s4:
                assert (s0, s1, s2, s3, s4) == (0, 1, 2, 3, 4) and s4 % 4 == 0


def test_group_locks_hold_across_processes_and_name_physical_gpus(tmp_path, monkeypatch):
    """A sweep that sees CUDA_VISIBLE_DEVICES=4,5,6,7 and one that sees all 8 GPUs agree on
    physical GPUs 4-7; a group held by another process blocks them here too."""
    import os
    from fp4_experiments.gpu_slots import release_group, try_gpu_group
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    mine = try_gpu_group(2, 4, tmp_path)
    assert mine.indices == [0, 1] and mine.cuda_visible_devices == "4,5"
    other = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from fp4_experiments.gpu_slots import try_gpu_group;"
         f"g = try_gpu_group(2, 4, {str(tmp_path)!r}); print(g.cuda_visible_devices, flush=True);"
         "sys.stdin.read()"],
        env=dict(os.environ), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "6,7"     # 4-5 are mine
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        everything = try_gpu_group(4, 8, tmp_path)           # sees 0..7
        assert everything.indices == [0, 1, 2, 3]
        assert try_gpu_group(4, 8, tmp_path) is None         # 4-5 mine, 6-7 the other process's
        assert try_gpu_group(1, 8, tmp_path) is None
        release_group(everything)
    finally:
        other.communicate("", timeout=30)
    assert try_gpu_group(2, 8, tmp_path).indices == [0, 1]  # its locks went with it: 6-7 free
    assert try_gpu_group(2, 8, tmp_path).indices == [2, 3]
    assert try_gpu_group(2, 8, tmp_path).indices == [6, 7]
    release_group(mine)


def test_a_group_of_four_waits_for_the_other_process(tmp_path, monkeypatch):
    from fp4_experiments.gpu_slots import release_group, try_gpu_group
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    mine = try_gpu_group(2, 8, tmp_path)                    # 0-1
    assert try_gpu_group(4, 8, tmp_path).indices == [4, 5, 6, 7]   # 0-3 overlaps mine
    assert try_gpu_group(4, 8, tmp_path) is None
    release_group(mine)


# -- the sweep job's wiring, without processes -----------------------------------------------------

def _finished(run_dir: Path, **kw):
    from fp4_experiments.rundir import Status, Summary, atomic_write_json
    s = Summary(status=Status.completed, ladder="fp8", stabilizer="none", format="mxfp4",
                model="demo", data="embedded", seed=0, target_ppl=None, tokens_to_target=None,
                best_ppl=400.0, best_ppl_tokens=768, mean_tokens_per_s=1.0, world_size=2,
                parallel="ddp", **kw).to_dict()
    atomic_write_json(run_dir / "summary.json", s)
    return s


def test_job_on_fake_gpus_gets_a_locked_group(compose, tiny, tmp_path, monkeypatch):
    import torch
    import fp4_experiments.sweep as sweep
    from fp4_experiments.gpu_slots import release_group, try_gpu_group
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    cfg = compose(tiny("hardware.device=cuda", "sweep.gpus_per_run=2", "parallel=ddp",
                       f"cache_dir={tmp_path / 'cache'}"))
    seen = []

    def fake_child(command, run_dir, env, fds):
        seen.append((command, env, list(fds)))
        return _finished(Path(run_dir))

    monkeypatch.setattr(sweep, "run_child", fake_child)
    held = try_gpu_group(2, 4, tmp_path / "cache" / "gpu-slots")    # another sweep has 0-1
    summary = sweep._run_on_gpu_group(cfg, ["+ladder=fp8", "results_dir=elsewhere"])
    assert summary["world_size"] == 2
    command, env, fds = seen[0]
    assert env == {"CUDA_VISIBLE_DEVICES": "2,3"} and len(fds) == 2
    assert command[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m"]
    assert command[6:8] == ["fp4_ablate", "run"]
    # The job's overrides, with results_dir and cache_dir pinned to what this job resolved.
    assert "results_dir=elsewhere" not in command and "+ladder=fp8" in command
    assert f"results_dir={cfg.results_dir}" in command
    assert f"cache_dir={tmp_path / 'cache'}" in command
    # Finished now: the next job of the same run starts nothing and takes no GPU.
    monkeypatch.setattr(sweep, "run_child", lambda *a: pytest.fail("started a finished run"))
    assert sweep._run_on_gpu_group(cfg, [])["status"] == "completed"
    release_group(held)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_slurm_task_of_a_multi_task_run_takes_no_slot_and_only_rank_0_writes(
        compose, tiny, tmp_path, monkeypatch, rank):
    """hydra.launcher.tasks_per_node=2: each task runs the job in-process as one rank (SLURM gave
    it its GPU): no GPU slot, and the ledger line is rank 0's alone."""
    import torch
    import fp4_experiments.sweep as sweep
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    cfg = compose(tiny("hardware.device=cuda", "parallel=ddp", "sweep.id=s1", "sweep.total=1",
                       f"cache_dir={tmp_path / 'cache'}", results=tmp_path / "runs"))
    monkeypatch.setattr(sweep, "run_experiment",
                        lambda cfg, ov, **kw: _finished(Path(tmp_path)))
    record = sweep.sweep_job(cfg, 0, [])
    assert record["status"] == "completed"
    assert not (tmp_path / "cache" / "gpu-slots").exists()
    written = list(sweep.ledger_dir(str(tmp_path / "runs"), "s1").glob("*.json"))
    assert len(written) == (1 if rank == 0 else 0)


def test_child_overrides_quote_odd_paths(compose, tiny, tmp_path):
    from fp4_experiments.sweep import child_overrides
    odd = tmp_path / "it's a dir"
    cfg = compose(tiny(f"results_dir='{tmp_path / 'runs, v2'}'"))
    out = child_overrides(cfg, ["seed=1", "+cache_dir=x"])
    assert out[0] == "seed=1" and len(out) == 3
    assert out[1] == f"results_dir='{tmp_path / 'runs, v2'}'"
    from fp4_experiments.sweep import _hydra_string
    assert _hydra_string(str(odd)) == "'" + str(odd).replace("'", "\\'") + "'"


def test_a_failed_child_names_why(tmp_path):
    from fp4_experiments.sweep import RunProcessFailed, child_outcome
    with pytest.raises(RunProcessFailed, match="exit code 1: fp4-ablate: invalid input") as err:
        child_outcome(1, "...\ntorchrun report\n", tmp_path, time.time(),
                      "fp4-ablate: invalid input data: too few tokens")
    assert "torchrun report" in err.value.stderr_tail
    # This attempt's failed summary says more than torchrun does.
    from fp4_experiments.rundir import Status, Summary, atomic_write_json
    started = time.time()
    atomic_write_json(tmp_path / "summary.json", Summary(
        status=Status.failed, error="RuntimeError: injected on rank 1").to_dict())
    with pytest.raises(RunProcessFailed, match="injected on rank 1"):
        child_outcome(1, "", tmp_path, started)
    with pytest.raises(RunProcessFailed, match="exited 0 but left no finished"):
        child_outcome(0, "", tmp_path / "elsewhere", started)  # e.g. another run key


# -- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["sweep.gpus_per_run=0"], "sweep.gpus_per_run=0 must be >= 1"),
    (["sweep.gpus_per_run=2"], "sweep.gpus_per_run=2 runs each job on 2 processes (torchrun); "
                               "choose parallel=ddp or parallel=fsdp2"),
    (["sweep.gpus_per_run=2", "parallel=ddp", "sweep.jobs_per_gpu=2"],
     "set sweep.jobs_per_gpu=1 or sweep.gpus_per_run=1"),
    (["sweep.gpus_per_run=2", "parallel=ddp", "hardware.device=cuda:1"],
     "hardware.device=cuda:1 names one: use hardware.device=auto or cuda"),
    (["sweep.gpus_per_run=4", "parallel=ddp", "train.batch_size=6"],
     "train.batch_size=6 (the global batch) must split into sweep.gpus_per_run=4 ranks"),
], ids=["zero", "parallel-none", "jobs-per-gpu", "named-device", "batch-split"])
def test_gpus_per_run_is_checked(compose, tiny, extra, message):
    from fp4_experiments.validate import ConfigError, validate_config
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(compose(tiny(*extra)), environment=False)


def test_gpus_per_run_against_the_machine(compose, tiny, monkeypatch):
    import torch
    from fp4_experiments.validate import ConfigError, validate_config
    ok = tiny("sweep.gpus_per_run=2", "parallel=fsdp2")
    validate_config(compose(ok))                     # the CPU: 2 gloo ranks
    with pytest.raises(ConfigError, match="not with a remote launcher: under hydra/launcher="
                                          "submitit_slurm .* hydra.launcher.tasks_per_node=2"):
        validate_config(compose(ok), devices=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)

    def on_auto(k, batch):  # hardware=cpu's torch backend, but the device left to "auto"
        return compose(tiny("hardware.device=auto", f"sweep.gpus_per_run={k}", "parallel=fsdp2",
                            f"train.batch_size={batch}"))
    validate_config(on_auto(2, 4))
    with pytest.raises(ConfigError, match=re.escape(
            "sweep.gpus_per_run=3 must divide the 4 visible GPUs (groups of consecutive GPUs); "
            "choose one of: 1, 2, 4")):
        validate_config(on_auto(3, 6))


# -- end to end on the CPU ------------------------------------------------------------------------

def _ledger(stdout: str):
    (where,) = re.findall(r"ledger in (\S+)", stdout)
    return [json.loads(p.read_text()) for p in sorted((Path(where) / "ledger").glob("*.json"))]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, cache_dir):
    """Two cells, each run on 2 gloo ranks by torchrun."""
    results = tmp_path_factory.mktemp("gpus") / "runs"
    common = [*SHORT, f"cache_dir={cache_dir}", f"results_dir={results}",
              "sweep.gpus_per_run=2", "parallel=ddp"]
    r = run_cli("sweep", *common, "+ladder=fp8,wgrad", timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return results, common, r


@pytest.mark.slow
def test_sweep_runs_each_cell_on_two_ranks(swept):
    results, _, r = swept
    assert "[sweep 2/2]" in r.stdout and "sweep finished: 2/2 jobs (2 completed)" in r.stdout
    records = _ledger(r.stdout)
    assert [rec["status"] for rec in records] == ["completed", "completed"]
    for rec in records:
        s = json.loads((Path(rec["run_dir"]) / "summary.json").read_text())
        assert (s["world_size"], s["parallel"], s["micro_batch_per_rank"],
                s["allreduce_dtype"]) == (2, "ddp", 2, "float32")
        assert rec["line"].startswith(f"{s['ladder']}/none/mxfp4 seed 0: completed")
    assert sorted(p.name.split("-")[0] for p in results.iterdir()) == ["fp8", "wgrad"]


@pytest.mark.slow
def test_a_failed_run_is_recorded_and_the_sweep_goes_on(swept):
    """Job 0 fails in its torchrun child (a validation split too small: known only once the data
    is prepared); job 1 goes on, and finds its run finished (no processes started)."""
    results, common, _ = swept
    before = sorted(p.name for p in results.iterdir())
    r = run_cli("sweep", *common, "+ladder=fp8", "data.val_tokens=10000000,2048", timeout=240)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    failed, skipped = _ledger(r.stdout)
    assert failed["status"] == "failed" and "torchrun exit code" in failed["line"]
    assert "fp4-ablate: invalid input data" in failed["line"]
    assert "ChildFailedError" in failed["stderr_tail"] or "exitcode" in failed["stderr_tail"]
    assert skipped["status"] == "completed" and "already finished" in r.stdout
    assert "FAILED job 0" in r.stdout and "sweep finished: 2/2 jobs (1 completed, 1 failed)" in r.stdout
    assert sorted(p.name for p in results.iterdir()) == before   # the failure left no run dir
