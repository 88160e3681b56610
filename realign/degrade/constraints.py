"""The constraint a damaged model must keep through recovery, or recovery would just undo the damage.

- `none`:     nothing to keep (forgetting, the teacher).
- `grid`:     every damage target stays on its integer affine grid (RTN, GPTQ); straight-through fake quantization.
- `fp4-grid`: every damage target stays on its NVFP4 grid (E2M1 values x fixed FP8 block scales x FP32 scale).
- `mask`:     every pruned weight stays exactly zero (and an N:M pattern stays N:M); training multiplies by the mask.
- `frozen`:   a bitsandbytes-quantized base that cannot change at all; training adds LoRA adapters (QLoRA).

The grids, scales and masks are fixed when the model is damaged and saved with the artifact
(`constraint.safetensors`); recovery never re-fits them, and `check` re-verifies them on every saved artifact.

Targets (targets.py) are Linear and Conv1D weights and each expert matrix of stacked MoE weights. Grids and masks
are stored per target in its [out, in] orientation; the parametrization of a Conv1D weight ([in, out]) transposes
around it, and that of a stacked [E, ...] expert parameter applies each expert's own.
A constraint must cover every target of the model and at least one: a check over nothing proves nothing.

How much of the damage a recovery changed is counted in touched.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.utils import parametrize

from realign.degrade.targets import damage_targets, targets_by_parameter

NO_CONSTRAINT = {"kind": "none"}
# Relative distance (in grid steps) tolerated from float rounding when re-checking a saved grid.
GRID_TOLERANCE = 1e-3


class ConstraintViolation(RuntimeError):
    pass


def constraint_kind(constraint: dict) -> str:
    kind = constraint.get("kind", "none")
    if kind not in KINDS:
        raise ValueError(f"unknown constraint kind {kind!r}; known: {', '.join(KINDS)}")
    return kind


TRAINED_SCALES = "scales"  # constraint["trained"]: the grid's scales train over frozen codes (TrainableScales)
TRAINED_LORA = "lora"  # constraint["trained"]: LoRA adapters train over the frozen grid (QLoRA-style, unmerged)


def keeps_adapters(constraint: dict) -> bool:
    """Whether the recovered model is a frozen base plus LoRA adapters (a bitsandbytes base, or a grid with
    `quantized_training: lora`): it is saved as base + adapter/, never baked."""
    return constraint.get("kind") == "frozen" or constraint.get("trained") == TRAINED_LORA


def adapter_base_targets(model) -> dict[str, torch.Tensor]:
    """The [out, in] base weights under a PeftModel's LoRA layers, by the plain model's module name."""
    return {name.removeprefix("base_model.model.").removesuffix(".base_layer"): module.weight
            for name, module in model.named_modules()
            if name.endswith(".base_layer") and isinstance(module, torch.nn.Linear)}


def _grid_parametrization(name: str, constraint: dict, tensors: dict, device, weight=None) -> torch.nn.Module:
    from realign.degrade.quantize import STEFakeQuant, TrainableScales

    scale, zero = tensors[f"{name}.scale"].to(device), tensors[f"{name}.zero"].to(device)
    if constraint.get("trained") == TRAINED_SCALES:
        return TrainableScales(weight, scale, zero, constraint["bits"])
    return STEFakeQuant(scale, zero, constraint["bits"])


def _grid_violation(name: str, weight: torch.Tensor, constraint: dict, tensors: dict) -> float:
    from realign.degrade.quantize import grid_violation

    return grid_violation(weight, tensors[f"{name}.scale"], tensors[f"{name}.zero"], constraint["bits"])


def _fp4_parametrization(name: str, constraint: dict, tensors: dict, device, weight=None) -> torch.nn.Module:
    from realign.degrade.nvfp4 import STENVFP4

    return STENVFP4(tensors[f"{name}.block_scale"].to(device), tensors[f"{name}.global_scale"].to(device))


def _fp4_violation(name: str, weight: torch.Tensor, constraint: dict, tensors: dict) -> float:
    from realign.degrade.nvfp4 import nvfp4_violation

    return nvfp4_violation(weight, tensors[f"{name}.block_scale"], tensors[f"{name}.global_scale"])


def _mask_parametrization(name: str, constraint: dict, tensors: dict, device, weight=None) -> torch.nn.Module:
    from realign.degrade.prune import ApplyMask

    return ApplyMask(tensors[name].to(device))


def _mask_violation(name: str, weight: torch.Tensor, constraint: dict, tensors: dict) -> float:
    _check_mask(name, weight, tensors[name], constraint.get("pattern"))  # raises on a violation
    return 0.0


def _all_values(name: str, tensors: dict) -> None:
    return None


def _kept_values(name: str, tensors: dict) -> torch.Tensor:
    return tensors[name].to("cpu", torch.bool)


@dataclass(frozen=True)
class TargetKind:
    """A constraint enforced on each targeted weight matrix: the parametrization that keeps it during training
    (of the [out, in] matrix), the re-check of a saved or trained weight (its distance from the constraint in
    grid steps; a mask raises instead) and the values the damage left free to change (`free(name, tensors)`: an
    [out, in] boolean mask, or None for every value), which `damage_touched` counts."""

    name: str
    parametrization: Callable
    violation: Callable
    grid: bool  # a grid whose violations are measured in steps and reported
    free: Callable = _all_values


# Constraint kinds: "none" and "frozen" (a bitsandbytes base, LoRA adapters trained) act on the whole model; the
# others are enforced per targeted matrix, one entry each here. Adding a kind is one entry plus its two functions
# (three where recovery may change only some of a target's values).
TARGET_KINDS: dict[str, TargetKind] = {k.name: k for k in (
    TargetKind("grid", _grid_parametrization, _grid_violation, grid=True),
    TargetKind("fp4-grid", _fp4_parametrization, _fp4_violation, grid=True),
    TargetKind("mask", _mask_parametrization, _mask_violation, grid=False, free=_kept_values),
)}
KINDS = ("none", *TARGET_KINDS, "frozen")


def _parametrization(kind: str, name: str, constraint: dict, tensors: dict, device, weight) -> torch.nn.Module:
    """The parametrization of one target's [out, in] matrix (`weight`, its current [out, in] values)."""
    return TARGET_KINDS[kind].parametrization(name, constraint, tensors, device, weight=weight)


