"""Apply one configured degradation to the teacher artifact and save the damaged artifact `{degradation}/none`."""

from __future__ import annotations

import time
from pathlib import Path

from realign.degrade import constraints
from realign.degrade.forgetting import forget_by_sft
from realign.degrade.prune import prune_model
from realign.degrade.quantize import quantize_model
from realign.io import read_jsonl
from realign.models.artifact import load_artifact, save_artifact
from realign.training import TrainConfig

FAMILIES = {"sft": "forgetting", "rtn": "quantization", "magnitude": "pruning"}


def train_config(params: dict, seed: int) -> TrainConfig:
    return TrainConfig(steps=params["steps"], lr=params["lr"], batch_size=params["batch_size"],
                       grad_accum=params.get("grad_accum", 1), schedule=params.get("schedule", "cosine"),
                       warmup_steps=params.get("warmup_steps", 0), max_grad_norm=params.get("max_grad_norm", 1.0),
                       seed=seed)


def degrade(teacher_dir: str | Path, out_dir: str | Path, model_name: str, name: str, params: dict, seed: int,
            code_train: str | Path | None = None) -> dict:
    start = time.time()
    model, tokenizer, _ = load_artifact(teacher_dir)
    method = params["method"]
    tensors: dict = {}
    curve: list[dict] = []
    extra: dict = {}
    if method == "sft":
        texts = [row["text"] for row in read_jsonl(code_train)]
        curve, n_chunks = forget_by_sft(model, tokenizer, texts, train_config(params, seed), params["max_len"])
        constraint = dict(constraints.NO_CONSTRAINT)
        extra["data"] = {"corpus": str(code_train), "chunks": n_chunks, "tokens_per_chunk": params["max_len"]}
    elif method == "rtn":
        constraint, tensors = quantize_model(model, params["bits"], params["group_size"], key=f"degradations.{name}.")
    elif method == "magnitude":
        constraint, tensors = prune_model(model, params["sparsity"])
    else:
        raise ValueError(f"degradations.{name}.method: unknown method {method!r}")
    check = constraints.check(model, constraint, tensors)
    meta = {"model": model_name, "degradation": name, "recovery": "none", "family": FAMILIES[method],
            "degradation_method": method, "degradation_params": params, "recovery_method": "none",
            "recovery_params": {}, "constraint": constraint, "constraint_check": check, "seed": seed,
            "parents": [str(teacher_dir)], "training_curve": curve, "timings": {"seconds": time.time() - start},
            **extra}
    save_artifact(model, tokenizer, out_dir, meta, constraint_tensors=tensors)
    return meta
