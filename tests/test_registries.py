"""The registries are the one list of each kind of method: the schema's enums agree with them, and what the stages
derive from them (families, calibrated methods) is what the registry says."""

import ast
import re
from pathlib import Path

import yaml

from realign.degrade.registry import CALIBRATED_METHODS, FAMILIES, METHODS, apply_method
from realign.recover.registry import METHODS as RECOVERY_METHODS

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml"


def _method_enum(schema: dict, section: str) -> list[str]:
    return schema["properties"][section]["additionalProperties"]["properties"]["method"]["enum"]


def test_the_schema_enums_are_the_registries():
    from realign.config import ConfigError, load_schema, validate_config

    schema = load_schema(SCHEMA_PATH)
    assert _method_enum(schema, "degradations") == list(METHODS)
    assert _method_enum(schema, "recoveries") == list(RECOVERY_METHODS)
    # the YAML itself lists no method names, so there is no second list to keep in step
    raw = yaml.safe_load(SCHEMA_PATH.read_text())
    assert all("enum" not in raw["properties"][s]["additionalProperties"]["properties"]["method"]
               for s in ("degradations", "recoveries"))
    config = yaml.safe_load((SCHEMA_PATH.parents[2] / "config.yaml").read_text())
    config["degradations"]["rtn-w3g64"]["method"] = "zip"
    import pytest

    with pytest.raises(ConfigError, match="degradations.rtn-w3g64.method"):
        validate_config(config, schema)


def test_families_and_calibration_come_from_the_entries():
    assert set(FAMILIES.values()) == {"forgetting", "quantization", "pruning"}
    assert set(CALIBRATED_METHODS) == {"gptq", "wanda", "sparsegpt"}
    assert all((m.apply is not None) == (m.kind == "post-training") for m in METHODS.values())


def test_a_method_that_is_not_post_training_cannot_be_applied_to_weights():
    import pytest

    with pytest.raises(ValueError, match="degradations.x.method: sft is not a post-training method"):
        apply_method(None, {"method": "sft"}, None, key="degradations.x.")
    with pytest.raises(ValueError, match="unknown method 'zip'"):
        apply_method(None, {"method": "zip"}, None, key="degradations.x.")


def test_recovery_options_and_teacher_needs_come_from_the_registry():
    from realign.config import RECOVERY_OPTIONS
    from realign.recover.registry import METHODS as RECOVERIES
    from realign.recover.registry import training_targets

    assert RECOVERY_OPTIONS == {name: m.options for name, m in RECOVERIES.items()}
    from realign.recover.registry import NEEDS_TEACHER_HIDDEN
    assert set(NEEDS_TEACHER_HIDDEN) == {"cka-kd", "alignment-blocked", "alignment-held", "alignment-only",
                                         "squarehead", "hidden-cosine"}
    # a live teacher: hidden states, scoring the student's samples, or logits without a top-k cache
    live = {name for name, m in RECOVERIES.items() if m.live_teacher({"top_k": 64})}
    assert live == set(NEEDS_TEACHER_HIDDEN) | {"onpolicy"}
    assert all(m.live_teacher({}) == (m.teacher_logits or m.teacher_hidden or m.scores_samples)
               for m in RECOVERIES.values())
    assert RECOVERIES["onpolicy"].sampled_tokens({}) == 65 and RECOVERIES["kd"].sampled_tokens({}) == 0
    assert training_targets("sdft", {}) == "rewrite" and training_targets("sdft", {"targets": "answers"}) == \
        "teacher_answer"
    assert training_targets("sft", {}) == "reference" and training_targets("kd", {}) == "teacher_answer"


def test_constraint_kinds_are_one_entry_each():
    from realign.degrade.constraints import KINDS, TARGET_KINDS

    assert KINDS == ("none", "grid", "fp4-grid", "mask", "frozen")
    assert {k for k, v in TARGET_KINDS.items() if v.grid} == {"grid", "fp4-grid"}


def _method_name_comparisons(tree, names: set[str]) -> list[int]:
    """Lines comparing something with a method name written as a string (==, !=, in a literal tuple/list/set)."""
    def literal_names(node) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(isinstance(e, ast.Constant) and e.value in names for e in node.elts)
        return False

    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
            and any(literal_names(side) for side in (node.left, *node.comparators))]


def test_no_method_is_dispatched_on_by_its_name_outside_its_registry():
    """Issue 31: a method's behaviour is carried by its registry entry (its loss and hooks, its kind), so adding one
    is its entry and its function; code elsewhere asks the entry, never compares the method's name."""
    names = set(METHODS) | set(RECOVERY_METHODS)
    repo = Path(__file__).resolve().parents[1]
    registries = {repo / "realign/degrade/registry.py", repo / "realign/recover/registry.py"}
    found = []
    # in realign.analysis.theta, "kd", "held" and "only" name the estimand's roles, not methods
    roles = repo / "realign/analysis/theta"
    for path in sorted([*(repo / "realign").rglob("*.py"), *(repo / "scripts").glob("*.py")]):
        if path not in registries and roles not in path.parents:
            found += [f"{path.relative_to(repo)}:{n}" for n in _method_name_comparisons(ast.parse(path.read_text()),
                                                                                        names)]
    for path in sorted((repo / "workflow").rglob("*.smk")):
        found += [f"{path.relative_to(repo)}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
                  if re.search(r"""(==|!=)\s*["'](%s)["']""" % "|".join(map(re.escape, names)), line)]
    assert found == []
