"""Recovery steps of the DAG: the teacher's answers (once per model) and each recovery run."""

from __future__ import annotations

import time
from pathlib import Path

from realign.degrade.stage import train_config
from realign.device import model_device
from realign.io import read_json, read_jsonl, write_jsonl
from realign.models.artifact import load_artifact, load_constraint_tensors, save_artifact
from realign.recover.methods import recover
from realign.recover.teacher_data import generate_answers


def teacher_answers(teacher_dir: str | Path, prompts_path: str | Path, max_new_tokens: int, out_path: str | Path,
                    batch_size: int = 8) -> int:
    model, tokenizer, _ = load_artifact(teacher_dir)
    records = read_json(prompts_path)["distill"]
    answers = generate_answers(model, tokenizer, [r["instruction"] for r in records], max_new_tokens, batch_size)
    write_jsonl(out_path, [{**r, "teacher_answer": a} for r, a in zip(records, answers)])
    return sum(1 for a in answers if a)


def run_recovery(teacher_dir: str | Path, damaged_dir: str | Path, answers_path: str | Path, out_dir: str | Path,
                 name: str, params: dict, seed: int) -> dict:
    start = time.time()
    student, tokenizer, parent_meta = load_artifact(damaged_dir)
    constraint_tensors = load_constraint_tensors(damaged_dir, device=model_device(student))
    teacher = load_artifact(teacher_dir)[0] if params["method"] == "kd" else None
    records = read_jsonl(answers_path)
    student, curve, check = recover(student, teacher, tokenizer, params["method"], records, train_config(params, seed),
                           params["max_len"], parent_meta["constraint"], constraint_tensors,
                           temperature=params.get("temperature", 1.0))
    meta = {**{k: parent_meta[k] for k in ("model", "degradation", "family", "degradation_method",
                                           "degradation_params", "constraint")},
            "recovery": name, "recovery_method": params["method"], "recovery_params": params,
            "constraint_check": check, "seed": seed, "parents": [str(damaged_dir), str(teacher_dir)],
            "data_split": {"train": "distill", "answers": str(answers_path), "n_records": len(records)},
            "training_curve": curve, "timings": {"seconds": time.time() - start}}
    save_artifact(student, tokenizer, out_dir, meta, constraint_tensors=constraint_tensors,
                  frozen_base_dir=damaged_dir)
    return meta
