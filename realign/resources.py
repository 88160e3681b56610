"""Job sizes for the scheduler (Snakemake `resources:`), derived from each model's parameter count so a 7B
model gets a 7B-sized job without editing rules. Used by every rule; the Slurm profile turns them into
`--mem`, `--time` and `--gpus`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from realign.config import ConfigError


@dataclass(frozen=True)
class JobSize:
    mem_base_mb: int     # interpreter, libraries, tokenizer, batch activations of a small model
    mem_per_b_mb: int    # per billion parameters
    minutes_base: int
    minutes_per_b: int   # per billion parameters (CPU fp32; GPU jobs use a tenth)
    uses_gpu: bool


# Memory per billion parameters, fp32 on the host: one model is 4 GB/B. Training holds the student, its
# gradients and two AdamW moments (16 GB/B) plus the frozen teacher (4 GB/B); measurement holds the artifact
# and, for divergence, the teacher (8 GB/B) plus full-vocabulary logits. Calibrated on SmolLM2-135M (peak RSS:
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
    """Billions of parameters of `models.<name>`: `params_b` if given, else counted from a local checkpoint's
    config.json (instantiated on the meta device, so nothing is allocated)."""
    if "params_b" in spec:
        return float(spec["params_b"])
    if spec["source"] != "path":
        raise ConfigError(f"models.{name}.params_b is required for source {spec['source']} "
                          "(the billions of parameters that size its jobs)")
    config_file = Path(spec["path"]) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"models.{name}.path: {spec['path']} has no config.json; give models.{name}.params_b")
    try:
        json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"models.{name}.path: {config_file} is not valid JSON ({err})") from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(str(config_file.parent),
                                              trust_remote_code=spec.get("trust_remote_code", False))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
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
