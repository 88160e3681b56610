"""Timing shared by the benchmarks (scripts in this folder import it as a sibling module)."""

from __future__ import annotations

import time

import torch


def timed(fn) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_gflops(a: torch.Tensor, b: torch.Tensor, repeats: int = 5) -> float:
    """Best fp throughput of `a @ b` over `repeats` calls after one warm-up (the machine's GEMM rate)."""
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e9
