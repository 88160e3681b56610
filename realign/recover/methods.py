"""Recovery methods. Each trains the damaged student under its damage's constraint.

- `kd`:   token-level KL(teacher || student) on the teacher's own answers (logit self-distillation);
- `sdft`: SFT on the teacher's own answers (sequence-level self-distillation);
- `sft`:  SFT on external reference answers, no teacher (control).
"""

from __future__ import annotations

import torch

from realign.data.sequences import chat_example
from realign.degrade import constraints
from realign.recover.losses import cross_entropy, forward_kl
from realign.training import TrainConfig, train

METHODS = ("kd", "sdft", "sft")


def build_examples(tokenizer, records: list[dict], answer_key: str, max_len: int) -> list[dict]:
    # An empty teacher answer is kept: it teaches "stop here" (the EOS token), which is the teacher's choice.
    usable = [r for r in records if isinstance(r.get(answer_key), str)]
    if not usable:
        raise ValueError(f"no distillation record has a {answer_key!r} text")
    return [chat_example(tokenizer, r["instruction"], r[answer_key], max_len) for r in usable]


def recover(student, teacher, tokenizer, method: str, records: list[dict], cfg: TrainConfig, max_len: int,
            constraint: dict, constraint_tensors: dict, temperature: float = 1.0):
    """Train `student` under its constraint; returns (trained model, training curve, constraint check).

    The trained model is `student` itself, or a PeftModel wrapping it when the constraint is a frozen base."""
    if method not in METHODS:
        raise ValueError(f"unknown recovery method {method!r}; allowed: {', '.join(METHODS)}")
    answer_key = "reference" if method == "sft" else "teacher_answer"
    examples = build_examples(tokenizer, records, answer_key, max_len)

    if method == "kd":
        if teacher is None:
            raise ValueError("kd needs the teacher model")
        teacher.eval()

        def loss_fn(model, batch):
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return forward_kl(logits, teacher_logits, batch["labels"], temperature)
    else:
        def loss_fn(model, batch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return cross_entropy(logits, batch["labels"])

    student = constraints.attach(student, constraint, constraint_tensors, seed=cfg.seed)
    try:
        curve = train(student, examples, loss_fn, cfg, pad_id=tokenizer.pad_token_id)
    finally:
        constraints.detach(student)
    return student, curve, constraints.check(student, constraint, constraint_tensors)
