"""Arrows run one way inside realign/: the artifact layer knows no damage method, recovery does not reach into the
degradation stage, and the import graph has no circle of any length (lazy imports, inside a function, included),
with no exception."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "realign"


def module_name(path: Path) -> str:
    """realign/models/checks.py -> realign.models.checks; a package's __init__.py is the package itself."""
    return ".".join(("realign", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")


def imported_modules(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The realign modules one import statement names. `from realign.x import y` is an import of realign.x.y when
    that is a module (else of realign.x, whose __init__ defines y); relative imports resolve against `module`."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name == "realign" or a.name.startswith("realign.")}
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join([*package, *([base] if base else [])])
    if base != "realign" and not base.startswith("realign."):
        return set()
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}


def import_graph() -> dict[str, set[str]]:
    """module -> the realign modules it imports anywhere in its file (module level or inside a function)."""
    paths = {module_name(path): path for path in ROOT.rglob("*.py")}
    modules = set(paths)
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        is_package = path.name == "__init__.py"
        targets = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets.update(imported_modules(node, module, is_package, modules))
        targets.discard(module)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan's algorithm, iterative), each sorted,
    the list sorted: two modules are in one component exactly when each reaches the other through imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        circles.append(sorted(component))
    return sorted(circles)


def describe(circles: list[list[str]], graph: dict[str, set[str]]) -> str:
    """One line per circle: its modules, then each import arrow inside it."""
    lines = []
    for members in circles:
        arrows = [f"{a} -> {b}" for a in members for b in sorted(graph[a]) if b in members]
        lines.append(f"circle of {len(members)}: {', '.join(members)}\n    " + "\n    ".join(arrows))
    return "\n".join(lines)


def test_the_cycle_finder_finds_a_planted_circle_and_no_other():
    acyclic = {"a": {"b", "c"}, "b": {"c", "d"}, "c": {"d"}, "d": set(), "e": {"a", "d"}}
    assert import_circles(acyclic) == []
    planted = {**acyclic, "d": {"f"}, "f": {"g"}, "g": {"d", "h"}, "h": set()}  # d -> f -> g -> d
    assert import_circles(planted) == [["d", "f", "g"]]
    two = {**planted, "h": {"i"}, "i": {"h"}, "e": {"a", "e"}}  # a second, separate pair; a self-import is none
    assert import_circles(two) == [["d", "f", "g"], ["h", "i"]]
    # a long chain closed at its end is one circle (recursion depth is not a limit: the search is iterative)
    ring = {f"m{i}": {f"m{(i + 1) % 3000}"} for i in range(3000)}
    assert import_circles(ring) == [sorted(ring)]


def test_import_resolution_names_submodules_and_relative_imports():
    modules = {"realign", "realign.models", "realign.models.checks", "realign.config"}
    parse = lambda source: ast.parse(source).body[0]  # noqa: E731
    assert imported_modules(parse("from realign.models import checks"), "realign.config", False, modules) \
        == {"realign.models.checks"}
    assert imported_modules(parse("from realign import config"), "realign.x", False, modules) == {"realign.config"}
    assert imported_modules(parse("from realign.models import ModelFacts"), "realign.config", False, modules) \
        == {"realign.models"}
    assert imported_modules(parse("from . import checks"), "realign.models.sources", False, modules) \
        == {"realign.models.checks"}
    assert imported_modules(parse("from ..config import X"), "realign.models.sources", False, modules) \
        == {"realign.config"}
    assert imported_modules(parse("from .checks import X"), "realign.models", True, modules) \
        == {"realign.models.checks"}
    assert imported_modules(parse("import numpy, realign.config"), "realign.x", False, modules) == {"realign.config"}
    assert imported_modules(parse("from realignment import x"), "realign.x", False, modules) == set()


def test_no_import_circles():
    graph = import_graph()
    circles = import_circles(graph)
    assert not circles, "import circles in realign/ (lazy imports included):\n" + describe(circles, graph)


def test_the_named_arrows_run_one_way():
    graph = import_graph()
    models = {t for m, targets in graph.items() if m.startswith("realign.models") for t in targets}
    assert not {t for t in models if t.startswith(("realign.degrade", "realign.recover", "realign.measure",
                                                    "realign.analysis"))}
    recover = {t for m, targets in graph.items() if m.startswith("realign.recover") for t in targets}
    assert "realign.degrade.stage" not in recover
    analysis = {t for m, targets in graph.items() if m.startswith("realign.analysis") for t in targets}
    assert not {t for t in analysis if t.startswith(("realign.degrade", "realign.recover"))}
