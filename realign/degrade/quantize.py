"""Round-to-nearest (RTN) group-wise weight quantization, and its straight-through fake-quant for training.

Asymmetric min-max quantization per group of `group_size` consecutive input features of each output row:
scale = (max - min) / (2^bits - 1), zero = round(-min / scale), w_q = clamp(round(w / scale) + zero, 0,
2^bits - 1), w_hat = (w_q - zero) * scale. Each group therefore holds at most 2^bits distinct values.

The grid (scale, zero per group) is fixed when the model is quantized and saved with the artifact: recovery
moves weights between points of that grid and never re-fits it, so the recovered model is representable in
exactly the damaged model's integer format.
"""

from __future__ import annotations

import torch

from realign.degrade.targets import damage_targets


def validate_rtn(bits: int, group_size: int, in_features: int | None = None, key: str = "") -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"{key}bits must be an integer in 1..8, got {bits!r}")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"{key}group_size must be an integer >= 2, got {group_size!r}")
    if in_features is not None and in_features % group_size:
        raise ValueError(f"{key}group_size={group_size} does not divide the layer width {in_features}; "
                         f"choose a divisor (e.g. 32 or 64 for SmolLM2's 576)")


def _groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = weight.shape
    return weight.detach().reshape(out_features, in_features // group_size, group_size).to(torch.float64)


def rtn_grid(weight: torch.Tensor, bits: int, group_size: int, key: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) of shape [out_features, in_features / group_size], float64.

    `key` prefixes error messages with the config key the parameters came from."""
    validate_rtn(bits, group_size, weight.shape[1], key=key)
    groups = _groups(weight, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / (2**bits - 1)).clamp_min(1e-12)
    return scale, torch.round(-low / scale)


def fake_quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Snap `weight` onto the given grid (same shape and dtype as `weight`)."""
    group_size = weight.shape[1] // scale.shape[1]
    groups = weight.reshape(weight.shape[0], scale.shape[1], group_size).to(torch.float64)
    q = torch.clamp(torch.round(groups / scale[..., None]) + zero[..., None], 0, 2**bits - 1)
    return ((q - zero[..., None]) * scale[..., None]).reshape(weight.shape).to(weight.dtype)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The dequantized RTN approximation of `weight` on its own min-max grid."""
    scale, zero = rtn_grid(weight, bits, group_size)
    return fake_quantize(weight, scale, zero, bits)


class STEFakeQuant(torch.nn.Module):
    """Parametrization: the forward sees grid weights, the backward passes gradients straight through."""

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("zero", zero, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (fake_quantize(weight, self.scale, self.zero, self.bits) - weight).detach()


def grid_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes [out, in / group_size, group_size] (float64) of `weight` on the grid (scale, zero)."""
    group_size = weight.shape[1] // scale.shape[1]
    return torch.clamp(torch.round(_groups(weight, group_size) / scale[..., None]) + zero[..., None], 0, 2**bits - 1)


class TrainableScales(torch.nn.Module):
    """Parametrization for trainable group scales over frozen integer codes (EfficientQAT's end-to-end step, Chen et
    al. 2024, arXiv 2407.11062): the weight is (codes - zero) x scale, the codes and zeros fixed at the damaged
    model's, each group's scale a parameter. The original weight is not read (recovery freezes it), so training
    moves the scales only, and the model stays in the damage's integer format with its own codes."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
        super().__init__()
        self.register_buffer("codes", grid_codes(weight, scale, zero, bits) - zero[..., None], persistent=False)
        self.scale = torch.nn.Parameter(scale.detach().clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.codes * self.scale[..., None]).reshape(weight.shape).to(weight.dtype)


def quantize_model(model, bits: int, group_size: int, key: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """Quantize every damage target in place; returns (constraint description, {name.scale/name.zero: grid})."""
    grids = {}
    layers = damage_targets(model)
    for name, target in layers.items():  # validate every target before touching any
        validate_rtn(bits, group_size, target.in_features, key=f"{key}({name}) ")
    for name, target in layers.items():
        scale, zero = rtn_grid(target.weight, bits, group_size, key=f"{key}({name}) ")
        target.assign(fake_quantize(target.weight, scale, zero, bits))
        grids[f"{name}.scale"], grids[f"{name}.zero"] = scale, zero
    constraint = {"kind": "grid", "scheme": "rtn-asym-minmax", "bits": bits, "group_size": group_size,
                  "modules": sorted(layers)}
    return constraint, grids


def grid_violation(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> float:
    """Largest distance of a weight from its grid, in grid steps (0 = on the grid, inside its range)."""
    group_size = weight.shape[1] // scale.shape[1]
    q = _groups(weight, group_size) / scale[..., None] + zero[..., None]
    off_grid = (q - torch.round(q)).abs().max()
    out_of_range = torch.clamp(-q, min=0).max().maximum(torch.clamp(q - (2**bits - 1), min=0).max())
    return float(torch.maximum(off_grid, out_of_range))


def levels_per_group(weight: torch.Tensor, group_size: int) -> int:
    """Maximum number of distinct values in any group (for checks and tests)."""
    groups = weight.detach().reshape(-1, group_size)
    return max(int(torch.unique(g).numel()) for g in groups)
