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


def on_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (a no-op on CPU)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights, bf16 matmuls); fp32 everywhere else, because on CPUs without
    bf16 units bf16 is several times slower (measured ~8x for SmolLM2 training on this machine's AVX2 CPU)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
