"""SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774): one-shot pruning with OBS weight reconstruction.

The same column-by-column machinery as GPTQ (calibration.damped_inverse_cholesky; error feedback inside blocks
of columns, lazy updates beyond), with "set to zero" in place of "round to the grid": after column i is pruned
the error it causes in W X is compensated by updating the not-yet-processed columns of the same rows, so the
kept weights change too.

The mask is chosen adaptively with the OBS saliency w_ij^2 / [H_F^-1]_jj (F: the columns not yet processed),
whose denominator is U_jj^2 for the upper Cholesky factor U: unstructured, once per block of columns on the
block's error-updated weights (the lowest-saliency weights of the block, so each block holds the target
sparsity); N:M, once per group of M columns when the loop reaches it.
"""

from __future__ import annotations

import torch

from realign.degrade.calibration import (
    calibration_summary, check_damp_block, collect_hessians, damped_inverse_cholesky, prune_layer_by_layer,
    pruning_plan,
)
from realign.degrade.nm import nm_mask
from realign.degrade.prune import mask_constraint
from realign.degrade.targets import validate_sparsity


def sparsegpt_prune_weight(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None,
                           nm: tuple[int, int] | None = None, damp: float = 0.01,
                           block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT for one weight [out, in] with input Hessian [in, in]: (pruned and reconstructed weight in
    weight's dtype, boolean keep-mask). Pruned weights are exactly 0.

    Unstructured: the layer loses exactly round(sparsity * numel) weights (each block its share, rounded so the
    blocks add up). N:M (`nm` = (n, m)): every m consecutive columns of a row keep n; blocks are rounded to a
    multiple of m so no group straddles two blocks. Computed in float64; inputs never seen on the calibration set
    (H_jj = 0) get weight 0."""
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of sparsity and nm")
    if nm is None:
        validate_sparsity(sparsity)
    check_damp_block(damp, block_size)
    rows, cols = weight.shape
    if nm is not None:
        n, m = nm
        if cols % m:
            raise ValueError(f"N:M group size {m} does not divide the input width {cols}")
        block_size = max(m, block_size // m * m)
    W = weight.detach().to(torch.float64, memory_format=torch.contiguous_format, copy=True)
    U, dead = damped_inverse_cholesky(hessian.to(W.device), damp)
    W[:, dead] = 0

    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        saliency_denominator = U1.diagonal().pow(2)[None, :]
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            # Cumulative rounding: the blocks' counts add up to exactly round(sparsity * numel) for the layer.
            count = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            saliency = W1.pow(2) / saliency_denominator
            lowest = torch.argsort(saliency.flatten(), stable=True)[:count]
            prune1.view(-1)[lowest] = True  # W1 is a fresh contiguous block, so is prune1
        for i in range(i2 - i1):
            if nm is not None and i % m == 0:
                saliency = W1[:, i:i + m].pow(2) / saliency_denominator[:, i:i + m]
                prune1[:, i:i + m] = ~nm_mask(saliency, n, m)
            w = W1[:, i]
            q = w.masked_fill(prune1[:, i], 0)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q  # exact zeros, not w - err * U_ii (equal up to rounding)
            Err1[:, i] = err
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = prune1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W.to(weight.dtype), ~pruned


def sparsegpt_prune_model(model, calibration, sparsity: float | None = None, pattern: str | None = None,
                          damp: float = 0.01, block_size: int = 128,
                          key: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """Prune every damage target (targets.py) in place with SparseGPT, decoder layer by decoder layer (each
    layer's Hessians from inputs produced by the already-pruned layers before it).

    Exactly one of `sparsity` / `pattern` ("2:4"). Returns (constraint description, {module name: keep-mask})
    in the format of prune.prune_model; `key` prefixes error messages with the config key."""
    check_damp_block(damp, block_size, key=key)
    goal, nm, calibration, groups = pruning_plan(model, sparsity, pattern, calibration, key=key)

    masks = prune_layer_by_layer(
        model, calibration, groups, collect_hessians,
        lambda weight, hessian: sparsegpt_prune_weight(weight, hessian, sparsity=goal if nm is None else None, nm=nm,
                                                       damp=damp, block_size=block_size))
    return mask_constraint("sparsegpt", nm, goal, masks, calibration=calibration_summary(calibration)), masks
