# Config validation (before any job), wildcard constraints, and the input functions shared by the rules.
import re

from realign.config import (ConfigError, config_hash, load_schema, study_cells, study_degradations,
                            study_recoveries,
                            training_params, validate_config)

try:
    config = validate_config(config, load_schema(workflow.source_path("../schemas/config.schema.yaml")))
except ConfigError as err:
    raise WorkflowError(f"config error: {err}") from None

SEED = config["seed"]
MODELS = list(config["models"])
DEGRADATIONS = study_degradations(config)
RECOVERIES = study_recoveries(config)
RESOURCES = config["data"].get("resources_dir", "resources")
CONDA_ENV = "../../envs/realign.yaml"


def _alternatives(names):
    return "|".join(re.escape(n) for n in names)


wildcard_constraints:
    model=_alternatives(MODELS),
    degradation=_alternatives(["none"] + DEGRADATIONS),
    recovery=_alternatives(["none"] + RECOVERIES),
    requirement=r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+-]+",


def artifacts():
    """Every (model, degradation, recovery) of the study; the teacher is (model, none, none)."""
    cells = []
    for model in MODELS:
        cells.append((model, "none", "none"))
        cells += [(model, degradation, recovery) for degradation, recovery in study_cells(config)]
    return cells


def artifact_dir(model, degradation, recovery):
    return f"results/models/{model}/{degradation}/{recovery}"


def model_dir(wildcards):
    return artifact_dir(wildcards.model, wildcards.degradation, wildcards.recovery)


def teacher_dir(wildcards):
    return artifact_dir(wildcards.model, "none", "none")


def wheel_dir(requirement):
    return f"{RESOURCES}/wheels/{requirement}"


def measurement_files(kind, suffix):
    return [f"results/{kind}/{m}/{d}/{r}.{suffix}" for m, d, r in artifacts()]


def maybe_temp(path):
    return temp(path) if config["workflow"].get("temp_models") else path
