"""Per-example row caches: tensors computed once on a list of tokenized examples (the teacher's top-k
log-probabilities on the distillation answers, its logits on the divergence examples) and read by every later
job. The rows of example i are rows offsets[i]:offsets[i + 1] of the `rows` tensor; the file's metadata carries
a fingerprint of the examples' token ids and labels, so a cache made on other examples (other prompts, another
tokenizer, another max_len) is refused instead of silently misaligned. One format, one check, for both caches.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from realign.io import load_checked_tensors, save_checked_tensors


def examples_fingerprint(examples: list[dict]) -> str:
    """sha256 of the examples' token ids and labels, in order."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(e["input_ids"].numpy().astype("int64").tobytes())
        digest.update(e["labels"].numpy().astype("int64").tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def save_row_cache(tensors: dict[str, torch.Tensor], path: str | Path, examples: list[dict],
                   metadata: dict[str, str]) -> None:
    """Write `tensors` (with an `offsets` entry) atomically, digested, with the examples' fingerprint."""
    save_checked_tensors(tensors, path, {"fingerprint": examples_fingerprint(examples), **metadata})


def load_row_cache(path: str | Path, examples: list[dict], *, what: str, step: str, rows: str,
                   made_on: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a cache written by save_row_cache, checked against its digest, against `examples`
    (`made_on` names what differs when the fingerprint does, e.g. "other divergence examples (...)") and for
    consistent offsets over the `rows` tensor; every error names the file (`what`) and the `step` to rerun."""
    tensors, metadata = load_checked_tensors(path, what, step)
    if metadata.get("fingerprint") != examples_fingerprint(examples):
        raise ValueError(f"{what} was computed on {made_on}; delete it and rerun the {step} step")
    if rows not in tensors or "offsets" not in tensors:
        raise ValueError(f"{what} holds {sorted(tensors)}, not {rows} and offsets; delete it and rerun the {step} "
                         "step")
    values, offsets = tensors[rows], tensors["offsets"]
    counts = offsets[1:] - offsets[:-1]
    if len(counts) != len(examples) or int(offsets[0]) != 0 or int(offsets[-1]) != len(values) \
            or bool((counts < 0).any()):
        raise ValueError(f"{what} is inconsistent: {len(counts)} examples, {int(offsets[-1])} rows indexed, "
                         f"{len(values)} stored; delete it and rerun the {step} step")
    return tensors, metadata
