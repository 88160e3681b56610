"""Where heavy computation runs: CUDA when present (quantization, calibration Hessians, bitsandbytes kernels),
otherwise the CPU in fp32 (bf16 is several times slower than fp32 on CPUs without bf16 units)."""

from __future__ import annotations

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
