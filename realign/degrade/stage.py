"""Apply one configured degradation to the teacher artifact and save the damaged artifact `{degradation}/none`.

Every method is `(model, spec, calibration) -> (model, constraint)`: it damages the model and returns the
constraint (grid, mask, frozen base) that recovery must keep; the constraint is re-checked before saving.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from realign.data.sequences import chat_example
from realign.degrade import constraints
from realign.degrade.coverage import DamageNotApplied, check_supported, damage_report, snapshot
from realign.degrade.forgetting import forget_by_sft
from realign.degrade.registry import degradation_method
from realign.device import compute_device, model_device
from realign.data.stage import read_prompts
from realign.io import file_sha256, read_jsonl
from realign.models.artifact import load_artifact, save_artifact
from realign.models.record import ArtifactRecord
from realign.training import TrainConfig

log = logging.getLogger(__name__)

def calibration_ids(tokenizer, records: list[dict], n_sequences: int, seq_len: int) -> torch.Tensor:
    """[n_sequences, seq_len] token ids from the distillation split (instruction + reference answer in the chat
    format the model is used with), concatenated and cut into full windows. Never evaluation data."""
    stream: list[int] = []
    for record in records:
        stream += chat_example(tokenizer, record["instruction"], record["reference"], 10**9)["input_ids"].tolist()
        if len(stream) >= n_sequences * seq_len:
            break
    if len(stream) < n_sequences * seq_len:
        raise ValueError(f"the distillation split has {len(stream)} tokens, fewer than data.calibration asks for "
                         f"({n_sequences} x {seq_len}); lower data.calibration.sequences or .max_len")
    return torch.tensor(stream[: n_sequences * seq_len]).reshape(n_sequences, seq_len)


def bnb_report(model, targets: dict, key: str) -> dict:
    """Every Linear/Conv1D target of the teacher must have become a bitsandbytes layer."""
    from realign.degrade.bnb import quantized_modules

    quantized = set(quantized_modules(model))
    missing = sorted(set(targets) - quantized)
    if missing or not quantized:
        raise DamageNotApplied(f"{key}method: bitsandbytes left {len(missing)} of {len(targets)} weight matrices "
                               f"unquantized (e.g. {missing[:1]})")
    total = sum(t.weight.numel() for t in targets.values())
    return {"targets": {kind: sum(t.kind == kind for t in targets.values()) for kind in ("linear", "conv1d")},
            "targeted_parameters": total, "claim": "every targeted layer is a bitsandbytes layer",
            "expected_fraction": 1.0, "touched_fraction": len(quantized & set(targets)) / len(targets)}


def degrade(teacher_dir: str | Path, out_dir: str | Path, model_name: str, name: str, params: dict, seed: int,
            narrow_train: str | Path | None = None, prompts_path: str | Path | None = None,
            calibration: dict | None = None) -> ArtifactRecord:
    start = time.time()
    key = f"degradations.{name}."
    method = degradation_method(params["method"], key)
    device = compute_device()
    tensors: dict = {}
    curve: list[dict] = []
    damage = calibration_used = data = precision = None  # what the record says by kind of method (realign.models.record)
    if method.kind == "load":
        from realign.degrade.bnb import frozen_constraint, load_quantized

        teacher, tokenizer, _ = load_artifact(teacher_dir, device="cpu")
        targets = check_supported(teacher, params, key=key)
        del teacher
        model = load_quantized(teacher_dir, params["quant_type"], device=device, key=key)
        constraint = frozen_constraint(model, params["quant_type"], params["lora_r"], params["lora_alpha"])
        damage = bnb_report(model, targets, key)
    else:
        model, tokenizer, teacher_record = load_artifact(teacher_dir)
        if method.kind == "training":
            texts = [row["text"] for row in read_jsonl(narrow_train, verify=True, producer="the `narrow_corpus` rule")]
            train_cfg = TrainConfig.from_params(params, seed)
            precision = train_cfg.precision_on(model_device(model))
            curve, n_chunks = forget_by_sft(model, tokenizer, texts, train_cfg, params["max_len"],
                                            run_identity={"parent": teacher_record.content_digest(), "params": params})
            constraint = dict(constraints.NO_CONSTRAINT)
            # the corpus's digest: the damage is a function of its entry and of these bytes (issue 32)
            data = {"corpus": params.get("corpus", "code"), "path": str(narrow_train), "chunks": n_chunks,
                    "tokens_per_chunk": params["max_len"], "sha256": file_sha256(narrow_train)}
        else:
            check_supported(model, params, key=key)  # refuse before any work
            ids = None
            if method.calibrated:
                ids = calibration_ids(tokenizer, read_prompts(prompts_path)["distill"], calibration["sequences"],
                                      calibration["max_len"])
                calibration_used = {"split": "distill (instruction + reference answer)",
                                    "sequences": ids.shape[0], "tokens_per_sequence": ids.shape[1]}
            before = snapshot(model)
            model.to(device)
            constraint, tensors = method.apply(model, params, ids, key)
            model.to("cpu")
            tensors = {k: v.cpu() for k, v in tensors.items()}
    check = constraints.check(model, constraint, tensors)
    if method.kind == "post-training":
        damage = damage_report(model, constraint, check, before, key=key)
        log.info("%s: %s touched %.4f of %d targeted weights (%s)", name, method.name,
                 damage["touched_fraction"], damage["targeted_parameters"], damage["claim"])
    seconds = time.time() - start
    log.info("%s: %s applied in %.1f s on %s; constraint check %s", name, method.name, seconds, device, check)
    record = ArtifactRecord(model=model_name, degradation=name, family=method.family, degradation_method=method.name,
                            degradation_params=params, constraint=constraint, constraint_check=check, seed=seed,
                            parents=[str(teacher_dir)], training_curve=curve, training_precision=precision,
                            timings={"seconds": seconds, "device": device}, damage=damage,
                            calibration=calibration_used, data=data)
    save_artifact(model, tokenizer, out_dir, record, constraint_tensors=tensors)
    return record
