"""`+profile=on`: torch.profiler over a few steps of the run itself (experiments/training/profile.py)."""
import json
from pathlib import Path

import pytest
from cli_support import train_records


def test_profiled_run_trains_the_same_bits_and_writes_its_profile(tiny, compose, tmp_path):
    from fp4_experiments.runner import run_experiment
    from fp4_experiments.rundir import PROFILE_JSON, PROFILE_TABLE, PROFILE_TRACE, run_key
    plain = compose(tiny("+ladder=wgrad", "+stabilizer=h16", results=tmp_path / "a"))
    profiled = compose(tiny("+ladder=wgrad", "+stabilizer=h16", "+profile=on", "profile.start_step=4",
                            "profile.steps=2", "profile.trace=true", "profile.row_limit=7",
                            results=tmp_path / "b"))
    assert run_key(plain) == run_key(profiled)  # the profiler is not an experiment key
    sa, sb = run_experiment(plain), run_experiment(profiled)
    da, db = next(Path(tmp_path / "a").iterdir()), next(Path(tmp_path / "b").iterdir())
    assert train_records(da) == train_records(db)  # the profiler only records
    assert sa["steps"] == sb["steps"] == 10
    assert not (da / PROFILE_TABLE).exists() and not (da / PROFILE_JSON).exists()
    prof = json.loads((db / PROFILE_JSON).read_text())
    assert prof["steps"] == [4, 5] and prof["device"] == "cpu"
    # The profiled steps' own times, as the loop measured them (metrics.jsonl logs every step here).
    dts = {json.loads(l)["step"]: json.loads(l)["step_time_s"]
           for l in (db / "metrics.jsonl").read_text().splitlines() if '"train"' in l}
    assert prof["step_times_s"] == [dts[4], dts[5]]
    rows = prof["rows"]
    assert 1 <= len(rows) <= 7
    assert any(r["name"].startswith("fp4::") for r in rows)  # the quantized linear's custom ops
    cpu = [r["self_cpu_ms_per_step"] for r in rows]
    assert cpu == sorted(cpu, reverse=True) and cpu[0] > 0
    table = (db / PROFILE_TABLE).read_text()
    assert table.startswith("# torch.profiler, optimizer steps 4-5 on cpu") and "Self CPU" in table
    import gzip
    trace = json.loads(gzip.open(db / PROFILE_TRACE).read())
    assert trace["traceEvents"]


def test_profiled_steps_stay_out_of_the_throughput():
    from fp4_experiments.training.state import LoopState
    from fp4_experiments.training.step import advance_clock
    loop = LoopState(untimed_steps=1)
    for dt, timed in [(9.0, True), (1.0, True), (5.0, False), (1.0, True)]:
        advance_clock(loop, 10, dt, timed=timed)
    assert loop.step == 4 and loop.tokens == 40 and loop.train_time_s == 16.0
    assert loop.timed_tokens == 20 and loop.timed_time_s == 2.0  # the untimed first and the profiled


def test_a_run_resumed_past_the_window_profiles_nothing(tmp_path):
    from types import SimpleNamespace
    import torch
    from fp4_experiments.training.profile import StepProfiler
    cfg = SimpleNamespace(steps=3, start_step=20, trace=False, row_limit=5)
    dev = torch.device("cpu")
    assert StepProfiler(cfg, tmp_path, dev, first_step=0).covers(20)
    assert not StepProfiler(cfg, tmp_path, dev, first_step=0).covers(23)
    assert not StepProfiler(cfg, tmp_path, dev, first_step=21).enabled  # resumed inside: none of it
    assert not StepProfiler(None, tmp_path, dev, first_step=0).enabled


@pytest.mark.parametrize("override, message", [
    ("profile.steps=-1", "profile.steps=-1 must be >= 1, or 0 for off"),
    ("profile.start_step=0", "profile.start_step=0 must be >= 1"),
    ("profile.row_limit=0", "profile.row_limit=0 must be >= 1"),
    # The tiny run has 10 steps: steps 9-11 would never all run.
    ("profile.start_step=9", "profile steps up to 11, but the run has 10 optimizer steps"),
])
def test_bad_profile_settings_are_refused_before_any_work(tiny, compose, tmp_path, override, message):
    from fp4_experiments.runner import run_experiment
    from fp4_experiments.validate import ConfigError
    import re
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_experiment(compose(tiny("+profile=on", "profile.start_step=2", override,
                                    results=tmp_path / "r")))
    assert not (tmp_path / "r").exists()
