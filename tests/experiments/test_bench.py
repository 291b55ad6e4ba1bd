"""`fp4-ablate bench`: its plan, ratios, targets and Markdown (fake rows), and on the CPU the
runner-path step, the correctness pass, the transformers peer and sweep packing on the demo shape.
Timings here are never checked against anything: the targets are for the GPU bench only."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from fp4_experiments import bench, bench_peers, bench_report, bench_steps

CPU = {"hardware": "cpu", "batch": 2, "seq_len": 32, "vocab": 512}


# ------------------------------------------------------------------ plan and bad names

def test_plan_orders_rows_and_rejects_bad_names():
    jobs = bench.plan(["llama-150m", "llama-20m"], ["bf16", "nvfp4:wgrad"],
                      eager_models=["llama-150m", "llama-20m"], compile_models=["llama-150m"],
                      compile_configs=["bf16", "wgrad+h16"],
                      peers=["transformers-bf16", "torchao-float8"], peer_models=["llama-150m"],
                      pack_jobs=[1, 2])
    keys = [(j["kind"], j["model"], j.get("config") or j.get("peer"), j["mode"]) for j in jobs]
    assert keys == [
        ("runner", "llama-150m", "bf16", "eager"), ("runner", "llama-150m", "nvfp4:wgrad", "eager"),
        ("runner", "llama-20m", "bf16", "eager"), ("runner", "llama-20m", "nvfp4:wgrad", "eager"),
        ("peer", "llama-150m", "transformers-bf16", "compile"),
        ("peer", "llama-150m", "torchao-float8", "compile"),
        ("check", "llama-150m", "bf16", "eager"),
        ("runner", "llama-150m", "bf16", "compile"), ("runner", "llama-150m", "wgrad+h16", "compile"),
        ("pack", "llama-20m", "fp8", "compile"), ("pack", "llama-20m", "fp8", "compile")]
    reordered = bench.plan(["llama-20m"], ["bf16"], eager_models=["llama-20m"], pack_jobs=[1],
                           order=["pack", "eager"])
    assert [j["kind"] for j in reordered] == ["pack", "runner"]
    assert [j["jobs"] for j in jobs if j["kind"] == "pack"] == [1, 2]
    eager_pack = bench.plan(["llama-20m"], [], pack_jobs=[1], pack_mode="eager")
    assert [j["mode"] for j in eager_pack] == ["eager"]
    with pytest.raises(ValueError, match="pack mode 'fast'; valid: eager, compile"):
        bench.plan(["llama-20m"], [], pack_jobs=[1], pack_mode="fast")
    assert bench_steps.parse_config("ufp4:wgrad") == ("ufp4", "wgrad", "none")
    assert bench_steps.parse_config("wgrad+rht") == ("mxfp4", "wgrad", "rht")
    with pytest.raises(ValueError, match="wgrad\\+h16"):
        bench.plan(["m"], ["wgrad+h17"])
    with pytest.raises(ValueError, match="transformers-bf16"):
        bench.plan(["m"], [], peers=["megatron"], peer_models=["m"])
    with pytest.raises(ValueError, match="peers"):
        bench.plan(["m"], [], order=["eager", "graphs"])


@pytest.mark.parametrize("argv, words", [
    (["--configs", "bf16,wgrad+h17"], ["wgrad+h17", "wgrad+h16"]),
    (["--models", "llama-21m"], ["llama-21m", "llama-20m"]),
    (["--peers", "megatron"], ["megatron", "torchao-float8"]),
    (["--models", "llama-20m", "--batches", "8,8"], ["--batches"]),
    (["--graph-models", "llama-150m"], ["cuda_graph"]),
    (["--profile-configs", "wgrad+h17"], ["wgrad+h17", "wgrad+h16"]),
    (["--profile-modes", "graph"], ["graph", "eager or compile"]),
])
def test_bad_arguments_fail_before_any_gpu_work(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_bench_needs_a_gpu(capsys):
    assert bench.main(["--skip-kernels"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# ------------------------------------------------------------------ ratios, targets, Markdown

def _row(config, mode, ms, gib=1.0, **extra):
    fmt, ladder, stab = bench_steps.parse_config(config)
    return {"kind": "runner", "model": "m", "config": config, "format": fmt, "ladder": ladder,
            "stabilizer": stab, "mode": mode, "median_step_s": ms / 1e3,
            "tokens_per_s": 1000 / ms, "peak_mem_bytes": int(gib * 2**30), **extra}


def _peer(peer, mode, ms, gib=1.0, **extra):
    return {"kind": "peer", "model": "m", "peer": peer, "mode": mode, "median_step_s": ms / 1e3,
            "tokens_per_s": 1000 / ms, "peak_mem_bytes": int(gib * 2**30), **extra}


def _fake_rows():
    steps = [_row("bf16", "eager", 150.0), _row("wgrad+h16", "eager", 300.0, 1.1),
             _row("bf16", "compile", 101.0, compile_s=40.0, first_step_s=40.9, graphs_first_step=2,
                  graph_breaks=0,
                  recompiles_after_first_step=0, bit_exact=True, steps=2),
             _row("fp8", "compile", 90.0, 1.05, compile_s=80.0, bit_exact=False, steps=2,
                  loss_equal=[True, False], grad_norm_equal=[True, False], grads_differing=3,
                  grads_compared=42, worst_param="lm_head.weight", worst_rel_diff=1e-3),
             _row("wgrad+h16", "compile", 120.0, 1.3, compile_s=60.0,
                  check_error="OutOfMemoryError: CUDA out of memory"),
             {**bench.identity({"kind": "runner", "model": "m", "config": "wgrad+sr",
                                "mode": "compile"}), "error": "_Timeout: gave up after 240 s"},
             {**bench.identity({"kind": "runner", "model": "m", "config": "dgrad",
                                "mode": "eager"}), "error": "ValueError: bad\n  a|b"}]
    peers = [_peer("transformers-bf16", "compile", 100.0), _peer("transformers-bf16", "eager", 160.0),
             _peer("torchao-float8", "compile", 95.0, compile_s=50.0, graphs_first_step=1,
                   graph_breaks=0, recompiles_after_first_step=0)]
    checks = [{"kind": "check", "model": "m", "config": "bf16", "check": "eager vs eager",
               "bit_exact": True, "steps": 2}]
    packing = [{"kind": "pack", "model": "llama-20m", "config": "fp8", "jobs": 1,
                "aggregate_tokens_per_s": 1e5, "per_job_tokens_per_s": [1e5],
                "peak_mem_bytes_per_job": 2**33},
               {"kind": "pack", "model": "llama-20m", "config": "fp8", "jobs": 4,
                "aggregate_tokens_per_s": 3e5, "per_job_tokens_per_s": [7e4, 8e4, 7e4, 8e4]},
               {"kind": "pack", "model": "llama-20m", "config": "fp8", "jobs": 8,
                "error": "RuntimeError: out of memory"}]
    return {"steps": steps, "peers": peers, "checks": checks, "packing": packing}


def test_ratios_to_bf16_and_to_the_peers():
    rows = _fake_rows()
    bench_report.add_ratios(rows["steps"], rows["peers"], rows["packing"])
    by = {(r["config"], r["mode"]): r for r in rows["steps"]}
    h16 = by["wgrad+h16", "compile"]
    assert h16["step_ratio_vs_bf16"] == pytest.approx(120 / 101)
    assert h16["mem_ratio_vs_bf16"] == pytest.approx(1.3)
    assert h16["x_transformers_bf16"] == pytest.approx(1.2)  # the compiled peer, not the eager one
    assert h16["x_torchao_float8"] == pytest.approx(120 / 95)
    assert by["wgrad+h16", "eager"]["x_transformers_bf16"] == pytest.approx(3.0)
    assert "x_transformers_bf16" not in by["wgrad+sr", "compile"]  # an error row has no ratios
    assert rows["peers"][2]["x_transformers_bf16"] == pytest.approx(0.95)
    assert rows["packing"][1]["aggregate_vs_one_job"] == pytest.approx(3.0)


def test_targets_met_missed_and_no_data():
    rows = _fake_rows()
    targets = bench_report.evaluate_targets(rows["steps"], rows["peers"])
    got = {(t["target"].split(" ")[0], t["mode"]): t for t in targets}
    assert got["fp8", "compile"]["status"] == "met"           # 90 / 95
    assert got["bf16", "compile"]["status"] == "met"          # 101 / 100 <= 1.02
    assert got["bf16", "eager"]["status"] == "missed"         # 150 / 100
    assert got["wgrad+h16", "compile"]["status"] == "missed"  # 1.20 > 1.15
    assert got["wgrad+h16", "compile"]["measured"] == pytest.approx(1.2)
    assert got["wgrad+sr", "compile"]["status"] == "no data"
    assert "gave up" in got["wgrad+sr", "compile"]["note"]
    assert ("wgrad+rht", "compile") not in got                # no such runner row: no target row
    mem = got["peak", "compile"]
    assert mem["status"] == "missed" and mem["config"] == "wgrad+h16"
    assert mem["measured"] == pytest.approx(1.3)
    assert got["peak", "eager"]["status"] == "met"
    comp = got["hardware=cuda", "compile"]
    assert comp["status"] == "missed" and "wgrad+sr" in comp["note"]  # a timeout is a miss
    assert ("hardware=cuda", "eager") not in got
    # Without the torchao peer the fp8 target has no data, and says why.
    skipped = [p if p["peer"] != "torchao-float8" else
               {**bench_peers_skip(), "model": "m"} for p in rows["peers"]]
    t = next(t for t in bench_report.evaluate_targets(rows["steps"], skipped)
             if t["target"].startswith("fp8"))
    assert t["status"] == "no data" and "torchao not installed" in t["note"]


def bench_peers_skip():
    return {"kind": "peer", "peer": "torchao-float8", "mode": "compile",
            "skipped": "torchao not installed"}


def test_markdown_tables():
    rows = _fake_rows()
    bench_report.add_ratios(rows["steps"], rows["peers"], rows["packing"])
    targets = bench_report.evaluate_targets(rows["steps"], rows["peers"])
    meta = {"device_name": "GPU X", "command": "fp4-ablate bench", "git_commit": "abc",
            "versions": {}, "date": "today"}
    text = bench_report.render(meta, [{"op": "mxfp4", "orientation": "axis=0", "impl": "triton",
                                       "median_ms": 0.15, "gbps": 1785.0, "pct_copy": 62.2,
                                       "correct": 0}], rows, targets)
    assert "| mxfp4 | axis=0 | triton | 0.150 | 1785 | 62.2 | 0 |" in text
    assert ("| m | wgrad+h16 | compile | 120.0 | 8 | 1.30 | 1.188 | 1.200 | 1.263 | 1.300 | 60.0 |"
            in text)
    assert "| m | wgrad+h16 | eager | 300.0 | 3 | 1.10 | 2.000 | 3.000 | 3.158 | 1.100 |" in text
    assert "| m | bf16 | compile | 101.0 | 10 | 1.00 | 1.000 | 1.010 | 1.063 | 1.000 | 40.0 (40.9) | 2 / 0 / 0 | yes |" in text
    assert "| m | wgrad+sr | compile | error: _Timeout: gave up after 240 s |" in text
    assert "| m | dgrad | eager | error: ValueError: bad a\\|b |" in text  # one line, one cell
    assert "| 60.0 |  /  / None | check failed |" not in text
    assert "| check failed |" in text
    assert "- m wgrad+h16, compile vs eager: OutOfMemoryError: CUDA out of memory" in text
    assert "| m | torchao-float8 | compile | 95.0 | 11 | 1.00 | 0.950 | 50.0 | 1 / 0 / 0 |" in text
    assert "| wgrad+h16 step <= 1.15x transformers bf16 | m | compile | wgrad+h16 | 1.200x | 1.15x | **missed** |" in text
    assert "| fp8 step <= torchao float8 step | m | compile | fp8 | 0.947x | 1x | met |" in text
    assert "| hardware=cuda compile <= 90 s (slowest configuration) | m | compile | wgrad+sr |" in text
    assert "- m bf16, eager vs eager, 2 step(s): bit-exact" in text
    assert "- m fp8, compile vs eager, 2 step(s): **not bit-exact**: " in text
    assert "3 of 42 gradients differ (worst lm_head.weight" in text
    assert "| llama-20m | fp8 | eager | 4 | 300,000 | 3.00 | 70,000, 80,000, 70,000, 80,000 |  |" in text
    assert "| llama-20m | fp8 | eager | 8 | error: RuntimeError: out of memory |" in text


def test_run_plan_bounds_rows_and_records_failures():
    args = SimpleNamespace(time_budget=0, row_timeout=1, compile_timeout=0)

    def fake(job, _args):
        if job["config"] == "fp8":
            raise RuntimeError("boom")
        if job["config"] == "dgrad":
            time.sleep(5)  # past the 1 s row limit
        return {"median_step_s": 0.1, "tokens_per_s": 10.0}

    jobs = [{"kind": "runner", "model": "m", "config": c, "mode": "eager"}
            for c in ("bf16", "fp8", "dgrad")]
    seen = []
    out = bench.run_plan(jobs, args, on_row=lambda sections: seen.append(len(sections["steps"])),
                         runner=fake)
    assert seen == [1, 2, 3]  # written after every row
    bf16, fp8, dgrad = out["steps"]
    assert bf16["median_step_s"] == 0.1 and bf16["ladder"] == "bf16"
    assert fp8["error"] == "RuntimeError: boom"
    assert "gave up after 1 s" in dgrad["error"] and dgrad["wall_s"] < 3
    budget = SimpleNamespace(time_budget=5, row_timeout=0, compile_timeout=0)
    out = bench.run_plan(jobs[:1], budget, runner=fake)  # 5 s < MIN_ROW_S: nothing starts
    assert "time budget" in out["steps"][0]["skipped"]


# ------------------------------------------------------------------ on the CPU, for real

def test_runner_row_is_the_runner_step_on_the_cpu():
    from fp4_ablate.hydra_app import compose
    from fp4_experiments.training import TrainStep
    overrides = bench_steps.config_overrides("demo", "wgrad+h16", "eager", **CPU)
    cfg = compose(overrides)  # the command line of `fp4-ablate run`
    assert (cfg.ladder.name, cfg.stabilizer.name, cfg.hardware.name) == ("wgrad", "h16", "cpu")
    assert (cfg.train.batch_size, cfg.model.seq_len) == (2, 32)
    build = bench_steps.build_runner(bench_steps.compose_config(overrides))
    try:
        assert isinstance(build.trainer.step, TrainStep)
        assert build.trainer.setup.step_model is build.model  # compile off
        x, y = build.trainer.step.loader.next_batch()
        assert x.shape == (2, 32) and torch.equal(x[:, 1:], y[:, :-1])
    finally:
        build.close()
    row = bench_steps.runner_row("demo", "wgrad+h16", "eager", steps=2, warmup=0, **CPU)
    assert row["kind"] == "runner" and row["ladder"] == "wgrad" and row["stabilizer"] == "h16"
    assert len(row["step_times_s"]) == 2 and row["median_step_s"] > 0
    assert row["tokens_per_s"] == pytest.approx(64 / row["median_step_s"])
    assert row["peak_mem_bytes"] is None and "bit_exact" not in row
    assert row["gemm_paths"]["wgrad"].startswith("fp4")


def test_correctness_pass_machinery_on_the_cpu():
    check = bench_steps.eager_repeatable("demo", "wgrad+sr", 1, **CPU)  # SR seeds repeat too
    assert check["bit_exact"] is True and check["grads_compared"] > 0
    cfg = bench_steps.compose_config(bench_steps.config_overrides("demo", "wgrad", "eager", **CPU))
    ref = bench_steps.snapshot_steps(cfg, 1)
    bent = [bench_steps.Snapshot(s.loss, s.grad_norm, dict(s.grads)) for s in ref]
    name = next(iter(bent[0].grads))
    bent[0].grads[name] = bent[0].grads[name] * (1 + 2**-10)
    diff = bench_steps.compare_snapshots(ref, bent)
    assert diff["bit_exact"] is False and diff["grads_differing"] == 1
    assert diff["worst_param"] == name and diff["loss_equal"] == [True]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only reasons")
def test_gpu_only_parts_say_why_on_the_cpu(monkeypatch):
    with pytest.raises(ValueError, match="no usable CUDA GPU"):
        bench_steps.runner_row("demo", "bf16", "compile", steps=1, batch=2, seq_len=32, vocab=512)
    monkeypatch.setattr(bench_peers, "torchao_version", lambda: None)
    row = bench_peers.peer_row("demo", "torchao-float8", "compile", **CPU)
    assert row["skipped"] == "torchao not installed"


def test_transformers_peer_on_the_cpu():
    cfg = bench_peers.peer_config("demo", **CPU)
    plain = bench_peers.plain_llama(cfg)
    assert not any(type(m).__name__ == "QuantLinear" for m in plain.modules())
    build = bench_steps.build_runner(bench_steps.compose_config(
        bench_steps.config_overrides("demo", "bf16", "eager", **CPU)))
    try:  # the same shape and the same initial weights as the runner's model
        ours = build.model.state_dict()
        assert all(torch.equal(v, ours[k]) for k, v in plain.state_dict().items())
    finally:
        build.close()
    row = bench_peers.peer_row("demo", "transformers-bf16", "eager", steps=1, warmup=0, **CPU)
    assert row["kind"] == "peer" and row["median_step_s"] > 0 and row["tokens_per_step"] == 64
    assert row["params"] == sum(p.numel() for p in plain.parameters())


def test_sweep_packing_on_the_cpu():
    from fp4_experiments.bench_pack import pack_row
    overrides = bench_steps.config_overrides("demo", "fp8", "eager", **CPU)
    row = pack_row(1, overrides, seconds=0.3, warmup=1, label="fp8", model="demo")
    assert row["jobs"] == 1 and row["steps_per_job"][0] >= 2
    assert row["aggregate_tokens_per_s"] == pytest.approx(row["per_job_tokens_per_s"][0])


def test_main_writes_markdown_and_json_the_report_reads(tmp_path, monkeypatch):
    from fp4_experiments.report.throughput import load_isolated_throughput
    monkeypatch.setattr(bench, "_gpu_name", lambda: "Fake GPU")  # hardware=auto is the CPU here
    monkeypatch.setattr(bench_peers, "torchao_version", lambda: None)
    assert bench.main(["--skip-kernels", "--out", str(tmp_path), "--name", "t", "--models", "demo",
                       "--batches", "2", "--seq-len", "32", "--vocab", "512", "--steps", "1",
                       "--warmup", "1", "--configs", "wgrad", "--compile-models", "",
                       "--peer-modes", "eager"]) == 0
    import json
    data = json.loads((tmp_path / "fake-gpu-t.json").read_text())
    assert [r["config"] for r in data["steps"]] == ["wgrad"]
    assert [r.get("skipped") for r in data["peers"]] == [None, "torchao not installed"]
    assert data["meta"]["versions"]["torchao"] is None and data["targets"]
    assert data["steps"][0]["x_transformers_bf16"] > 0
    md = (tmp_path / "fake-gpu-t.md").read_text()
    assert "| demo | wgrad | eager |" in md and "## Issue 12 targets" in md
    iso = load_isolated_throughput(tmp_path / "fake-gpu-t.json")
    assert iso.tokens_per_s[("demo", "wgrad", "none")] == data["steps"][0]["tokens_per_s"]
