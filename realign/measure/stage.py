"""Measurement steps of the DAG: activations, CKA vs the teacher, output divergence, and evaluation."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import torch

from realign.data.sequences import chat_example, chat_prompt_content, packed_chunks
from realign.data.stage import read_prompts
from realign.device import measure_precision, model_device
from realign.io import read_jsonl, write_json, write_parquet
from realign.measure.activations import (capture, content_positions, load_activations, sample_positions,
                                         save_activations)
from realign.measure.kernels import linear_cka
from realign.measure.divergence import cached_divergence, pooled_nll, sequence_nlls
from realign.measure.similarity import (JACKKNIFE_MEASURES, MEASURE_NAMES, compare_layers, jackknife_interval,
                                        jackknife_other_means, percentile_ci)

NULL_SEED_OFFSET = 7919  # the random-init null model's seed is the study seed + this


log = logging.getLogger(__name__)


def load_artifact(artifact_dir, device: str | None = None):
    """realign.models.artifact.load_artifact, imported on first use: the CKA and null-floor jobs load no model,
    and importing transformers would cost them ~2 s of their ~7 s."""
    from realign.models.artifact import load_artifact as load

    return load(artifact_dir, device=device)


def probe_sequences(tokenizer, records: list[dict], max_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Probe texts: instruction (chat format) followed by its reference answer, truncated to `max_tokens`; and per
    sequence a bool mask of the tokens that carry its own content (instruction or answer text, not the template)."""
    sequences, masks = [], []
    for r in records:
        prompt, content = chat_prompt_content(tokenizer, r["instruction"])
        answer = tokenizer(r["reference"], add_special_tokens=False)["input_ids"]
        sequences.append(torch.tensor((prompt + answer)[:max_tokens]))
        masks.append(torch.tensor((content + [True] * len(answer))[:max_tokens], dtype=torch.bool))
    return sequences, masks


def _probe(tokenizer, prompts_path, max_tokens: int, per_sequence: int, seed: int):
    """The probe sequences and the (sequence, position) pairs sampled from their content positions."""
    sequences, masks = probe_sequences(tokenizer, read_prompts(prompts_path)["probe"], max_tokens)
    try:
        candidates = content_positions(sequences, masks)
    except ValueError as err:
        raise ValueError(f"{err} (measure.probe_max_tokens = {max_tokens}; probe split of {prompts_path})") from None
    short = [len(c) for c in candidates if len(c) < per_sequence]
    if short:  # capped, as the schema says: a sequence gives every content position it has
        log.info("measure.positions_per_sequence = %d: %d of %d probe sequences have fewer content positions "
                 "(%d to %d), and give all of them", per_sequence, len(short), len(candidates), min(short), max(short))
    return sequences, sample_positions(candidates, per_sequence, seed)


def activations(artifact_dir, prompts_path, out_path, max_tokens: int, per_sequence: int, seed: int,
                dtype: str = "float32") -> dict:
    """`dtype`: measure.dtype (realign.device.measure_precision), resolved here and recorded in the file."""
    start = time.time()
    model, tokenizer, _ = load_artifact(artifact_dir)
    precision = measure_precision(dtype, model_device(model))
    sequences, pairs = _probe(tokenizer, prompts_path, max_tokens, per_sequence, seed)
    acts = capture(model, sequences, pairs, precision=precision)
    save_activations(acts, out_path, {"artifact": str(artifact_dir), "seed": str(seed), "precision": precision,
                                      "probe_split": "probe", "n_sequences": str(len(sequences))})
    return {"n_tokens": int(acts["token_index"].shape[0]), "precision": precision, "seconds": time.time() - start}


