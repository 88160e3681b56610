"""Recovery methods and controls. Each trains the damaged student under its damage's constraint with the one
training loop (realign.training.train); a method is only a choice of training data and of a loss composed
from realign.recover.losses.

Self-distillation (realign.recover.run runs them; realign.recover.registry lists them):
- `kd`:  token-level divergence (forward KL, reverse KL or generalized JSD; temperature; full vocabulary
         from a live teacher, or the teacher's cached top-k) on the teacher's own answers;
- `sdft`: SFT on the teacher's rewrites of the reference answers (Yang et al. 2024), or on its own answers;
- `onpolicy`: the student samples an answer, the teacher conditioned on the reference answer (a demonstration)
         scores it; reverse KL on the student's tokens (Shenfeld et al. 2026, arXiv 2601.19897);
- `cka-kd`: kd + align_weight * (1 - minibatch linear CKA) at `layers` (CKA-regularised distillation);
- `squarehead`: kd + align_weight * per-layer hidden-state MSE normalised by the teacher's mean square (SquareHead,
         Kurtic et al. 2023, the loss llm-compressor's users recover pruned models with);
- `hidden-cosine`: align_weight * per-layer cosine distance of the student's hidden states to the teacher's
         (ModelOpt, DistillKit), plus kd unless `with_kl` is false.
Both feature losses force alignment directly and are not rotation-invariant: whether they raise CKA more than kd,
and whether that buys more recovery, is evidence on the hypothesis. Their layers are `layers`, or else the
pre-registered measure.alignment_layers (recovery_spec fills them in).
Controls:
- `alignment-blocked`: kd + align_weight * CKA: the logits are matched while layer CKA is pushed down;
- `alignment-held`: kd under a ceiling on each pre-registered layer's debiased CKA to the teacher (the damaged
         model's, plus a dose), enforced by an augmented Lagrangian (realign.recover.held);
- `alignment-only`: align_weight * (1 - CKA) (or the hidden-state MSE), no logits;
- `sft`: SFT on external reference answers, no teacher.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from realign.data.sequences import (IGNORE, chat_example, chat_prompt_ids, clamp_prompts, collate, left_pad,
                                   model_context, prompt_budget)
from realign.device import model_device, on_device
from realign.recover.losses import (HIDDEN_TERMS, cross_entropy, divergence, forward, logit_loss,
                                    supervised_log_probs, supervised_mask)
from realign.training import example_order
DEMONSTRATION_TEMPLATE = ("{instruction}\n\nThis is an example of a good response:\n{reference}\n\n"
                          "Now write your own response to the request.")


@dataclass(frozen=True)
class Setup:
    """What a method's setup function (its registry entry's `setup`) builds its training from."""
    method: object  # its realign.recover.registry.RecoveryMethod entry
    params: dict
    teacher: object  # the teacher model, or None when the method needs no live teacher
    tokenizer: object
    records: list[dict]  # the distillation records
    max_len: int
    teacher_top_k_path: object = None  # the teacher's cached top-k log-probabilities on these examples, if any
    # alignment-held: the teacher's and the damaged model's content-states caches (realign.recover.content_states);
    # without them, the states are computed in the run (from the live teacher, and the student before training)
    teacher_states_path: object = None
    damaged_states_path: object = None


@dataclass(frozen=True)
class Training:
    """A method's training: its examples, its loss `loss_fn(model, batch)`, and `prepare(student, examples, cfg)`,
    called under the constraint before the first step (or None)."""
    examples: list[dict]
    loss_fn: Callable
    prepare: Callable | None = None


def _top_k(setup: Setup, examples: list[dict]):
    if setup.teacher_top_k_path is None:
        return None
    from realign.recover.teacher_logits import TeacherTopK

    return TeacherTopK(setup.teacher_top_k_path, examples, setup.params.get("temperature", 1.0))


def _examples(setup: Setup, content: bool = False) -> list[dict]:
    """The training examples of the record text the method trains on (build_examples)."""
    return build_examples(setup.tokenizer, setup.records, setup.method.training_targets(setup.params), setup.max_len,
                          content=content)


def distillation_setup(setup: Setup) -> Training:
    """kd and the methods that add a hidden-state term to it (or, alignment-only, train on that term alone)."""
    examples = _examples(setup)
    return Training(examples, distillation_loss(setup.method, setup.params, setup.teacher, _top_k(setup, examples)))


def held_setup(setup: Setup) -> Training:
    """alignment-held: kd under a ceiling on each pre-registered layer's CKA (realign.recover.held). The ceilings
    are the damaged model's CKA on the run's own batches (the loop's example order): every one (hold_baseline
    batch) or the first few; both models' hidden states come from their content-states caches."""
    from realign.recover.content_states import ContentStates, compute_content_states
    from realign.recover.held import HeldAlignment, calibration_batches

    params, pad_id = setup.params, setup.tokenizer.pad_token_id
    examples = _examples(setup, content=True)

    def states(path, model, what):
        if path is not None:
            return ContentStates.load(path, examples, params["alignment_layers"])
        if model is None:
            raise ValueError(f"alignment-held needs {what}'s content-states cache or the model")
        return compute_content_states(model, examples, params["alignment_layers"], pad_id)

    teacher_top_k = _top_k(setup, examples)
    loss_fn = HeldAlignment(params, states(setup.teacher_states_path, setup.teacher, "the teacher"), teacher_top_k,
                            setup.teacher)

    def prepare(student, examples, cfg):
        # under the constraint, before any update, the student is the damaged model
        damaged = states(setup.damaged_states_path, student, "the damaged model")
        n_batches = (cfg.steps * cfg.grad_accum if params["hold_baseline"] == "batch"
                     else params["hold_calibration_batches"])
        order = example_order(len(examples), n_batches * cfg.batch_size, cfg.seed)
        loss_fn.calibrate(damaged, calibration_batches(examples, order, cfg.batch_size, n_batches, pad_id,
                                                       model_device(student)))

    return Training(examples, loss_fn, prepare)