class Transposed(torch.nn.Module):
    """Applies an [out, in] parametrization to a weight stored [in, out] (transformers Conv1D)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.inner(weight.T).T


class PerExpert(torch.nn.Module):
    """Applies each expert's own [out, in] parametrization to a stacked [E, out, in] (or, transposed,
    [E, in, out]) expert parameter."""

    def __init__(self, inners: list[torch.nn.Module], transposed: bool):
        super().__init__()
        self.inners = torch.nn.ModuleList(inners)
        self.transposed = transposed

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.shape[0] != len(self.inners):
            raise ValueError(f"{weight.shape[0]} experts, but constraints for {len(self.inners)}")
        if self.transposed:
            return torch.stack([inner(weight[e].T).T for e, inner in enumerate(self.inners)])
        return torch.stack([inner(weight[e]) for e, inner in enumerate(self.inners)])


def constrained_targets(model, constraint: dict) -> dict:
    """The model's damage targets, which must be exactly the (non-empty) modules the constraint lists."""
    names = constraint.get("modules") or []
    if not names:
        raise ConstraintViolation(f"the {constraint.get('scheme', constraint.get('kind'))} constraint lists no "
                                  f"module: a damage that touched nothing, or a check over nothing")
    targets = damage_targets(model)
    unknown = sorted(set(names) - set(targets))
    if unknown:
        raise ConstraintViolation(f"constraint names module {unknown[0]!r} which the model does not have "
                                  f"({len(unknown)} unknown)")
    uncovered = sorted(set(targets) - set(names))
    if uncovered:
        raise ConstraintViolation(f"the constraint covers {len(names)} of the model's {len(targets)} weight matrices; "
                                  f"not {uncovered[0]!r} ({len(uncovered)} uncovered): the damage skipped them "
                                  f"(made by an older realign that only targeted nn.Linear?)")
    return {name: targets[name] for name in names}


def attach(model, constraint: dict, tensors: dict[str, torch.Tensor], seed: int = 0):
    """Prepare `model` for training under the constraint; returns the model to train.

    Grids and masks become parametrizations of the same model; a frozen base is wrapped in LoRA adapters
    (a new PeftModel object). `tensors` holds the constraint's data by target name.
    """
    kind = constraint_kind(constraint)
    if kind == "none":
        return model
    if kind == "frozen":
        from realign.degrade.bnb import attach_lora

        return attach_lora(model, constraint["lora"], seed=seed)
    if constraint.get("trained") == TRAINED_LORA:
        from realign.degrade.bnb import attach_lora

        if kind != "grid":
            raise ConstraintViolation(f"LoRA over a frozen grid needs an integer grid (RTN, GPTQ), not a {kind!r} "
                                      "constraint")
        constrained_targets(model, constraint)  # every target covered, before peft wraps them
        return attach_lora(model, constraint["lora"], seed=seed, kbit=False)
    targets = constrained_targets(model, constraint)
    scales = constraint.get("trained") == TRAINED_SCALES
    if scales and kind != "grid":
        raise ConstraintViolation(f"trained scales need an integer grid (RTN, GPTQ), not a {kind!r} constraint")
    for group in targets_by_parameter(targets).values():
        first = group[0]
        device = getattr(first.module, first.param).device
        if first.kind == "experts":
            by_expert = {t.expert: _parametrization(kind, t.name, constraint, tensors, device, t.weight.detach())
                         for t in group}
            n_experts = getattr(first.module, first.param).shape[0]
            if sorted(by_expert) != list(range(n_experts)):
                raise ConstraintViolation(f"{first.parameter_name}: the constraint covers {len(by_expert)} of "
                                          f"{n_experts} experts")
            module = PerExpert([by_expert[e] for e in range(n_experts)], first.transposed)
        else:
            module = _parametrization(kind, first.name, constraint, tensors, device, first.weight.detach())
            if first.transposed:
                module = Transposed(module)
        parametrize.register_parametrization(first.module, first.param, module)
        if scales:  # the codes are frozen: only the scales (and what is not a damage target) train
            getattr(first.module, "parametrizations")[first.param].original.requires_grad_(False)
    return model


