"""Run `fp4-ablate <args>` in this process with Python's garbage collector watched (or switched off).

    python3 experiments/gpu/gc_probe.py --gc on|off -- run model=... +ladder=...

Why: on CUDA the quantized steps are bound by the host (hundreds of custom-op launches per step),
so a collector pause inside a step costs the step its length, and a run process holds far more
objects than the benchmark's (data, tokenizer, compiled graphs), which makes each collection of
the older generations longer. `--gc off` disables the collector for the whole process, only to
measure what the collector costs, not as a way to train. At exit one
line `GC_PROBE {json}` on stderr: per generation, the collections and their total milliseconds.
"""
import atexit
import gc
import json
import runpy
import sys
import time


def main() -> None:
    argv = sys.argv[1:]
    mode = "on"
    if argv[:1] == ["--gc"]:
        mode, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if mode not in ("on", "off"):
        sys.exit(f"--gc {mode}: choose on or off")
    stats = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
    started = {}

    def watch(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            s = stats[info["generation"]]
            s[0] += 1
            s[1] += (time.perf_counter() - started.pop("t")) * 1e3

    gc.callbacks.append(watch)
    if mode == "off":
        gc.disable()

    def report():
        print("GC_PROBE " + json.dumps({"mode": mode, "objects": len(gc.get_objects()),
                                        **{f"gen{g}": {"collections": n, "ms": round(ms, 1)}
                                           for g, (n, ms) in stats.items()}}),
              file=sys.stderr, flush=True)

    atexit.register(report)
    sys.argv = ["fp4-ablate"] + argv
    runpy.run_module("fp4_ablate", run_name="__main__")


if __name__ == "__main__":
    main()
