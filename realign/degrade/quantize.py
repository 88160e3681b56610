"""Round-to-nearest (RTN) group-wise weight quantization, and its straight-through fake-quant for training.

Asymmetric min-max quantization per group of `group_size` consecutive input features of each output row:
scale = (max - min) / (2^bits - 1), w_q = clamp(round(w / scale) + zero, 0, 2^bits - 1),
w_hat = (w_q - zero) * scale. Each group therefore holds at most 2^bits distinct values.
"""

from __future__ import annotations

import torch

from realign.degrade.targets import block_linears


def validate_rtn(bits: int, group_size: int, in_features: int | None = None, key: str = "") -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"{key}bits must be an integer in 1..8, got {bits!r}")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"{key}group_size must be an integer >= 2, got {group_size!r}")
    if in_features is not None and in_features % group_size:
        raise ValueError(f"{key}group_size={group_size} does not divide the layer width {in_features}; "
                         f"choose a divisor (e.g. 32 or 64 for SmolLM2's 576)")


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Return the dequantized RTN approximation of `weight` (same shape and dtype)."""
    out_features, in_features = weight.shape
    validate_rtn(bits, group_size, in_features)
    groups = weight.detach().reshape(out_features, in_features // group_size, group_size).to(torch.float64)
    low = groups.amin(dim=-1, keepdim=True)
    high = groups.amax(dim=-1, keepdim=True)
    levels = 2**bits - 1
    scale = ((high - low) / levels).clamp_min(1e-12)
    zero = torch.round(-low / scale)
    q = torch.clamp(torch.round(groups / scale) + zero, 0, levels)
    return ((q - zero) * scale).reshape(out_features, in_features).to(weight.dtype)


class STEFakeQuant(torch.nn.Module):
    """Parametrization: the forward sees quantized weights, the backward passes gradients straight through."""

    def __init__(self, bits: int, group_size: int):
        super().__init__()
        self.bits, self.group_size = bits, group_size

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (rtn_quantize(weight, self.bits, self.group_size) - weight).detach()


def quantize_model(model, bits: int, group_size: int) -> dict:
    """Quantize every block Linear in place; returns the constraint description."""
    layers = block_linears(model)
    for name, linear in layers.items():
        validate_rtn(bits, group_size, linear.in_features, key=f"degradations.*.({name}) ")
        with torch.no_grad():
            linear.weight.copy_(rtn_quantize(linear.weight, bits, group_size))
    return {"kind": "grid", "scheme": "rtn-asym-minmax", "bits": bits, "group_size": group_size,
            "modules": sorted(layers)}


def grid_violation(weight: torch.Tensor, bits: int, group_size: int) -> float:
    """Largest distance of a weight from its group's RTN grid, relative to the grid step (0 = on grid)."""
    out_features, in_features = weight.shape
    groups = weight.detach().reshape(out_features, in_features // group_size, group_size).to(torch.float64)
    step = ((groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / (2**bits - 1)).clamp_min(1e-12)
    requantized = rtn_quantize(weight.detach().to(torch.float64), bits, group_size)
    return float(((weight.detach().to(torch.float64) - requantized).reshape_as(groups).abs() / step).max())


def levels_per_group(weight: torch.Tensor, group_size: int) -> int:
    """Maximum number of distinct values in any group (for checks and tests)."""
    out_features, in_features = weight.shape
    groups = weight.detach().reshape(-1, group_size)
    return max(int(torch.unique(g).numel()) for g in groups)
