"""Turn text into training/measurement examples: chat prompt + answer with loss on the answer only, or packed
chunks of plain text. An example is a dict of 1-D LongTensors `input_ids` and `labels` (-100 = no loss)."""

from __future__ import annotations

import torch

IGNORE = -100


# Stands in for an instruction when the chat template is rendered to find where the content goes.
_CONTENT_SLOT = "REALIGNCONTENTSLOT"


def chat_prompt_text(tokenizer, instruction: str) -> str:
    """The instruction in the tokenizer's chat template (as a user turn, with the generation prompt), or in
    "Instruction: ...\nResponse:" when the tokenizer has no template."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Instruction: {instruction}\nResponse:"


def chat_prompt_ids(tokenizer, instruction: str) -> list[int]:
    return tokenizer(chat_prompt_text(tokenizer, instruction), add_special_tokens=False)["input_ids"]


def content_span(tokenizer, instruction: str) -> tuple[str, int, int]:
    """(prompt text, start, end): the characters of the chat-formatted prompt that the instruction filled. The
    template is rendered around a placeholder; the text before and after it is the template's own (system prompt,
    role and control tokens, generation prompt) and must frame the real prompt the same way. A template that
    trims the content is fine; one whose frame depends on the content is a ValueError."""
    text = chat_prompt_text(tokenizer, instruction)
    head, slot, tail = chat_prompt_text(tokenizer, _CONTENT_SLOT).partition(_CONTENT_SLOT)
    if not slot or _CONTENT_SLOT in tail or len(head) + len(tail) > len(text) or not text.startswith(head) \
            or not text.endswith(tail):
        raise ValueError(f"cannot find the instruction {instruction[:60]!r} in the prompt the tokenizer's chat "
                         "template makes of it: the template's text around the user message depends on the message")
    return text, len(head), len(text) - len(tail)


def chat_prompt_content(tokenizer, instruction: str) -> tuple[list[int], list[bool]]:
    """The prompt's token ids (as chat_prompt_ids) and, per token, whether it carries instruction text: its
    characters overlap the instruction's span (a token straddling the border counts; it differs with the content)."""
    text, start, end = content_span(tokenizer, instruction)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"the probe's content tokens are found with character offsets, which the slow tokenizer "
                         f"{type(tokenizer).__name__} does not give: use a fast (tokenizers) tokenizer")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    content = [s < end and e > start for s, e in encoded["offset_mapping"]]
    return encoded["input_ids"], content


def model_context(model) -> int | None:
    """Positions the model can attend over (its config's max_position_embeddings), None if it declares none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = getattr(config, "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None


def prompt_budget(model, max_new_tokens: int, what: str, limit: int | None = None) -> int | None:
    """The most prompt tokens that leave room for `max_new_tokens` generated ones in the model's context
    (capped at `limit`); ValueError naming `what` (the config key of the generation budget) if there is none."""
    context = model_context(model)
    if context is None:
        return limit
    if max_new_tokens >= context:
        raise ValueError(f"{what} = {max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{context} tokens")
    return context - max_new_tokens if limit is None else min(limit, context - max_new_tokens)


def clamp_prompts(prompts: list[list[int]], budget: int | None) -> tuple[list[list[int]], int]:
    """Keep the last `budget` tokens of each prompt (the end holds the chat template's generation prompt);
    returns (prompts, how many were cut)."""
    if budget is None:
        return prompts, 0
    return [p[-budget:] for p in prompts], sum(len(p) > budget for p in prompts)


def chat_example(tokenizer, instruction: str, answer: str, max_len: int, content: bool = False) -> dict:
    """Prompt tokens (no loss) + answer tokens + EOS (loss), truncated to `max_len` tokens.

    `content=True` adds a bool `content` flag per token, as the probe's (realign.measure.stage.probe_sequences):
    instruction text (chat_prompt_content) and answer text, never the template's tokens nor the closing EOS."""
    if content:
        prompt, flags = chat_prompt_content(tokenizer, instruction)
    else:
        prompt, flags = chat_prompt_ids(tokenizer, instruction), None
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # Keep at least a few answer tokens even for long prompts: cut the prompt from the left.
    keep = max(1, max_len - min(len(answer_ids), max_len // 2))
    prompt = prompt[-keep:]
    ids = (prompt + answer_ids)[:max_len]
    labels = ([IGNORE] * len(prompt) + answer_ids)[:max_len]
    example = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if content:
        example["content"] = torch.tensor((flags[-keep:] + [True] * (len(answer_ids) - 1) + [False])[:max_len],
                                          dtype=torch.bool)
    return example


def packed_chunks(tokenizer, texts: list[str], seq_len: int, max_chunks: int | None = None) -> list[dict]:
    """Concatenate texts (separated by EOS) and cut into full `seq_len` chunks; loss on every token."""
    stream: list[int] = []
    chunks = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        while len(stream) >= seq_len:
            ids = torch.tensor(stream[:seq_len])
            chunks.append({"input_ids": ids, "labels": ids.clone()})
            stream = stream[seq_len:]
            if max_chunks is not None and len(chunks) >= max_chunks:
                return chunks
    return chunks


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a list of examples into a batch with an attention mask; examples that carry an `index` (their
    position in the training set, used to look up cached teacher outputs) pass it on as `batch["index"]`, and
    examples that carry `content` flags pass them on as `batch["content"]` (False on padding)."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((len(examples), length), pad_id, dtype=torch.long),
             "labels": torch.full((len(examples), length), IGNORE, dtype=torch.long),
             "attention_mask": torch.zeros((len(examples), length), dtype=torch.long)}
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][i, :n] = e["input_ids"]
        batch["labels"][i, :n] = e["labels"]
        batch["attention_mask"][i, :n] = 1
    if all("index" in e for e in examples):
        batch["index"] = torch.tensor([e["index"] for e in examples])
    if all("content" in e for e in examples):  # chat_example(content=True); padding is never content
        batch["content"] = torch.zeros((len(examples), length), dtype=torch.bool)
        for i, e in enumerate(examples):
            batch["content"][i, :len(e["content"])] = e["content"]
    return batch


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded [batch, width] token ids and attention mask, the layout generation continues from."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, s in enumerate(sequences):
        input_ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        attention[i, width - len(s):] = 1
    return input_ids, attention
