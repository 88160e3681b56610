"""How far the artifact's next-token distributions are from the teacher's, on held-out text.

Two ways to the same numbers: `output_divergence` runs the teacher and the artifact side by side (the reference,
used by tests), `cached_divergence` reads the teacher's logits from the cache the `teacher_outputs` step made once
per model (realign.measure.teacher_outputs) and runs the artifact alone."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from realign.data.sequences import IGNORE, collate
from realign.device import autocast, keep_logits, model_device, on_device

CHUNK_ROWS = 256  # supervised positions normalised at once: 256 x 49152 float64 = 100 MB a copy


# Per supervised token, each written once in _token_measures: KL(teacher || artifact) (what kd minimises and the
# analysis reads), the reverse KL(artifact || teacher), the Jensen-Shannon divergence (symmetric, bounded by ln 2),
# and top-1 agreement; llama.cpp's KL-divergence tool reports the same family for quantized models.
DIVERGENCES = ("kl", "reverse_kl", "js")


def _token_measures(teacher_logits: torch.Tensor, logits: torch.Tensor, rows: int = CHUNK_ROWS
                    ) -> dict[str, torch.Tensor]:
    """Per-row {"kl", "reverse_kl", "js", "top1"} of [n, vocab] logits (nats; top1 bool), normalised in float64,
    `rows` rows at a time (each row's numbers do not depend on the others; the float64 copies of a whole batch
    would be GBs)."""
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and artifact logits {tuple(logits.shape)} "
                         "differ in shape (another vocabulary?)")
    out: dict[str, list[torch.Tensor]] = {name: [] for name in (*DIVERGENCES, "top1")}
    for start in range(0, len(logits), rows):
        t = F.log_softmax(teacher_logits[start:start + rows].double(), -1)
        s = F.log_softmax(logits[start:start + rows].double(), -1)
        pt, ps = t.exp(), s.exp()
        mid = torch.logaddexp(t, s) - math.log(2.0)  # log of the mixture (p_t + p_s) / 2
        out["kl"].append((pt * (t - s)).sum(-1).cpu())
        out["reverse_kl"].append((ps * (s - t)).sum(-1).cpu())
        out["js"].append((0.5 * (pt * (t - mid)).sum(-1) + 0.5 * (ps * (s - mid)).sum(-1)).cpu())
        out["top1"].append((t.argmax(-1) == s.argmax(-1)).cpu())
    empty = {name: torch.zeros(0, dtype=torch.float64) for name in DIVERGENCES}
    return {**empty, "top1": torch.zeros(0, dtype=torch.bool)} if not out["kl"] else \
        {name: torch.cat(values) for name, values in out.items()}


def _summary(measures: dict[str, torch.Tensor], counts: list[int], ids: list | None = None) -> dict:
    """The token-level means with standard errors (what the analysis reads: kl_teacher_artifact and kl_stderr,
    reverse_kl and reverse_kl_stderr, js and js_stderr, top1_agreement) and one record per prompt (`per_prompt`:
    its index in the split, its id, its supervised tokens, its mean of each divergence and its top-1 rate), so
    artifacts can be paired by prompt."""
    kl, agree = measures["kl"], measures["top1"]
    n = kl.numel()
    per_prompt, start = [], 0
    for i, count in enumerate(counts):
        record = {"prompt": i, "id": ids[i] if ids else None, "n_tokens": count}
        for name in DIVERGENCES:
            record[name] = float(measures[name][start:start + count].mean()) if count else None
        record["top1_agreement"] = float(agree[start:start + count].double().mean()) if count else None
        per_prompt.append(record)
        start += count

    def stderr(values: torch.Tensor) -> float:
        return float(values.std() / math.sqrt(n)) if n > 1 else float("nan")

    return {"kl_teacher_artifact": float(kl.mean()), "kl_stderr": stderr(kl),
            "reverse_kl": float(measures["reverse_kl"].mean()), "reverse_kl_stderr": stderr(measures["reverse_kl"]),
            "js": float(measures["js"].mean()), "js_stderr": stderr(measures["js"]),
            "top1_agreement": float(agree.double().mean()), "n_tokens": n,
            "n_prompts": len(counts), "per_prompt": per_prompt}


def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


@torch.no_grad()
def output_divergence(teacher, model, examples: list[dict], pad_id: int, batch_size: int = 8,
                      ids: list | None = None, precision: str | None = None) -> dict:
    """Per-token KL(teacher || model), the reverse KL, JS and top-1 agreement over the supervised tokens of
    `examples`."""
    parts, counts = [], []
    device = model_device(model)
    if model_device(teacher) != device:
        raise ValueError(f"teacher on {model_device(teacher)}, artifact on {device}: load both on one device")
    for start in range(0, len(examples), batch_size):
        batch = on_device(collate(examples[start:start + batch_size], pad_id), device)
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        mask = batch["labels"][:, 1:] != IGNORE
        with autocast(device, precision):
            teacher_logits, logits = teacher(**kwargs).logits, model(**kwargs).logits
        parts.append(_token_measures(teacher_logits[:, :-1][mask], logits[:, :-1][mask]))
        counts += mask.sum(1).tolist()
    return _summary(_concat(parts), counts, ids)


@torch.no_grad()
def cached_divergence(cache: dict[str, torch.Tensor], model, examples: list[dict], pad_id: int,
                      batch_size: int = 8, ids: list | None = None, precision: str | None = None) -> dict:
    """`output_divergence` with the teacher's logits read from `cache` (load_teacher_outputs, checked against the
    same `examples`): the same numbers, one forward pass instead of two."""
    parts, counts = [], []
    device = model_device(model)
    offsets = cache["offsets"]
    for start in range(0, len(examples), batch_size):
        end = min(start + batch_size, len(examples))
        batch = on_device(collate(examples[start:end], pad_id), device)
        mask = batch["labels"][:, 1:] != IGNORE
        with autocast(device, precision):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = cache["logits"][int(offsets[start]):int(offsets[end])]
        if len(rows) != int(mask.sum()):
            raise ValueError(f"examples {start}..{end - 1} have {int(mask.sum())} supervised tokens, the teacher "
                             f"outputs cache {len(rows)}")
        parts.append(_token_measures(rows.to(device), logits[:, :-1][mask]))
        counts += mask.sum(1).tolist()
    return _summary(_concat(parts), counts, ids)


@torch.no_grad()
def sequence_nlls(model, examples: list[dict], pad_id: int, batch_size: int = 8,
                  precision: str | None = None) -> list[dict]:
    """Per example: the summed negative log-likelihood (nats) of its supervised tokens and their count."""
    out = []
    device = model_device(model)
    for start in range(0, len(examples), batch_size):
        batch = on_device(collate(examples[start:start + batch_size], pad_id), device)
        targets = batch["labels"][:, 1:]
        supervised = targets != IGNORE
        counts = supervised.sum(1)
        positions = supervised.any(0).nonzero()
        if len(positions) == 0:  # nothing to score in this batch
            out += [{"nll_sum": 0.0, "n_tokens": 0} for _ in range(len(targets))]
            continue
        # Only the positions that predict a supervised token get logits and a float64 log-softmax: the LM head runs
        # from the batch's first such position on (`logits_to_keep`); logits at position t predict targets[:, t].
        first = int(positions[0])
        with autocast(device, precision):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           **keep_logits(model, batch["input_ids"].shape[1] - first)).logits
        logits = logits[:, -(targets.shape[1] - first) - 1:-1]  # positions first .. T-2
        rows = supervised[:, first:]
        logp = F.log_softmax(logits[rows].double(), -1).gather(-1, targets[:, first:][rows][:, None])
        picked = torch.zeros(targets.shape, dtype=logp.dtype, device=logp.device)
        picked[:, first:][rows] = logp[:, 0]
        out += [{"nll_sum": float(-total), "n_tokens": int(n)} for total, n in zip(picked.sum(1).cpu(), counts.cpu())]
    return out


def mean_nll(model, examples: list[dict], pad_id: int, batch_size: int = 8) -> dict:
    """Mean negative log-likelihood (nats/token) and perplexity over the supervised tokens."""
    return pooled_nll(sequence_nlls(model, examples, pad_id, batch_size))


def pooled_nll(per_sequence: list[dict]) -> dict:
    """Mean negative log-likelihood (nats/token) and perplexity over all supervised tokens of `sequence_nlls`."""
    total, count = sum(s["nll_sum"] for s in per_sequence), sum(s["n_tokens"] for s in per_sequence)
    if count == 0:
        raise ValueError("no tokens to score")
    return {"nll": total / count, "ppl": math.exp(total / count), "n_tokens": count}
