"""The teacher answers instruction prompts once; every recovery of that model reuses the answers."""

from __future__ import annotations

import logging
import sys

import torch
from tqdm import tqdm

from realign.data.sequences import chat_prompt_ids, clamp_prompts, left_pad, model_context, prompt_budget
from realign.device import autocast, model_device


@torch.no_grad()
def generate_answers(model, tokenizer, instructions: list[str], max_new_tokens: int, batch_size: int = 8,
                     max_prompt_tokens: int = 256) -> list[str]:
    """Greedy answers (deterministic), left-padded batches. Prompts keep their last `max_prompt_tokens`
    tokens, fewer when the model's context minus `max_new_tokens` is shorter (a log line counts the cuts)."""
    model.eval()
    device = model_device(model)
    budget = prompt_budget(model, max_new_tokens, "data.teacher_max_new_tokens", max_prompt_tokens)
    answers, clamped = [], 0
    for start in tqdm(range(0, len(instructions), batch_size), desc="generate", file=sys.stderr, ascii=True):
        prompts, cut = clamp_prompts([chat_prompt_ids(tokenizer, text)
                                      for text in instructions[start:start + batch_size]], budget)
        clamped += cut
        input_ids, attention = left_pad(prompts, tokenizer.pad_token_id)
        width = input_ids.shape[1]
        with autocast(device):
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    if clamped:
        logging.info("clamped %d of %d prompts to their last %d tokens (context %s tokens minus %d to generate, "
                     "at most %d)", clamped, len(instructions), budget, model_context(model), max_new_tokens,
                     max_prompt_tokens)
    return [a.strip() for a in answers]


REWRITE_TEMPLATE = ("{instruction}\n\nHere is a reference answer:\n{reference}\n\n"
                    "Answer the request above in your own words, using the reference answer as a guide.")


def rewrite_instruction(instruction: str, reference: str) -> str:
    """The prompt of self-distilled fine-tuning (Yang et al. 2024, "Self-Distillation Bridges Distribution Gap
    in Language Model Fine-Tuning"): the model restates the reference answer in its own distribution."""
    return REWRITE_TEMPLATE.format(instruction=instruction, reference=reference)


def accept_rewrite(rewrite: str, reference: str, max_new_tokens: int) -> bool:
    """A simple check: a rewrite must have some substance relative to the (length-capped) reference and must
    not echo the rewrite prompt's own scaffolding; otherwise the reference is used (as in Yang et al.)."""
    words = rewrite.split()
    reference_words = min(len(reference.split()), int(0.6 * max_new_tokens))
    if len(words) < max(3, 0.2 * reference_words):
        return False
    return "reference answer" not in rewrite.lower() and "in your own words" not in rewrite.lower()


def generate_rewrites(model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int = 8) -> list[dict]:
    """Each record gains `rewrite` (the model's accepted rewrite, or the reference) and `rewrite_accepted`."""
    prompts = [rewrite_instruction(r["instruction"], r["reference"]) for r in records]
    rewrites = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, max_prompt_tokens=768)
    out = []
    for record, rewrite in zip(records, rewrites):
        accepted = accept_rewrite(rewrite, record["reference"], max_new_tokens)
        out.append({**record, "rewrite": rewrite if accepted else record["reference"], "rewrite_accepted": accepted,
                    "rewrite_raw": rewrite})
    return out
