"""How fast is per-layer CKA of one artifact against the teacher? A benchmark run on demand (not a test).

Shape: SmolLM2-135M, 31 hidden states (embeddings + 30 layers) of width 576, on 8192 probe tokens, stored
float16 as the activation cache stores them. The data are synthetic with that shape and the features that
matter for speed and precision: a low-rank signal with a decaying spectrum, noise, and a few huge nearly
constant dimensions (the "massive activations" of LLM hidden states) that punish any float32 arithmetic done
before centering. The artifact is the teacher plus a low-rank drift and noise that grow with depth.

Three implementations of the same numbers, timed side by side in one run:
  fast      realign.measure.cka.TeacherCKA: the teacher's centered features and ||Y^T Y||_F^2 computed once
            ("teacher prep", paid once per job), then per artifact layer Y^T X and the upper block triangle of
            X^T X as float32 GEMMs with float64 sums; it returns linear *and* debiased CKA.
  gram      the n x n kernel formulation of pytorch-cka / Kornblith et al.: K = X X^T, L = Y Y^T, HSIC =
            tr(K H L H) with the centering H K H done by subtracting row/column means (the same matrix as the
            explicit H products, without their two n^3 GEMMs, so this baseline is the generous one), in
            float64 by default (a float32 Gram loses the 1e-6 agreement to the massive dimensions; try
            --gram-dtype float32). Linear CKA only.
  reference realign.measure.cka.linear_cka in float64 (feature space), the values both are checked against.

The floor: the fast path's GEMM FLOPs divided by the machine's fp32 GEMM throughput measured in the same run on
the same shapes (8192-deep 576 x 576 products), before and after the fast path, the best of both (so that
other work sharing the machine cannot flatter the ratio to the floor); fp64 throughput is printed too.

    .venv/bin/python benchmarks/cka_speed.py                  # all 31 layers, 2 repeats of the fast path
    .venv/bin/python benchmarks/cka_speed.py --gram-layers 4  # baseline on 4 layers, scaled to 31 (say so)
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from _timing import matmul_gflops

from realign.measure.cka import _SYRK_BLOCK, TeacherCKA, linear_cka


def synthetic_hidden_states(n: int, d: int, layers: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -2, 64)
    teacher, artifact = [], []
    for layer in range(layers):
        depth = 1 + layer / layers
        signal, drift = (torch.randn(n, 64, generator=g) @ (spectrum[:, None] * torch.randn(64, d, generator=g))
                         for _ in range(2))
        y = depth * (signal + 0.3 * torch.randn(n, d, generator=g))
        y[:, :3] += depth * torch.tensor([300.0, -80.0, 40.0])  # massive, nearly constant dimensions
        # The damage: a structured drift and noise, both growing with depth, so CKA falls from ~1 towards ~0.6.
        x = y + depth * (layer / layers) * (drift + 0.5 * torch.randn(n, d, generator=g))
        teacher.append(y.half())
        artifact.append(x.half())
    return teacher, artifact


def gemm_gflops(n: int, d: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """The rate of the CKA's own product shape: [d, n] (transposed view) @ [n, d]."""
    return matmul_gflops(torch.randn(n, d, dtype=dtype).T, torch.randn(n, d, dtype=dtype), repeats)


def fast_path_flops(n: int, d: int, layers: int) -> float:
    """Per artifact: Y^T X (2 n d^2) and X^T X's upper block triangle, as TeacherCKA computes them."""
    triangle = sum(2 * n * min(_SYRK_BLOCK, d - s) * (d - s) for s in range(0, d, _SYRK_BLOCK))
    return layers * (2 * n * d * d + triangle)


