"""Every recovery method and control, one entry each: its name (the config's `recoveries.<name>.method`), the options
it reads beyond the shared ones (any other key is a config error naming it), what it trains on and with which loss:
- `teacher_logits` / `teacher_hidden`: it reads the teacher's logits (its cached top-k, or a live teacher) / hidden
  states (a live teacher, or with `content_states` the teacher's and the damaged model's content-states caches,
  realign.recover.content_states, which the workflow makes for it); `scores_samples`: the live teacher scores the
  student's own samples (on-policy);
- `targets`: which text of a distillation record it trains on;
- `hidden_term`: the hidden-state term added to the logit loss (realign.recover.losses.HIDDEN_TERMS; an
  `align_loss` option replaces it), or None;
- `alignment_layers`: "always" (its layers are measure.alignment_layers) or "default" (unless it sets `layers`),
  filled in by realign.config.recovery_spec; None: its `layers`, else every hidden state but the embeddings;
- `setup`: `(Setup) -> Training`, its examples, its loss and what runs before the first step
  (realign.recover.methods; realign.recover.run runs it).
realign.config (option checks), realign.recover.methods and stage, realign.models.checks and the workflow's input
functions read this list, and so does the config schema's `method` enum (realign.config.load_schema fills it in).
Adding a method is one entry here plus its setup function (and its options in the schema, if it has new ones).
The setup functions are imported only when a run starts, so reading the list costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

LOGIT_OPTIONS = ("temperature", "divergence", "beta", "top_k")
ALIGN_OPTIONS = ("layers", "align_weight")
# alignment-held (realign.recover.held): the dose (allowed CKA rise = hold_fraction x hold_reference), the damaged
# model's CKA it is counted from, the augmented Lagrangian's rho; its layers are measure.alignment_layers. Their
# defaults live in the schema (realign.config.recovery_defaults).
HELD_OPTIONS = ("hold_fraction", "hold_reference", "hold_baseline", "hold_rho", "hold_calibration_batches")
ONPOLICY_MAX_NEW_TOKENS = 64  # onpolicy's sample length when `max_new_tokens` is not set


def _distillation(setup):
    from realign.recover.methods import distillation_setup

    return distillation_setup(setup)


def _held(setup):
    from realign.recover.methods import held_setup

    return held_setup(setup)


def _onpolicy(setup):
    from realign.recover.methods import onpolicy_setup

    return onpolicy_setup(setup)


def _supervised(setup):
    from realign.recover.methods import supervised_setup

    return supervised_setup(setup)


@dataclass(frozen=True)
class RecoveryMethod:
    name: str
    options: tuple[str, ...]
    setup: Callable
    teacher_logits: bool = False
    teacher_hidden: bool = False
    scores_samples: bool = False
    targets: str = "teacher_answer"  # teacher_answer | reference | rewrite (sdft: its `targets` option decides)
    hidden_term: str | None = None  # cka (1 - CKA) | anti-cka (+CKA) | mse | cosine
    alignment_layers: str | None = None  # always | default
    control: bool = False  # separates cause from correlation rather than recovering
    content_states: bool = False  # its hidden states come from content-states caches (the workflow makes them)

    def live_teacher(self, params: dict, states_cached: bool = False) -> bool:
        """Whether a run of this method runs the teacher model during training (hidden states, unless the run is
        given their caches, scoring samples, or logits without a top-k cache)."""
        return ((self.teacher_hidden and not (self.content_states and states_cached)) or self.scores_samples
                or (self.teacher_logits and params.get("top_k") is None))

    def max_new_tokens(self, params: dict) -> int:
        """The length of the student's samples, for a method that scores them."""
        return params.get("max_new_tokens", ONPOLICY_MAX_NEW_TOKENS)

    def sampled_tokens(self, params: dict) -> int:
        """Tokens the student samples per prompt (they must fit in the context with its prompt); 0 if none."""
        return self.max_new_tokens(params) + 1 if self.scores_samples else 0

    def training_targets(self, params: dict) -> str:
        """Which text of a distillation record the student is trained on (the key of the record)."""
        if self.targets == "rewrite" and params.get("targets", "rewrite") != "rewrite":
            return "teacher_answer"
        return self.targets


METHODS: dict[str, RecoveryMethod] = {m.name: m for m in (
    RecoveryMethod("kd", LOGIT_OPTIONS, _distillation, teacher_logits=True),
    RecoveryMethod("sdft", ("targets",), _supervised, targets="rewrite"),
    RecoveryMethod("onpolicy", ("max_new_tokens", "sample_temperature"), _onpolicy, scores_samples=True),
    RecoveryMethod("cka-kd", LOGIT_OPTIONS + ALIGN_OPTIONS, _distillation, teacher_logits=True, teacher_hidden=True,
                   hidden_term="cka"),
    RecoveryMethod("alignment-blocked", LOGIT_OPTIONS + ALIGN_OPTIONS, _distillation, teacher_logits=True,
                   teacher_hidden=True, hidden_term="anti-cka", control=True),
    RecoveryMethod("alignment-held", LOGIT_OPTIONS + HELD_OPTIONS, _held, teacher_logits=True, teacher_hidden=True,
                   alignment_layers="always", control=True, content_states=True),
    RecoveryMethod("alignment-only", ALIGN_OPTIONS + ("align_loss",), _distillation, teacher_hidden=True,
                   hidden_term="cka", control=True),
    RecoveryMethod("sft", (), _supervised, targets="reference", control=True),
    RecoveryMethod("squarehead", LOGIT_OPTIONS + ALIGN_OPTIONS, _distillation, teacher_logits=True,
                   teacher_hidden=True, hidden_term="mse", alignment_layers="default"),
    RecoveryMethod("hidden-cosine", LOGIT_OPTIONS + ALIGN_OPTIONS + ("with_kl",), _distillation, teacher_logits=True,
                   teacher_hidden=True, hidden_term="cosine", alignment_layers="default"),
)}
RECOVERY_OPTIONS = {name: m.options for name, m in METHODS.items()}
NEEDS_TEACHER_LOGITS = tuple(name for name, m in METHODS.items() if m.teacher_logits)
NEEDS_TEACHER_HIDDEN = tuple(name for name, m in METHODS.items() if m.teacher_hidden)
NEEDS_CONTENT_STATES = tuple(name for name, m in METHODS.items() if m.content_states)


def training_targets(method: str, params: dict) -> str:
    """Which text of a distillation record the student is trained on (the key of the record)."""
    return METHODS[method].training_targets(params)
