"""Score an in-memory model on the exported offline benchmark tasks with lm-evaluation-harness 0.4.13."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np

# Must be set before `datasets` / `lm_eval` are imported anywhere, or datasets tries the hub (telemetry).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from realign.data.benchmarks import scored_pairs, task_kind, verify_benchmarks  # noqa: E402  (after the switches)
from realign.device import autocast, model_device, training_precision  # noqa: E402
from realign.io import read_jsonl  # noqa: E402

SEED = 1234


def _num(x) -> float | None:
    if x is None:
        return None
    if isinstance(x, str):  # lm-eval reports "N/A" for stderrs it cannot compute
        try:
            return float(x)
        except ValueError:
            return math.nan
    return float(x)


def check_continuations_fit(lm, task_dir: Path, tasks: list[str]) -> None:
    """lm-eval left-truncates a long context but asserts that every scored continuation fits the model's
    context (lm.max_length), with a bare AssertionError in the middle of scoring. Check every item first, with
    lm-eval's own encoding of the pair, and name the task, the item and both lengths."""

    for task in tasks:
        for doc in read_jsonl(Path(task_dir) / f"{task}.jsonl"):
            for context, continuation in scored_pairs(task, doc):
                n = len(lm._encode_pair(context, continuation)[1])
                if n > lm.max_length:
                    raise ValueError(f"measure.benchmarks.{task}: item {doc['id']} has a continuation of {n} tokens, "
                                     f"longer than the model's context of {lm.max_length} tokens, so lm-eval cannot "
                                     "score it; evaluate a model with a longer context or leave the task out")


@functools.cache
def scored_rows_class():
    """lm-eval's HFLM, except that a log-likelihood pass runs the LM head, and lm-eval's log-softmax, on the last
    positions of the batch that hold a scored continuation token, not on every position: a multiple-choice item's
    context is most of its tokens, and the head (vocabulary x hidden) is most of a small model's FLOPs per token.

    lm-eval reads the continuation's logits at `inplen + (logits.shape[0] - padding_len)` back from the end
    (HFLM._loglikelihood_tokens), so logits for only the last `keep` positions are read at the same tokens, as
    long as `keep` covers every row's continuation and its right padding; each batch row is matched to its
    request by its tokens. A row that matches no request (it cannot happen with lm-eval 0.4.13) gets the full
    logits. The kept logits are the same numbers up to the last bits of a GEMM with fewer rows
    (tests/test_evaluate.py)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from realign.device import keep_logits

    class ScoredRowsLM(HFLM):
        _tails: dict | None = None  # the input tokens of each pending request -> its longest continuation

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            self._tails = {}
            for _, context, continuation in requests:
                inp = tuple((context + continuation)[-(self.max_length + 1):][:-1])
                self._tails[inp] = max(self._tails.get(inp, 0), len(continuation))
            try:
                return super()._loglikelihood_tokens(requests, *args, **kwargs)
            finally:
                self._tails = None

        def _needed(self, row: list[int]) -> int | None:
            """The positions from the end that row's continuation needs, or None if it matches no request."""
            length = len(row)
            while length and row[length - 1] == 0:  # lm-eval pads with 0, which may also end a real input
                length -= 1
            for end in range(length, len(row) + 1):
                if tuple(row[:end]) in self._tails:
                    return len(row) - end + self._tails[tuple(row[:end])]
            return None

        def _model_call(self, inps, attn_mask=None, labels=None):
            if self._tails is None or attn_mask is not None or labels is not None:
                return super()._model_call(inps, attn_mask, labels)
            needed = [self._needed(row) for row in inps.tolist()]
            if None in needed or not keep_logits(self.model, 1):
                return super()._model_call(inps)
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                 enabled=self.mixed_precision_dtype is not None):
                return self.model(inps, **keep_logits(self.model, max(needed))).logits

    return ScoredRowsLM


def scored_rows_lm(model, tokenizer, batch_size: int, precision: str = "float32"):
    """`model` wrapped for lm-eval as scored_rows_class() (the LM head on the scored rows only). HFLM's forward
    sets its own autocast, which overrides the caller's, so the `precision` is handed to it."""
    import torch

    dtype = torch.bfloat16 if precision == "bfloat16" else None
    return scored_rows_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                               mixed_precision_dtype=dtype)


