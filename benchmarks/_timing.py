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


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gemm_rates(shapes: dict[str, tuple[int, int, int]]) -> dict[str, dict[str, float]]:
    """GFLOP/s of each named (m, k, n) product in fp32 and in bf16 (both operands bf16, as under autocast):
    {"fp32": {name: rate}, "bf16": {name: rate}}. On a CPU without bf16 units (avx512_bf16, AMX) bf16 is emulated and
    slower than fp32; where it has them, the bf16 rate is the ceiling a bf16 forward can reach."""
    return {precision: {name: matmul_gflops(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype))
                        for name, (m, k, n) in shapes.items()}
            for precision, dtype in PRECISIONS.items()}


def best_rates(measurements: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The best of several gemm_rates measurements, per precision and shape: the peak. Taken over measurements
    before and after each timed step, so that other work on the machine cannot lower it and inflate a fraction."""
    return {precision: {name: max(m[precision][name] for m in measurements) for name in measurements[0][precision]}
            for precision in measurements[0]}
