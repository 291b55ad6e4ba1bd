"""Sweep packing: the aggregate tokens/s of J runner step loops sharing one GPU.

`fp4-ablate sweep` with `sweep.jobs_per_gpu=J` runs J independent runs per GPU, each its own
process and CUDA context. `pack_row(J, ...)` does the same with the bench's runner step: it starts
J worker processes (`python -m fp4_experiments.bench_pack SPEC`), each builds the runner path for
the same config (bench_steps.build_runner, synthetic batches) and takes `warmup` steps, then says
READY; once all are ready the parent sends GO to all at once, and each steps for `seconds` of wall
time and reports its tokens/s. Aggregate = the sum over the J jobs (their windows coincide to within
a step). The workers are this process's children, ended by their own handles if anything fails.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

READY, RESULT = "FP4-BENCH-READY", "FP4-BENCH-RESULT "


def worker_main(argv: List[str]) -> int:
    """One packed job: spec = {"overrides": [...], "warmup": n, "seconds": s}."""
    import torch
    from .bench_steps import build_runner, compose_config, peak_memory, run_steps

    spec = json.loads(argv[0])
    build = build_runner(compose_config(spec["overrides"]))
    try:
        warmup = int(spec.get("warmup", 2))
        plain_steps = getattr(build.trainer.step, "plain_steps", None)  # a GraphedStep captures untimed
        run_steps(build, max(warmup, plain_steps + 1) if plain_steps is not None else warmup)
        print(READY, flush=True)
        sys.stdin.readline()  # GO
        t0, n = time.perf_counter(), 0
        while n < 2 or time.perf_counter() - t0 < float(spec["seconds"]):
            run_steps(build, 1, start=n)
            n += 1
        elapsed = time.perf_counter() - t0
        print(RESULT + json.dumps({
            "steps": n, "elapsed_s": elapsed, "tokens": n * build.tokens_per_step,
            "tokens_per_s": n * build.tokens_per_step / elapsed,
            **peak_memory(build.device)}),
            flush=True)
    finally:
        build.close()
    return 0


def _read_until(proc: subprocess.Popen, prefix: str) -> Optional[str]:
    """The first stdout line of `proc` starting with `prefix` (None at EOF)."""
    while True:
        line = proc.stdout.readline()
        if not line:
            return None
        if line.startswith(prefix):
            return line.rstrip("\n")


def _stderr_tail(path: str, n: int = 600) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def pack_row(jobs: int, overrides: List[str], *, seconds: float = 10.0, warmup: int = 2,
             label: str = "", model: str = "", env: Optional[Dict[str, str]] = None) -> Dict:
    """Aggregate and per-job tokens/s of `jobs` concurrent runner step loops of one config."""
    spec = json.dumps({"overrides": list(overrides), "warmup": warmup, "seconds": seconds})
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    child_env.setdefault("OMP_NUM_THREADS", "1")  # several jobs share the host's cores
    procs: List[subprocess.Popen] = []
    logs: List[str] = []
    row: Dict = {"kind": "pack", "jobs": jobs, "model": model, "config": label,
                 "seconds": seconds, "overrides": list(overrides)}
    try:
        for _ in range(jobs):
            fd, log = tempfile.mkstemp(prefix="fp4-bench-pack-", suffix=".log")
            logs.append(log)
            with os.fdopen(fd, "w") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "fp4_experiments.bench_pack", spec], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=err, text=True, env=child_env))
        for i, proc in enumerate(procs):
            if _read_until(proc, READY) is None:
                raise RuntimeError(f"packed job {i} exited before it was ready: "
                                   f"{_stderr_tail(logs[i])}")
        for proc in procs:  # all at once
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        results = []
        for i, proc in enumerate(procs):
            line = _read_until(proc, RESULT)
            if line is None:
                raise RuntimeError(f"packed job {i} gave no result: {_stderr_tail(logs[i])}")
            results.append(json.loads(line[len(RESULT):]))
            proc.wait(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            os.unlink(log)
    per_job = [r["tokens_per_s"] for r in results]
    peaks = [r["peak_mem_bytes"] for r in results if r.get("peak_mem_bytes") is not None]
    row.update(aggregate_tokens_per_s=sum(per_job), per_job_tokens_per_s=per_job,
               mean_job_tokens_per_s=sum(per_job) / len(per_job),
               steps_per_job=[r["steps"] for r in results],
               peak_mem_bytes_per_job=max(peaks) if peaks else None)
    return row


def add_pack_ratios(rows: List[Dict]) -> None:
    """Aggregate tokens/s against one job alone (the J=1 row of the same config and mode)."""
    for row in rows:
        one = next((r for r in rows if r.get("jobs") == 1 and r.get("config") == row.get("config")
                    and r.get("model") == row.get("model") and r.get("mode") == row.get("mode")
                    and "aggregate_tokens_per_s" in r), None)
        if one and "aggregate_tokens_per_s" in row:
            row["aggregate_vs_one_job"] = row["aggregate_tokens_per_s"] / one["aggregate_tokens_per_s"]


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
