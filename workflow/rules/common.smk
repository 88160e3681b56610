# Config validation (before any job), wildcard constraints, and the input functions shared by the rules.
import re

from realign.config import (ConfigError, artifact_location, checkpoint_steps, config_hash, load_schema,
                            recovery_spec, run_dir, study_cells, study_degradations, study_recoveries,
                            trained_recoveries, training_params, validate_config)
from realign.resources import job_resources, parameter_count_b

try:
    config = validate_config(config, load_schema(workflow.source_path("../schemas/config.schema.yaml")))
    PARAMS_B = {name: parameter_count_b(spec, name) for name, spec in config["models"].items()}
except ConfigError as err:
    raise WorkflowError(f"config error: {err}") from None

SEED = config["seed"]
MODELS = list(config["models"])
DEGRADATIONS = study_degradations(config)
RECOVERIES = study_recoveries(config)  # every recovery artifact name: replicates and checkpoints included
TRAINED = trained_recoveries(config)  # the training runs behind them
RESOURCES = config["data"].get("resources_dir", "resources")
CONDA_ENV = "../../envs/realign.yaml"
GPUS = config["workflow"]["gpus"]


def sized(kind):
    """`resources:` of a rule whose jobs are of `kind` (realign.resources.JOB_SIZES), scaled by the parameter
    count of the job's model (none for rules without a {model} wildcard) and by the retry attempt."""

    def one(key):
        return lambda wc, attempt: job_resources(kind, PARAMS_B.get(wc.get("model"), 0.0), GPUS, attempt)[key]

    return {"mem_mb": one("mem_mb"), "runtime": one("runtime"), "gpu": one("gpu")}


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
    return run_dir(model, degradation, recovery)


def model_dir(wildcards):
    return run_dir(wildcards.model, wildcards.degradation, wildcards.recovery)


def model_path(wildcards):
    return artifact_location(wildcards.model, wildcards.degradation, wildcards.recovery)


def teacher_dir(wildcards):
    return artifact_dir(wildcards.model, "none", "none")


def wheel_dir(requirement):
    return f"{RESOURCES}/wheels/{requirement}"


def measurement_files(kind, suffix):
    return [f"results/{kind}/{m}/{d}/{r}.{suffix}" for m, d, r in artifacts()]


def maybe_temp(path):
    return temp(path) if config["workflow"].get("temp_models") else path
