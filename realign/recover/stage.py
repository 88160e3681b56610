"""Recovery steps of the DAG: the teacher's answers, rewrites and top-k logits (once per model) and each
recovery run, whose checkpoints are saved as artifacts of their own inside the run's directory."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

from realign.degrade import constraints
from realign.degrade.touched import check_codes, damage_touched, stored_values
from realign.device import model_device
from realign.data.stage import read_prompts
from realign.io import file_sha256, read_jsonl, write_jsonl
from realign.models.artifact import artifact_facts, load_artifact, load_constraint_tensors, read_record, save_artifact
from realign.models.record import ArtifactRecord
from realign.models.checks import check_fits
from realign.recover.methods import build_examples
from realign.recover.registry import METHODS as RECOVERY_METHODS
from realign.recover.registry import training_targets
from realign.recover.run import needs_live_teacher, recover
from realign.recover.teacher_data import generate_answers, generate_rewrites
from realign.identity import CHECKPOINTS_DIR, ArtifactId, checkpoint_dir
from realign.training import TrainConfig

log = logging.getLogger(__name__)


def teacher_answers(teacher_dir: str | Path, prompts_path: str | Path, max_new_tokens: int, out_path: str | Path,
                    batch_size: int = 8) -> int:
    model, tokenizer, _ = load_artifact(teacher_dir)
    records = read_prompts(prompts_path)["distill"]
    answers = generate_answers(model, tokenizer, [r["instruction"] for r in records], max_new_tokens, batch_size)
    write_jsonl(out_path, [{**r, "teacher_answer": a} for r, a in zip(records, answers)], digest=True)
    return sum(1 for a in answers if a)


def teacher_rewrites(teacher_dir: str | Path, prompts_path: str | Path, max_new_tokens: int, out_path: str | Path,
                     batch_size: int = 8) -> dict:
    """The teacher's rewrites of the reference answers (self-distilled fine-tuning); returns acceptance counts."""
    model, tokenizer, _ = load_artifact(teacher_dir)
    rows = generate_rewrites(model, tokenizer, read_prompts(prompts_path)["distill"], max_new_tokens, batch_size)
    write_jsonl(out_path, rows, digest=True)
    return {"records": len(rows), "accepted": sum(r["rewrite_accepted"] for r in rows)}


def read_teacher_records(path: str | Path) -> list[dict]:
    """The teacher's answers or rewrites, verified against the digest their step wrote."""
    return read_jsonl(path, verify=True, producer=f"the step that made it ({Path(path).stem})")


def teacher_top_k(teacher_dir: str | Path, answers_path: str | Path, out_path: str | Path, max_len: int,
                  top_k: int, temperature: float, batch_size: int = 8, recoveries: list[str] = ()) -> None:
    """Cache the teacher's top-k log-probabilities on the kd examples (the original teacher's answers);
    `recoveries`: the names of the recoveries that read this cache (named by errors)."""
    from realign.recover.teacher_logits import compute_teacher_top_k, save_teacher_top_k

    keys = [f"recoveries.{name}.top_k" for name in recoveries] or ["recoveries.<name>.top_k"]
    check_fits(artifact_facts(teacher_dir), f"the teacher {teacher_dir}", {" / ".join(keys): top_k},
               {"training.max_len (or recoveries.<name>.max_len)": max_len})
    model, tokenizer, _ = load_artifact(teacher_dir)
    examples = build_examples(tokenizer, read_teacher_records(answers_path), "teacher_answer", max_len)
    cache = compute_teacher_top_k(model, examples, top_k, temperature, tokenizer.pad_token_id, batch_size)
    save_teacher_top_k(cache, out_path, examples, temperature)


def content_states(model_dir: str | Path, answers_path: str | Path, out_path: str | Path, max_len: int,
                   alignment_layers, batch_size: int = 8) -> None:
    """Cache a model's hidden states at the content positions of the held examples (the teacher's answers), at
    the layers of measure.alignment_layers (realign.recover.content_states)."""
    from realign.recover.content_states import compute_content_states

    model, tokenizer, _ = load_artifact(model_dir)
    examples = build_examples(tokenizer, read_teacher_records(answers_path), "teacher_answer", max_len, content=True)
    compute_content_states(model, examples, alignment_layers, tokenizer.pad_token_id, batch_size).save(
        out_path, examples, alignment_layers)


