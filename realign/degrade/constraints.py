"""The constraint a damaged model must keep through recovery, or recovery would just undo the damage.

- `none`: nothing to keep (forgetting, the teacher).
- `grid`: every block Linear stays on its RTN grid; training goes through straight-through fake quantization.
- `mask`: every pruned weight stays exactly zero; training multiplies by the mask.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from realign.degrade.prune import ApplyMask
from realign.degrade.quantize import STEFakeQuant, grid_violation
from realign.degrade.targets import block_linears

NO_CONSTRAINT = {"kind": "none"}
# Relative distance (in grid steps) tolerated from float rounding when re-checking a saved grid.
GRID_TOLERANCE = 1e-3


class ConstraintViolation(RuntimeError):
    pass


def attach(model, constraint: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Register the parametrizations that make training respect the constraint.

    `tensors` holds the constraint's data: keep-masks by module name, or `{name}.scale` / `{name}.zero` grids.
    """
    kind = constraint.get("kind", "none")
    if kind == "none":
        return
    layers = block_linears(model)
    for name in constraint["modules"]:
        if name not in layers:
            raise ConstraintViolation(f"constraint names module {name!r} which the model does not have")
        if kind == "grid":
            module = STEFakeQuant(tensors[f"{name}.scale"], tensors[f"{name}.zero"], constraint["bits"])
        elif kind == "mask":
            module = ApplyMask(tensors[name].to(layers[name].weight.device))
        else:
            raise ValueError(f"unknown constraint kind {kind!r}")
        parametrize.register_parametrization(layers[name], "weight", module)


def detach(model) -> None:
    """Bake the constrained weights in (quantized / masked values) and remove the parametrizations."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def check(model, constraint: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Verify the weights satisfy the constraint; raise ConstraintViolation naming the first bad module."""
    kind = constraint.get("kind", "none")
    if kind == "none":
        return {"kind": "none", "ok": True}
    layers = block_linears(model)
    worst = 0.0
    for name in constraint["modules"]:
        weight = layers[name].weight.detach()
        if kind == "grid":
            violation = grid_violation(weight, tensors[f"{name}.scale"], tensors[f"{name}.zero"],
                                       constraint["bits"])
            worst = max(worst, violation)
            if violation > GRID_TOLERANCE:
                raise ConstraintViolation(f"{name}: weights are {violation:.3g} grid steps off their saved "
                                          f"{constraint['bits']}-bit RTN grid")
        elif kind == "mask":
            mask = tensors[name]
            nonzero_pruned = int((weight[~mask] != 0).sum())
            if nonzero_pruned:
                raise ConstraintViolation(f"{name}: {nonzero_pruned} pruned weights are no longer zero")
    return {"kind": kind, "ok": True, "modules_checked": len(constraint["modules"]),
            **({"max_grid_violation_steps": worst} if kind == "grid" else {})}
