"""Unstructured magnitude pruning: in each block Linear, zero the `sparsity` fraction of smallest |w|."""

from __future__ import annotations

import torch

from realign.degrade.targets import block_linears


def validate_sparsity(sparsity, key: str = "sparsity") -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise ValueError(f"{key} must be a number strictly between 0 and 1, got {sparsity!r}")


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask with exactly round(sparsity * numel) zeros (ties broken by position)."""
    validate_sparsity(sparsity)
    n_prune = int(round(sparsity * weight.numel()))
    order = torch.argsort(weight.detach().abs().flatten(), stable=True)
    keep = torch.ones(weight.numel(), dtype=torch.bool)
    keep[order[:n_prune]] = False
    return keep.reshape(weight.shape)


def prune_model(model, sparsity: float) -> tuple[dict, dict[str, torch.Tensor]]:
    """Prune in place; returns (constraint description, {module name: keep-mask})."""
    masks = {}
    for name, linear in block_linears(model).items():
        mask = magnitude_mask(linear.weight, sparsity)
        with torch.no_grad():
            linear.weight.mul_(mask)
        masks[name] = mask
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return {"kind": "mask", "scheme": "magnitude-unstructured", "sparsity": float(sparsity),
            "achieved_sparsity": 1 - kept / total, "modules": sorted(masks)}, masks


class ApplyMask(torch.nn.Module):
    """Parametrization that keeps pruned weights at exactly zero (and their gradients at zero)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask
