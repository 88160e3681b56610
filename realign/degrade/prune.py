"""Magnitude pruning of each damage target (targets.py): unstructured (the `sparsity` fraction of smallest |w|
per layer) or N:M semi-structured (the n largest |w| kept in every m consecutive input weights of a row)."""

from __future__ import annotations

import torch

from realign.degrade.targets import damage_targets, validate_sparsity


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask with exactly round(sparsity * numel) zeros (ties broken by position)."""
    validate_sparsity(sparsity)
    n_prune = int(round(sparsity * weight.numel()))
    order = torch.argsort(weight.detach().abs().flatten(), stable=True)
    keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    keep[order[:n_prune]] = False
    return keep.reshape(weight.shape)


def prune_model(model, sparsity: float | None = None, pattern: str | None = None,
                key: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """Prune in place; returns (constraint description, {module name: keep-mask})."""
    from realign.degrade.nm import check_widths, nm_mask, resolve_target

    target, nm = resolve_target(sparsity, pattern, key=key)
    layers = damage_targets(model)
    if not layers:
        raise ValueError(f"{key}method: {type(model).__name__} has no weight matrix to prune (no damage target)")
    if nm is not None:
        check_widths(layers, nm[1], key=key)
    masks = {}
    for name, layer in layers.items():
        weight = layer.weight.detach()
        mask = magnitude_mask(weight, target) if nm is None else nm_mask(weight.abs(), *nm)
        layer.assign(weight * mask)
        masks[name] = mask
    return mask_constraint("magnitude", nm, target, masks), masks


def mask_constraint(scheme: str, nm: tuple[int, int] | None, target: float, masks: dict[str, torch.Tensor],
                    **extra) -> dict:
    """The `mask` constraint description shared by every pruning method (`extra`: e.g. its calibration)."""
    if not masks:
        raise ValueError(f"{scheme} pruning found no weight matrix to prune (no damage target)")
    kept = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    return {"kind": "mask", "scheme": scheme, "pattern": None if nm is None else f"{nm[0]}:{nm[1]}",
            "sparsity": float(target), "achieved_sparsity": 1 - kept / total, **extra, "modules": sorted(masks)}


class ApplyMask(torch.nn.Module):
    """Parametrization that keeps pruned weights at exactly zero (and their gradients at zero)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask
