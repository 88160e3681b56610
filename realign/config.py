"""Study configuration: schema validation with messages that name the offending key, plus the cross-key
checks a schema cannot express. Runs at Snakemake start-up, before any job."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import jsonschema
import yaml

from realign.data.stage import CHARS_PER_TOKEN, check_prompt_pool, forgetting_chars_needed
from realign.degrade.registry import METHODS as DEGRADATION_METHODS
from realign.errors import ConfigError  # re-exported: `from realign.config import ConfigError` keeps working
from realign.identity import format_recovery_name, parse_recovery_name
from realign.models.checks import check_models
from realign.recover.registry import METHODS as RECOVERY_METHODS
from realign.recover.registry import RECOVERY_OPTIONS


def _key_path(error: jsonschema.ValidationError, prefix: tuple[str, ...] = ()) -> str:
    return ".".join(str(p) for p in (*prefix, *error.absolute_path)) or "<top level>"


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
    """The config schema, with the allowed `method` of each degradation and recovery filled in from their registries
    (realign.degrade.registry, realign.recover.registry): a new method is an entry there, not also a schema edit."""
    from realign.degrade.registry import METHODS as DEGRADATION_METHODS
    from realign.recover.registry import METHODS as RECOVERY_METHODS

    schema = yaml.safe_load(Path(path).read_text())
    for section, names in (("degradations", DEGRADATION_METHODS), ("recoveries", RECOVERY_METHODS)):
        schema["properties"][section]["additionalProperties"]["properties"]["method"] = {"enum": list(names)}
    return schema


def _check_schema(instance, schema: dict, prefix: tuple[str, ...] = ()) -> None:
    """Raise ConfigError naming the key (under `prefix`, the path of `instance` in the config) of each error."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: (len(e.absolute_path), _key_path(e, prefix)))
    if errors:
        # The deepest error usually names the real culprit (e.g. degradations.rtn.bits, not degradations.rtn).
        error = max(errors, key=lambda e: len(e.absolute_path))
        lines = [f"invalid config key {_key_path(e, prefix)}: {_describe(e)}" for e in errors[:5]]
        raise ConfigError(f"invalid config key {_key_path(error, prefix)}: {_describe(error)}"
                          + ("\nall problems:\n  " + "\n  ".join(lines) if len(errors) > 1 else ""))


def _check_duplicate_seeds(config: dict) -> None:
    """A block's `seeds` listed twice would be the same run twice: named here, before the schema's `oneOf` over a
    block or a list of blocks answers with a dump that names no key."""
    study = config.get("study") if isinstance(config, dict) else None
    blocks = study if isinstance(study, list) else [study] if isinstance(study, dict) else []
    for index, block in enumerate(blocks):
        seeds = block.get("seeds") if isinstance(block, dict) else None
        if isinstance(seeds, list):
            repeated = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
            if repeated:
                where = f"study[{index}]" if isinstance(study, list) else "study"
                raise ConfigError(f"invalid config key {where}.seeds: seed(s) {repeated} listed more than once "
                                  "(each seed is one training run)")


def recovery_defaults(method: str, schema: dict | None = None) -> dict:
    """The schema's defaults of the options `method` reads (realign.recover.registry): today alignment-held's
    hold_* keys, whose one home is the schema. Validation fills them into every entry of that method."""
    schema = schema or load_schema(SCHEMA_PATH)
    options = schema["properties"]["recoveries"]["additionalProperties"]["properties"]
    return {key: options[key]["default"] for key in RECOVERY_OPTIONS[method] if "default" in options.get(key, {})}


def validate_config(config: dict, schema: dict) -> dict:
    """Return a validated copy of `config` with defaults filled; raise ConfigError naming the key."""
    _check_duplicate_seeds(config)
    _check_schema(config, schema)
    config = copy.deepcopy(config)
    _apply_defaults(config, schema)
    for name, spec in config["recoveries"].items():
        config["recoveries"][name] = {**recovery_defaults(spec["method"], schema), **spec}
    _check_cross_references(config)
    return config


def validate_key(config: dict, schema: dict, key: str):
    """One top-level key of `config` checked against its part of `schema`, returned as a copy with the schema's
    defaults filled (raises ConfigError naming the key, e.g. `analysis.alpha`). For code that reads one block
    of a config (realign.analysis.settings); the cross-key checks of validate_config are not repeated."""
    if key not in config:
        raise ConfigError(f"invalid config key {key}: missing (a required top-level key)")
    part = {**schema["properties"][key], "$defs": schema.get("$defs", {})}
    _check_schema(config[key], part, (key,))
    value = copy.deepcopy(config[key])
    _apply_defaults(value, part)
    return value


