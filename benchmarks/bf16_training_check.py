"""bf16 training against fp32 training (issue 29): the rule docs/2026-12-08-bf16.md fixed before any bf16 run.

    python benchmarks/bf16_training_check.py FP32/results CHECK/results --damage sft-code-lr2e3 --damage magnitude-50 \
        [--fp32-arm kd --bf16-arm kd-bf16 --fp32-seeds 200 ... 205 --bf16-seeds 200 201 --control-seed 200]

FP32 is the confirmatory study's results folder: its fp32 arm at every seed gives the seed-to-seed spread. CHECK is
the folder where the bf16 arm ran (a clean clone of main), with the same parents, and the fp32 arm at the control
seed made again there. Each run's quantities are those the study's verdicts read (precision_check's readers):
- gain: bench_logprob of the run minus its parent's, on the same items (tasks weighted equally);
- delta CKA: the debiased CKA over the alignment range, the run's minus its parent's.

The control: the fp32 run at `--control-seed` made again in CHECK must give FP32's gain and delta CKA (within
1e-9); where it does, a bf16 run is compared with FP32's fp32 run at its seed, otherwise with CHECK's (which must
then hold the fp32 arm at every bf16 seed).

For each damage and quantity the check passes when (1) every bf16 run lies within the range of the fp32 runs, and
(2) |bf16 - fp32| at the same seed is at most the fp32 runs' seed-to-seed standard deviation (ddof 1).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precision_check import items, paired, similarity  # noqa: E402

CONTROL_TOLERANCE = 1e-9  # the control's "same numbers": recomputation with the same code on the same kind of CPU


@dataclass(frozen=True)
class Run:
    gain: float
    delta_cka: float


def run(results: Path, model: str, damage: str, recovery: str) -> Run:
    """A recovery's gain and delta CKA over its parent in one results folder."""
    gain = paired(items(results, model, damage, recovery), items(results, model, damage, "none"))[0]
    delta = similarity(results, model, damage, recovery)[0] - similarity(results, model, damage, "none")[0]
    return Run(gain, delta)


def check(fp32: Path, here: Path, model: str, damages: list[str], fp32_arm: str, bf16_arm: str,
          fp32_seeds: list[int], bf16_seeds: list[int], control_seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the control per damage, the rule per damage and quantity)."""
    controls, rules = [], []
    for damage in damages:
        spread = {s: run(fp32, model, damage, f"{fp32_arm}+seed{s}") for s in fp32_seeds}
        control = run(here, model, damage, f"{fp32_arm}+seed{control_seed}")
        same = all(abs(getattr(control, q) - getattr(spread[control_seed], q)) <= CONTROL_TOLERANCE
                   for q in ("gain", "delta_cka"))
        controls.append({"damage": damage, "gain_difference": control.gain - spread[control_seed].gain,
                         "delta_cka_difference": control.delta_cka - spread[control_seed].delta_cka,
                         "same": same})
        paired_fp32 = {s: spread[s] if same else run(here, model, damage, f"{fp32_arm}+seed{s}") for s in bf16_seeds}
        bf16 = {s: run(here, model, damage, f"{bf16_arm}+seed{s}") for s in bf16_seeds}
        for quantity in ("gain", "delta_cka"):
            values = np.array([getattr(r, quantity) for r in spread.values()])
            sd = float(values.std(ddof=1))
            within_range = all(values.min() <= getattr(bf16[s], quantity) <= values.max() for s in bf16_seeds)
            differences = [getattr(bf16[s], quantity) - getattr(paired_fp32[s], quantity) for s in bf16_seeds]
            rules.append({"damage": damage, "quantity": quantity, "fp32_min": float(values.min()),
                          "fp32_max": float(values.max()), "fp32_sd": sd,
                          "bf16": [getattr(bf16[s], quantity) for s in bf16_seeds],
                          "same_seed_differences": differences, "within_range": within_range,
                          "within_sd": all(abs(d) <= sd for d in differences),
                          "passes": within_range and all(abs(d) <= sd for d in differences)})
    return pd.DataFrame(controls), pd.DataFrame(rules)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp32", type=Path, help="the confirmatory study's results folder")
    parser.add_argument("check", type=Path, help="the results folder of the bf16 runs and the fp32 control")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--damage", action="append", required=True)
    parser.add_argument("--fp32-arm", default="kd")
    parser.add_argument("--bf16-arm", default="kd-bf16")
    parser.add_argument("--fp32-seeds", type=int, nargs="+", default=list(range(200, 206)))
    parser.add_argument("--bf16-seeds", type=int, nargs="+", default=[200, 201])
    parser.add_argument("--control-seed", type=int, default=200)
    args = parser.parse_args()
    controls, rules = check(args.fp32, args.check, args.model, args.damage, args.fp32_arm, args.bf16_arm,
                            args.fp32_seeds, args.bf16_seeds, args.control_seed)
    print(controls.to_markdown(index=False, floatfmt=".3g"))
    print()
    print(rules.to_markdown(index=False, floatfmt=".4g"))
    passed = bool(rules["passes"].all())
    print(f"\nbf16 training {'passes' if passed else 'fails'} its check")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
