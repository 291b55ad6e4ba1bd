"""The run-directory contract (experiments/rundir.py): atomic writer, typed summary/meta, version-1 reader."""
import dataclasses
import json
import os
import re
import stat
from pathlib import Path

import pytest

from fp4_experiments import rundir
from fp4_experiments.rundir import (FINISHED, SCHEMA_VERSION, GemmPath, Meta, RunDirError, Status, Summary,
                                    atomic_save, atomic_write_json, atomic_write_text, load_run)

REPO = Path(__file__).resolve().parents[2]
LADDER_RUNS = REPO / "results" / "mxfp4-ladder-llama20m" / "runs"


@pytest.fixture
def umask():
    old = os.umask(0o022)

    def set_(mask):
        os.umask(mask)
        rundir.process_umask.cache_clear()

    yield set_
    os.umask(old)
    rundir.process_umask.cache_clear()


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_atomic_writer_respects_the_umask(tmp_path, umask):
    umask(0o022)
    assert _mode(atomic_write_text(tmp_path / "a" / "summary.json", "{}")) == 0o644
    assert _mode(atomic_save(tmp_path / "ckpt.pt", lambda f: f.write(b"\0" * 10))) == 0o644
    umask(0o027)
    assert _mode(atomic_write_json(tmp_path / "b.json", {"x": 1})) == 0o640
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1}
    # Nothing but the targets is left in the directory (no temporary files).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.json", "ckpt.pt"]


def test_atomic_save_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = atomic_write_text(tmp_path / "last.pt", "old")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        atomic_save(target, broken)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["last.pt"]


def test_atomic_save_takes_torch_save(tmp_path):
    torch = pytest.importorskip("torch")
    p = atomic_save(tmp_path / "checkpoints" / "last.pt", lambda f: torch.save({"w": torch.arange(3)}, f))
    assert torch.load(p)["w"].tolist() == [0, 1, 2]


def test_gemm_path_text_of_version_1():
    assert GemmPath.from_text("fp8:e5m2xe4m3 (torch._scaled_mm)") == GemmPath("fp8", ("e5m2", "e4m3"),
                                                                               "torch._scaled_mm")
    # "mxfp4" contains an x: the formats are split by name, not by the letter.
    assert GemmPath.from_text("fp4:mxfp4 (emulated)") == GemmPath("fp4", ("mxfp4", "mxfp4"), "emulated")
    assert GemmPath.from_text("fp4:mxfp4xe4m3 (emulated)").formats == ("mxfp4", "e4m3")
    assert GemmPath.from_text("bf16") == GemmPath("bf16", (), "torch.matmul")
    assert not GemmPath.from_text("fp4:nvfp4 (emulated)").native
    assert GemmPath.from_text("fp8:e4m3xe4m3 (torch._scaled_mm)").describe() == "fp8:e4m3 (torch._scaled_mm)"
    with pytest.raises(RunDirError, match="unrecognised gemm path"):
        GemmPath.from_text("int8:foo (x)")


def test_version_1_run_directory_loads():
    d = next(p for p in sorted(LADDER_RUNS.iterdir()) if p.name.startswith("dgrad-none-mxfp4-llama-20m-s0-"))
    raw = json.loads((d / "summary.json").read_text())
    assert "schema_version" not in raw and isinstance(raw["gemm_paths"]["dgrad"], str)  # really version 1
    rec = load_run(d)
    s = rec.summary
    assert s.schema_version == 1 and s.status is Status.reached and s.finished
    assert s.gemm_paths["wgrad"] == GemmPath("fp8", ("e5m2", "e4m3"), "torch._scaled_mm")
    assert s.gemm_paths["dgrad"].precision == "fp4" and not s.gemm_paths["dgrad"].native
    assert rec.meta.schema_version == 1 and rec.meta.device_name == "NVIDIA H200"
    assert rec.metrics.evals and rec.metrics.last_step <= s.steps
    assert rec.config["train"]["target_ppl"] == s.target_ppl


def test_version_2_summary_round_trip(tmp_path):
    s = Summary(status=Status.not_reached, run_key="k" * 16, ladder="wgrad", stabilizer="h16", format="mxfp4",
                model="m", data="d", seed=3, target_ppl=30.0, tokens_to_target=None, best_ppl=31.0,
                mean_tokens_per_s=5.0, steps=10,
                gemm_paths={"fprop": GemmPath("fp4", ("mxfp4", "mxfp4"), "emulated")})
    d = s.to_dict()
    assert d["schema_version"] == SCHEMA_VERSION == 2 and d["status"] == "not_reached"
    assert d["gemm_paths"]["fprop"] == {"precision": "fp4", "formats": ["mxfp4", "mxfp4"], "backend": "emulated"}
    atomic_write_json(tmp_path / "summary.json", d)
    back = Summary.from_dict(json.loads((tmp_path / "summary.json").read_text()))
    assert back == s
    with pytest.raises(RunDirError, match="schema_version 3 is newer"):
        Summary.from_dict(dict(d, schema_version=3))
    with pytest.raises(RunDirError, match="unknown status 'done'"):
        Summary.from_dict(dict(d, status="done"))
    # A failed run's summary needs its status only (the runner writes identity, error, wall time).
    failed = Summary.from_dict({"status": "failed", "ladder": "fp8", "error": "OOM"})
    assert failed.status is Status.failed and not failed.finished and failed.error == "OOM"


def test_status_and_finished_agree_with_the_runner():
    from fp4_experiments.runner import FINISHED as RUNNER_FINISHED
    assert {s.value for s in Status} == {"reached", "not_reached", "diverged", "completed", "failed"}
    assert set(RUNNER_FINISHED) == {s.value for s in FINISHED} and Status.failed not in FINISHED
    assert f"{Status.reached}" == "reached" and json.dumps(Status.diverged) == '"diverged"'


def test_design_doc_is_generated_from_the_module():
    doc = (REPO / "docs" / "design.md").read_text()
    assert rundir.describe_markdown() in doc, "regenerate: python -m fp4_experiments.rundir"
    section = doc[doc.index(rundir.DOC_BEGIN):doc.index(rundir.DOC_END)]
    files = re.findall(r"^- `([^`]+)`:", section, flags=re.M)
    assert files == list(rundir.RUN_FILES)

    def keys(title):
        block = section[section.index(title):].split("\n\n")[0]
        return re.findall(r"^  - `([^`]+)`:", block, flags=re.M)

    assert keys("`summary.json` keys") == [f.name for f in dataclasses.fields(Summary)]
    assert keys("`meta.json` keys") == [f.name for f in dataclasses.fields(Meta)]
