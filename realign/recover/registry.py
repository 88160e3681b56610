"""Every recovery method and control, one entry each: its name (the config's `recoveries.<name>.method`), the options
it reads beyond the shared ones (any other key is a config error naming it), whether it trains on the teacher's
logits (its cached top-k, or a live teacher) and on its hidden states (a live teacher), and which text of a
distillation record it trains on. realign.config (option checks), realign.recover.methods (losses, data) and the
workflow's input functions read this list, and so does the config schema's `method` enum (realign.config.load_schema
fills it in). Adding a method is one entry here plus its loss in realign.recover.methods (and its options in the
schema, if it has new ones).
"""

from __future__ import annotations

from dataclasses import dataclass

LOGIT_OPTIONS = ("temperature", "divergence", "beta", "top_k")
ALIGN_OPTIONS = ("layers", "align_weight")
# alignment-held (realign.recover.held): the dose (allowed CKA rise = hold_fraction x hold_reference), the damaged
# model's CKA it is counted from, the augmented Lagrangian's rho; its layers are measure.alignment_layers.
HELD_OPTIONS = ("hold_fraction", "hold_reference", "hold_baseline", "hold_rho", "hold_calibration_batches")


@dataclass(frozen=True)
class RecoveryMethod:
    name: str
    options: tuple[str, ...]
    teacher_logits: bool = False
    teacher_hidden: bool = False
    targets: str = "teacher_answer"  # teacher_answer | reference | rewrite (sdft: its `targets` option decides)
    control: bool = False  # separates cause from correlation rather than recovering


METHODS: dict[str, RecoveryMethod] = {m.name: m for m in (
    RecoveryMethod("kd", LOGIT_OPTIONS, teacher_logits=True),
    RecoveryMethod("sdft", ("targets",), targets="rewrite"),
    RecoveryMethod("onpolicy", ("max_new_tokens", "sample_temperature")),
    RecoveryMethod("cka-kd", LOGIT_OPTIONS + ALIGN_OPTIONS, teacher_logits=True, teacher_hidden=True),
    RecoveryMethod("alignment-blocked", LOGIT_OPTIONS + ALIGN_OPTIONS, teacher_logits=True, teacher_hidden=True,
                   control=True),
    RecoveryMethod("alignment-held", LOGIT_OPTIONS + HELD_OPTIONS, teacher_logits=True, teacher_hidden=True,
                   control=True),
    RecoveryMethod("alignment-only", ALIGN_OPTIONS + ("align_loss",), teacher_hidden=True, control=True),
    RecoveryMethod("sft", (), targets="reference", control=True),
    RecoveryMethod("squarehead", LOGIT_OPTIONS + ALIGN_OPTIONS, teacher_logits=True, teacher_hidden=True),
    RecoveryMethod("hidden-cosine", LOGIT_OPTIONS + ALIGN_OPTIONS + ("with_kl",), teacher_logits=True,
                   teacher_hidden=True),
)}
RECOVERY_OPTIONS = {name: m.options for name, m in METHODS.items()}
NEEDS_TEACHER_LOGITS = tuple(name for name, m in METHODS.items() if m.teacher_logits)
NEEDS_TEACHER_HIDDEN = tuple(name for name, m in METHODS.items() if m.teacher_hidden)


def training_targets(method: str, params: dict) -> str:
    """Which text of a distillation record the student is trained on (the key of the record)."""
    targets = METHODS[method].targets
    if targets == "rewrite" and params.get("targets", "rewrite") != "rewrite":
        return "teacher_answer"
    return targets
