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


def _token_measures(teacher_logits: torch.Tensor, logits: torch.Tensor, rows: int = CHUNK_ROWS
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL(teacher || model) and top-1 agreement of [n, vocab] logits, normalised in float64, `rows` rows at
    a time (each row's numbers do not depend on the others; the float64 copies of a whole batch would be GBs)."""
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and artifact logits {tuple(logits.shape)} "
                         "differ in shape (another vocabulary?)")
    kls, agree = [], []
    for start in range(0, len(logits), rows):
        t = F.log_softmax(teacher_logits[start:start + rows].double(), -1)
        s = F.log_softmax(logits[start:start + rows].double(), -1)
        kls.append((t.exp() * (t - s)).sum(-1).cpu())
        agree.append((t.argmax(-1) == s.argmax(-1)).cpu())
    if not kls:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    return torch.cat(kls), torch.cat(agree)


def _summary(kl: torch.Tensor, agree: torch.Tensor, counts: list[int], ids: list | None = None) -> dict:
    """The token-level means (what the analysis reads) and one record per prompt (`per_prompt`: its index in the
    split, its id, its supervised tokens, its mean KL and top-1 rate), so artifacts can be paired by prompt."""
    n = kl.numel()
    per_prompt, start = [], 0
    for i, count in enumerate(counts):
        k, a = kl[start:start + count], agree[start:start + count]
        per_prompt.append({"prompt": i, "id": ids[i] if ids else None, "n_tokens": count,
                           "kl": float(k.mean()) if count else None,
                           "top1_agreement": float(a.double().mean()) if count else None})
        start += count
    return {"kl_teacher_artifact": float(kl.mean()),
            "kl_stderr": float(kl.std() / math.sqrt(n)) if n > 1 else float("nan"),
            "top1_agreement": float(agree.double().mean()), "n_tokens": n,
            "n_prompts": len(counts), "per_prompt": per_prompt}


@torch.no_grad()
def output_divergence(teacher, model, examples: list[dict], pad_id: int, batch_size: int = 8,
                      ids: list | None = None) -> dict:
    """Per-token KL(teacher || model) and top-1 agreement over the supervised tokens of `examples`."""
    kls, agree, counts = [], [], []
    device = model_device(model)
    if model_device(teacher) != device:
        raise ValueError(f"teacher on {model_device(teacher)}, artifact on {device}: load both on one device")
    for start in range(0, len(examples), batch_size):
        batch = on_device(collate(examples[start:start + batch_size], pad_id), device)
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        mask = batch["labels"][:, 1:] != IGNORE
        with autocast(device):
            teacher_logits, logits = teacher(**kwargs).logits, model(**kwargs).logits
        kl, same = _token_measures(teacher_logits[:, :-1][mask], logits[:, :-1][mask])
        kls.append(kl)
        agree.append(same)
        counts += mask.sum(1).tolist()
    return _summary(torch.cat(kls), torch.cat(agree), counts, ids)


@torch.no_grad()
def cached_divergence(cache: dict[str, torch.Tensor], model, examples: list[dict], pad_id: int,
                      batch_size: int = 8, ids: list | None = None) -> dict:
    """`output_divergence` with the teacher's logits read from `cache` (load_teacher_outputs, checked against the
    same `examples`): the same numbers, one forward pass instead of two."""
    kls, agree, counts = [], [], []
    device = model_device(model)
    offsets = cache["offsets"]
    for start in range(0, len(examples), batch_size):
        end = min(start + batch_size, len(examples))
        batch = on_device(collate(examples[start:end], pad_id), device)
        mask = batch["labels"][:, 1:] != IGNORE
        with autocast(device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = cache["logits"][int(offsets[start]):int(offsets[end])]
        if len(rows) != int(mask.sum()):
            raise ValueError(f"examples {start}..{end - 1} have {int(mask.sum())} supervised tokens, the teacher "
                             f"outputs cache {len(rows)}")
        kl, same = _token_measures(rows.to(device), logits[:, :-1][mask])
        kls.append(kl)
        agree.append(same)
        counts += mask.sum(1).tolist()
    return _summary(torch.cat(kls), torch.cat(agree), counts, ids)


@torch.no_grad()
def sequence_nlls(model, examples: list[dict], pad_id: int, batch_size: int = 8) -> list[dict]:
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
        with autocast(device):
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
