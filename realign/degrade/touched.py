"""How much of the damage a recovery changed, from the weights the constraint keeps (constraints.py).

`damage_touched` is saved as `damage_touched` in artifact.json: a recovery that moved no grid point (3-bit RTN: 12
steps at lr 2e-4 never move a latent weight half a step) trained only the embeddings and norms, and its record says
so. `check_codes` verifies that trained scales kept every integer code.
"""

from __future__ import annotations

import torch

from realign.degrade.constraints import (TARGET_KINDS, TRAINED_LORA, ConstraintViolation, constrained_weights,
                                         constrained_targets, constraint_kind)


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


def stored_values(model, constraint: dict) -> dict[str, torch.Tensor] | None:
    """A CPU copy of every constrained target's stored [out, in] weight (its grid points, or its masked values),
    taken from the damaged model before recovery for `damage_touched`; None for a constraint that is not kept
    per target (none, frozen). Costs host memory the size of the targeted weights."""
    if constraint_kind(constraint) not in TARGET_KINDS:
        return None
    return {name: target.weight.detach().to("cpu", copy=True)
            for name, target in constrained_targets(model, constraint).items()}


def _adapter_counts(model) -> dict:
    """Counts over the LoRA B matrices, which start at zero (peft's default initialisation): a nonzero B value is
    one the training moved."""
    b = [param.detach() for name, param in model.named_parameters() if ".lora_B." in name]
    return _counts(sum(bool((m != 0).any()) for m in b), len(b), sum(int((m != 0).sum()) for m in b),
                   sum(m.numel() for m in b))


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
    kind = constraint_kind(constraint)
    if kind == "none":
        return None
    if kind == "frozen":
        from realign.degrade.bnb import base_digests, changed_base_layers, quantized_modules

        modules = quantized_modules(model)
        digests, expected = base_digests(model), constraint["digests"]
        sizes = {name: module.in_features * module.out_features for name, module in modules.items()}
        changed = changed_base_layers(digests, expected)
        values = sum(sizes.values())
        entry = _counts(len(changed), len(expected), sum(sizes.get(name, 0) for name in changed), values)
        entry["adapter"] = _adapter_counts(model)
        return {kind: entry}
    if before is None:
        raise ValueError(f"damage_touched: no stored values of the damaged {kind} targets to compare with")
    weights = constrained_weights(model, constraint)
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
    if constraint.get("trained") == TRAINED_LORA:  # the base stays on its grid by design: what trained is the adapter
        entry["adapter"] = _adapter_counts(model)
    return {kind: entry}


def _counts(matrices_changed: int, matrices: int, values_changed: int, values: int) -> dict:
    return {"matrices_changed": int(matrices_changed), "matrices": int(matrices), "values_changed": int(values_changed),
            "values": int(values), "fraction": values_changed / values if values else 0.0}