def check_theta_thresholds(theta_support: float, theta_refute: float) -> None:
    """The cross-key rule of the theta verdict's thresholds: refuting needs theta's upper bound below
    theta_refute, supporting its lower bound above theta_support, so theta_refute > theta_support would let one
    interval do both."""
    if theta_refute > theta_support:
        raise ConfigError(f"invalid config key analysis.theta_refute: {theta_refute} is above analysis.theta_support "
                          f"{theta_support}; one interval could then both support and refute")


def _study_blocks(config: dict) -> list[dict]:
    study = config.get("study")
    if study is None:
        return [{}]
    return study if isinstance(study, list) else [study]


# The config schema, shipped with the package (realign/assets links to workflow/schemas/config.schema.yaml).
SCHEMA_PATH = Path(__file__).resolve().parent / "assets" / "config.schema.yaml"


SHARED_RECOVERY_KEYS = ("method", "steps", "lr", "teacher", "checkpoints", "quantized_training", "lora_r", "lora_alpha")
# Damages whose constraint is an integer grid with per-group scales: the ones `quantized_training: scales` can train.
INTEGER_GRID_METHODS = ("rtn", "gptq")
# The `training:` keys a recovery may set for itself (the schema's training_keys)
TRAINING_KEYS = ("batch_size", "grad_accum", "max_len", "schedule", "warmup_steps", "max_grad_norm", "state_every",
                 "dtype")


def _check_cross_references(config: dict) -> None:
    blocks = _study_blocks(config)
    for index, block in enumerate(blocks):
        where = f"study[{index}]" if isinstance(config.get("study"), list) else "study"
        for kind in ("degradations", "recoveries"):
            for name in block.get(kind, []):
                if name not in config[kind] and not (kind == "degradations" and name == "none"):
                    raise ConfigError(f"invalid config key {where}.{kind}: {name!r} is not defined under {kind}: "
                                      f"defined are {', '.join(config[kind])}"
                                      + (" (or 'none', the undamaged model)" if kind == "degradations" else ""))
    for name, spec in config["recoveries"].items():
        teacher = spec.get("teacher", "none")
        if teacher != "none" and teacher not in config["degradations"]:
            raise ConfigError(f"invalid config key recoveries.{name}.teacher: {teacher!r} is not defined under "
                              f"degradations (or 'none', the undamaged original)")
        for fraction in spec.get("checkpoints", []):
            if not 0 < round(fraction * spec["steps"]) < spec["steps"]:
                raise ConfigError(f"invalid config key recoveries.{name}.checkpoints: {fraction} of "
                                  f"{spec['steps']} steps rounds to step {round(fraction * spec['steps'])}, "
                                  "not strictly inside the run")
        options = RECOVERY_OPTIONS[spec["method"]]
        for key in spec:
            if key not in options + SHARED_RECOVERY_KEYS + TRAINING_KEYS:
                raise ConfigError(f"invalid config key recoveries.{name}.{key}: not an option of method "
                                  f"{spec['method']}; its options: {', '.join(options) or 'none'}")
    for name, spec in config["degradations"].items():
        pattern = spec.get("pattern")
        if isinstance(pattern, str) and ":" in pattern:
            n, m = (int(x) for x in pattern.split(":"))
            if not 0 < n < m:
                raise ConfigError(f"invalid config key degradations.{name}.pattern: {pattern!r} keeps {n} of every {m} "
                                  "weights; an N:M pattern needs 0 < N < M (e.g. '2:4')")
    for index, block in enumerate(blocks):
        # Only where the block names both: an all x all block leaves that cell out instead (study_cells)
        where = f"study[{index}]" if isinstance(config.get("study"), list) else "study"
        for recovery in block.get("recoveries", []) if "degradations" in block else []:
            teacher = config["recoveries"][recovery].get("teacher", "none")
            if teacher != "none" and teacher in block["degradations"]:
                raise ConfigError(f"invalid config key recoveries.{recovery}.teacher: {teacher!r} is a damage "
                                  f"{where} recovers with it, so that recovery would distil the damaged model "
                                  "into itself: nothing to learn")
            spec = config["recoveries"][recovery]
            lora_keys = [k for k in ("lora_r", "lora_alpha") if k in spec]
            lora = spec.get("quantized_training") == "lora"
            missing = [k for k in ("lora_r", "lora_alpha") if k not in spec]
            if lora and missing:
                raise ConfigError(f"invalid config key recoveries.{recovery}.{missing[0]}: quantized_training: lora "
                                  "needs both lora_r and lora_alpha")
            if lora_keys and not lora:
                raise ConfigError(f"invalid config key recoveries.{recovery}.{lora_keys[0]}: an option of "
                                  "quantized_training: lora, which this recovery does not set")
            if spec.get("quantized_training") in ("scales", "lora"):
                other = [d for d in block["degradations"]
                         if d != "none" and config["degradations"][d]["method"] not in INTEGER_GRID_METHODS]
                if other:
                    trained = config["recoveries"][recovery]["quantized_training"]
                    raise ConfigError(f"invalid config key recoveries.{recovery}.quantized_training: '{trained}' "
                                      f"trains over an integer grid ({', '.join(INTEGER_GRID_METHODS)}), but "
                                      f"{where} applies it to {other[0]!r} (method "
                                      f"{config['degradations'][other[0]]['method']})")
    _check_warmup(config)
    _check_batch_sizes(config)
    _check_narrow_corpus_size(config)
    check_prompt_pool(config["data"], config["seed"])
    layers = config["measure"]["alignment_layers"]
    if isinstance(layers, list) and layers[0] > layers[1]:
        raise ConfigError(f"invalid config key measure.alignment_layers: [{layers[0]}, {layers[1]}] is not a range "
                          "(first > last)")
    analysis = config["analysis"]
    check_theta_thresholds(analysis["theta_support"], analysis["theta_refute"])
    performance = analysis["performance"]
    if performance.startswith("acc:") and performance[4:] not in config["measure"]["benchmarks"]:
        raise ConfigError(f"invalid config key analysis.performance: task {performance[4:]!r} is not in "
                          f"measure.benchmarks ({', '.join(config['measure']['benchmarks'])})")
    degradations = study_degradations(config)
    check_models(config, degradations,
                 replace_layers=[d for d in degradations
                                 if DEGRADATION_METHODS[config["degradations"][d]["method"]].kind == "load"],
                 sampled={name: tokens for name, spec in config["recoveries"].items()
                          if (tokens := RECOVERY_METHODS[spec["method"]].sampled_tokens(spec))})


