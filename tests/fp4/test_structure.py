"""Structure of the fp4 package: no import cycles, nothing imported from the experiment layers, and
every module importable on its own (in a fresh interpreter, in any order)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "fp4"
FORBIDDEN = ("experiments", "fp4_experiments", "cli", "fp4_ablate", "configs", "fp4_configs")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(path: Path, name: str, modules):
    """Every module imported anywhere in the file (lazy, function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            found.add(base)
            # `from fp4 import fp8_gemm` / `from . import kernels` import a submodule.
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules)
    return found


def _graph():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = _imports(path, name, modules)
        # The package root only maps names lazily (import_module of strings): no edge to it.
        graph[name] = {d for d in deps if d in modules and d != name and d != "fp4"}
        graph[name + ":all"] = deps
    return graph


def _find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(n for n in graph if not n.endswith(":all")):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_import_graph_of_fp4_has_no_cycle():
    graph = _graph()
    assert "fp4.kernels" in graph["fp4.quantize"] and "fp4.kernels.amax" in graph["fp4.kernels.mx_quant"]
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_kernels_import_nothing_private_from_the_dispatcher():
    graph = _graph()
    for name in (n for n in graph if n.startswith("fp4.kernels") and not n.endswith(":all")):
        assert "fp4.quantize" not in graph[name], name


def test_fp4_imports_nothing_from_the_experiment_layers():
    graph = _graph()
    for name, deps in graph.items():
        if name.endswith(":all"):
            bad = [d for d in deps if d.split(".")[0] in FORBIDDEN]
            assert not bad, (name, bad)


@pytest.mark.parametrize("first", ["fp4.kernels.fp8_quant", "fp4.kernels.mx_quant", "fp4.kernels",
                                   "fp4.fp8_gemm", "fp4.linear", "fp4.state", "fp4.names"])
def test_each_module_imports_first_in_a_fresh_interpreter(first):
    if first.startswith("fp4.kernels.") and subprocess.run(
            [sys.executable, "-c", "import triton"], capture_output=True).returncode:
        pytest.skip("triton is not installed")
    code = f"import {first}, fp4.quantize, fp4.kernels, fp4.linear; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
