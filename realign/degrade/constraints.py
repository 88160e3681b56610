"""The constraint a damaged model must keep through recovery, or recovery would just undo the damage.

- `none`:     nothing to keep (forgetting, the teacher).
- `grid`:     every block Linear stays on its integer affine grid (RTN, GPTQ); straight-through fake quantization.
- `fp4-grid`: every block Linear stays on its NVFP4 grid (E2M1 values x fixed FP8 block scales x FP32 scale).
- `mask`:     every pruned weight stays exactly zero (and an N:M pattern stays N:M); training multiplies by the mask.
- `frozen`:   a bitsandbytes-quantized base that cannot change at all; training adds LoRA adapters (QLoRA).

The grids, scales and masks are fixed when the model is damaged and saved with the artifact
(`constraint.safetensors`); recovery never re-fits them, and `check` re-verifies them on every saved artifact.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from realign.degrade.targets import block_linears

NO_CONSTRAINT = {"kind": "none"}
KINDS = ("none", "grid", "fp4-grid", "mask", "frozen")
# Relative distance (in grid steps) tolerated from float rounding when re-checking a saved grid.
GRID_TOLERANCE = 1e-3


class ConstraintViolation(RuntimeError):
    pass


def _kind(constraint: dict) -> str:
    kind = constraint.get("kind", "none")
    if kind not in KINDS:
        raise ValueError(f"unknown constraint kind {kind!r}; known: {', '.join(KINDS)}")
    return kind


def _parametrization(kind: str, name: str, constraint: dict, tensors: dict, device) -> torch.nn.Module:
    if kind == "grid":
        from realign.degrade.quantize import STEFakeQuant

        return STEFakeQuant(tensors[f"{name}.scale"], tensors[f"{name}.zero"], constraint["bits"])
    if kind == "fp4-grid":
        from realign.degrade.nvfp4 import STENVFP4

        return STENVFP4(tensors[f"{name}.block_scale"], tensors[f"{name}.global_scale"])
    from realign.degrade.prune import ApplyMask

    return ApplyMask(tensors[name].to(device))


def attach(model, constraint: dict, tensors: dict[str, torch.Tensor], seed: int = 0):
    """Prepare `model` for training under the constraint; returns the model to train.

    Grids and masks become parametrizations of the same model; a frozen base is wrapped in LoRA adapters
    (a new PeftModel object). `tensors` holds the constraint's data by module name.
    """
    kind = _kind(constraint)
    if kind == "none":
        return model
    if kind == "frozen":
        from realign.degrade.bnb import attach_lora

        return attach_lora(model, constraint["lora"], seed=seed)
    layers = block_linears(model)
    for name in constraint["modules"]:
        if name not in layers:
            raise ConstraintViolation(f"constraint names module {name!r} which the model does not have")
        module = _parametrization(kind, name, constraint, tensors, layers[name].weight.device)
        parametrize.register_parametrization(layers[name], "weight", module)
    return model


def detach(model) -> None:
    """Bake the constrained weights in (quantized / masked values) and remove the parametrizations."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def baked_copy(model):
    """A separate model with the constrained weights baked in, leaving `model` (and its training) untouched.

    Not `copy.deepcopy`: a deep copy shares the parametrized module classes, so removing the copy's
    parametrizations would remove the original's too."""
    state = {}
    for key, value in model.state_dict().items():
        if ".parametrizations." not in key:
            state[key] = value.detach().clone()
        elif key.endswith(".parametrizations.weight.original"):
            module_name = key[: -len(".parametrizations.weight.original")]
            state[f"{module_name}.weight"] = model.get_submodule(module_name).weight.detach().clone()
    copy = type(model)(model.config)
    copy.load_state_dict(state, strict=True)
    return copy.to(next(model.parameters()).device).eval()


def _check_mask(name: str, weight: torch.Tensor, mask: torch.Tensor, pattern: str | None) -> None:
    nonzero_pruned = int((weight[~mask] != 0).sum())
    if nonzero_pruned:
        raise ConstraintViolation(f"{name}: {nonzero_pruned} pruned weights are no longer zero")
    if pattern:
        from realign.degrade.nm import nm_violations, parse_pattern

        n, m = parse_pattern(pattern)
        bad = nm_violations(weight, n, m)
        if bad:
            raise ConstraintViolation(f"{name}: {bad} groups of {m} weights have more than {n} nonzeros "
                                      f"(pattern {pattern})")


def check(model, constraint: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Verify the weights satisfy the constraint; raise ConstraintViolation naming the first bad module."""
    kind = _kind(constraint)
    if kind == "none":
        return {"kind": "none", "ok": True}
    if kind == "frozen":
        from realign.degrade.bnb import base_digests

        digests = base_digests(model)
        expected = constraint["digests"]
        if sorted(digests) != sorted(expected):
            raise ConstraintViolation(f"quantized layers differ from the saved base: expected {len(expected)}, "
                                      f"found {len(digests)}")
        changed = [name for name in expected if digests[name] != expected[name]]
        if changed:
            raise ConstraintViolation(f"{changed[0]}: the frozen quantized base weights changed "
                                      f"({len(changed)} layers differ from their saved digest)")
        return {"kind": kind, "ok": True, "modules_checked": len(expected)}
    layers = block_linears(model)
    worst = 0.0
    for name in constraint["modules"]:
        weight = layers[name].weight.detach()
        if kind == "grid":
            from realign.degrade.quantize import grid_violation

            violation = grid_violation(weight, tensors[f"{name}.scale"], tensors[f"{name}.zero"],
                                       constraint["bits"])
        elif kind == "fp4-grid":
            from realign.degrade.nvfp4 import nvfp4_violation

            violation = nvfp4_violation(weight, tensors[f"{name}.block_scale"], tensors[f"{name}.global_scale"])
        else:
            _check_mask(name, weight, tensors[name], constraint.get("pattern"))
            continue
        worst = max(worst, violation)
        if violation > GRID_TOLERANCE:
            raise ConstraintViolation(f"{name}: weights are {violation:.3g} grid steps off their saved "
                                      f"{constraint.get('scheme', kind)} grid")
    result = {"kind": kind, "ok": True, "modules_checked": len(constraint["modules"])}
    if kind in ("grid", "fp4-grid"):
        result["max_grid_violation_steps"] = worst
    return result