def onpolicy_setup(setup: Setup) -> Training:
    if setup.teacher is None:
        raise ValueError("onpolicy needs the teacher model")
    usable = [r for r in setup.records if isinstance(r.get("reference"), str)]
    examples = [{**chat_example(setup.tokenizer, r["instruction"], "", setup.max_len), "index": i}
                for i, r in enumerate(usable)]
    return Training(examples, onpolicy_loss(setup.teacher, setup.tokenizer, usable, setup.params, setup.max_len,
                                            setup.method.max_new_tokens(setup.params)))


def supervised_setup(setup: Setup) -> Training:
    """sdft and sft: cross-entropy on a text of the records (the teacher's rewrites or answers, or references)."""
    examples = _examples(setup)

    def loss_fn(model, batch):
        return cross_entropy(forward(model, batch, False).logits, batch["labels"])

    return Training(examples, loss_fn)


def build_examples(tokenizer, records: list[dict], answer_key: str, max_len: int, content: bool = False) -> list[dict]:
    """Training examples of the records' `answer_key` texts; `content`: with per-token content flags
    (chat_example), for a loss that reads hidden states at the positions the measurement reads."""
    # An empty teacher answer is kept: it teaches "stop here" (the EOS token), which is the teacher's choice.
    usable = [r for r in records if isinstance(r.get(answer_key), str)]
    if not usable:
        raise ValueError(f"no distillation record has a {answer_key!r} text")
    return [{**chat_example(tokenizer, r["instruction"], r[answer_key], max_len, content=content), "index": i}
            for i, r in enumerate(usable)]


def _hidden_layers(params: dict, n_hidden: int) -> list[int]:
    if params.get("layers") is None and params.get("alignment_layers") is not None:
        from realign.measure.stage import alignment_range

        first, last = alignment_range(params["alignment_layers"], n_hidden)
        return list(range(first, last + 1))
    layers = params.get("layers") or list(range(1, n_hidden))
    bad = [i for i in layers if not 0 <= i < n_hidden]
    if bad:
        raise ValueError(f"recovery layers {bad} out of range: the model has hidden states 0..{n_hidden - 1}")
    return layers


