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


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights, bf16 matmuls); fp32 everywhere else, because on CPUs without
    bf16 units bf16 is several times slower (measured ~8x for SmolLM2 training on this machine's AVX2 CPU)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
