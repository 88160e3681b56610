"""How long does the CKA stage take per artifact, and how much memory? A benchmark run on demand (not a test).

The stage (realign.measure.stage.similarity_to_teacher -> realign.measure.similarity.compare_layers) computes, per layer,
linear / debiased / RBF CKA, Procrustes similarity and mutual k-NN overlap, a sequence bootstrap of the debiased
CKA, and the layer x layer matrices. Shape of the default study: SmolLM2-135M (31 hidden states of width 576),
24 probe sequences x 24 positions = 576 tokens, 1000 replicates; synthetic float16 activations of that shape
(teacher = random, artifact = teacher + noise). Prints seconds per phase and the peak RSS.

    .venv/bin/python benchmarks/similarity_stage.py
    .venv/bin/python benchmarks/similarity_stage.py --sequences 64 --per-sequence 32 --replicates 2000
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from realign.measure.similarity import compare_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=24)
    parser.add_argument("--per-sequence", type=int, default=24)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--layers", type=int, default=31)
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.sequences * args.per_sequence
    sequence_of_token = torch.arange(args.sequences).repeat_interleave(args.per_sequence)
    teacher = [torch.randn(n, args.dim, generator=g).half() for _ in range(args.layers)]
    artifact = [(t.float() + 0.5 * torch.randn(n, args.dim, generator=g)).half() for t in teacher]
    timings = {}
    for label, kwargs in (("per-layer measures only", {"n_boot": 0, "matrix": False}),
                          ("+ bootstrap", {"n_boot": args.replicates, "matrix": False}),
                          ("+ bootstrap + matrices (the stage)", {"n_boot": args.replicates, "matrix": True})):
        start = time.perf_counter()
        compare_layers(teacher, artifact, sequence_of_token, **kwargs)
        timings[label] = round(time.perf_counter() - start, 2)
    result = {"tokens": n, "dim": args.dim, "layers": args.layers, "replicates": args.replicates,
              "threads": args.threads, "seconds": timings,
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
