"""Every degradation method, one entry each: its name (the config's `degradations.<name>.method`), its family, how
it damages (`post-training`: a function of the loaded weights; `training`: narrow SFT; `load`: bitsandbytes loads
the teacher quantized), whether it is fitted on calibration windows of the distillation split, and for the
post-training methods the function `(model, params, calibration ids, key) -> (constraint, constraint tensors)`.

The stage (realign.degrade.stage), the config's cross-checks, the coverage checks and the workflow's input functions
read this list, and so does the config schema's `method` enum (realign.config.load_schema fills it in). Adding a
method is one entry here plus its function (and its options in the schema, if it has new ones). The method
modules are imported only when their method runs, so reading the list costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DegradationMethod:
    name: str
    family: str  # forgetting | quantization | pruning
    kind: str  # post-training | training | load
    calibrated: bool = False
    apply: Callable | None = None


def _rtn(model, params, calibration, key):
    from realign.degrade.quantize import quantize_model

    return quantize_model(model, params["bits"], params["group_size"], key=key)


def _gptq(model, params, calibration, key):
    from realign.degrade.gptq import gptq_quantize_model

    return gptq_quantize_model(model, calibration, params["bits"], params["group_size"],
                               sym=params.get("sym", False), act_order=params.get("act_order", False),
                               damp=params.get("damp", 0.01), key=key)


def _nvfp4(model, params, calibration, key):
    from realign.degrade.nvfp4 import nvfp4_quantize_model

    return nvfp4_quantize_model(model, key=key)


def _magnitude(model, params, calibration, key):
    from realign.degrade.prune import prune_model

    return prune_model(model, params.get("sparsity"), pattern=params.get("pattern"), key=key)


def _wanda(model, params, calibration, key):
    from realign.degrade.wanda import wanda_prune_model

    return wanda_prune_model(model, calibration, sparsity=params.get("sparsity"), pattern=params.get("pattern"),
                             key=key)


def _sparsegpt(model, params, calibration, key):
    from realign.degrade.sparsegpt import sparsegpt_prune_model

    return sparsegpt_prune_model(model, calibration, sparsity=params.get("sparsity"), pattern=params.get("pattern"),
                                 damp=params.get("damp", 0.01), key=key)


METHODS: dict[str, DegradationMethod] = {m.name: m for m in (
    DegradationMethod("sft", "forgetting", "training"),
    DegradationMethod("rtn", "quantization", "post-training", apply=_rtn),
    DegradationMethod("gptq", "quantization", "post-training", calibrated=True, apply=_gptq),
    DegradationMethod("nvfp4", "quantization", "post-training", apply=_nvfp4),
    DegradationMethod("bnb", "quantization", "load"),
    DegradationMethod("magnitude", "pruning", "post-training", apply=_magnitude),
    DegradationMethod("wanda", "pruning", "post-training", calibrated=True, apply=_wanda),
    DegradationMethod("sparsegpt", "pruning", "post-training", calibrated=True, apply=_sparsegpt),
)}
FAMILIES = {name: m.family for name, m in METHODS.items()}
CALIBRATED_METHODS = tuple(name for name, m in METHODS.items() if m.calibrated)


def degradation_method(name: str, key: str = "") -> DegradationMethod:
    if name not in METHODS:
        raise ValueError(f"{key}method: unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def apply_method(model, params: dict, calibration, key: str = ""):
    """Damage `model` in place with a post-training method; returns (constraint, constraint tensors)."""
    method = degradation_method(params["method"], key)
    if method.apply is None:
        raise ValueError(f"{key}method: {method.name} is not a post-training method ({method.kind})")
    return method.apply(model, params, calibration, key)