def gram_linear_cka(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> float:
    x, y = x.to(dtype), y.to(dtype)
    k, l = _center_gram(x @ x.T), _center_gram(y @ y.T)
    hsic = (k * l).sum(dtype=torch.float64)
    return float(hsic / torch.sqrt((k * k).sum(dtype=torch.float64) * (l * l).sum(dtype=torch.float64)))


def _center_gram(gram: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T/n, by subtracting row and column means (in place: K is not needed again)."""
    means = gram.mean(0)
    gram -= means[None, :]
    gram -= means[:, None]
    gram += means.mean()
    return gram


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--layers", type=int, default=31)
    parser.add_argument("--repeats", type=int, default=3, help="fast-path repeats (best is reported)")
    parser.add_argument("--gram-layers", type=int, default=None, help="baseline on the first N layers only")
    parser.add_argument("--gram-dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, d, layers = args.tokens, args.dim, args.layers

    gflops32 = gemm_gflops(n, d, torch.float32)
    teacher, artifact = synthetic_hidden_states(n, d, layers, seed=0)

    start = time.perf_counter()
    fast = TeacherCKA(teacher)
    prep_s = time.perf_counter() - start
    fast_times, fast_values = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        fast_values = fast.compare(artifact)
        fast_times.append(time.perf_counter() - start)
    fast_s = min(fast_times)
    gflops32 = max(gflops32, gemm_gflops(n, d, torch.float32))
    gflops64 = gemm_gflops(n, d, torch.float64)

    start = time.perf_counter()
    reference = [(linear_cka(y, x), linear_cka(y, x, debiased=True)) for y, x in zip(teacher, artifact)]
    reference_s = time.perf_counter() - start

    gram_layers = args.gram_layers or layers
    dtype = getattr(torch, args.gram_dtype)
    start = time.perf_counter()
    gram = [gram_linear_cka(x, y, dtype) for y, x in zip(teacher[:gram_layers], artifact[:gram_layers])]
    gram_measured_s = time.perf_counter() - start
    gram_s = gram_measured_s * layers / gram_layers

    diff_fast_ref = max(max(abs(f[0] - r[0]), abs(f[1] - r[1])) for f, r in zip(fast_values, reference))
    diff_fast_gram = max(abs(f[0] - g) for f, g in zip(fast_values, gram))
    diff_gram_ref = max(abs(g - r[0]) for g, r in zip(gram, reference))
    floor_s = fast_path_flops(n, d, layers) / (gflops32 * 1e9)
    figures = {
        "shape": {"tokens": n, "dim": d, "layers": layers, "storage": "float16"},
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "gemm_gflops_fp32": gflops32, "gemm_gflops_fp64": gflops64,
        "fast_teacher_prep_s": prep_s, "fast_per_artifact_s": fast_s, "fast_all_runs_s": fast_times,
        "floor_s": floor_s, "fast_over_floor": fast_s / floor_s,
        "gram_dtype": args.gram_dtype, "gram_layers_measured": gram_layers, "gram_measured_s": gram_measured_s,
        "gram_per_artifact_s": gram_s, "speedup_vs_gram": gram_s / fast_s,
        "speedup_vs_gram_incl_teacher_prep": gram_s / (fast_s + prep_s),
        "reference_float64_s": reference_s, "speedup_vs_reference": reference_s / fast_s,
        "max_abs_diff_fast_vs_reference": diff_fast_ref, "max_abs_diff_fast_vs_gram": diff_fast_gram,
        "max_abs_diff_gram_vs_reference": diff_gram_ref,
        "cka_range": [min(v[0] for v in fast_values), max(v[0] for v in fast_values)],
    }
    scaled = "" if gram_layers == layers else f" (measured on {gram_layers} layers, scaled to {layers})"
    print(f"CKA of one artifact vs the teacher: {layers} layers x {n} tokens x {d} features, float16 cache, "
          f"{figures['threads']} threads")
    print(f"  GEMM throughput (8192-deep 576x576): fp32 {gflops32:.0f} GFLOP/s, fp64 {gflops64:.0f} GFLOP/s")
    print(f"  fast path     {fast_s:7.2f} s per artifact (best of {args.repeats}: "
          f"{', '.join(f'{t:.2f}' for t in fast_times)}), teacher prep {prep_s:.2f} s once; "
          f"floor {floor_s:.2f} s ({fast_s / floor_s:.2f}x the floor)")
    print(f"  Gram baseline {gram_s:7.2f} s per artifact, {args.gram_dtype}{scaled}: "
          f"fast path is {gram_s / fast_s:.1f}x faster ({gram_s / (fast_s + prep_s):.1f}x with the teacher prep)")
    print(f"  float64 linear_cka (linear + debiased) {reference_s:.2f} s: fast path {reference_s / fast_s:.1f}x faster")
    low, high = figures["cka_range"]
    print(f"  max |diff|: fast vs float64 {diff_fast_ref:.1e} (linear and debiased), fast vs Gram "
          f"{diff_fast_gram:.1e}, Gram vs float64 {diff_gram_ref:.1e}; linear CKA spans {low:.4f}..{high:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
