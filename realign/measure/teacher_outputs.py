"""The teacher's next-token logits on the divergence examples, computed once per model and read by the divergence
job of every artifact, so that job runs the artifact alone.

The cache holds, for the supervised positions of each example in order (the row-major order of
`logits[:, :-1][labels[:, 1:] != -100]`), the teacher's logits over the full vocabulary as the model computed
them, in float32 (exact for float32 and bfloat16 outputs); `offsets[i]` is where example i's rows start. The
reader normalises them in float64 (log_softmax), exactly as the two-model computation does, so the numbers equal
it. A fingerprint of the examples' token ids and labels (which depend on the prompts, the tokenizer and max_len)
is stored with them: a cache made on other examples is refused. Size: rows x vocabulary x 4 bytes (24 prompts of
~100 answer tokens x 49152 = ~0.5 GB for SmolLM2).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from realign.data.sequences import IGNORE, collate
from realign.device import autocast, model_device, on_device
from realign.data.row_cache import load_row_cache, save_row_cache

STEP = "teacher_outputs"


@torch.no_grad()
def compute_teacher_outputs(teacher, examples: list[dict], pad_id: int, batch_size: int = 8,
                            precision: str | None = None) -> dict[str, torch.Tensor]:
    """{"logits": [n_supervised, vocab] float32, "offsets": [n_examples + 1] int64}, batched as the divergence
    job batches the artifact (same `batch_size`, same padding)."""
    teacher.eval()
    device = model_device(teacher)
    rows, counts = [], []
    for start in tqdm(range(0, len(examples), batch_size), desc="teacher outputs", file=sys.stderr, ascii=True):
        batch = on_device(collate(examples[start:start + batch_size], pad_id), device)
        mask = batch["labels"][:, 1:] != IGNORE
        with autocast(device, precision):
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows.append(logits[:, :-1][mask].float().cpu())
        counts += mask.sum(1).tolist()
    if not rows:
        raise ValueError("no divergence examples to run the teacher on (data.prompt_splits.divergence is 0?)")
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    return {"logits": torch.cat(rows), "offsets": offsets}


def save_teacher_outputs(outputs: dict[str, torch.Tensor], path: str | Path, examples: list[dict],
                         teacher: str = "", precision: str = "float32") -> None:
    save_row_cache(outputs, path, examples, {"n_examples": str(len(examples)), "teacher": str(teacher),
                                            "precision": precision})


def load_teacher_outputs(path: str | Path, examples: list[dict], precision: str | None = None) -> dict[str, torch.Tensor]:
    """The cache at `path`, checked against its digest and against `examples` (the divergence job's own, made with
    the artifact's tokenizer): a truncated, corrupted or inconsistent cache, or one made on other examples or (when
    `precision` is given) in another precision than the artifact's forward, is an error naming the file."""
    path = Path(path)
    what = f"teacher outputs cache {path}"
    tensors, metadata = load_row_cache(path, examples, what=what, step=STEP, rows="logits",
                                made_on="other divergence examples (the prompts in prompts.json, the tokenizer or "
                                        "training.max_len differ)")
    logits = tensors["logits"]
    if set(tensors) != {"logits", "offsets"} or logits.dtype != torch.float32 or logits.dim() != 2:
        raise ValueError(f"{what} holds {sorted(tensors)} with logits {tuple(logits.shape)} as {logits.dtype}, not "
                         f"float32 [rows, vocab] logits and offsets; delete it and rerun the {STEP} step")
    if precision is not None and metadata.get("precision") != precision:
        raise ValueError(f"{what} was computed in {metadata.get('precision', 'an unrecorded precision')}, the "
                         f"artifact runs in {precision} (measure.dtype): both sides of the divergence must run in "
                         f"one precision; rerun the {STEP} step")
    return {"logits": logits, "offsets": tensors["offsets"]}