def run_recovery(teacher_dir: str | Path, damaged_dir: str | Path, records_path: str | Path, out_dir: str | Path,
                 name: str, params: dict, seed: int, teacher_top_k_path: str | Path | None = None,
                 checkpoint_steps: list[int] = (), state_every: int = 0,
                 content_states: tuple = (None, None)) -> ArtifactRecord:
    """Train recovery `name` of the damaged model; `content_states`: the teacher's and the damaged model's
    content-states caches, for a method that reads them (alignment-held), or None each (computed in the run)."""
    start = time.time()
    out_dir = Path(out_dir)
    lengths = {f"recoveries.{name}.max_len (or training.max_len)": params["max_len"]}
    sampled = RECOVERY_METHODS[params["method"]].sampled_tokens(params)
    if sampled:  # the student's prompt leaves room for its sample
        lengths[f"recoveries.{name}.max_new_tokens"] = sampled
    check_fits(artifact_facts(damaged_dir), f"the model {damaged_dir}",
               {f"recoveries.{name}.top_k": params["top_k"]} if "top_k" in params else {}, lengths)
    student, tokenizer, parent = load_artifact(damaged_dir)
    constraint = parent.constraint
    trained = params.get("quantized_training")  # absent: the straight-through grid
    if trained == constraints.TRAINED_SCALES:
        constraint = {**constraint, "trained": trained}
    elif trained == constraints.TRAINED_LORA:
        from realign.degrade.bnb import LORA_TARGETS

        constraint = {**constraint, "trained": trained, "adapter": "lora",
                      "lora": {"r": params["lora_r"], "alpha": params["lora_alpha"], "target_modules": LORA_TARGETS}}
    constraint_tensors = load_constraint_tensors(damaged_dir, device=model_device(student))  # the damaged grid
    # The damaged targets' stored values, to record how much of the damage the recovery changed (damage_touched).
    damaged_values = stored_values(student, constraint)
    states_cached = all(path is not None for path in content_states)
    teacher = load_artifact(teacher_dir)[0] if needs_live_teacher(params, states_cached) else None
    records = read_teacher_records(records_path)
    # what the run and each of its checkpoints share: the parent's identity and damage, how it was trained
    train_cfg = TrainConfig.from_params(params, seed)
    run_record = ArtifactRecord(
        model=parent.model, degradation=parent.degradation, family=parent.family,
        degradation_method=parent.degradation_method, degradation_params=parent.degradation_params,
        constraint=constraint, recovery_method=params["method"], recovery_params=params, seed=seed,
        training_precision=train_cfg.precision_on(model_device(student)),
        teacher=str(teacher_dir), parents=[str(damaged_dir), str(teacher_dir)],
        data_split={"train": "distill", "records": str(records_path), "n_records": len(records),
                    "targets": training_targets(params["method"], params),
                    "teacher_top_k": str(teacher_top_k_path) if teacher_top_k_path else None,
                    "content_states": [str(path) for path in content_states] if states_cached else None})
    staging = out_dir.parent / f".{out_dir.name}.checkpoints.partial"
    state_path = out_dir.parent / f".{out_dir.name}.train_state.pt"
    # A saved state is continued only by the run that saved it: same parent and teacher (their content digests),
    # constraint, training records, teacher top-k cache and method parameters (realign.training.train).
    identity = {"parent": parent.content_digest(), "teacher": read_record(teacher_dir).content_digest(),
                "constraint": constraint, "records": file_sha256(records_path),
                "teacher_top_k": file_sha256(teacher_top_k_path) if teacher_top_k_path else None,
                "content_states": [file_sha256(path) for path in content_states] if states_cached else None,
                "params": params,
                "checkpoint_steps": list(checkpoint_steps)}

    def touched(model, label: str, tensors: dict) -> dict | None:
        result = damage_touched(model, constraint, tensors, damaged_values)
        for kind, counts in (result or {}).items():
            log.log(logging.WARNING if kind != "frozen" and counts["matrices_changed"] == 0 else logging.INFO,
                    "%s: changed %d of %d targeted %s matrices (%d of %d values, %.4g)", label,
                    counts["matrices_changed"], counts["matrices"], kind, counts["values_changed"], counts["values"],
                    counts["fraction"])
        return result

    def codes_kept(model, tensors: dict) -> dict:
        """With trained scales: the check that every integer code is the parent's, and the scales changed."""
        return {"codes": check_codes(model, constraint, constraint_tensors, tensors, damaged_values)} \
            if constraint.get("trained") == constraints.TRAINED_SCALES else {}

    def save_checkpoint(model, step: int, curve: list[dict]) -> None:
        # The run goes on training `model`; the checkpoint is a copy with the constraint baked in.
        snapshot = model if constraints.keeps_adapters(constraint) else constraints.baked_copy(model)
        tensors = constraints.trained_grid(model, constraint, constraint_tensors)
        check = {**constraints.check(snapshot, constraint, tensors), **codes_kept(snapshot, tensors)}
        checkpoint = replace(ArtifactId.parse(parent.model, parent.degradation, name), step=step)
        record = replace(run_record, recovery=checkpoint.recovery_name, checkpoint_of=name, step=step,
                         constraint_check=check, training_curve=curve,
                         damage_touched=touched(snapshot, checkpoint.recovery_name, tensors))
        save_artifact(snapshot, tokenizer, checkpoint_dir(staging, step), record, constraint_tensors=tensors,
                      frozen_base_dir=damaged_dir)

    student, curve, check, trained_tensors = recover(
                                    student, teacher, tokenizer, params, records, train_cfg,
                                    params["max_len"], constraint, constraint_tensors,
                                    teacher_top_k_path=teacher_top_k_path, on_checkpoint=save_checkpoint,
                                    checkpoint_steps=checkpoint_steps, state_path=state_path, state_every=state_every,
                                    run_identity=identity,
                                    # checkpoints saved by an interrupted run are kept only while its state is
                                    on_restart=lambda: shutil.rmtree(staging, ignore_errors=True),
                                    content_states=content_states if states_cached else (None, None))
    check = {**check, **codes_kept(student, trained_tensors)}
    record = replace(run_record, recovery=name, step=params["steps"], constraint_check=check,
                     checkpoints=list(checkpoint_steps), training_curve=curve, timings={"seconds": time.time() - start},
                     damage_touched=touched(student, name, trained_tensors))
    save_artifact(student, tokenizer, out_dir, record, constraint_tensors=trained_tensors,
                  frozen_base_dir=damaged_dir, include={CHECKPOINTS_DIR: staging / CHECKPOINTS_DIR})
    shutil.rmtree(staging, ignore_errors=True)
    return record
