"""Wanda (Sun et al. 2023, arXiv:2306.11695): prune by weight magnitude times input activation norm.

The score of weight W_ij is |W_ij| * ||X_j||_2, where ||X_j||_2 is the norm of input feature j over the
calibration tokens: a small weight on a feature with large activations can matter more than a large weight on a
quiet one (LLMs have a few such outlier features). Scores are compared within each output row (each row
loses the same number of weights), and the kept weights are left unchanged: no reconstruction, unlike SparseGPT.
"""

from __future__ import annotations

import torch

from realign.degrade.calibration import (
    calibration_summary, collect_input_sq_norms, prune_layer_by_layer, pruning_plan,
)
from realign.degrade.nm import nm_mask
from realign.degrade.prune import mask_constraint
from realign.degrade.targets import validate_sparsity


def wanda_mask(weight: torch.Tensor, input_sq_norm: torch.Tensor, sparsity: float | None = None,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Boolean keep-mask for `weight` [out, in] given each input feature's squared norm [in].

    Unstructured (`sparsity`): each row loses exactly round(sparsity * in) weights, the lowest-scoring (ties go
    to the earlier column). N:M (`nm` = (n, m)): each row keeps the n best of every m consecutive weights."""
    score = weight.detach().abs().to(torch.float64) * input_sq_norm.to(weight.device, torch.float64).sqrt()[None, :]
    if nm is not None:
        return nm_mask(score, *nm)
    validate_sparsity(sparsity)
    n_prune = int(round(sparsity * weight.shape[1]))
    order = torch.argsort(score, dim=1, stable=True)
    keep = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    keep.scatter_(1, order[:, :n_prune], False)
    return keep


def wanda_prune_model(model, calibration, sparsity: float | None = None, pattern: str | None = None,
                      key: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """Prune every damage target (targets.py) in place with Wanda, decoder layer by decoder layer (each layer
    scored on inputs from the already-pruned layers before it).

    Exactly one of `sparsity` / `pattern` ("2:4"). Returns (constraint description, {module name: keep-mask})
    in the format of prune.prune_model; `key` prefixes error messages with the config key."""
    goal, nm, calibration, groups = pruning_plan(model, sparsity, pattern, calibration, key=key)

    def prune(weight, input_sq_norms):
        mask = wanda_mask(weight, input_sq_norms, sparsity=goal if nm is None else None, nm=nm)
        return weight.detach().masked_fill(~mask, 0), mask

    masks = prune_layer_by_layer(model, calibration, groups, collect_input_sq_norms, prune)
    return mask_constraint("wanda", nm, goal, masks, calibration=calibration_summary(calibration)), masks