def distillation_loss(entry, params: dict, teacher=None, teacher_top_k=None):
    """The loss of kd and of the methods with a hidden-state term (their registry `entry`'s `hidden_term`, or the
    `align_loss` option) as `loss_fn(model, batch)`."""
    weight = params.get("align_weight", 1.0)
    needs_hidden = entry.teacher_hidden
    term = HIDDEN_TERMS[params.get("align_loss", entry.hidden_term)] if needs_hidden else None
    if teacher is None and (needs_hidden or teacher_top_k is None):
        raise ValueError(f"recovery method {entry.name} needs the teacher model")

    def loss_fn(model, batch):
        teacher_out = None
        if teacher is not None and (needs_hidden or teacher_top_k is None):
            with torch.no_grad():
                teacher_out = forward(teacher, batch, needs_hidden)
        out = forward(model, batch, needs_hidden)
        loss = torch.zeros((), device=out.logits.device)
        if entry.teacher_logits and params.get("with_kl", True):
            loss = logit_loss(params, out.logits, teacher_out, batch, teacher_top_k)
        if needs_hidden:
            mask = supervised_mask(batch["labels"])
            layers = _hidden_layers(params, len(out.hidden_states))
            loss = loss + weight * term(out.hidden_states, teacher_out.hidden_states, mask, layers)
        return loss

    return loss_fn


def demonstration_instruction(instruction: str, reference: str) -> str:
    return DEMONSTRATION_TEMPLATE.format(instruction=instruction, reference=reference)


def onpolicy_loss(teacher, tokenizer, records: list[dict], params: dict, max_len: int, max_new_tokens: int):
    """Shenfeld et al.'s on-policy self-distillation as `loss_fn(model, batch)`; batches carry record indices."""
    sample_temperature = params.get("sample_temperature", 1.0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # The student's prompt must leave room for its sample in the context; the teacher's, for the sample it scores.
    budget = prompt_budget(teacher, max_new_tokens, "onpolicy max_new_tokens (recoveries.<name>.max_new_tokens)")
    student_prompts, clamped = clamp_prompts([chat_prompt_ids(tokenizer, r["instruction"]) for r in records], budget)
    if clamped:
        logging.info("onpolicy: clamped %d of %d prompts to their last %d tokens (context %d minus %d to sample)",
                     clamped, len(records), budget, model_context(teacher), max_new_tokens)
    teacher_prompts = [chat_prompt_ids(tokenizer, demonstration_instruction(r["instruction"], r["reference"]))
                       for r in records]
    teacher_length = min(max(max_len, 512), model_context(teacher) or max(max_len, 512))

    def sample(model, prompts: list[list[int]]) -> list[list[int]]:
        input_ids, attention = left_pad(prompts, pad)
        device = model_device(model)
        # no autocast of its own: it runs inside the training loop's, in training.dtype like the student's forwards
        with torch.no_grad():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=True, temperature=sample_temperature,
                                 top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=eos)
        responses = []
        for row in out[:, input_ids.shape[1]:].tolist():
            responses.append(row[:row.index(eos) + 1] if eos in row else row)
        return responses

    def scored_batch(prompts: list[list[int]], responses: list[list[int]], device, length: int) -> dict:
        examples = []
        for prompt, response in zip(prompts, responses):
            prompt = prompt[-max(1, length - len(response)):]
            examples.append({"input_ids": torch.tensor(prompt + response),
                             "labels": torch.tensor([IGNORE] * len(prompt) + response)})
        return on_device(collate(examples, pad), device)

    def loss_fn(model, batch):
        indices = batch["index"].tolist()
        responses = sample(model, [student_prompts[i] for i in indices])
        device = batch["input_ids"].device
        student_batch = scored_batch([student_prompts[i] for i in indices], responses, device, max_len)
        # The teacher reads the demonstration too; it runs without gradients, so it may see a longer context.
        teacher_batch = scored_batch([teacher_prompts[i] for i in indices], responses, device, teacher_length)
        with torch.no_grad():
            teacher_logp = supervised_log_probs(forward(teacher, teacher_batch, False).logits, teacher_batch["labels"])
        student_logp = supervised_log_probs(forward(model, student_batch, False).logits, student_batch["labels"])
        return divergence(teacher_logp, student_logp, "reverse_kl")

    return loss_fn
