"""Measurement steps of the DAG: activations, CKA vs the teacher, output divergence, and evaluation."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from realign.data.sequences import chat_example, chat_prompt_ids, packed_chunks
from realign.io import atomic_path, read_json, read_jsonl
from realign.measure.activations import capture, load_activations, save_activations
from realign.measure.cka import TeacherCKA
from realign.measure.divergence import mean_nll, output_divergence
from realign.models.artifact import load_artifact


def probe_sequences(tokenizer, records: list[dict], max_tokens: int) -> list[torch.Tensor]:
    """Probe texts: instruction (chat format) followed by its reference answer, truncated to `max_tokens`."""
    sequences = []
    for r in records:
        ids = chat_prompt_ids(tokenizer, r["instruction"]) + tokenizer(r["reference"], add_special_tokens=False)["input_ids"]
        sequences.append(torch.tensor(ids[:max_tokens]))
    return sequences


def activations(artifact_dir, prompts_path, out_path, max_tokens: int, per_sequence: int, seed: int) -> dict:
    start = time.time()
    model, tokenizer, _ = load_artifact(artifact_dir)
    sequences = probe_sequences(tokenizer, read_json(prompts_path)["probe"], max_tokens)
    acts = capture(model, sequences, per_sequence, seed)
    save_activations(acts, out_path, {"artifact": str(artifact_dir), "seed": str(seed),
                                      "probe_split": "probe", "n_sequences": str(len(sequences))})
    return {"n_tokens": int(acts["token_index"].shape[0]), "seconds": time.time() - start}


def cka_vs_teacher(teacher_acts, artifact_acts, out_path) -> pd.DataFrame:
    teacher_layers, teacher_index = load_activations(teacher_acts)
    layers, index = load_activations(artifact_acts)
    if not torch.equal(teacher_index, index) or len(teacher_layers) != len(layers):
        raise ValueError(f"{artifact_acts} was not captured at the same probe tokens/layers as {teacher_acts}")
    # Equal to linear_cka(t, a) and linear_cka(t, a, debiased=True) within 1e-6, at a fraction of the cost.
    rows = [{"layer": i, "linear_cka": linear, "debiased_cka": debiased}
            for i, (linear, debiased) in enumerate(TeacherCKA(teacher_layers).compare(layers))]
    frame = pd.DataFrame(rows)
    with atomic_path(out_path) as tmp:
        frame.to_parquet(tmp, index=False)
    return frame


def _reference_examples(tokenizer, records: list[dict], max_len: int) -> list[dict]:
    return [chat_example(tokenizer, r["instruction"], r["reference"], max_len) for r in records]


def divergence(teacher_dir, artifact_dir, prompts_path, max_len: int, batch_size: int) -> dict:
    start = time.time()
    teacher = load_artifact(teacher_dir)[0]
    model, tokenizer, _ = load_artifact(artifact_dir)
    examples = _reference_examples(tokenizer, read_json(prompts_path)["divergence"], max_len)
    result = output_divergence(teacher, model, examples, tokenizer.pad_token_id, batch_size)
    return {**result, "split": "divergence", "seconds": time.time() - start}


def evaluate(artifact_dir, prompts_path, narrow_heldout: dict[str, str], task_dir, tasks: list[str], max_len: int,
             narrow_chunks: int, batch_size: int) -> dict:
    """lm-eval benchmarks plus held-out NLL on reference answers (`general`) and on each narrow corpus."""
    from realign.measure.evaluate import run_lm_eval

    start = time.time()
    model, tokenizer, _ = load_artifact(artifact_dir)
    general = _reference_examples(tokenizer, read_json(prompts_path)["heldout"], max_len)
    perplexity = {"general": mean_nll(model, general, tokenizer.pad_token_id, batch_size)}
    for corpus, path in narrow_heldout.items():
        chunks = packed_chunks(tokenizer, [r["text"] for r in read_jsonl(path)], max_len, max_chunks=narrow_chunks)
        perplexity[corpus] = mean_nll(model, chunks, tokenizer.pad_token_id, batch_size)
    benchmarks = run_lm_eval(model, tokenizer, Path(task_dir), tasks, batch_size=batch_size)
    return {"benchmarks": benchmarks, "perplexity": perplexity, "seconds": time.time() - start,
            "splits": {"general": "heldout (reference answers)", **{c: str(p) for c, p in narrow_heldout.items()}}}