def null_activations(teacher_dir, prompts_path, out_path, max_tokens: int, per_sequence: int, seed: int) -> dict:
    """Activations of a randomly initialised model of the teacher's architecture on the same probe tokens."""
    from transformers import AutoModelForCausalLM

    start = time.time()
    teacher, tokenizer, _ = load_artifact(teacher_dir, device="cpu")
    # A seed of its own: a teacher that is itself a seeded random model (tests build one) must not be recreated.
    torch.manual_seed(seed + NULL_SEED_OFFSET)
    model = AutoModelForCausalLM.from_config(teacher.config, dtype=torch.float32)
    teacher_weights, weights = teacher.state_dict(), model.state_dict()
    if all(torch.equal(teacher_weights[k], w) for k, w in weights.items() if k in teacher_weights):
        raise ValueError(f"the random initialisation equals the teacher {teacher_dir}: it is no null model")
    del teacher
    sequences, pairs = _probe(tokenizer, prompts_path, max_tokens, per_sequence, seed)
    acts = capture(model, sequences, pairs)
    save_activations(acts, out_path, {"artifact": f"random init of {teacher_dir}", "seed": str(seed),
                                      "probe_split": "probe", "n_sequences": str(len(sequences))})
    return {"n_tokens": int(acts["token_index"].shape[0]), "seconds": time.time() - start}


def _matched(teacher_acts, artifact_acts):
    teacher_layers, teacher_index = load_activations(teacher_acts)
    layers, index = load_activations(artifact_acts)
    if not torch.equal(teacher_index, index) or len(teacher_layers) != len(layers):
        raise ValueError(f"{artifact_acts} was not captured at the same probe tokens/layers as {teacher_acts}")
    return teacher_layers, layers, teacher_index[:, 0]


def alignment_range(alignment_layers, n_hidden: int) -> tuple[int, int]:
    """The hidden states (first, last, inclusive) that the alignment summary averages, of a model with `n_hidden`
    = L + 1 of them (0 = embeddings, 1..L-1 = the outputs of blocks 1..L-1, L = the final post-norm state).
    `alignment_layers` (measure.alignment_layers): "inner" = 1..L-1, every block but the last, whose output is the
    final state that must re-align whenever the logits do; or an explicit [first, last] within 1..L."""
    final = n_hidden - 1
    if alignment_layers == "inner":
        if final < 2:
            raise ValueError(f"measure.alignment_layers = 'inner' (hidden states 1..L-1) is empty for a model of "
                             f"{final} transformer block(s): set an explicit [first, last]")
        return 1, final - 1
    first, last = (int(v) for v in alignment_layers)
    if not 1 <= first <= last <= final:
        raise ValueError(f"measure.alignment_layers = [{first}, {last}] is not a range within 1..{final}: the model "
                         f"has {final} transformer blocks (hidden states 0 = embeddings, {final} = final post-norm)")
    return first, last


def similarity_to_teacher(teacher_acts, artifact_acts, out_path, summary_path, *, n_boot: int = 1000,
                          jackknife_groups: int = 8, seed: int = 0, knn_k: int = 10,
                          alignment_layers="inner") -> pd.DataFrame:
    """Per-layer similarity of an artifact to the teacher (parquet, with an `in_alignment_range` flag per layer)
    and a JSON summary: over the pre-registered range of hidden states (`alignment_layers`, see alignment_range),
    the layer means and minima of every measure, the debiased CKA layer mean's bootstrap replicates (paired across
    artifacts: same seed, same probe sequences) and CI, the other measures' layer means' delete-a-group jackknife
    intervals over probe sequences (`jackknife_groups`, 0: none; realign.measure.similarity); apart from it every
    measure at the embeddings (layer 0) and at the final post-norm state (layer L); and the teacher-layer x
    artifact-layer CKA matrices."""
    teacher_layers, layers, sequence_of_token = _matched(teacher_acts, artifact_acts)
    first, last = alignment_range(alignment_layers, len(layers))
    result = compare_layers(teacher_layers, layers, sequence_of_token, n_boot=n_boot, seed=seed, knn_k=knn_k)
    frame = pd.DataFrame(result["layers"])
    frame["in_alignment_range"] = frame["layer"].between(first, last)
    body = frame[frame["in_alignment_range"]]
    mean_replicates = result["replicates"][:, first:last + 1].mean(1)
    low, high = percentile_ci(mean_replicates)
    final = len(layers) - 1
    jackknife = {}
    groups = min(jackknife_groups, result["n_sequences"])  # a probe split of fewer sequences: one per group
    if groups >= 2:
        replicates = jackknife_other_means(teacher_layers, layers, sequence_of_token, range(first, last + 1),
                                           groups=groups, seed=seed, knn_k=knn_k)
        for m in JACKKNIFE_MEASURES:
            stderr, jk_low, jk_high = jackknife_interval(float(body[m].mean()), replicates[m])
            jackknife[m] = {"stderr": stderr, "ci": [jk_low, jk_high], "replicates": replicates[m].tolist()}
    summary = {
        "alignment_layers": [first, last],
        "final_layer": final,
        "layer_means": {m: float(body[m].mean()) for m in MEASURE_NAMES},
        "layer_mins": {m: float(body[m].min()) for m in MEASURE_NAMES},
        "debiased_cka_mean_ci": [low, high],
        "debiased_cka_mean_replicates": mean_replicates.tolist(),
        "jackknife_groups": groups if jackknife else 0,
        "other_means_jackknife": jackknife,
        "embedding": {m: float(frame.loc[frame["layer"] == 0, m].iloc[0]) for m in MEASURE_NAMES},
        "final": {m: float(frame.loc[frame["layer"] == final, m].iloc[0]) for m in MEASURE_NAMES},
        "matrix": {k: v.tolist() if torch.is_tensor(v) else v for k, v in result["matrix"].items()},
        **{k: result[k] for k in ("n_tokens", "n_sequences", "n_boot", "seed", "knn_k")},
        "teacher": str(teacher_acts), "artifact": str(artifact_acts),
    }
    write_parquet(frame, out_path)
    write_json(summary_path, summary, digest=True)
    return frame


