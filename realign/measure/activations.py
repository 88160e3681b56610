"""Hidden states of every layer on a fixed probe set, at sampled token positions, cached as safetensors.

Position 0 is never sampled: attention-sink tokens carry massive activations that would dominate CKA. The
sampled positions depend only on the probe token ids and the seed, so every artifact of a model (same
tokenizer) is measured at exactly the same tokens, which is what CKA against the teacher requires.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from realign.device import autocast, keep_logits, model_device
from realign.io import atomic_path, check_tensors_digest, tensors_sha256

FLOAT16_MAX = 65504.0


def sample_positions(lengths: list[int], per_sequence: int, seed: int) -> list[tuple[int, int]]:
    """(sequence, position) pairs: up to `per_sequence` distinct positions in 1..len-1 of each sequence."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for seq, length in enumerate(lengths):
        candidates = torch.arange(1, length)
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:per_sequence]]
        pairs += [(seq, int(p)) for p in sorted(chosen.tolist())]
    return pairs


@torch.no_grad()
def capture(model, sequences: list[torch.Tensor], per_sequence: int, seed: int) -> dict[str, torch.Tensor]:
    """Returns {"layer.{i}": [n_tokens, d] float32 for i in 0..L (0 = embeddings), "token_index": [n, 2]}."""
    model.eval()
    device = model_device(model)
    pairs = sample_positions([len(s) for s in sequences], per_sequence, seed)
    by_sequence: dict[int, list[int]] = {}
    for seq, pos in pairs:
        by_sequence.setdefault(seq, []).append(pos)
    layers: list[list[torch.Tensor]] | None = None
    for seq, positions in by_sequence.items():
        with autocast(device):
            # Only the hidden states are kept: the LM head runs on the last position alone.
            hidden = model(input_ids=sequences[seq][None].to(device), output_hidden_states=True,
                           **keep_logits(model, 1)).hidden_states
        if layers is None:
            layers = [[] for _ in hidden]
        for i, h in enumerate(hidden):
            layers[i].append(h[0, positions].float().cpu())
    if layers is None:
        raise ValueError("probe set is empty or every probe sequence has a single token")
    out = {f"layer.{i}": torch.cat(chunks) for i, chunks in enumerate(layers)}
    out["token_index"] = torch.tensor(pairs, dtype=torch.long)
    return out


def save_activations(activations: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """float16 storage, or bfloat16 where some activation exceeds float16's range; a content digest goes in the
    metadata so that a corrupted cache is an error, not a silently wrong CKA."""
    biggest = max(float(v.abs().max()) for k, v in activations.items() if k.startswith("layer."))
    dtype = torch.float16 if biggest < FLOAT16_MAX else torch.bfloat16
    tensors = {k: (v.to(dtype) if k.startswith("layer.") else v).contiguous() for k, v in activations.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**metadata, "storage_dtype": str(dtype), "sha256": tensors_sha256(tensors)})


def load_activations(path: str | Path) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(per-layer tensors in layer order, token_index); a truncated, corrupted or incomplete file is a clear error.

    A cache without its digest (written before digests existed, or not by save_activations) is an error too."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            expected = (f.metadata() or {}).get("sha256")
    except (SafetensorError, OSError) as err:
        raise RuntimeError(f"activation cache {path} is unreadable (truncated or corrupted?): {err}") from err
    check_tensors_digest(tensors, expected, f"activation cache {path}", "activations")
    n_layers = sum(1 for k in tensors if k.startswith("layer."))
    missing = [k for k in ["token_index", *(f"layer.{i}" for i in range(n_layers))] if k not in tensors]
    if missing or n_layers == 0:
        raise RuntimeError(f"activation cache {path} is incomplete: missing {', '.join(missing) or 'every layer'} "
                           f"(has {', '.join(sorted(tensors)) or 'nothing'})")
    return [tensors[f"layer.{i}"] for i in range(n_layers)], tensors["token_index"]