def _check_warmup(config: dict) -> None:
    """Warm-up at or beyond a run's steps: the learning rate never reaches its value (a 3-step run with 2 warm-up
    steps trains at 0.02-0.06 x lr). Named where it is set: the run's own entry or `training`."""
    runs = [("recoveries", name, spec) for name, spec in config["recoveries"].items()]
    runs += [("degradations", name, spec) for name, spec in config["degradations"].items() if "steps" in spec]
    for section, name, spec in runs:
        params = training_params(config, section, name)
        if params["warmup_steps"] >= params["steps"]:
            key = f"{section}.{name}.warmup_steps" if "warmup_steps" in spec else "training.warmup_steps"
            raise ConfigError(f"invalid config key {key}: {params['warmup_steps']} warm-up steps for {section}.{name} "
                              f"of {params['steps']} steps: its learning rate would never reach "
                              f"{section}.{name}.lr")


def _check_batch_sizes(config: dict) -> None:
    """A recovery trains on the distill split: a batch larger than it would hold an example twice."""
    distill = config["data"]["prompt_splits"]["distill"]
    for name, spec in config["recoveries"].items():
        batch = training_params(config, "recoveries", name)["batch_size"]
        if batch > distill:
            key = f"recoveries.{name}.batch_size" if "batch_size" in spec else "training.batch_size"
            raise ConfigError(f"invalid config key {key}: batches of {batch} for recoveries.{name}, which trains on "
                              f"the {distill} prompts of data.prompt_splits.distill: a batch would repeat examples")


def _check_narrow_corpus_size(config: dict) -> None:
    """Each forgetting run fits in the narrow corpus, which is cut at data.narrow_corpus_chars."""
    size = config["data"]["narrow_corpus_chars"]
    for name, spec in config["degradations"].items():
        training = DEGRADATION_METHODS[spec["method"]].kind == "training"
        needed = forgetting_chars_needed(spec, config["training"]) if training else 0
        if needed > size:
            raise ConfigError(f"invalid config key data.narrow_corpus_chars: {size} characters, but degradations.{name} "
                              f"trains on {needed // CHARS_PER_TOKEN} tokens, which need {needed} "
                              f"({CHARS_PER_TOKEN} per token); raise it")


