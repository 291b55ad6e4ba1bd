"""experiments/kernel_sass.py: the launches it records are the launcher's, and it compiles them.

The tool compiles for sm_90 with the ptxas that ships with Triton, so it needs no GPU. The tests
run it in a subprocess without TRITON_INTERPRET (under the interpreter, @triton.jit gives
functions that cannot be compiled), and skip where Triton's NVIDIA backend tools are absent."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _ptxas() -> bool:
    try:
        from triton.backends.nvidia import __file__ as nv_init
    except Exception:  # noqa: BLE001 -- no Triton, or no NVIDIA backend in it
        return False
    return (Path(nv_init).parent / "bin" / "ptxas").exists()


pytestmark = pytest.mark.skipif(not _ptxas(), reason="Triton's NVIDIA backend (ptxas) is not installed")


def _run(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "experiments.kernel_sass", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _row(out: str, case: str, kernel: str) -> list:
    rows = [line.split() for line in out.splitlines() if line.startswith(case + " ") and kernel in line]
    assert len(rows) == 1, out
    return rows[0]


def test_records_and_compiles_the_default_launch():
    out = _run("--case", "mxfp4-last", "--rows", "256", "--cols", "768")
    row = _row(out, "mxfp4-last", "block_quant_kernel")
    tile, regs, spill, blocks = int(row[2]), int(row[3]), int(row[4]), int(row[5])
    # The launcher's MX last-axis tile is 32 x 128 (mx_quant._default_config): 4096 elements.
    assert tile == 4096
    assert 16 <= regs <= 255 and spill >= 0 and 1 <= blocks <= 32


def test_config_replaces_the_table_tile():
    out = _run("--case", "mxfp4-last", "--rows", "256", "--cols", "768", "--config", "16,128,4,0")
    assert int(_row(out, "mxfp4-last", "block_quant_kernel")[2]) == 16 * 128


def test_nvfp4_records_its_amax_pre_pass_too():
    out = _run("--case", "nvfp4-last", "--rows", "256", "--cols", "768")
    _row(out, "nvfp4-last", "_amax_kernel")
    _row(out, "nvfp4-last", "block_quant_kernel")