def null_floors(teacher_acts, random_acts, out_path, *, seed: int = 0, knn_k: int = 10,
                sample_sizes=(16, 32, 64, 128, 256), repeats: int = 5) -> pd.DataFrame:
    """What the measures say when there is nothing to find, per layer, in a long table (null, n_samples, layer,
    measures...):

    * `random-init`: the teacher vs a randomly initialised model of the same architecture on the same tokens;
    * `token-shuffled`: the teacher vs its own activations with the tokens permuted (right representation,
      wrong pairing);
    * the same two at small token counts (`n_samples` < all; linear and debiased CKA only, mean of `repeats`
      random token subsets), which shows the biased estimator's inflation when n is small against the width."""
    teacher_layers, random_layers, sequence_of_token = _matched(teacher_acts, random_acts)
    n = len(sequence_of_token)
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(n, generator=generator)
    nulls = {"random-init": random_layers, "token-shuffled": [t[permutation] for t in teacher_layers]}
    frames = []
    for name, layers in nulls.items():
        result = compare_layers(teacher_layers, layers, sequence_of_token, n_boot=0, seed=seed, knn_k=knn_k,
                                matrix=False)
        frame = pd.DataFrame(result["layers"]).drop(columns=["debiased_cka_ci_low", "debiased_cka_ci_high"])
        frames.append(frame.assign(null=name, n_samples=n))
        for size in sample_sizes:
            if size >= n:
                continue
            rows = []
            for i, (t, a) in enumerate(zip(teacher_layers, layers)):
                picks = [torch.randperm(n, generator=generator)[:size] for _ in range(repeats)]
                rows.append({"layer": i,
                             "linear_cka": sum(linear_cka(t[p], a[p]) for p in picks) / repeats,
                             "debiased_cka": sum(linear_cka(t[p], a[p], debiased=True) for p in picks) / repeats})
            frames.append(pd.DataFrame(rows).assign(null=name, n_samples=size))
    out = pd.concat(frames, ignore_index=True)
    out = out[["null", "n_samples", "layer", *[m for m in MEASURE_NAMES if m in out]]]
    write_parquet(out, out_path)
    return out


def _reference_examples(tokenizer, records: list[dict], max_len: int) -> list[dict]:
    return [chat_example(tokenizer, r["instruction"], r["reference"], max_len) for r in records]


