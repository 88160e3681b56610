"""The teacher's top-k log-probabilities on the distillation examples, computed once per (teacher, max_len, k,
temperature) and reused by every logit-distillation recovery of that model, so training needs no second
forward pass through the teacher.

The cache holds, for the supervised positions of each example in order, the k largest log-probabilities
(normalised over the full vocabulary at the given temperature, float32) and their token ids; `offsets[i]` is
where example i's rows start. A fingerprint of the examples' tokens guards against reuse with other data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from realign.data.sequences import collate
from realign.device import autocast, model_device, on_device
from realign.recover.losses import supervised_log_probs, supervised_mask
from realign.data.row_cache import load_row_cache, save_row_cache


@torch.no_grad()
def compute_teacher_top_k(teacher, examples: list[dict], top_k: int, temperature: float, pad_id: int,
                          batch_size: int = 8) -> dict[str, torch.Tensor]:
    teacher.eval()
    device = model_device(teacher)
    values, indices, counts = [], [], []
    for start in tqdm(range(0, len(examples), batch_size), desc="teacher logits", file=sys.stderr, ascii=True):
        batch = on_device(collate(examples[start:start + batch_size], pad_id), device)
        with autocast(device):
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        top = supervised_log_probs(logits, batch["labels"], temperature).topk(top_k, dim=-1)
        values.append(top.values.cpu())
        indices.append(top.indices.to(torch.int32).cpu())
        counts += supervised_mask(batch["labels"]).sum(1).tolist()
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts).cumsum(0)
    return {"values": torch.cat(values), "indices": torch.cat(indices), "offsets": offsets}


def save_teacher_top_k(cache: dict[str, torch.Tensor], path: str | Path, examples: list[dict], temperature: float):
    save_row_cache(cache, path, examples, {"temperature": repr(float(temperature)),
                                           "top_k": str(cache["values"].shape[1])})


class TeacherTopK:
    """A loaded cache; `rows(batch)` gives the [n_supervised, k] teacher rows of a training batch, in the
    row-major order of its supervised positions (the order `supervised_log_probs` uses)."""

    def __init__(self, path: str | Path, examples: list[dict], temperature: float):
        path = Path(path)
        tensors, metadata = load_row_cache(path, examples, what=f"teacher logits cache {path}", step="teacher_top_k",
                                           rows="values", made_on="other distillation examples (answers, tokenizer "
                                                                  "or max_len differ)")
        if float(metadata.get("temperature", "nan")) != float(temperature):
            raise ValueError(f"teacher logits cache {path} is at temperature {metadata.get('temperature')}, "
                             f"the recovery asks for {temperature}")
        self.values, self.indices, self.offsets = tensors["values"], tensors["indices"].long(), tensors["offsets"]
        self.top_k = self.values.shape[1]

    def rows(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "index" not in batch:
            raise ValueError("the batch carries no example indices; the cache cannot be matched to it")
        mask = supervised_mask(batch["labels"])
        pieces = []
        for row, example in enumerate(batch["index"].tolist()):
            start, end = int(self.offsets[example]), int(self.offsets[example + 1])
            if end - start != int(mask[row].sum()):
                raise ValueError(f"example {example} has {int(mask[row].sum())} supervised tokens, the cache "
                                 f"{end - start}")
            pieces.append(torch.arange(start, end))
        select = torch.cat(pieces)
        device = batch["labels"].device
        return self.values[select].to(device), self.indices[select].to(device)
