"""The registries are the one list of each kind of method: the schema's enums agree with them, and what the stages
derive from them (families, calibrated methods) is what the registry says."""

from pathlib import Path

import yaml

from realign.degrade.registry import CALIBRATED_METHODS, FAMILIES, METHODS, apply_method
from realign.recover.registry import METHODS as RECOVERY_METHODS

SCHEMA = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())


def _method_enum(section: str) -> list[str]:
    return SCHEMA["properties"][section]["additionalProperties"]["properties"]["method"]["enum"]


def test_the_schema_enums_are_the_registries():
    assert sorted(_method_enum("degradations")) == sorted(METHODS)
    assert sorted(_method_enum("recoveries")) == sorted(RECOVERY_METHODS)


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
    from realign.recover import methods
    from realign.recover.registry import METHODS as RECOVERIES
    from realign.recover.registry import training_targets

    assert RECOVERY_OPTIONS == {name: m.options for name, m in RECOVERIES.items()}
    assert methods.METHODS == tuple(RECOVERIES)
    assert set(methods.NEEDS_TEACHER_HIDDEN) == {"cka-kd", "alignment-blocked", "alignment-held", "alignment-only",
                                                 "squarehead", "hidden-cosine"}
    assert training_targets("sdft", {}) == "rewrite" and training_targets("sdft", {"targets": "answers"}) == \
        "teacher_answer"
    assert training_targets("sft", {}) == "reference" and training_targets("kd", {}) == "teacher_answer"


def test_constraint_kinds_are_one_entry_each():
    from realign.degrade.constraints import KINDS, TARGET_KINDS

    assert KINDS == ("none", "grid", "fp4-grid", "mask", "frozen")
    assert {k for k, v in TARGET_KINDS.items() if v.grid} == {"grid", "fp4-grid"}
