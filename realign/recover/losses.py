"""Small loss functions composed by the recovery methods. Logits are [batch, time, vocab]; labels use -100
for positions without loss. Position t's logits predict token t+1 (causal shift applied here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from realign.data.sequences import IGNORE


def _shifted(logits: torch.Tensor, labels: torch.Tensor):
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    return logits, targets, targets != IGNORE


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits, targets, _ = _shifted(logits, labels)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float = 1.0) -> torch.Tensor:
    """Mean over supervised tokens of KL(p_teacher || p_student) at `temperature`, scaled by T^2 (Hinton)."""
    s, _, mask = _shifted(student_logits, labels)
    t, _, _ = _shifted(teacher_logits, labels)
    s_logp = F.log_softmax(s[mask].float() / temperature, dim=-1)
    t_logp = F.log_softmax(t[mask].float() / temperature, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return kl.mean() * temperature**2
