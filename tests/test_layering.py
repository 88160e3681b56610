"""Arrows run one way inside realign/: the artifact layer knows no damage method, recovery does not reach into the
degradation stage, and no two modules import each other (lazy imports included), with one stated exception."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "realign"
# realign.config validates a study and calls the model checks, which raise its ConfigError: a deliberate pair.
ALLOWED_PAIRS = {frozenset({"realign.config", "realign.models.checks"})}


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        module = ".".join(("realign", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        targets = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("realign"):
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("realign"))
    return graph


def test_no_two_modules_import_each_other():
    graph = import_graph()
    pairs = {frozenset({a, b}) for a, targets in graph.items() for b in targets if a in graph.get(b, ())}
    assert pairs <= ALLOWED_PAIRS, sorted(tuple(sorted(p)) for p in pairs - ALLOWED_PAIRS)


def test_the_named_arrows_run_one_way():
    graph = import_graph()
    models = {t for m, targets in graph.items() if m.startswith("realign.models") for t in targets}
    assert not {t for t in models if t.startswith(("realign.degrade", "realign.recover", "realign.measure",
                                                    "realign.analysis"))}
    recover = {t for m, targets in graph.items() if m.startswith("realign.recover") for t in targets}
    assert "realign.degrade.stage" not in recover
    analysis = {t for m, targets in graph.items() if m.startswith("realign.analysis") for t in targets}
    assert not {t for t in analysis if t.startswith(("realign.degrade", "realign.recover"))}
