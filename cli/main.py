"""`fp4-ablate`: parse the subcommand, hand the rest to Hydra (run, sweep) or argparse (the rest).

    fp4-ablate run [OVERRIDES]        one run (Hydra: --help, --cfg job, key=value, +group=option)
    fp4-ablate sweep [OVERRIDES]      the paper's grid (or any Hydra sweep) over seeds, resumable
    fp4-ablate report [RESULTS_DIR]   the token-cost table, CSV, LaTeX and plots
    fp4-ablate calibrate [RESULTS_DIR] the target perplexity from FP8 runs without a target
    fp4-ablate bench                  quantization kernels and training steps on a CUDA GPU
    fp4-ablate diagnose [OPTIONS] [OVERRIDES]  GEMM quantization errors of every config, side by side
"""
from __future__ import annotations

import os
import sys
import time
from typing import List, Optional, Sequence

from . import hydra_app

USAGE = __doc__.split("\n", 2)[2]
SUBCOMMANDS = ("run", "sweep", "report", "calibrate", "bench", "diagnose")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: fp4-ablate {run,sweep,report,calibrate,bench,diagnose} ...\n\n" + USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"fp4-ablate: unknown command {command!r}; choose one of: {', '.join(SUBCOMMANDS)}",
              file=sys.stderr)
        return 2
    handler = {"run": run_command, "sweep": sweep_command, "report": report_command,
               "calibrate": calibrate_command, "bench": bench_command,
               "diagnose": diagnose_command}[command]
    code = handler(rest)
    return int(code or 0)


def _precheck_or_exit(command_lines: List[List[str]], devices: bool = True) -> Optional[object]:
    cfg = None
    for line in command_lines:
        try:
            cfg = hydra_app.precheck(line, devices=devices)
        except hydra_app.PrecheckError as err:
            print(f"fp4-ablate: {err}", file=sys.stderr)
            raise SystemExit(2)
    return cfg


def run_command(argv: List[str]) -> int:
    from hydra.core.hydra_config import HydraConfig
    from fp4_experiments.runlock import RunLocked
    from fp4_experiments.runner import one_line, run_experiment

    flags, overrides = hydra_app.split_flags(argv)
    if not flags:
        _precheck_or_exit([overrides])

    from fp4_experiments.validate import ConfigError

    def task(cfg):
        try:
            summary = run_experiment(cfg, list(HydraConfig.get().overrides.task))
        except ConfigError as err:  # bad input found after the precheck (e.g. the data): exit 2
            print(f"fp4-ablate: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2)
        except RunLocked as err:  # another process is training this run now: exit 3
            print(f"fp4-ablate run: {err}", file=sys.stderr, flush=True)
            raise SystemExit(3)
        if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 speaks for the run
            print(one_line(summary), flush=True)

    hydra_app.run_hydra(task, argv, "fp4-ablate run")
    return 0


def sweep_command(argv: List[str]) -> int:
    from hydra.core.hydra_config import HydraConfig
    from fp4_experiments.sweep import DEFAULT_GRID, GRID_KEYS, read_ledger, summarize, sweep_job

    flags, overrides = hydra_app.split_flags(argv)
    if not any(hydra_app.key_of(o) in GRID_KEYS for o in overrides):
        overrides.append("+ablation=" + ",".join(DEFAULT_GRID))
    # A launcher that runs the jobs on other machines (SLURM): their CUDA is not this host's.
    launcher = hydra_app.find_override(overrides, "hydra/launcher")
    devices = launcher is None or launcher in ("basic", "joblib")
    # Every value of every swept key is checked (config, devices, paths, data files) before
    # the first job starts: a sweep with a bad data path must not start 35 failing jobs.
    cfg = _precheck_or_exit(hydra_app.first_value_variants(overrides)[:1], devices)
    if hydra_app.find_override(overrides, "seed") is None:
        overrides.append(f"seed=range(0,{cfg.sweep.seeds})")
    if launcher is None:
        overrides += _parallel_launcher(cfg.sweep.jobs_per_gpu, cfg.sweep.gpus_per_run)
    if not flags:
        _precheck_or_exit(hydra_app.first_value_variants(overrides)[1:], devices)
    total = hydra_app.sweep_size(overrides)
    sweep_id = time.strftime("%Y-%m-%d_%H-%M-%S") + f"_{os.getpid()}"
    # normpath: "runs/" and "runs" are one results_dir (the ledger sits beside it, in sweeps/).
    results_dir = os.path.normpath(str(cfg.results_dir))
    sweep_dir = os.path.join(os.path.dirname(results_dir) or ".", "sweeps", sweep_id)
    overrides += [f"sweep.total={total}", f"sweep.id={sweep_id}", f"hydra.sweep.dir={sweep_dir}"]
    if not flags:
        print(f"fp4-ablate sweep: {total} runs; ledger in {sweep_dir}", flush=True)

    def task(cfg):
        hc = HydraConfig.get()
        sweep_job(cfg, int(hc.job.num), list(hc.overrides.task))

    if flags:
        # --cfg/--info/--help describe one job: the sweep's first (Hydra allows no sweep there).
        hydra_app.run_hydra(task, [*flags, *hydra_app.first_value_variants(overrides)[0]],
                            "fp4-ablate sweep")
        return 0
    hydra_app.run_hydra(task, ["--multirun", *overrides], "fp4-ablate sweep")
    text, failed = summarize(read_ledger(results_dir, sweep_id), total)
    print(text, flush=True)
    return 1 if failed else 0


def _parallel_launcher(jobs_per_gpu: int, gpus_per_run: int = 1) -> List[str]:
    """`jobs_per_gpu` runs on each local GPU at once, or one run per group of `gpus_per_run` GPUs
    (Hydra's joblib launcher + GPU slots / groups)."""
    try:
        import torch
        n = torch.cuda.device_count()
    except Exception:
        n = 0
    workers = n // gpus_per_run if gpus_per_run > 1 else n * jobs_per_gpu
    if workers <= 1:
        return []
    try:
        import hydra_plugins.hydra_joblib_launcher  # noqa: F401
    except ImportError:
        print(f"fp4-ablate sweep: {n} GPU(s) x sweep.jobs_per_gpu={jobs_per_gpu} asked for parallel "
              "jobs but hydra-joblib-launcher is not installed; running sequentially "
              "(pip install hydra-joblib-launcher)", file=sys.stderr)
        return []
    return ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={workers}"]


def report_command(argv: List[str]) -> int:
    from fp4_experiments.report.cli import main as report_main
    return report_main(argv)


def calibrate_command(argv: List[str]) -> int:
    from fp4_experiments.calibrate import main as calibrate_main
    return calibrate_main(argv)


def bench_command(argv: List[str]) -> int:
    from fp4_experiments.bench import main as bench_main
    return bench_main(argv)


def diagnose_command(argv: List[str]) -> int:
    from fp4_experiments.diagnostics.diagnose import main as diagnose_main
    return diagnose_main(argv)


if __name__ == "__main__":
    sys.exit(main())