def trained_grid(model, constraint: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The constraint tensors of `model` as it stands: with trained scales, each target's `.scale` is its
    parametrization's current scale (a copy; the rest as given); otherwise `tensors` itself. Call while the
    constraint is attached."""
    if constraint.get("trained") != TRAINED_SCALES:
        return tensors
    out = dict(tensors)
    for name, target in constrained_targets(model, constraint).items():
        out[f"{name}.scale"] = _scale_module(target).scale.detach().to(tensors[f"{name}.scale"].device).clone()
    return out


def _scale_module(target):
    module = getattr(target.module, "parametrizations")[target.param][0]
    if isinstance(module, PerExpert):
        module = module.inners[target.expert]
    return module.inner if isinstance(module, Transposed) else module


def detach(model) -> None:
    """Bake the constrained weights in (quantized / masked values) and remove the parametrizations."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def baked_copy(model):
    """A separate model with the constrained weights baked in, leaving `model` (and its training) untouched.

    Not `copy.deepcopy`: a deep copy shares the parametrized module classes, so removing the copy's
    parametrizations would remove the original's too."""
    state = {}
    for key, value in model.state_dict().items():
        if ".parametrizations." not in key:
            state[key] = value.detach().clone()
        elif key.endswith(".original"):
            module_name, param = key[: -len(".original")].split(".parametrizations.")
            state[f"{module_name}.{param}"] = getattr(model.get_submodule(module_name), param).detach().clone()
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
    kind = constraint_kind(constraint)
    if kind == "none":
        return {"kind": "none", "ok": True}
    if kind == "frozen":
        from realign.degrade.bnb import base_digests, changed_base_layers

        digests = base_digests(model)
        expected = constraint["digests"]
        if not expected:
            raise ConstraintViolation("the frozen constraint lists no quantized layer: a check over nothing")
        if sorted(digests) != sorted(expected):
            raise ConstraintViolation(f"quantized layers differ from the saved base: expected {len(expected)}, "
                                      f"found {len(digests)}")
        changed = changed_base_layers(digests, expected)
        if changed:
            raise ConstraintViolation(f"{changed[0]}: the frozen quantized base weights changed "
                                      f"({len(changed)} layers differ from their saved digest)")
        return {"kind": kind, "ok": True, "modules_checked": len(expected)}
    weights = constrained_weights(model, constraint)
    worst = 0.0
    target_kind = TARGET_KINDS[kind]
    for name, weight in weights.items():
        violation = target_kind.violation(name, weight.detach(), constraint, tensors)
        worst = max(worst, violation)
        if violation > GRID_TOLERANCE:
            raise ConstraintViolation(f"{name}: weights are {violation:.3g} grid steps off their saved "
                                      f"{constraint.get('scheme', kind)} grid")
    result = {"kind": kind, "ok": True, "modules_checked": len(weights)}
    if target_kind.grid:
        result["max_grid_violation_steps"] = worst
    return result


def constrained_weights(model, constraint: dict) -> dict[str, torch.Tensor]:
    """The weights a per-target constraint keeps: the base weights under the adapters with
    `quantized_training: lora`, otherwise each constrained target's weight."""
    if constraint.get("trained") == TRAINED_LORA:
        return _lora_base_weights(model, constraint)
    return {name: target.weight for name, target in constrained_targets(model, constraint).items()}


def _lora_base_weights(model, constraint: dict) -> dict[str, torch.Tensor]:
    """The base weights under the LoRA layers of a grid with `quantized_training: lora`: exactly the constraint's
    modules (a check over fewer would prove less)."""
    base = adapter_base_targets(model)
    names = constraint.get("modules") or []
    missing = sorted(set(names) - set(base))
    if missing or not names:
        raise ConstraintViolation(f"LoRA over the grid wraps {len(base)} of the constraint's {len(names)} modules; "
                                  f"not {missing[0] if missing else 'any'!r}")
    return {name: base[name] for name in names}
