"""The layering the architecture note (docs/ARCHITECTURE.md) draws holds in the code: the
package's import graph, function-level imports included, has no cycle, and the core package
never imports torch (torch lives in runtime/)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dfpgen"


def _graph() -> dict[str, set[str]]:
    mods = {f.stem for f in PKG.glob("*.py")}
    graph = {}
    for f in PKG.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
                deps.update(n for n in names if n in mods)
        graph[f.stem] = deps - {f.stem}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (c := visit(w)):
                return c
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state and (c := visit(v)):
            return c
    return None


def test_the_import_graph_of_the_core_package_is_acyclic():
    graph = _graph()
    assert len(graph) > 20 and "decisions" in graph["pass_kernels"] and "passes" in graph["decisions"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_core_package_never_imports_torch():
    for f in PKG.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            # dfpgen.baseline times PyTorch's own conv for the CLI's "vs torch" column,
            # only when torch is installed: the one named exception.
            if f.name != "baseline.py":
                assert not any(n.split(".")[0] == "torch" for n in names), f.name
