"""Recovery methods and controls. Each trains the damaged student under its damage's constraint with the one
training loop (realign.training.train); a method is only a choice of training data and of a loss composed
from realign.recover.losses.

Self-distillation:
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

import torch

from realign.data.sequences import (IGNORE, chat_example, chat_prompt_ids, clamp_prompts, collate, left_pad,
                                   model_context, prompt_budget)
from realign.degrade import constraints
from realign.device import autocast, model_device, on_device
from realign.recover.losses import (cross_entropy, divergence, forward, layer_cka, layer_cosine_distance, layer_mse,
                                    logit_loss, supervised_log_probs, supervised_mask)
from realign.recover.registry import METHODS as REGISTRY
from realign.recover.registry import NEEDS_TEACHER_HIDDEN, NEEDS_TEACHER_LOGITS, training_targets
from realign.training import TrainConfig, example_order, train

METHODS = tuple(REGISTRY)  # realign.recover.registry: the one list
DEMONSTRATION_TEMPLATE = ("{instruction}\n\nThis is an example of a good response:\n{reference}\n\n"
                          "Now write your own response to the request.")


def needs_live_teacher(params: dict) -> bool:
    """Whether a recovery runs the teacher model during training (hidden states, on-policy scoring, or logits
    without a top-k cache)."""
    method = params["method"]
    return (method in NEEDS_TEACHER_HIDDEN or method == "onpolicy"
            or (method in NEEDS_TEACHER_LOGITS and params.get("top_k") is None))


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


def distillation_loss(params: dict, teacher=None, teacher_top_k=None):
    """The loss of kd, cka-kd, alignment-blocked, alignment-only, squarehead and hidden-cosine as
    `loss_fn(model, batch)`."""
    method = params["method"]
    weight = params.get("align_weight", 1.0)
    needs_hidden = method in NEEDS_TEACHER_HIDDEN
    if teacher is None and (needs_hidden or teacher_top_k is None):
        raise ValueError(f"recovery method {method} needs the teacher model")

    def loss_fn(model, batch):
        teacher_out = None
        if teacher is not None and (needs_hidden or teacher_top_k is None):
            with torch.no_grad():
                teacher_out = forward(teacher, batch, needs_hidden)
        out = forward(model, batch, needs_hidden)
        loss = torch.zeros((), device=out.logits.device)
        if method in NEEDS_TEACHER_LOGITS and params.get("with_kl", True):
            loss = logit_loss(params, out.logits, teacher_out, batch, teacher_top_k)
        if needs_hidden:
            mask = supervised_mask(batch["labels"])
            layers = _hidden_layers(params, len(out.hidden_states))
            if method == "squarehead":
                loss = loss + weight * layer_mse(out.hidden_states, teacher_out.hidden_states, mask, layers)
            elif method == "hidden-cosine":
                loss = loss + weight * layer_cosine_distance(out.hidden_states, teacher_out.hidden_states, mask, layers)
            elif method == "alignment-only" and params.get("align_loss", "cka") == "mse":
                loss = loss + weight * layer_mse(out.hidden_states, teacher_out.hidden_states, mask, layers)
            else:
                cka = layer_cka(out.hidden_states, teacher_out.hidden_states, mask, layers)
                loss = loss + weight * (cka if method == "alignment-blocked" else 1 - cka)
        return loss

    return loss_fn


def demonstration_instruction(instruction: str, reference: str) -> str:
    return DEMONSTRATION_TEMPLATE.format(instruction=instruction, reference=reference)


def onpolicy_loss(teacher, tokenizer, records: list[dict], params: dict, max_len: int):
    """Shenfeld et al.'s on-policy self-distillation as `loss_fn(model, batch)`; batches carry record indices."""
    max_new_tokens = params.get("max_new_tokens", 64)
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
        with torch.no_grad(), autocast(device):
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


def recover(student, teacher, tokenizer, params: dict, records: list[dict], cfg: TrainConfig, max_len: int,
            constraint: dict, constraint_tensors: dict, teacher_top_k_path=None, on_checkpoint=None,
            checkpoint_steps=(), state_path=None, state_every: int = 0, run_identity: dict | None = None,
            on_restart=None):
    """Train `student` under its constraint with recovery `params` (method + options); returns (trained model,
    training curve, constraint check). The trained model is `student` itself, or a PeftModel wrapping it when
    the constraint is a frozen base. `on_checkpoint(model, step, curve)` is called at `checkpoint_steps`;
    `state_path`/`state_every`/`run_identity`/`on_restart`: resumable training (realign.training.train)."""
    method = params["method"]
    if method not in METHODS:
        raise ValueError(f"unknown recovery method {method!r}; allowed: {', '.join(METHODS)}")
    if method == "onpolicy":
        if teacher is None:
            raise ValueError("onpolicy needs the teacher model")
        usable = [r for r in records if isinstance(r.get("reference"), str)]
        examples = [{**chat_example(tokenizer, r["instruction"], "", max_len), "index": i}
                    for i, r in enumerate(usable)]
        loss_fn = onpolicy_loss(teacher, tokenizer, usable, params, max_len)
    else:
        examples = build_examples(tokenizer, records, training_targets(method, params), max_len,
                                  content=method == "alignment-held")
        if method in ("kd",) + NEEDS_TEACHER_HIDDEN:
            top_k = None
            if teacher_top_k_path is not None:
                from realign.recover.teacher_logits import TeacherTopK

                top_k = TeacherTopK(teacher_top_k_path, examples, params.get("temperature", 1.0))
            if method == "alignment-held":
                from realign.recover.held import HeldAlignment

                loss_fn = HeldAlignment(params, teacher, top_k)
            else:
                loss_fn = distillation_loss(params, teacher, top_k)
        else:
            def loss_fn(model, batch):
                return cross_entropy(forward(model, batch, False).logits, batch["labels"])
    if teacher is not None:
        teacher.eval()

    student = constraints.attach(student, constraint, constraint_tensors, seed=cfg.seed)
    try:
        if method == "alignment-held":
            # The ceilings are the damaged model's CKA: measured now, under the constraint and before any update,
            # on the run's own batches (the loop's example order): every one (hold_baseline batch) or the first few.
            from realign.recover.held import calibration_batches, option

            n_batches = (cfg.steps * cfg.grad_accum if option(params, "hold_baseline") == "batch"
                         else option(params, "hold_calibration_batches"))
            order = example_order(len(examples), n_batches * cfg.batch_size, cfg.seed)
            loss_fn.calibrate(student, calibration_batches(examples, order, cfg.batch_size, n_batches,
                                                           tokenizer.pad_token_id, model_device(student)))
        curve = train(student, examples, loss_fn, cfg, pad_id=tokenizer.pad_token_id,
                      checkpoint_steps=checkpoint_steps, on_checkpoint=on_checkpoint, state_path=state_path,
                      state_every=state_every, run_identity=run_identity, on_restart=on_restart)
    finally:
        constraints.detach(student)
    return student, curve, constraints.check(student, constraint, constraint_tensors)