def run_lm_eval(model, tokenizer, task_dir: Path, tasks: list[str], batch_size: int = 8,
                precision: str | None = None) -> tuple[dict, list[dict]]:
    """Evaluate `model` (an already-loaded transformers causal LM) on tasks `realign_{task}` from `task_dir`.

    Returns (summary, items). summary: {task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "perplexity",
    "n"}}; keys a task does not have (acc_norm for lambada/winogrande, perplexity for multiple-choice tasks) are
    None, and stderrs lm-eval cannot compute are NaN. items: one record per scored item (:func:`item_record`),
    built from lm-eval's logged samples.
    """
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise FileNotFoundError(f"benchmark task directory {task_dir} does not exist")
    missing = [t for t in tasks if not (task_dir / f"realign_{t}.yaml").exists()]
    if missing:
        raise FileNotFoundError(f"no exported task YAML for {missing} in {task_dir}")

    verify_benchmarks(task_dir, tasks)  # the items scored are those exported, gold labels included

    was_training = model.training
    model.eval()
    try:
        lm = scored_rows_lm(model, tokenizer, batch_size, precision or training_precision(model_device(model)))
        check_continuations_fit(lm, task_dir, tasks)
        with autocast(model_device(model), precision):  # realign.device.autocast: measure.dtype, resolved
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=[f"realign_{t}" for t in tasks],
                # include_defaults=False: indexing the ~10k built-in task YAMLs costs ~8 s per call on this CPU
                task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                num_fewshot=0,
                log_samples=True,  # per-item log-likelihoods: the paired, continuous measure
                random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED, fewshot_random_seed=SEED,
                bootstrap_iters=1000,
            )
    finally:
        model.train(was_training)


    items = []
    for t in tasks:
        for sample in sorted(results["samples"][f"realign_{t}"], key=lambda s: s["doc_id"]):
            doc = sample["doc"]
            n_tokens = (len(lm._encode_pair(doc["context"], doc["continuation"])[1])
                        if task_kind(t) == "ll" else None)
            items.append(item_record(t, sample, n_tokens))
    out: dict = {}
    for t in tasks:
        r = results["results"][f"realign_{t}"]
        n = results.get("n-samples", {}).get(f"realign_{t}", {})
        n = int(n.get("effective", n.get("original", 0)))

        def get(metric: str):
            return _num(r.get(f"{metric},none"))

        out[t] = {
            "acc": get("acc"),
            "acc_stderr": get("acc_stderr"),
            "acc_norm": get("acc_norm"),
            "acc_norm_stderr": get("acc_norm_stderr") if "acc_norm,none" in r else None,
            "perplexity": get("perplexity"),
            "n": n,
        }
        if out[t]["acc_stderr"] is None:
            out[t]["acc_stderr"] = math.nan
    return out, items


def item_record(task: str, sample: dict, n_target_tokens: int | None = None) -> dict:
    """One benchmark item of lm-eval's logged `sample`, as realign records it.

    Multiple choice: `lls` are the choices' log-likelihoods; `lls_norm` divide each by its choice's length in
    characters, as lm-eval's acc_norm does (winogrande scores one shared continuation after each choice, so its
    log-likelihoods are compared as they are); `gold_logprob` is the gold choice's log-probability normalised over
    the choices, log_softmax(lls_norm)[gold]: a graded score in (-inf, 0], higher = better, log(1/n_choices) at
    indifference. LAMBADA: `gold_logprob` is the target's log-probability per token, `acc` the greedy match.
    `accuracy` is acc_norm where the task has it, else acc. acc and acc_norm are recomputed from the
    log-likelihoods and must equal lm-eval's (a check that the record reads the sample as lm-eval scored it)."""

    doc, kind = sample["doc"], task_kind(task)
    lls = np.array([float(resp[0]) for resp in sample["filtered_resps"]])
    greedy = [bool(resp[1]) for resp in sample["filtered_resps"]]
    record = {"task": task, "item_id": str(doc["id"]), "n_choices": len(lls)}
    if kind == "ll":
        if not n_target_tokens:
            raise ValueError(f"{task} item {doc['id']}: the target's token count is needed for a per-token score")
        record.update(gold=0, lls=lls.tolist(), lls_norm=(lls / n_target_tokens).tolist(),
                      acc=float(greedy[0]), acc_norm=math.nan, gold_logprob=float(lls[0] / n_target_tokens),
                      n_target_tokens=int(n_target_tokens))
    else:
        gold = int(doc["gold"])
        lengths = (np.ones(len(lls)) if kind == "multi_input"
                   else np.array([float(len(choice)) for choice in doc["choices"]]))
        norm = lls / lengths
        log_probs = norm - np.logaddexp.reduce(norm)
        record.update(gold=gold, lls=lls.tolist(), lls_norm=norm.tolist(), acc=float(np.argmax(lls) == gold),
                      acc_norm=float(np.argmax(norm) == gold) if kind == "mc" else math.nan,
                      gold_logprob=float(log_probs[gold]), n_target_tokens=None)
    record["accuracy"] = record["acc"] if math.isnan(record["acc_norm"]) else record["acc_norm"]
    for metric in ("acc", "acc_norm"):
        if metric in sample and float(sample[metric]) != record[metric]:
            raise RuntimeError(f"{task} item {doc['id']}: {metric} recomputed from the log-likelihoods is "
                               f"{record[metric]}, lm-eval scored {sample[metric]}: the record misreads the sample")
    return record
