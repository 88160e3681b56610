"""`alignment-held`: kd while each pre-registered layer's CKA to the teacher is held at a ceiling.

The study asks whether self-distillation recovers a damaged model *by* re-aligning its hidden geometry. The
intervention that tests it must prevent re-alignment while the logits are matched, and it must prevent exactly
what the study measures; a penalty on some other CKA only slows re-alignment (`alignment-blocked` kept about
two thirds of kd's rise). So the constraint reads the measurement's own quantities, on every training batch:

* the estimator: debiased linear CKA (unbiased HSIC), the same code as the measurement's (cka.debiased_cka);
* the tokens: content positions of the batch (activations.content_positions): instruction and answer text,
  never the chat template, a prefix another sequence of the batch shares, position 0 or padding;
* the layers: `measure.alignment_layers` (alignment_range), default every block but the last. The final post-norm
  state must re-align whenever the logits do, so holding it would fight kd itself; it and the embeddings are free.

The ceiling of layer l is c0_l + hold_fraction * reference_l, c0_l the damaged model's CKA: the student before its
first update is the damaged model, so c0 is the damaged model's CKA on the run's own batches. By default
(hold_baseline `batch`) on every batch of the run, each batch getting its own ceiling: the constraint is then on
the rise of CKA on the same tokens, as the study's paired ΔCKA is. One ceiling for all batches (`mean`: the mean
over the first `hold_calibration_batches`) is not enough: which examples a batch of 4 holds moves its CKA by far
more than kd does (tiny model, step 0, the same layer: 0.62 to 0.81 over 4 batches, while kd raises it by 0.08), so
a batch that is merely easy would be pushed down and a hard one let through. Neither the teacher nor the damaged
model changes, so both models' states at the batch's tokens are read from their content-states caches
(realign.recover.content_states, computed once per damage and shared by every seed): the ceilings cost no forward,
and a step one student forward and backward, as kd's does. The reference ("the dose") is `headroom` = 1 - c0_l by
default (self-contained: 0 holds the damaged value, 1 lifts the constraint), or a number: an absolute CKA rise such
as kd's measured ΔCKA, so that hold_fraction 0.5 allows half of kd's re-alignment.

The constraint g_l = cka_l - ceiling_l <= 0 is enforced by the augmented Lagrangian of Rockafellar (1973) for
inequalities: loss = kd + sum_l (max(0, lambda_l + rho g_l)^2 - lambda_l^2) / (2 rho), and after each batch the
multiplier follows dual ascent, lambda_l <- max(0, lambda_l + rho g_l). A penalty with a fixed weight either binds
too weakly (kd wins, CKA rises) or too strongly (CKA is pushed far below); the multiplier finds the weight at
which the layer sits at its ceiling, one layer at a time, and falls back to 0 on a layer that kd leaves alone.
"""

from __future__ import annotations

import torch

from realign.device import on_device
from realign.measure.activations import content_positions
from realign.measure.kernels import debiased_cka
from realign.recover.content_states import ContentStates
from realign.recover.losses import forward, logit_loss


def content_token_mask(batch: dict) -> torch.Tensor:
    """[batch, time] True at the content positions of a training batch (chat_example(content=True)), as the
    measurement selects them on the probe: content_positions on each row's unpadded tokens. A row that repeats
    an earlier row token for token (an example drawn twice) contributes nothing: its every state is shared."""
    lengths = batch["attention_mask"].sum(1).tolist()
    rows, seen = [], set()
    for i, n in enumerate(lengths):
        key = tuple(batch["input_ids"][i, :n].tolist())
        if key not in seen:
            seen.add(key)
            rows.append(i)
    try:
        positions = content_positions([batch["input_ids"][i, :lengths[i]].cpu() for i in rows],
                                      [batch["content"][i, :lengths[i]].cpu() for i in rows])
    except ValueError as err:  # it speaks of probe sequences; here they are a training batch's examples
        raise ValueError(f"alignment-held, training batch of examples {batch['index'].tolist()}: {err}") from None
    mask = torch.zeros_like(batch["content"])
    for i, chosen in zip(rows, positions):
        mask[i, chosen] = True
    return mask


