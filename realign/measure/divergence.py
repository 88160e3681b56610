"""How far the artifact's next-token distributions are from the teacher's, on held-out text."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from realign.data.sequences import IGNORE, collate
from realign.device import autocast, model_device, on_device


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
def sequence_nlls(model, examples: list[dict], pad_id: int, batch_size: int = 8) -> list[dict]:
    """Per example: the summed negative log-likelihood (nats) of its supervised tokens and their count."""
    out = []
    device = model_device(model)
    for start in range(0, len(examples), batch_size):
        batch = on_device(collate(examples[start:start + batch_size], pad_id), device)
        with autocast(device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2).double(), targets, ignore_index=IGNORE, reduction="none")
        counts = (targets != IGNORE).sum(1)
        out += [{"nll_sum": float(total), "n_tokens": int(n)} for total, n in zip(nll.sum(1).cpu(), counts.cpu())]
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
