"""Job sizes for the scheduler (Snakemake `resources:`), derived from each model's parameter count so a 7B
model gets a 7B-sized job without editing rules. Used by every rule; the Slurm profile turns them into
`--mem`, `--time` and `--gpus`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from realign.config import ConfigError
from realign.models.checks import GGUFInfo, check_local_model, safetensors_parameter_count


@dataclass(frozen=True)
class JobSize:
    mem_base_mb: int     # interpreter, libraries, tokenizer, batch activations of a small model
    mem_per_b_mb: int    # per billion parameters
    minutes_base: int
    minutes_per_b: int   # per billion parameters (CPU fp32; GPU jobs use a tenth)
    uses_gpu: bool


# Memory per billion parameters, fp32 on the host: one model is 4 GB/B. Training holds the student, its
# gradients and two AdamW moments (16 GB/B) plus the frozen teacher (4 GB/B); measurement holds the artifact
# (or the teacher, for its cached outputs) and, for divergence, the teacher's cached logits plus the artifact's
# full-vocabulary logits (it held both models before the cache). Calibrated on SmolLM2-135M (peak RSS:
# recover 4.6 GB, evaluate 3.4 GB, divergence 3.2 GB, activations 1.1 GB on 2 cores) with ~20 % headroom;
# retries scale memory and time with the attempt number.
JOB_SIZES = {
    "fetch": JobSize(1000, 0, 20, 0, False),
    "data": JobSize(2000, 0, 20, 0, False),
    "prepare": JobSize(2000, 8000, 20, 60, False),
    "generate": JobSize(2500, 8000, 30, 600, True),
    "train": JobSize(3000, 20000, 30, 1200, True),
    "measure": JobSize(3000, 8000, 30, 600, True),
    "light": JobSize(2000, 0, 10, 0, False),
    # CKA and the other similarity measures: two activation caches (width grows with the model) and a few n x n
    # Gram matrices of the probe tokens per layer (n = 8192 in configs/qwen2.5.yaml: about 6 GB); no GPU.
    "similarity": JobSize(3000, 4000, 10, 10, False),
}


def parameter_count_b(spec: dict, name: str) -> float:
    """Billions of parameters of `models.<name>`: `params_b` if given, else counted from a local source: a GGUF
    file's header, the headers of a directory's safetensors files, or (weights in another format) a model
    instantiated from config.json on the meta device. Runs while the DAG is built, so it never runs a model's
    own code (trust_remote_code) and never allocates weights."""
    if "params_b" in spec:
        return float(spec["params_b"])
    if spec["source"] != "path":
        raise ConfigError(f"models.{name}.params_b is required for source {spec['source']} "
                          "(the billions of parameters that size its jobs)")
    local = check_local_model(spec["path"], name)
    if isinstance(local, GGUFInfo):
        return local.n_parameters / 1e9
    counted = safetensors_parameter_count(spec["path"])
    if counted is not None:
        return counted / 1e9
    if spec.get("trust_remote_code", False):
        raise ConfigError(f"models.{name}.params_b is required: {spec['path']} has no safetensors weights whose "
                          "headers could be counted, and counting otherwise would run the model's remote code "
                          "(trust_remote_code: true) while the workflow is planned")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(spec["path"], trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except (ValueError, KeyError, OSError) as err:
        raise ConfigError(f"models.{name}.path: cannot count the parameters of {spec['path']} from its "
                          f"config.json ({err}); give models.{name}.params_b") from None
    return sum(p.numel() for p in model.parameters()) / 1e9


def job_resources(kind: str, params_b: float, gpus: int, attempt: int = 1) -> dict:
    """{mem_mb, runtime (minutes), gpu} for one job of `kind` on a model of `params_b` billion parameters."""
    size = JOB_SIZES[kind]
    on_gpu = size.uses_gpu and gpus > 0
    minutes_per_b = size.minutes_per_b / 10 if on_gpu else size.minutes_per_b
    return {
        "mem_mb": int(math.ceil((size.mem_base_mb + size.mem_per_b_mb * params_b) * attempt)),
        "runtime": int(math.ceil((size.minutes_base + minutes_per_b * params_b) * attempt)),
        "gpu": gpus if on_gpu else 0,
    }
