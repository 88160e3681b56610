"""Where heavy computation runs: CUDA when present (quantization, calibration Hessians, bitsandbytes kernels),
otherwise the CPU in fp32 (bf16 is several times slower than fp32 on CPUs without bf16 units)."""

from __future__ import annotations

import contextlib
import os

import torch


def compute_device() -> str:
    """`cuda` when a GPU is visible, else `cpu`; REALIGN_DEVICE=cpu forces the CPU path."""
    forced = os.environ.get("REALIGN_DEVICE")
    if forced:
        if forced.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"REALIGN_DEVICE={forced} but CUDA is not available")
        return forced
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def keep_logits(model, n: int) -> dict:
    """Forward kwargs for a pass that needs logits at the last `n` positions only: transformers' `logits_to_keep`
    (the LM head skips the other positions; hidden states and the kept logits are unchanged), or nothing for a
    model whose forward does not take it (a PEFT wrapper passes it on to its base model's)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


def on_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (a no-op on CPU)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


PRECISIONS = ("auto", "float32", "bfloat16")  # measure.dtype


def bf16_units(device) -> bool:
    """Whether `device` multiplies bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX (as torch reports it). On
    other CPUs bf16 is emulated and several times slower than fp32."""
    if torch.device(device).type == "cuda":
        return True
    return torch.device(device).type == "cpu" and bool(torch.cpu._is_avx512_bf16_supported()
                                                        or torch.cpu._is_amx_tile_supported())


def measure_precision(setting: str, device) -> str:
    """The precision a measurement runs in for measure.dtype `setting`: `float32`, `bfloat16`, or for `auto`
    bfloat16 where the device has bf16 units (bf16_units) and float32 elsewhere."""
    if setting not in PRECISIONS:
        raise ValueError(f"measure.dtype: {setting!r} is not one of {', '.join(PRECISIONS)}")
    if setting == "auto":
        return "bfloat16" if bf16_units(device) else "float32"
    return setting


TRAINING_PRECISIONS = ("float32", "bfloat16")  # training.dtype


def training_precision(device, setting: str | None = None) -> str:
    """The precision of a training forward: training.dtype `setting` where the config sets it, else (and for a
    forward that names none: measurement code called directly) bf16 on CUDA and fp32 elsewhere. bf16 training on
    a CPU with bf16 units is faster but not validated as the default (issue 29): a config asks for it."""
    if setting is not None:
        if setting not in TRAINING_PRECISIONS:
            raise ValueError(f"training.dtype: {setting!r} is not one of {', '.join(TRAINING_PRECISIONS)}")
        return setting
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def autocast(device: torch.device, precision: str | None = None):
    """The matmul precision of a forward pass: `precision` "bfloat16" (bf16 autocast: fp32 weights, bf16 products)
    or "float32" (none); None, the training default: bf16 on CUDA, fp32 elsewhere, because on CPUs without bf16
    units bf16 is several times slower (measured ~8x for SmolLM2 training on an AVX2 CPU)."""
    device_type = torch.device(device).type
    if precision is None:
        precision = training_precision(device)
    if precision == "bfloat16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision != "float32":
        raise ValueError(f"unknown precision {precision!r}; allowed: float32, bfloat16")
    return contextlib.nullcontext()
