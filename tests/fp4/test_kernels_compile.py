"""The Triton kernels compile for the GPU they run on (CUDA sm_90), checked without one.

The other kernel tests run the kernels under TRITON_INTERPRET=1, which executes their Python and
so cannot see what only Triton's compiler rejects (a construct its frontend does not lower, a
branch that yields another type). Here every kernel variant the launchers build for a spread of
calls (sm90_compile_probe.py) is compiled by triton.compile for target cuda sm_90 down to a cubin
(Triton's bundled ptxas), in a subprocess without TRITON_INTERPRET: those modules set it for this
process before Triton is imported. Nothing is launched. Skipped where Triton has no CUDA backend.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")

PROBE = Path(__file__).with_name("sm90_compile_probe.py")
KERNELS = {"_amax_kernel", "_fp8_kernel", "_fp8_t_kernel", "block_quant_kernel", "fp32_block_kernel"}


def _has_cuda_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _has_cuda_backend(), reason="triton has no CUDA backend to compile for")
def test_every_kernel_variant_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a compile, not a cache hit
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(PROBE)], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [f"{r['kernel']} {r['constexprs']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    names = {r["kernel"] for r in rows}
    assert KERNELS <= names, names
    assert len(rows) >= 20, len(rows)
