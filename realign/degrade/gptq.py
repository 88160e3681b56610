"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): one-shot weight quantization with second-order error feedback.

For one Linear with calibration inputs X, GPTQ quantizes the weight column by column (input feature by input
feature) and, after rounding column i, spreads the rounding error over the not-yet-quantized columns so as to
minimise ||W X - W_hat X||^2 (Optimal Brain Surgeon with H = 2 X X^T / n). Rows are independent and share H, so
all rows are handled at once. Two tricks make it fast and stable without changing the result:

- Cholesky: the rows of the upper Cholesky factor of H^-1 are exactly the OBS updates with the inverse Hessian
  restricted to the remaining columns (calibration.damped_inverse_cholesky);
- lazy batch updates: within a block of columns the error is applied immediately, but to the columns after the
  block only once per block, as one matrix product.

The quantization grid is the same per-group asymmetric min-max grid as RTN (quantize.rtn_grid), stored in the
same (scale, zero) float64 format, one group per `group_size` consecutive input columns of a row, so the RTN
checks and the straight-through recovery apply unchanged. A group's grid is fitted when the column loop reaches
the group's first column, on the error-updated weights (standard GPTQ). With act_order the columns are quantized
in order of decreasing H_ii, so the grids are fitted on the original weights up front ("static groups"): each
grid still covers consecutive columns.
"""

from __future__ import annotations

import torch

from realign.degrade.calibration import (
    calibration_summary, check_calibration, check_damp_block, collect_hessians, damped_inverse_cholesky,
    targets_by_layer, sequential_layers,
)
from realign.degrade.quantize import rtn_grid, validate_rtn


def group_grid(columns: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each [rows], of the grid for one group of columns [rows, group_size] (float64).

    Asymmetric: RTN's min-max grid. Symmetric: zero = 2^(bits-1) and scale = 2 max|w| / (2^bits - 1), the
    reference GPTQ symmetric grid (the positive end falls half a step short of max|w|)."""
    if sym:
        scale = (2 * columns.abs().amax(dim=1) / (2**bits - 1)).clamp_min(1e-12)
        return scale, torch.full_like(scale, float(2 ** (bits - 1)))
    scale, zero = rtn_grid(columns, bits, columns.shape[1])
    return scale[:, 0], zero[:, 0]


def _snap(column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    # The same arithmetic as quantize.fake_quantize, so the result passes grid_violation exactly.
    q = torch.clamp(torch.round(column / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def activation_order(hessian: torch.Tensor) -> torch.Tensor:
    """Column order of act_order: decreasing H_jj (dead inputs counted as 1, as after the dead-input fix)."""
    diag = hessian.diagonal().to(torch.float64).clone()
    diag[diag == 0] = 1
    return torch.argsort(diag, descending=True, stable=True)


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                         sym: bool = False, act_order: bool = False, damp: float = 0.01,
                         block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ for one weight [out, in] with input Hessian [in, in]: (quantized weight in weight's dtype, scale, zero)
    with scale/zero [out, in / group_size] float64 as in quantize.rtn_grid.

    Computed in float64 on the weight's device. Inputs never seen on the calibration set (H_jj = 0) get weight 0.
    Note: for a bf16/fp16 weight the cast back moves values off the float64 grid; quantize float32 models."""
    validate_rtn(bits, group_size, weight.shape[1])
    check_damp_block(damp, block_size)
    rows, cols = weight.shape
    W = weight.detach().to(torch.float64, memory_format=torch.contiguous_format, copy=True)
    hessian = hessian.to(W.device)
    order = activation_order(hessian) if act_order else None
    U, dead = damped_inverse_cholesky(hessian, damp, order)
    W[:, dead] = 0

    n_groups = cols // group_size
    scale = torch.empty(rows, n_groups, dtype=torch.float64, device=W.device)
    zero = torch.empty_like(scale)
    if act_order:
        for g in range(n_groups):
            scale[:, g], zero[:, g] = group_grid(W[:, g * group_size:(g + 1) * group_size], bits, sym)
        W = W[:, order]
        group_of = (order // group_size).tolist()
    else:
        group_of = [c // group_size for c in range(cols)]

    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if not act_order and col % group_size == 0:
                # Fit the group's grid on its current, error-updated weights. Its columns inside this block are
                # up to date in W1; columns past the block still miss this block's (lazy) update: apply it here.
                current = W1[:, i:i + group_size]
                if col + group_size > i2:
                    tail = W[:, i2:col + group_size] - Err1[:, :i] @ U[i1:i1 + i, i2:col + group_size]
                    current = torch.cat([current, tail], dim=1)
                scale[:, col // group_size], zero[:, col // group_size] = group_grid(current, bits, sym)
            g = group_of[col]
            w = W1[:, i]
            q = _snap(w, scale[:, g], zero[:, g], bits)
            Q[:, col] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if act_order:
        Q = Q[:, torch.argsort(order)]
    return Q.to(weight.dtype), scale, zero


def gptq_quantize_model(model, calibration, bits: int, group_size: int, sym: bool = False, act_order: bool = False,
                        damp: float = 0.01, block_size: int = 128,
                        key: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """Quantize every damage target (targets.py) in place with GPTQ, decoder layer by decoder layer (each
    layer's Hessians from inputs produced by the already-quantized layers before it).

    `calibration`: [sequences, length] token ids. Returns (constraint description, {name.scale/name.zero: grid})
    in the format of quantize.quantize_model; `key` prefixes error messages with the config key."""
    validate_rtn(bits, group_size, key=key)
    check_damp_block(damp, block_size, key=key)
    calibration = check_calibration(calibration, key=key)
    groups = targets_by_layer(model)
    for group in groups:
        for name, target in group.items():
            validate_rtn(bits, group_size, target.in_features, key=f"{key}({name}) ")

    grids = {}
    for index, layer, run in sequential_layers(model, calibration):
        modules = groups[index]
        hessians = collect_hessians(modules, run)
        for name, target in modules.items():
            quantized, scale, zero = gptq_quantize_weight(target.weight, hessians.pop(name), bits, group_size,
                                                          sym=sym, act_order=act_order, damp=damp,
                                                          block_size=block_size)
            target.assign(quantized)
            grids[f"{name}.scale"], grids[f"{name}.zero"] = scale, zero
    names = sorted(name for group in groups for name in group)
    constraint = {"kind": "grid", "scheme": "gptq-sym" if sym else "gptq-asym", "bits": bits,
                  "group_size": group_size, "act_order": bool(act_order), "damp": float(damp),
                  "calibration": calibration_summary(calibration), "modules": names}
    return constraint, grids
