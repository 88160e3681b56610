"""N:M semi-structured sparsity: in every run of M consecutive input weights of an output row, at most N are nonzero.

"2:4" is the pattern sparse tensor cores accelerate. Groups run along the input dimension (the columns of a Linear
weight), the dimension the hardware compresses.
"""

from __future__ import annotations

import re

import torch

from realign.degrade.targets import validate_sparsity

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str, key: str = "") -> tuple[int, int]:
    """"2:4" -> (2, 4). `key` prefixes the error message with the config key the pattern came from."""
    match = _PATTERN.match(pattern) if isinstance(pattern, str) else None
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"{key}pattern must look like 'N:M' with integers 0 < N < M (e.g. '2:4'), got {pattern!r}")
    return int(match[1]), int(match[2])


def _check_width(tensor: torch.Tensor, m: int) -> None:
    if tensor.dim() != 2 or tensor.shape[1] % m:
        raise ValueError(f"N:M groups of {m} need a 2-D tensor whose width is divisible by {m}, "
                         f"got shape {tuple(tensor.shape)}")


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean keep-mask holding the `n` highest-scoring entries of every `m` consecutive columns of each row.

    Ties go to the earlier column, so the mask is deterministic."""
    _check_width(score, m)
    rows, cols = score.shape
    groups = score.detach().reshape(rows, cols // m, m)
    keep_idx = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., :n]
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=score.device)
    keep.scatter_(-1, keep_idx, True)
    return keep.reshape(rows, cols)


def nm_violations(weight_or_mask: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of `m` consecutive columns holding more than `n` nonzeros (True counts as nonzero)."""
    _check_width(weight_or_mask, m)
    nonzero = (weight_or_mask.detach() != 0).reshape(-1, m)
    return int((nonzero.sum(dim=-1) > n).sum())


def resolve_target(sparsity, pattern, key: str = "") -> tuple[float, tuple[int, int] | None]:
    """Exactly one of `sparsity` (unstructured, 0 < s < 1) and `pattern` ("N:M") must be given.

    Returns (target sparsity, (n, m) or None); an N:M pattern has sparsity 1 - n/m."""
    if (sparsity is None) == (pattern is None):
        raise ValueError(f"give exactly one of {key}sparsity (unstructured fraction) and {key}pattern "
                         f"(N:M, e.g. '2:4'), got sparsity={sparsity!r}, pattern={pattern!r}")
    if pattern is None:
        validate_sparsity(sparsity, key=f"{key}sparsity")
        return float(sparsity), None
    n, m = parse_pattern(pattern, key=key)
    return 1 - n / m, (n, m)


def check_widths(modules: dict, m: int, key: str = "") -> None:
    """Every target's (targets.Target) input width must split into whole groups of m."""
    for name, module in modules.items():
        if module.in_features % m:
            raise ValueError(f"{key}pattern: group size M={m} does not divide the input width {module.in_features} "
                             f"of {name}")