def teacher_outputs(teacher_dir, prompts_path, out_path, max_len: int, batch_size: int,
                    dtype: str = "float32") -> dict:
    """The teacher's logits at the supervised positions of the divergence examples, cached once per model for the
    divergence job of every artifact (realign.measure.teacher_outputs)."""
    from realign.measure.teacher_outputs import compute_teacher_outputs, save_teacher_outputs

    start = time.time()
    teacher, tokenizer, _ = load_artifact(teacher_dir)
    precision = measure_precision(dtype, model_device(teacher))
    examples = _reference_examples(tokenizer, read_prompts(prompts_path)["divergence"], max_len)
    outputs = compute_teacher_outputs(teacher, examples, tokenizer.pad_token_id, batch_size, precision)
    save_teacher_outputs(outputs, out_path, examples, teacher=str(teacher_dir), precision=precision)
    return {"n_tokens": int(outputs["logits"].shape[0]), "vocab": int(outputs["logits"].shape[1]),
            "n_prompts": len(examples), "seconds": time.time() - start}


def divergence(teacher_outputs_path, artifact_dir, prompts_path, max_len: int, batch_size: int,
               dtype: str = "float32") -> dict:
    """KL(teacher || artifact) and top-1 agreement on the divergence prompts, the teacher's side read from the
    cache of the `teacher_outputs` step (checked to be made on these very examples)."""
    from realign.measure.teacher_outputs import load_teacher_outputs

    start = time.time()
    model, tokenizer, _ = load_artifact(artifact_dir)
    precision = measure_precision(dtype, model_device(model))
    records = read_prompts(prompts_path)["divergence"]
    examples = _reference_examples(tokenizer, records, max_len)
    cache = load_teacher_outputs(teacher_outputs_path, examples, precision)
    result = cached_divergence(cache, model, examples, tokenizer.pad_token_id, batch_size,
                               ids=[r.get("id") for r in records], precision=precision)
    return {**result, "split": "divergence", "teacher_outputs": str(teacher_outputs_path), "precision": precision,
            "seconds": time.time() - start}


def heldout_chunks(tokenizer, corpus: str, path, max_len: int, n_chunks: int) -> list:
    """The first `n_chunks` packed chunks of `max_len` tokens of a narrow corpus's held-out file; fewer when it has
    fewer (capped, as the schema says, and logged)."""
    texts = [r["text"] for r in read_jsonl(path, verify=True, producer="the `narrow_corpus` rule")]
    chunks = packed_chunks(tokenizer, texts, max_len, max_chunks=n_chunks)
    if len(chunks) < n_chunks:
        log.info("data.code_heldout_chunks = %d: the held-out %s corpus gives %d chunks of %d tokens; all are scored",
                 n_chunks, corpus, len(chunks), max_len)
    return chunks


def evaluate(artifact_dir, prompts_path, narrow_heldout: dict[str, str], task_dir, tasks: list[str], max_len: int,
             narrow_chunks: int, batch_size: int, dtype: str = "float32") -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """lm-eval benchmarks plus held-out NLL on reference answers (`general`) and on each narrow corpus.

    Returns (summary, items, sequences): the summary JSON; one row per benchmark item
    (realign.measure.evaluate.item_record); one row per held-out sequence (corpus, sequence, nll_sum, n_tokens),
    from which the summary's NLLs are the token-weighted means."""
    from realign.measure.evaluate import run_lm_eval

    start = time.time()
    model, tokenizer, _ = load_artifact(artifact_dir)
    precision = measure_precision(dtype, model_device(model))
    corpora = {"general": _reference_examples(tokenizer, read_prompts(prompts_path)["heldout"], max_len)}
    for corpus, path in narrow_heldout.items():
        corpora[corpus] = heldout_chunks(tokenizer, corpus, path, max_len, narrow_chunks)
    sequences, perplexity = [], {}
    for corpus, examples in corpora.items():
        scored = sequence_nlls(model, examples, tokenizer.pad_token_id, batch_size, precision)
        perplexity[corpus] = pooled_nll(scored)
        sequences += [{"corpus": corpus, "sequence": i, **s} for i, s in enumerate(scored)]
    benchmarks, items = run_lm_eval(model, tokenizer, Path(task_dir), tasks, batch_size=batch_size,
                                    precision=precision)
    summary = {"benchmarks": benchmarks, "perplexity": perplexity, "precision": precision,
               "seconds": time.time() - start,
               "splits": {"general": "heldout (reference answers)", **{c: str(p) for c, p in narrow_heldout.items()}}}
    return summary, pd.DataFrame(items), pd.DataFrame(sequences)
