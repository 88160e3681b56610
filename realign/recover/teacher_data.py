"""The teacher answers instruction prompts once; every recovery of that model reuses the answers."""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from realign.data.sequences import chat_prompt_ids
from realign.device import autocast, model_device


@torch.no_grad()
def generate_answers(model, tokenizer, instructions: list[str], max_new_tokens: int, batch_size: int = 8,
                     max_prompt_tokens: int = 256) -> list[str]:
    """Greedy answers (deterministic), left-padded batches."""
    model.eval()
    device = model_device(model)
    answers = []
    for start in tqdm(range(0, len(instructions), batch_size), desc="generate", file=sys.stderr, ascii=True):
        prompts = [chat_prompt_ids(tokenizer, text)[-max_prompt_tokens:]
                   for text in instructions[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention[i, width - len(p):] = 1
        with autocast(device):
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [a.strip() for a in answers]
