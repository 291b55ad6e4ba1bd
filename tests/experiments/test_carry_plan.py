"""experiments/gpu/carry_plan.py: what a lease carries, split into device calls that fit."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "gpu" / "carry_plan.py"
spec = importlib.util.spec_from_file_location("carry_plan", SCRIPT)
carry_plan = importlib.util.module_from_spec(spec)
spec.loader.exec_module(carry_plan)
MB = 10**6


def test_plan_fits_every_call_and_carries_each_path_once():
    items = [("a", 19 * MB), ("b", 19 * MB), ("c", 17 * MB), ("d", 8 * MB), ("e", 4 * MB), ("f", 1 * MB)]
    calls = carry_plan.plan(items, room=26 * MB)
    assert all(sum(n for _, n in call) <= 26 * MB for call in calls)
    assert sorted(p for call in calls for p, _ in call) == sorted(p for p, _ in items)
    assert len(calls) == 3  # 68 MB in 26 MB calls: first-fit decreasing needs no fourth
    assert calls[0][0] == ("a", 19 * MB)  # largest first


def test_plan_respects_the_path_limit():
    calls = carry_plan.plan([(str(i), 1) for i in range(20)], room=10**9, max_paths=8)
    assert [len(c) for c in calls] == [8, 8, 4]


def test_a_file_larger_than_a_call_is_refused_with_its_size():
    with pytest.raises(ValueError, match="big.*30.0 MB.*26.0 MB"):
        carry_plan.plan([("big", 30 * MB)], room=26 * MB)


def test_a_folder_too_large_for_one_call_travels_as_its_files(tmp_path, capsys):
    data = tmp_path / "mix"
    data.mkdir()
    for name, n in (("x.gz", 3000), ("y.gz", 2000), ("z.gz", 1000)):
        (data / name).write_bytes(b"0" * n)
    small = tmp_path / "whl"
    small.mkdir()
    (small / "w.whl").write_bytes(b"0" * 500)
    pieces = carry_plan.pieces([small, data], room=4000)
    assert (str(small), 500) in pieces  # fits: carried whole
    assert {p for p, _ in pieces} >= {str(data / "x.gz"), str(data / "y.gz"), str(data / "z.gz")}
    room_mb = (carry_plan.CALL_LIMIT - carry_plan.MARGIN - 4000) / MB  # leaves a room of 4000 B
    assert carry_plan.main([str(small), str(data), "--repo-mb", str(room_mb)]) == 0
    out = capsys.readouterr().out
    assert "in 2 call(s)" in out and "x.gz" in out


def test_a_missing_path_is_a_clear_error(tmp_path, capsys):
    assert carry_plan.main([str(tmp_path / "nope"), "--repo-mb", "10"]) == 2
    assert "nope: no such file or folder" in capsys.readouterr().err