def ceilings(damaged: torch.Tensor, params: dict) -> torch.Tensor:
    """Per-layer CKA ceilings from the damaged model's per-layer CKA and the dose (module docstring)."""
    fraction, reference = params["hold_fraction"], params["hold_reference"]
    rise = 1 - damaged if reference == "headroom" else torch.full_like(damaged, float(reference))
    return damaged + fraction * rise


def batch_key(batch: dict) -> tuple[int, ...]:
    """A batch's identity: its examples' indices (CKA does not depend on their order)."""
    return tuple(sorted(batch["index"].tolist()))


class HeldAlignment:
    """The loss of `alignment-held` as `loss_fn(model, batch)`, with the state the training loop keeps: the
    ceilings and per-layer multipliers (state_dict, so a resumed run continues them), and per-step metrics for the
    curve. The teacher's hidden states come from its content-states cache (realign.recover.content_states), its
    logits from the top-k cache, or from the live `teacher` when there is none. `calibrate(damaged_states,
    batches)` must run before the first step."""

    def __init__(self, params: dict, teacher_states: ContentStates, teacher_top_k=None, teacher=None):
        if teacher_states is None:
            raise ValueError("alignment-held needs the teacher's hidden states (its content-states cache)")
        if teacher_top_k is None and teacher is None:
            raise ValueError("alignment-held needs the teacher's logits: its top-k cache or the teacher model")
        self.params, self.teacher_states = params, teacher_states
        self.teacher_top_k, self.teacher = teacher_top_k, teacher
        self.rho = float(params["hold_rho"])
        self.paired = params["hold_baseline"] == "batch"
        self.layers: list[int] = list(teacher_states.layers)
        self.limits: dict[tuple[int, ...], torch.Tensor] | torch.Tensor | None = None
        self.multipliers: torch.Tensor | None = None
        self._calls: list[dict] = []

    def _cka(self, states: list[torch.Tensor], batch: dict, mask: torch.Tensor) -> torch.Tensor:
        """Per held layer, debiased CKA of `states` (per layer, [n, hidden] at the batch's `mask`) to the teacher's."""
        teacher = self.teacher_states.select(batch, mask)
        # The estimator in float32 outside autocast: bf16 products would swamp CKA differences of 0.01.
        with torch.autocast(mask.device.type, enabled=False):
            return torch.stack([debiased_cka(s, t) for s, t in zip(states, teacher)])

    def layer_cka(self, model, batch: dict, with_logits: bool = False):
        """Per held layer, the student's debiased CKA to the teacher on the batch's content tokens (differentiable),
        and the kd term when `with_logits`."""
        out = forward(model, batch, True)
        self.teacher_states.check_model(len(out.hidden_states), "the student")
        mask = content_token_mask(batch)
        cka = self._cka([out.hidden_states[i][mask] for i in self.layers], batch, mask)
        if not with_logits:
            return cka
        teacher_out = None
        if self.teacher_top_k is None:
            with torch.no_grad():
                teacher_out = forward(self.teacher, batch, False)
        return cka, logit_loss(self.params, out.logits, teacher_out, batch, self.teacher_top_k)

    @torch.no_grad()
    def calibrate(self, damaged_states: ContentStates, batches: list[dict]):
        """Set the ceilings from the damaged model's per-layer CKA (its cached content states against the
        teacher's) on `batches`: per batch (hold_baseline `batch`: `batches` must be every batch of the run) or
        their mean (`mean`)."""
        if not batches:
            raise ValueError("alignment-held needs at least one calibration batch")
        if damaged_states.layers != self.layers or damaged_states.n_hidden != self.teacher_states.n_hidden:
            raise ValueError(f"the damaged model's content states are at hidden states {damaged_states.layers} of "
                             f"{damaged_states.n_hidden}, the teacher's at {self.layers} of "
                             f"{self.teacher_states.n_hidden}; rerun the content_states steps")
        damaged: dict[tuple[int, ...], torch.Tensor] = {}
        for batch in batches:
            if batch_key(batch) not in damaged:
                mask = content_token_mask(batch)
                damaged[batch_key(batch)] = self._cka(damaged_states.select(batch, mask), batch, mask).double().cpu()
        if self.paired:
            self.limits = {key: ceilings(value, self.params) for key, value in damaged.items()}
        else:
            self.limits = ceilings(torch.stack(list(damaged.values())).mean(0), self.params)
        self.multipliers = torch.zeros(len(self.layers), dtype=torch.float64)
        return self.limits

    def limit(self, batch: dict) -> torch.Tensor:
        if self.limits is None:
            raise RuntimeError("alignment-held: calibrate() on the damaged model before training")
        if not self.paired:
            return self.limits
        key = batch_key(batch)
        if key not in self.limits:
            raise RuntimeError(f"alignment-held: batch of examples {list(key)} was not calibrated")
        return self.limits[key]

    def __call__(self, model, batch: dict) -> torch.Tensor:
        limit = self.limit(batch)
        cka, kd = self.layer_cka(model, batch, with_logits=True)
        violation = cka - limit.to(cka)
        multipliers = self.multipliers.to(cka)
        penalty = ((torch.relu(multipliers + self.rho * violation).square() - multipliers.square())
                   / (2 * self.rho)).sum()
        # Dual ascent on this batch's violation; the new multipliers price the next batch.
        self.multipliers = torch.relu(self.multipliers + self.rho * violation.detach().double().cpu())
        self._calls.append({"kd": float(kd.detach()), "cka": cka.detach().double().cpu(), "limit": limit})
        return kd + penalty

    def step_metrics(self) -> dict:
        """What the training curve records for the step just taken (means over its micro-batches): the kd term,
        per held layer the batch CKA, its ceiling on that batch and the multiplier after the step."""
        calls, self._calls = self._calls, []
        if not calls:
            return {}

        def mean(key):
            return [round(v, 6) for v in torch.stack([c[key] for c in calls]).mean(0).tolist()]

        return {"kd": sum(c["kd"] for c in calls) / len(calls), "held_layers": list(self.layers),
                "cka": mean("cka"), "cka_limit": mean("limit"),
                "multiplier": [round(v, 6) for v in self.multipliers.tolist()]}

    def state_dict(self) -> dict:
        limits = self.limits
        if isinstance(limits, dict):  # torch.load(weights_only=True) takes tensors and plain containers
            limits = {"keys": [list(k) for k in limits], "values": torch.stack(list(limits.values()))}
        return {"layers": list(self.layers or []), "limits": limits, "multipliers": self.multipliers}

    def load_state_dict(self, state: dict) -> None:
        # A resumed run continues with the ceilings and multipliers the interrupted run had, bit for bit.
        if list(state["layers"]) != self.layers:
            raise ValueError(f"the saved training state holds layers {list(state['layers'])}, this run {self.layers}")
        limits = state["limits"]
        if isinstance(limits, dict):
            limits = {tuple(k): v for k, v in zip(limits["keys"], limits["values"])}
        self.limits, self.multipliers = limits, state["multipliers"]


def calibration_batches(examples: list[dict], order: list[int], batch_size: int, n_batches: int, pad_id: int,
                        device) -> list[dict]:
    """The run's first `n_batches` training batches (`order`: the loop's example order), collated on `device`."""
    from realign.data.sequences import collate

    starts = range(0, min(len(order), n_batches * batch_size), batch_size)
    return [on_device(collate([examples[i] for i in order[s:s + batch_size]], pad_id), device) for s in starts]
