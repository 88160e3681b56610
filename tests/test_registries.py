"""The registries are the one list of each kind of method: the schema's enums agree with them, and what the stages
derive from them (families, calibrated methods) is what the registry says."""

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
