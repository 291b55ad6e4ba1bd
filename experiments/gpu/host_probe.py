"""Run `fp4-ablate <args>` in this process with Python's profiler over a window of training steps.

    python3 experiments/gpu/host_probe.py --steps 15:18 --out DIR/tag -- run model=... +ladder=...
    python3 experiments/gpu/host_probe.py --steps 5:8 --out DIR/tag -- bench --compile-configs ...

Why: on CUDA the quantized steps are bound by the host (the torch.profiler tables of
run_vs_bench.sh: CPU time per step >= GPU time), so what costs a step is Python, which
torch.profiler shows only as the self time of the custom ops. cProfile over the same steps says
which functions it is. Every call of TrainStep.__call__ (the step both `run` and `bench` time) is
counted in the process; calls [a, b) run under cProfile. Writes DIR/tag.txt (per-step seconds,
the functions by own time and by cumulative time) and DIR/tag.pstats (for pstats / snakeviz).
A probe, not a mode of the tool: profiled steps run slower than unprofiled ones.
"""
import argparse
import cProfile
import io
import pstats
import runpy
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", default="15:18", help="a:b, the TrainStep calls to profile")
    p.add_argument("--out", required=True, help="path prefix of the .txt and .pstats files")
    p.add_argument("--top", type=int, default=45)
    p.add_argument("args", nargs=argparse.REMAINDER)
    ns = p.parse_args()
    argv = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    first, last = (int(v) for v in ns.steps.split(":"))
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    from fp4_experiments.training import step as step_module
    original = step_module.TrainStep.__call__
    prof, seen, times = cProfile.Profile(), [0], []

    def profiled_call(self, lr):
        i = seen[0]
        seen[0] += 1
        if not first <= i < last:
            return original(self, lr)
        t0 = time.perf_counter()
        prof.enable()
        try:
            return original(self, lr)
        finally:
            prof.disable()
            times.append(time.perf_counter() - t0)
            if i == last - 1:
                write()

    def write():
        prof.dump_stats(str(out) + ".pstats")
        text = io.StringIO()
        text.write(f"# host_probe: TrainStep calls {first}..{last - 1}; step seconds (profiled): "
                   + ", ".join(f"{t:.3f}" for t in times) + "\n# args: " + " ".join(argv) + "\n")
        for key in ("tottime", "cumulative"):
            stats = pstats.Stats(prof, stream=text)
            stats.sort_stats(key).print_stats(ns.top)
        out.with_suffix(".txt").write_text(text.getvalue())

    step_module.TrainStep.__call__ = profiled_call
    sys.argv = ["fp4-ablate"] + argv
    runpy.run_module("fp4_ablate", run_name="__main__")


if __name__ == "__main__":
    main()
