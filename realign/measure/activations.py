"""Hidden states of every layer on a fixed probe set, at sampled token positions, cached as safetensors.

Only positions that carry a probe sequence's own content are sampled: tokens of its instruction or reference
answer, never the chat template's shared prefix (system prompt, role and control tokens, generation prompt), whose
hidden states repeat in every sequence and would enter the bootstrap over sequences as independent tokens. For the
same reason a position whose prefix (token ids up to and including it) another probe sequence shares is never
sampled, and position 0 never is: attention-sink tokens carry massive activations that would dominate CKA. The
sampled positions depend only on the probe token ids, their content masks and the seed, so every artifact of a
model (same tokenizer) is measured at exactly the same tokens, which is what CKA against the teacher requires.
"""

from __future__ import annotations

from pathlib import Path

import torch

from realign.device import autocast, keep_logits, model_device
from realign.io import load_checked_tensors, save_checked_tensors

FLOAT16_MAX = 65504.0
# Shorter probe sequences run alone, never batched: a GEMM's rows are not always independent of how many rows it
# has. On the default study's CPU (torch 2.13, MKL) a product of 1-3, 5-7 or 9-11 rows gave other last bits than the
# same rows inside a larger product, so a short sequence alone (few rows) and batched (many) differed.
MIN_BATCHED_TOKENS = 32


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def content_positions(sequences: list[torch.Tensor], content: list[torch.Tensor]) -> list[list[int]]:
    """Per sequence, the positions that may be sampled: content tokens (`content[i]`, a bool mask), not position
    0, and not shared with another sequence (a position p is shared when another sequence has the same ids[:p+1],
    hence the same hidden state). A sequence with no position left is a ValueError."""
    ids = [s.tolist() for s in sequences]
    # The longest prefix a sequence shares with any other is the longest it shares with a neighbour in sort order.
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    shared = [0] * len(ids)
    for a, b in zip(order, order[1:]):
        n = _common_prefix(ids[a], ids[b])
        shared[a], shared[b] = max(shared[a], n), max(shared[b], n)
    positions = []
    for i, mask in enumerate(content):
        if len(mask) != len(ids[i]):
            raise ValueError(f"probe sequence {i}: {len(mask)} content flags for {len(ids[i])} tokens")
        eligible = [p for p in range(max(1, shared[i]), len(ids[i])) if mask[p]]
        if not eligible:
            raise ValueError(f"probe sequence {i} has no token of its own content to measure: of its {len(ids[i])} "
                             f"tokens, {int(mask.sum())} carry instruction or answer text and the first {shared[i]} "
                             "are shared with another probe sequence")
        positions.append(eligible)
    return positions