def checkpoint_steps(spec: dict) -> list[int]:
    """The optimizer steps at which a recovery saves a measurable checkpoint (`checkpoints`: fractions of
    its steps); the final model is the recovery itself and the damaged model is step 0."""
    return sorted({round(f * spec["steps"]) for f in spec.get("checkpoints", [])})


def study_cells(config: dict) -> list[tuple[str, str]]:
    """The (degradation, recovery artifact) pairs of the study, recovery `none` (the damaged model) included.

    `study` is absent (all x all), one block {degradations, recoveries, seeds} (its cross product; a missing list
    means all), or a list of such blocks (the union), so a study can cross a long damage ladder with one recovery
    and a few damages with every control. `seeds` replicates the block's recoveries; degradation `none` trains the
    undamaged model (a control: self-distillation should change nothing). Checkpoints are artifacts too. A
    recovery whose damaged teacher is the block's own damage is left out (nothing to learn; validate_config
    rejects a block that names both)."""
    cells: list[tuple[str, str]] = []

    def add(cell):
        if cell not in cells and cell != ("none", "none"):
            cells.append(cell)

    for block in _study_blocks(config):
        seeds = block.get("seeds", [config["seed"]])
        for degradation in block.get("degradations", list(config["degradations"])):
            add((degradation, "none"))
            for recovery in block.get("recoveries", list(config["recoveries"])):
                if degradation != "none" and config["recoveries"][recovery].get("teacher", "none") == degradation:
                    continue  # distilling a damage into itself teaches nothing (named in a block: a ConfigError)
                for seed in seeds:
                    replicate = None if seed == config["seed"] else seed
                    for step in checkpoint_steps(config["recoveries"][recovery]) + [None]:
                        add((degradation, format_recovery_name(recovery, replicate, step)))
    return cells



def study_artifacts(config: dict) -> list[tuple[str, str, str]]:
    """Every (model, degradation, recovery) artifact of the study, per model its teacher (model, none, none) first:
    the cells the `table` rule reads and a study snapshot (realign.snapshot) carries."""
    cells = []
    for model in config["models"]:
        cells.append((model, "none", "none"))
        cells += [(model, degradation, recovery) for degradation, recovery in study_cells(config)]
    return cells


def study_degradations(config: dict) -> list[str]:
    """The degradations the study applies (`none`, the undamaged model, is not one), damaged teachers included."""
    names = [d for d, _ in study_cells(config)]
    names += [config["recoveries"][parse_recovery_name(r)[0]].get("teacher", "none") for r in study_recoveries(config)]
    return [d for d in dict.fromkeys(names) if d != "none"]


def study_recoveries(config: dict) -> list[str]:
    """Every recovery artifact name of the study (replicates and checkpoints included)."""
    return list(dict.fromkeys(r for _, r in study_cells(config) if r != "none"))


def trained_recoveries(config: dict) -> list[str]:
    """The recovery runs of the study (one training job each; checkpoints come out of the same job)."""
    return list(dict.fromkeys(r for r in study_recoveries(config) if parse_recovery_name(r)[2] is None))


def recovery_spec(config: dict, name: str) -> tuple[dict, int]:
    """(training parameters, seed) of a recovery artifact name. alignment-held's spec is completed with its
    defaults and with measure.alignment_layers, so the artifact records the ceiling's every input."""
    recovery, seed, _ = parse_recovery_name(name)
    spec = training_params(config, "recoveries", recovery)
    # the pre-registered layers, for a method whose layers they always are (alignment-held: its hold_* defaults
    # were filled in at validation) or are unless it sets `layers` (realign.recover.registry)
    uses = RECOVERY_METHODS[spec["method"]].alignment_layers
    if uses == "always" or (uses == "default" and "layers" not in spec):
        spec = {**spec, "alignment_layers": config["measure"]["alignment_layers"]}
    return spec, config["seed"] if seed is None else seed


# How often a run saves a state to resume from: it changes no result, so it is no param of any job (a change of
# it must not rerun finished recoveries); scripts/recover.py reads it with `state_every` below.
RESUME_KEYS = ("state_every",)


def training_params(config: dict, section: str, name: str) -> dict:
    """The shared `training:` defaults overridden by the method's own entries, the resume cadence left out."""
    merged = {**config["training"], **config[section][name]}
    return {key: value for key, value in merged.items() if key not in RESUME_KEYS}


def state_every(config: dict, name: str) -> int:
    """A recovery artifact's resume cadence: its recovery's `state_every`, else `training.state_every`, else 0
    (no saved state)."""
    recovery, _, _ = parse_recovery_name(name)
    return int({**config["training"], **config["recoveries"][recovery]}.get("state_every", 0))


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
