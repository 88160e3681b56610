"""Never silently wrong: which methods can damage a model, and proof that a damage touched what it claims.

- `check_supported` refuses, before anything is modified, a method that cannot damage every target of the model
  (e.g. bitsandbytes on stacked MoE experts), or a model without any target. `check_supported_config` does the
  same from a transformers config alone (a weightless model on the meta device), for config validation.
- `snapshot` + `damage_report` measure, after the damage, the fraction of the targeted weights it touched and
  raise `DamageNotApplied` when that is not the fraction the method claims: pruning to sparsity s leaves s of the
  targeted weights exactly zero; quantization leaves every targeted weight on its grid (the constraint check)
  and changes them. The report (saved as `damage` in artifact.json) also names the weight matrices no method
  targets (MoE routers), so a "50% pruned" model says what the 50% is of.
"""

from __future__ import annotations

import torch

from realign.degrade.registry import CALIBRATED_METHODS, METHODS
from realign.degrade.targets import Target, damage_targets, untargeted_matrices


class DamageNotApplied(RuntimeError):
    pass


def check_supported(model, params: dict, key: str = "") -> dict[str, Target]:
    """Raise ValueError (naming `<key>method` and the module) if `params["method"]` cannot damage every target
    of `model`; returns the targets."""
    method = params["method"]
    if METHODS[method].kind == "training":  # forgetting trains every weight: nothing to cover
        return {}
    targets = damage_targets(model)
    if not targets:
        raise ValueError(f"{key}method: {method} finds no weight matrix to damage in {type(model).__name__} "
                         f"(no nn.Linear, transformers Conv1D or stacked expert weights outside the embeddings)")
    if METHODS[method].kind == "load":  # bitsandbytes replaces nn.Linear/Conv1D layers as it loads
        experts = sorted({t.parameter_name for t in targets.values() if t.kind == "experts"})
        if experts:
            raise ValueError(f"{key}method: bnb cannot quantize stacked MoE expert weights ({experts[0]}, "
                             f"{len(experts)} in all): bitsandbytes replaces nn.Linear/Conv1D layers only, so the "
                             f"experts would stay in full precision; use rtn, gptq or nvfp4 for this model")
    if method in CALIBRATED_METHODS:
        from realign.degrade.calibration import targets_by_layer

        try:
            targets_by_layer(model)
        except ValueError as err:
            raise ValueError(f"{key}method: {method} calibrates layer by layer and cannot handle "
                             f"{type(model).__name__}: {err}") from err
        for module in {id(t.module): t.module for t in targets.values() if t.kind == "experts"}.values():
            if getattr(type(module).forward, "__wrapped__", None) is None:
                raise ValueError(f"{key}method: {method} needs each expert's calibration inputs, but "
                                 f"{type(module).__name__} has no per-expert (eager) forward to observe them")
    return targets


def check_supported_config(config, params: dict, key: str = "") -> None:
    """check_supported from a transformers config (PretrainedConfig, or a config.json dict) without weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, dict):
        config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    check_supported(model, params, key=key)


def snapshot(model) -> dict[str, torch.Tensor]:
    """A CPU copy of every target's [out, in] weight, to measure the damage against."""
    return {name: t.weight.detach().to("cpu", copy=True) for name, t in damage_targets(model).items()}


def damage_report(model, constraint: dict, check: dict, before: dict[str, torch.Tensor], key: str = "") -> dict:
    """Measure the damage of a grid or mask constraint against the weights `before` it; raise DamageNotApplied
    unless every target was damaged as claimed. `check`: constraints.check's result on the damaged model."""
    targets = damage_targets(model)
    if set(before) != set(targets) or not targets:
        raise DamageNotApplied(f"{key}method: the targets changed during the damage ({len(before)} before, "
                               f"{len(targets)} after)")
    if check.get("modules_checked") != len(targets):
        raise DamageNotApplied(f"{key}method: the constraint check covered {check.get('modules_checked')} of "
                               f"{len(targets)} weight matrices")
    total = changed = zeros = zeros_before = 0
    for name, target in targets.items():
        after = target.weight.detach().cpu()
        total += after.numel()
        changed += int((after != before[name]).sum())
        zeros += int((after == 0).sum())
        zeros_before += int((before[name] == 0).sum())
    untargeted = untargeted_matrices(model, targets)
    params = dict(model.named_parameters())
    report = {"targets": {kind: sum(t.kind == kind for t in targets.values()) for kind in ("linear", "conv1d",
                                                                                          "experts")},
              "targeted_parameters": total,
              "untargeted_matrices": untargeted,
              "untargeted_parameters": sum(params[name].numel() for name in untargeted if name in params),
              "changed_fraction": changed / total, "zero_fraction": zeros / total}
    kind = constraint.get("kind")
    if kind == "mask":
        expected = float(constraint["sparsity"])
        # Per-row rounding (Wanda) moves a target's sparsity by at most half a weight per row.
        tolerance = max(0.5 / t.in_features for t in targets.values()) + 1e-9
        low, high = expected - tolerance, expected + tolerance + zeros_before / total
        report.update(claim=f"{expected:g} of the targeted weights are zero", expected_fraction=expected,
                      touched_fraction=zeros / total)
        if not low <= zeros / total <= high:
            raise DamageNotApplied(f"{key}method: {constraint.get('scheme')} pruning claims sparsity {expected:g} "
                                   f"but {zeros / total:.4f} of the {total} targeted weights are zero")
    elif kind in ("grid", "fp4-grid"):
        # On the grid: every target passed the constraint check. Changed: a quantization that moved no weight
        # wrote its result somewhere else.
        report.update(claim="every targeted weight is on its grid", expected_fraction=1.0, touched_fraction=1.0)
        nonzero_before = total - zeros_before
        if nonzero_before and changed == 0:
            raise DamageNotApplied(f"{key}method: {constraint.get('scheme')} quantization changed none of the "
                                   f"{total} targeted weights")
    else:
        raise ValueError(f"damage_report measures grid and mask damage, not {kind!r}")
    return report
