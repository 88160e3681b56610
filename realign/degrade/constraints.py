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

`damage_touched` says how much of the damage a recovery changed (saved as `damage_touched` in artifact.json): a
recovery that moved no grid point (3-bit RTN: 12 steps at lr 2e-4 never move a latent weight half a step) trained
only the embeddings and norms, and its record says so.
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


def _kind(constraint: dict) -> str:
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
    kind = _kind(constraint)
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


def check_codes(model, constraint: dict, parent_tensors: dict, tensors: dict, before: dict) -> dict:
    """With trained scales: every target's integer codes on its trained grid equal the damaged parent's on its
    grid (`before`: stored_values of the parent). Raises ConstraintViolation naming the first that differs;
    returns {groups, scales_changed} counts."""
    from realign.degrade.quantize import grid_codes

    groups = changed = 0
    bits = constraint["bits"]
    for name, target in constrained_targets(model, constraint).items():
        old_scale, new_scale = parent_tensors[f"{name}.scale"].cpu(), tensors[f"{name}.scale"].cpu()
        zero = parent_tensors[f"{name}.zero"].cpu()
        old = grid_codes(before[name], old_scale, zero, bits)
        new = grid_codes(target.weight.detach().cpu(), new_scale, zero, bits)
        if not torch.equal(old, new):
            raise ConstraintViolation(f"{name}: {int((old != new).sum())} integer codes differ from the damaged "
                                      "model's, but trained scales keep the codes")
        groups += new_scale.numel()
        changed += int((new_scale != old_scale).sum())
    return {"groups": groups, "scales_changed": changed, "fraction": changed / groups if groups else 0.0}


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
    kind = _kind(constraint)
    if kind == "none":
        return {"kind": "none", "ok": True}
    if kind == "frozen":
        from realign.degrade.bnb import base_digests

        digests = base_digests(model)
        expected = constraint["digests"]
        if not expected:
            raise ConstraintViolation("the frozen constraint lists no quantized layer: a check over nothing")
        if sorted(digests) != sorted(expected):
            raise ConstraintViolation(f"quantized layers differ from the saved base: expected {len(expected)}, "
                                      f"found {len(digests)}")
        changed = [name for name in expected if digests[name] != expected[name]]
        if changed:
            raise ConstraintViolation(f"{changed[0]}: the frozen quantized base weights changed "
                                      f"({len(changed)} layers differ from their saved digest)")
        return {"kind": kind, "ok": True, "modules_checked": len(expected)}
    if constraint.get("trained") == TRAINED_LORA:
        weights = _lora_base_weights(model, constraint)
    else:
        weights = {name: target.weight for name, target in constrained_targets(model, constraint).items()}
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


def stored_values(model, constraint: dict) -> dict[str, torch.Tensor] | None:
    """A CPU copy of every constrained target's stored [out, in] weight (its grid points, or its masked values),
    taken from the damaged model before recovery for `damage_touched`; None for a constraint that is not kept
    per target (none, frozen). Costs host memory the size of the targeted weights."""
    if _kind(constraint) not in TARGET_KINDS:
        return None
    return {name: target.weight.detach().to("cpu", copy=True)
            for name, target in constrained_targets(model, constraint).items()}


def _lora_b_matrices(model) -> list[torch.Tensor]:
    return [param.detach() for name, param in model.named_parameters() if ".lora_B." in name]


def damage_touched(model, constraint: dict, tensors: dict[str, torch.Tensor],
                   before: dict[str, torch.Tensor] | None) -> dict | None:
    """How much of the damage a recovery changed: {kind: {matrices_changed, matrices, values_changed, values,
    fraction}}, or None without a constraint (kind none).

    Grid kinds (grid, fp4-grid) count every targeted value whose stored value (its dequantized grid point, as
    saved) differs from the damaged parent's `before` (stored_values): with the grid fixed, a changed value is a
    changed integer code (the stored weights are the grid points themselves, so no code is decoded). A mask counts
    only the kept (unmasked) values: the pruned ones stay zero by construction. `fraction` =
    values_changed / values; `matrices_changed` counts the targets with at least one changed value. `model` holds
    the recovered weights with the constraint baked in (after `detach`, or a `baked_copy`).

    A frozen bitsandbytes base (LoRA recovery) changes no base value by design: its entry counts the quantized
    layers whose digest differs from the saved one (0 after a passing check; the values of a layer cannot be
    compared one by one, so `values_changed` is that layer's whole size) and adds `adapter`, the same counts over
    the LoRA B matrices, which start at zero (peft's default initialisation): a nonzero B value is one the training
    moved, so `adapter.values_changed` > 0 says the adapter was trained."""
    kind = _kind(constraint)
    if kind == "none":
        return None
    if kind == "frozen":
        from realign.degrade.bnb import base_digests, quantized_modules

        modules = quantized_modules(model)
        digests, expected = base_digests(model), constraint["digests"]
        sizes = {name: module.in_features * module.out_features for name, module in modules.items()}
        changed = [name for name in expected if digests.get(name) != expected[name]]
        values = sum(sizes.values())
        entry = _counts(len(changed), len(expected), sum(sizes.get(name, 0) for name in changed), values)
        b = _lora_b_matrices(model)
        entry["adapter"] = _counts(sum(bool((m != 0).any()) for m in b), len(b), sum(int((m != 0).sum()) for m in b),
                                   sum(m.numel() for m in b))
        return {kind: entry}
    if before is None:
        raise ValueError(f"damage_touched: no stored values of the damaged {kind} targets to compare with")
    lora = constraint.get("trained") == TRAINED_LORA
    weights = _lora_base_weights(model, constraint) if lora else {
        name: target.weight for name, target in constrained_targets(model, constraint).items()}
    if set(before) != set(weights):
        raise ValueError(f"damage_touched: {len(before)} stored targets, but the constraint covers {len(weights)}")
    matrices_changed = values_changed = values = 0
    for name, weight in weights.items():
        differs = weight.detach().cpu() != before[name]
        free = TARGET_KINDS[kind].free(name, tensors)
        if free is not None:
            differs &= free
        n_changed = int(differs.sum())
        matrices_changed += n_changed > 0
        values_changed += n_changed
        values += differs.numel() if free is None else int(free.sum())
    entry = _counts(matrices_changed, len(weights), values_changed, values)
    if lora:  # the base stays on its grid by design: what trained is the adapter (counted as for a frozen base)
        b = _lora_b_matrices(model)
        entry["adapter"] = _counts(sum(bool((m != 0).any()) for m in b), len(b), sum(int((m != 0).sum()) for m in b),
                                   sum(m.numel() for m in b))
    return {kind: entry}


def _counts(matrices_changed: int, matrices: int, values_changed: int, values: int) -> dict:
    return {"matrices_changed": int(matrices_changed), "matrices": int(matrices), "values_changed": int(values_changed),
            "values": int(values), "fraction": values_changed / values if values else 0.0}
