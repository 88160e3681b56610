"""How far the artifact's next-token distributions are from the teacher's, on held-out text."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from realign.data.sequences import IGNORE, collate
from realign.device import autocast, keep_logits, model_device, on_device


@torch.no_grad()
def output_divergence(teacher, model, examples: list[dict], pad_id: int, batch_size: int = 8) -> dict:
    """Per-token KL(teacher || model) and top-1 agreement over the supervised tokens of `examples`."""
    kls, agree = [], []
    device = model_device(model)
    if model_device(teacher) != device:
        raise ValueError(f"teacher on {model_device(teacher)}, artifact on {device}: load both on one device")
    for start in range(0, len(examples), batch_size):
        batch = on_device(collate(examples[start:start + batch_size], pad_id), device)
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        mask = batch["labels"][:, 1:] != IGNORE
        with autocast(device):
            teacher_logits, logits = teacher(**kwargs).logits, model(**kwargs).logits
        t = F.log_softmax(teacher_logits[:, :-1][mask].double(), -1)
        s = F.log_softmax(logits[:, :-1][mask].double(), -1)
        kls.append((t.exp() * (t - s)).sum(-1).cpu())
        agree.append((t.argmax(-1) == s.argmax(-1)).cpu())
    kl = torch.cat(kls)
    n = kl.numel()
    return {"kl_teacher_artifact": float(kl.mean()),
            "kl_stderr": float(kl.std() / math.sqrt(n)) if n > 1 else float("nan"),
            "top1_agreement": float(torch.cat(agree).double().mean()), "n_tokens": n,
            "n_prompts": len(examples)}


@torch.no_grad()
def mean_nll(model, examples: list[dict], pad_id: int, batch_size: int = 8) -> dict:
    """Mean negative log-likelihood (nats/token) and perplexity over the supervised tokens.

    Only the positions that predict a supervised token get logits and a float64 log-softmax: the LM head runs
    from the batch's first such position on (`logits_to_keep`), and the unsupervised rows are dropped before the
    float64 copy. The per-token log-probabilities are then summed by the same call, over the same batch layout
    (unsupervised positions ignored), as F.cross_entropy over every position would, so the result is the same
    to the last bit as scoring the whole padded batch (tests/test_measure.py)."""
    total, count = 0.0, 0
    device = model_device(model)
    for start in range(0, len(examples), batch_size):
        batch = on_device(collate(examples[start:start + batch_size], pad_id), device)
        targets = batch["labels"][:, 1:]
        supervised = targets != IGNORE
        positions = supervised.any(0).nonzero()
        if len(positions) == 0:
            continue  # nothing to score in this batch: it would add 0 to the sum
        first = int(positions[0])  # logits at position t predict targets[:, t]; none is needed before `first`
        with autocast(device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           **keep_logits(model, batch["input_ids"].shape[1] - first)).logits
        logits = logits[:, -(targets.shape[1] - first) - 1:-1]  # positions first .. T-2
        rows = supervised[:, first:]
        logp = F.log_softmax(logits[rows].double(), -1).gather(-1, targets[:, first:][rows][:, None])
        picked = torch.zeros(targets.shape, dtype=logp.dtype, device=logp.device)
        picked[:, first:][rows] = logp[:, 0]
        nll = F.nll_loss(picked.reshape(-1, 1), torch.where(supervised, 0, IGNORE).reshape(-1), ignore_index=IGNORE,
                         reduction="sum")
        total += float(nll)
        count += int(supervised.sum())
    if count == 0:
        raise ValueError("no tokens to score")
    return {"nll": total / count, "ppl": math.exp(total / count), "n_tokens": count}
