"""Small loss functions composed by the recovery methods. Logits are [batch, time, vocab]; labels use -100
for positions without loss. Position t's logits predict token t+1 (causal shift applied here).

Distillation losses are split in two steps so that every divergence works on the full vocabulary or on a
cached top-k teacher alike: first both sides become log-probabilities over the same categories
(`supervised_log_probs` for the full vocabulary, `coarsen_top_k` for the teacher's top-k tokens plus one
"everything else" category), then `divergence` compares them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from realign.data.sequences import IGNORE
from realign.measure.kernels import minibatch_linear_cka

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _shifted(logits: torch.Tensor, labels: torch.Tensor):
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    return logits, targets, targets != IGNORE


def supervised_mask(labels: torch.Tensor) -> torch.Tensor:
    """[batch, time] True where the position's logits predict a supervised token (the causal shift applied)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits, targets, _ = _shifted(logits, labels)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE)


def supervised_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[n_supervised, vocab] float32 log-probabilities at `temperature`, in row-major order of the batch."""
    return F.log_softmax(logits[supervised_mask(labels)].float() / temperature, dim=-1)


def _log1mexp(log_mass: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, clamped so that an (almost) empty tail stays finite."""
    return torch.log1p(-log_mass.exp().clamp(max=1 - 1e-6))


def coarsen_top_k(log_probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Collapse [n, vocab] log-probabilities to [n, k + 1]: the k categories `indices` and their complement.

    Coarsening is exact bookkeeping, not an approximation of the categories kept: divergences between
    coarsened distributions are lower bounds of the full ones (data processing) and equal them when the
    tail is distributed alike."""
    top = log_probs.gather(-1, indices)
    return torch.cat([top, _log1mexp(torch.logsumexp(top, -1, keepdim=True))], dim=-1)


def top_k_with_tail(top_log_probs: torch.Tensor) -> torch.Tensor:
    """[n, k] teacher top-k log-probabilities (normalised over the full vocabulary) -> [n, k + 1] with the tail."""
    top_log_probs = top_log_probs.float()
    return torch.cat([top_log_probs, _log1mexp(torch.logsumexp(top_log_probs, -1, keepdim=True))], dim=-1)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) from log-probabilities; 0 * log 0 counts as 0."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def divergence(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor, kind: str = "forward_kl",
               beta: float = 0.5) -> torch.Tensor:
    """Mean over rows of a divergence between teacher T and student S over the same categories.

    forward_kl = KL(T || S) (mass-covering); reverse_kl = KL(S || T) (mode-seeking); jsd = generalized
    Jensen-Shannon of Agarwal et al. (2024, GKD): beta KL(T || M) + (1 - beta) KL(S || M), M = beta T + (1 - beta) S,
    which is 0 at beta in {0, 1}; beta = 0.5 is the symmetric JSD."""
    if kind == "forward_kl":
        per_row = _kl(teacher_log_probs, student_log_probs)
    elif kind == "reverse_kl":
        per_row = _kl(student_log_probs, teacher_log_probs)
    elif kind == "jsd":
        if not 0 < beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        log_beta, log_rest = torch.log(torch.tensor(beta)), torch.log(torch.tensor(1 - beta))
        mixture = torch.logsumexp(torch.stack([teacher_log_probs + log_beta, student_log_probs + log_rest]), 0)
        per_row = beta * _kl(teacher_log_probs, mixture) + (1 - beta) * _kl(student_log_probs, mixture)
    else:
        raise ValueError(f"unknown divergence {kind!r}; allowed: {', '.join(DIVERGENCES)}")
    if per_row.numel() == 0:
        raise ValueError("no supervised tokens in the batch")
    return per_row.mean()


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """Mean over supervised tokens of KL(p_teacher || p_student) at `temperature`, scaled by T^2 (Hinton)."""
    return divergence(supervised_log_probs(teacher_logits, labels, temperature),
                      supervised_log_probs(student_logits, labels, temperature)) * temperature**2


def layer_cka(student_hidden, teacher_hidden, mask: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """Mean minibatch CKA over `layers` (indices into hidden_states) on the tokens selected by `mask`."""
    return torch.stack([minibatch_linear_cka(student_hidden[i][mask], teacher_hidden[i][mask])
                        for i in layers]).mean()


def layer_cosine_distance(student_hidden, teacher_hidden, mask: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """Mean over `layers` and supervised tokens of 1 - cos(student state, teacher state): 0 when every token's
    hidden state points the teacher's way (its scale is free), 2 when opposite."""
    terms = []
    for i in layers:
        s, t = student_hidden[i][mask].float(), teacher_hidden[i][mask].float()
        terms.append((1 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean())
    return torch.stack(terms).mean()


def layer_mse(student_hidden, teacher_hidden, mask: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """Mean squared hidden-state difference over `layers`, each normalised by the teacher's mean square, so
    layers with large activations do not dominate (SquareHead's feature term, Kurtic et al. 2023)."""
    terms = []
    for i in layers:
        s, t = student_hidden[i][mask].float(), teacher_hidden[i][mask].float()
        terms.append((s - t).square().mean() / (t.square().mean() + 1e-12))
    return torch.stack(terms).mean()


def forward(model, batch: dict, hidden: bool):
    """The model on a collated batch, with every hidden state when `hidden`."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden)


def logit_loss(params: dict, student_logits, teacher_out, batch: dict, teacher_top_k=None) -> torch.Tensor:
    """kd's term: the divergence of the student's supervised next-token distributions from the teacher's (its
    cached top-k + tail when `teacher_top_k` is given, else `teacher_out`'s full logits), times T^2."""
    temperature = params.get("temperature", 1.0)
    kind, beta = params.get("divergence", "forward_kl"), params.get("beta", 0.5)
    student_logp = supervised_log_probs(student_logits, batch["labels"], temperature)
    if teacher_top_k is not None:
        values, indices = teacher_top_k.rows(batch)
        loss = divergence(top_k_with_tail(values), coarsen_top_k(student_logp, indices), kind, beta)
    else:
        teacher_logp = supervised_log_probs(teacher_out.logits, batch["labels"], temperature)
        loss = divergence(teacher_logp, student_logp, kind, beta)
    return loss * temperature**2


# The hidden-state terms a recovery adds to its logit loss (its registry entry's `hidden_term`, or `align_loss`),
# each `(student hidden states, teacher hidden states, mask, layers) -> scalar`, minimised: re-aligning (1 - CKA,
# cka-kd and alignment-only), pushing alignment down (+CKA, alignment-blocked), feature distillation (SquareHead's
# normalised MSE, the cosine distance).
HIDDEN_TERMS = {
    "cka": lambda student, teacher, mask, layers: 1 - layer_cka(student, teacher, mask, layers),
    "anti-cka": layer_cka,
    "mse": layer_mse,
    "cosine": layer_cosine_distance,
}
