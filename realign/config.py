"""Study configuration: schema validation with messages that name the offending key, plus the cross-key
checks a schema cannot express. Runs at Snakemake start-up, before any job."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import jsonschema
import yaml


class ConfigError(ValueError):
    pass


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(schema.get("properties", {}))
        return f"{error.message}; allowed keys: {', '.join(allowed) or 'none'}"
    if error.validator == "not" and error.instance == "none":
        return "'none' is reserved (it names the undamaged teacher and the no-recovery control)"
    if error.validator == "oneOf" and all(set(sub) == {"required"} for sub in error.validator_value):
        names = [name for sub in error.validator_value for name in sub["required"]]
        return f"give exactly one of {', '.join(names)}"
    if error.validator in ("oneOf", "anyOf") and schema.get("description"):
        # "not valid under any of the given schemas" alone does not say what would be.
        return f"{error.message}; expected {' '.join(schema['description'].split())}"
    if error.validator == "enum":
        return f"{error.instance!r} is not allowed; allowed: {', '.join(map(str, error.validator_value))}"
    return error.message


def _apply_defaults(instance, schema) -> None:
    """Fill `default` values of object properties (jsonschema validates but never fills)."""
    if not isinstance(instance, dict) or not isinstance(schema, dict):
        return
    for name, sub in schema.get("properties", {}).items():
        if isinstance(sub, dict):
            if "default" in sub and name not in instance:
                instance[name] = copy.deepcopy(sub["default"])
            _apply_defaults(instance.get(name), sub)


def load_schema(path: str | Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def validate_config(config: dict, schema: dict) -> dict:
    """Return a validated copy of `config` with defaults filled; raise ConfigError naming the key."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), _key_path(e)))
    if errors:
        # The deepest error usually names the real culprit (e.g. degradations.rtn.bits, not degradations.rtn).
        error = max(errors, key=lambda e: len(e.absolute_path))
        lines = [f"invalid config key {_key_path(e)}: {_describe(e)}" for e in errors[:5]]
        raise ConfigError(f"invalid config key {_key_path(error)}: {_describe(error)}"
                          + ("\nall problems:\n  " + "\n  ".join(lines) if len(errors) > 1 else ""))
    config = copy.deepcopy(config)
    _apply_defaults(config, schema)
    _check_cross_references(config)
    return config


def _study_blocks(config: dict) -> list[dict]:
    study = config.get("study")
    if study is None:
        return [{}]
    return study if isinstance(study, list) else [study]


def _check_cross_references(config: dict) -> None:
    blocks = _study_blocks(config)
    for index, block in enumerate(blocks):
        where = f"study[{index}]" if isinstance(config.get("study"), list) else "study"
        for kind in ("degradations", "recoveries"):
            for name in block.get(kind, []):
                if name not in config[kind]:
                    raise ConfigError(f"invalid config key {where}.{kind}: {name!r} is not defined under {kind}: "
                                      f"defined are {', '.join(config[kind])}")
    performance = config["analysis"]["performance"]
    if performance.startswith("acc:") and performance[4:] not in config["measure"]["benchmarks"]:
        raise ConfigError(f"invalid config key analysis.performance: task {performance[4:]!r} is not in "
                          f"measure.benchmarks ({', '.join(config['measure']['benchmarks'])})")
    for name, model in config["models"].items():
        if model["source"] == "path" and not Path(model["path"]).is_dir():
            raise ConfigError(f"invalid config key models.{name}.path: directory {model['path']} does not exist")


def study_cells(config: dict) -> list[tuple[str, str]]:
    """The (degradation, recovery) pairs of the study, recovery `none` (the damaged model) included.

    `study` is absent (all x all), one block {degradations, recoveries} (its cross product; a missing list means
    all), or a list of such blocks (the union), so a study can cross a long damage ladder with one recovery and
    a few damages with every control."""
    cells: list[tuple[str, str]] = []
    for block in _study_blocks(config):
        for degradation in block.get("degradations", list(config["degradations"])):
            for recovery in ["none"] + list(block.get("recoveries", list(config["recoveries"]))):
                if (degradation, recovery) not in cells:
                    cells.append((degradation, recovery))
    return cells


def study_degradations(config: dict) -> list[str]:
    return list(dict.fromkeys(d for d, _ in study_cells(config)))


def study_recoveries(config: dict) -> list[str]:
    return list(dict.fromkeys(r for _, r in study_cells(config) if r != "none"))


def training_params(config: dict, section: str, name: str) -> dict:
    """The shared `training:` defaults overridden by the method's own entries."""
    return {**config["training"], **config[section][name]}


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