def sample_positions(candidates: list[list[int]], per_sequence: int, seed: int) -> list[tuple[int, int]]:
    """(sequence, position) pairs: up to `per_sequence` distinct positions of each sequence's `candidates`."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for seq, eligible in enumerate(candidates):
        chosen = torch.tensor(eligible, dtype=torch.long)[torch.randperm(len(eligible), generator=generator)]
        pairs += [(seq, int(p)) for p in sorted(chosen[:per_sequence].tolist())]
    return pairs


def _routes_to_experts(model) -> bool:
    """Whether the model has mixture-of-experts layers: its config counts experts, or it has transformers'
    experts modules (as realign.degrade.targets recognises them)."""
    from realign.degrade.targets import _is_experts
    from realign.models.checks import facts_from_config

    return facts_from_config(model.config.to_dict()).experts is not None or any(map(_is_experts, model.modules()))


@torch.no_grad()
def capture(model, sequences: list[torch.Tensor], pairs: list[tuple[int, int]],
            batch_size: int = 16, precision: str | None = None) -> dict[str, torch.Tensor]:
    """Hidden states at the (sequence, position) `pairs` (sample_positions): {"layer.{i}": [n_tokens, d] float32
    for i in 0..L (0 = embeddings, L = the final post-norm state), "token_index": [n, 2]}.

    On CPU, sequences of equal length (most probe sequences are cut at the same token budget) of a dense model,
    of at least MIN_BATCHED_TOKENS tokens, run together, up to `batch_size` at a time and without padding: each
    row's hidden states were the same to the last bit as when the sequence runs alone (tests/test_measure.py, and
    SmolLM2-135M on the default probe set; an empirical property of the CPU's GEMMs, not a guarantee), and a batch
    of 128-token sequences ran ~5x faster on the default study's machine than one sequence at a time. Otherwise
    every sequence runs alone, as before: a short sequence's GEMMs have few rows, whose last bits changed with the
    row count (MIN_BATCHED_TOKENS); a mixture-of-experts layer groups the batch's tokens per expert, which changed
    the last bits on Mixtral; and batched bf16 GEMMs on a GPU may round differently (not checked). `precision`:
    realign.device.autocast's (measure.dtype, resolved)."""
    model.eval()
    device = model_device(model)
    by_sequence: dict[int, list[int]] = {}
    for seq, pos in pairs:
        by_sequence.setdefault(seq, []).append(pos)
    if torch.device(device).type != "cpu" or _routes_to_experts(model):
        batch_size = 1
    same_length: dict[int, list[int]] = {}
    for seq in by_sequence:
        same_length.setdefault(len(sequences[seq]), []).append(seq)
    picked: dict[int, list[torch.Tensor]] = {}  # sequence -> its sampled positions' hidden states, per layer
    for length, members in same_length.items():
        step = batch_size if length >= MIN_BATCHED_TOKENS else 1
        for start in range(0, len(members), step):
            chunk = members[start:start + step]
            with autocast(device, precision):
                # Only the hidden states are kept: the LM head runs on the last position alone.
                hidden = model(input_ids=torch.stack([sequences[seq] for seq in chunk]).to(device),
                               output_hidden_states=True, **keep_logits(model, 1)).hidden_states
            for row, seq in enumerate(chunk):
                picked[seq] = [h[row, by_sequence[seq]].float().cpu() for h in hidden]
    if not picked:
        raise ValueError("no probe position to capture: the probe set is empty")
    n_layers = len(next(iter(picked.values())))
    out = {f"layer.{i}": torch.cat([picked[seq][i] for seq in by_sequence]) for i in range(n_layers)}
    out["token_index"] = torch.tensor(pairs, dtype=torch.long)
    return out


def save_activations(activations: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """float16 storage, or bfloat16 where some activation exceeds float16's range; a content digest goes in the
    metadata so that a corrupted cache is an error, not a silently wrong CKA."""
    biggest = max(float(v.abs().max()) for k, v in activations.items() if k.startswith("layer."))
    dtype = torch.float16 if biggest < FLOAT16_MAX else torch.bfloat16
    tensors = {k: (v.to(dtype) if k.startswith("layer.") else v) for k, v in activations.items()}
    save_checked_tensors(tensors, path, {**metadata, "storage_dtype": str(dtype)})


def load_activations(path: str | Path) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(per-layer tensors in layer order, token_index); a truncated, corrupted or incomplete file is a clear error.

    A cache without its digest (written before digests existed, or not by save_activations) is an error too."""
    tensors, _ = load_checked_tensors(path, f"activation cache {path}", "activations")
    n_layers = sum(1 for k in tensors if k.startswith("layer."))
    missing = [k for k in ["token_index", *(f"layer.{i}" for i in range(n_layers))] if k not in tensors]
    if missing or n_layers == 0:
        raise RuntimeError(f"activation cache {path} is incomplete: missing {', '.join(missing) or 'every layer'} "
                           f"(has {', '.join(sorted(tensors)) or 'nothing'})")
    return [tensors[f"layer.{i}"] for i in range(n_layers)], tensors["token_index"]
