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


# Where a pass or tier name may be compared with a literal: only the planners' guards that
# refuse a spec of another pass (docs/ARCHITECTURE.md, "Layering"); everything else asks the
# pass registry (dfpgen/passes.py) or the tier record (dfpgen/isa.py).
_NAME_BRANCHES_ALLOWED = {("plan.py", "pass_kind"), ("plan_bwd_data.py", "pass_kind"), ("tuning.py", "pass_kind")}
_PASS_NAMES = {"fwd", "bwd_data", "bwd_weight"}
_TIER_NAMES = {"avx512_vnni", "vnni256", "avx2", "generic"}


def _literal_names(node) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_literal_names(e) for e in node.elts)) if node.elts else set()
    return set()


def _name_branches(tree) -> list[tuple[int, str]]:
    """(line, 'pass_kind' | 'tier') of every comparison of a pass or tier name with a literal."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        names = set().union(*(_literal_names(s) for s in sides))
        for s in sides:
            attr = s.attr if isinstance(s, ast.Attribute) else s.id if isinstance(s, ast.Name) else ""
            if attr.endswith("pass_kind") and names & _PASS_NAMES:
                found.append((node.lineno, "pass_kind"))
            elif attr.endswith("tier") and names & _TIER_NAMES:
                found.append((node.lineno, "tier"))
    return found


def test_pass_and_tier_names_are_branched_on_only_in_the_registry_and_the_tier_table():
    runtime = PKG.parent / "runtime"
    bad = []
    for f in [*PKG.glob("*.py"), *runtime.glob("*.py")]:
        for line, kind in _name_branches(ast.parse(f.read_text())):
            if (f.name, kind) not in _NAME_BRANCHES_ALLOWED or f.parent == runtime:
                bad.append(f"{f.parent.name}/{f.name}:{line} ({kind})")
    assert not bad, bad
    for t in (PKG.parent / "templates").glob("*.j2"):
        text = t.read_text()
        assert not any(f"p.tier == '{n}'" in text or f'p.tier == "{n}"' in text for n in _TIER_NAMES), t.name
        assert not any(f"pass_kind == '{n}'" in text or f'pass_kind == "{n}"' in text for n in _PASS_NAMES), t.name


def test_the_name_branch_finder_finds_branches():
    tree = ast.parse('if spec.pass_kind == "fwd": pass\nif tier in ("avx2", "generic"): pass\n'
                     'if x == "fwd": pass\n')
    assert _name_branches(tree) == [(1, "pass_kind"), (2, "tier")]


def test_the_architecture_note_names_every_file_of_the_data_path():
    root = PKG.parent
    note = (root / "docs" / "ARCHITECTURE.md").read_text()
    files = [*PKG.glob("*.py"), *(root / "runtime").glob("*.py"), *(root / "templates").glob("*.j2"),
             *(root / "examples").glob("*.py")]
    missing = [str(f.relative_to(root)) for f in files if f.name != "__init__.py" and f.name not in note]
    assert len(files) > 50 and not missing, missing


# numpy hands matrix products to its BLAS (OpenBLAS in the wheels), whose worker threads spin
# for a while after each call: on the per-call path of a conv that takes a core from the
# kernel threads. Only the reference (tests and `dfpgen cache verify`) may use them.
_BLAS_CALLS = {"dot", "matmul", "tensordot", "einsum", "inner", "outer", "vdot", "linalg"}


def _blas_uses(src: str) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            lines.append(node.lineno)
        elif (isinstance(node, ast.Attribute) and node.attr in _BLAS_CALLS
              and isinstance(node.value, ast.Name) and node.value.id in ("np", "numpy")):
            lines.append(node.lineno)
    return lines


def test_the_per_call_path_makes_no_blas_call():
    assert sorted(_blas_uses("y = a @ b\nz = np.linalg.norm(a)\nw = np.dot(a, b)\nd = isa.dot\n")) == [1, 2, 3]
    for f in list(PKG.glob("*.py")) + list((PKG.parent / "runtime").glob("*.py")):
        if f.name in ("reference.py", "bn_reference.py"):
            continue
        src = f.read_text()
        assert not _blas_uses(src), (f.name, _blas_uses(src))
