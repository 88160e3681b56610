"""What does caching the teacher's side of the divergence save? A benchmark run on demand (not a test).

Three steps, each in a fresh process (wall time and peak RSS of its own), as the Snakemake jobs run them:
  direct   the divergence job before the cache: load the teacher and the artifact, run both on the divergence
           examples (realign.measure.divergence.output_divergence);
  cache    the `teacher_outputs` job, once per model: load the teacher, run it, write its logits at the
           supervised positions (realign.measure.stage.teacher_outputs);
  cached   the divergence job now: load the artifact and the cache, run the artifact alone
           (realign.measure.stage.divergence).
It checks that `cached` gives `direct`'s numbers. Default shape: the default study (max_len 160, batch 16).

    .venv/bin/python benchmarks/divergence_cache.py --teacher results/models/smollm2-135m/none/none \\
        --artifact results/models/smollm2-135m/magnitude-50/none --prompts results/data/prompts.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def step(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    start = time.time()
    if args.step == "direct":
        from realign.data.stage import read_prompts
        from realign.measure.divergence import output_divergence
        from realign.measure.stage import _reference_examples
        from realign.models.artifact import load_artifact

        teacher = load_artifact(args.teacher)[0]
        model, tokenizer, _ = load_artifact(args.artifact)
        examples = _reference_examples(tokenizer, read_prompts(args.prompts)["divergence"], args.max_len)
        result = output_divergence(teacher, model, examples, tokenizer.pad_token_id, args.batch_size)
    elif args.step == "cache":
        from realign.measure.stage import teacher_outputs

        result = teacher_outputs(args.teacher, args.prompts, args.cache, args.max_len, args.batch_size)
        result["bytes"] = Path(args.cache).stat().st_size
    else:
        from realign.measure.stage import divergence

        result = divergence(args.cache, args.artifact, args.prompts, args.max_len, args.batch_size)
    keep = ("kl_teacher_artifact", "top1_agreement", "n_tokens", "n_prompts", "vocab", "bytes")
    usage = resource.getrusage(resource.RUSAGE_SELF)  # CPU time: less sensitive than wall time to a busy machine
    return {"step": args.step, "seconds": time.time() - start, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024,
            **{k: result[k] for k in keep if k in result}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--artifact", help="default: the teacher itself")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--max-len", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--step", choices=("direct", "cache", "cached"))
    parser.add_argument("--cache")
    args = parser.parse_args()
    args.artifact = args.artifact or args.teacher
    if args.step:
        print(json.dumps(step(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in ("direct", "cache", "cached"):
            cmd = [sys.executable, __file__, "--teacher", args.teacher, "--artifact", args.artifact, "--prompts",
                   args.prompts, "--max-len", str(args.max_len), "--batch-size", str(args.batch_size), "--threads",
                   str(args.threads), "--step", name, "--cache", str(Path(tmp) / "teacher.safetensors")]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    direct, cached = rows[0], rows[2]
    assert abs(direct["kl_teacher_artifact"] - cached["kl_teacher_artifact"]) <= 1e-9 * max(
        1.0, abs(direct["kl_teacher_artifact"])), (direct, cached)
    assert direct["top1_agreement"] == cached["top1_agreement"] and direct["n_tokens"] == cached["n_tokens"]
    print(f"divergence job: {direct['seconds']:.1f} s before, {cached['seconds']:.1f} s after (CPU "
          f"{direct['cpu_seconds']:.1f} -> {cached['cpu_seconds']:.1f} s), + {rows[1]['seconds']:.1f} s (CPU "
          f"{rows[1]['cpu_seconds']:.1f} s) once per model for the cache, {rows[1]['bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
