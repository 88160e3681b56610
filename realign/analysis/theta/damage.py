"""One damaged parent's arms for the pre-registered test, and its quantities paired by seed.

A :class:`Damage` holds the kd arm, the held arm (alignment-held at its dose) and, where the study has one, the
alignment-only arm, all from the undamaged teacher (realign.analysis.arms.pick), and builds the paired quantities
the estimator, the eligibility and the check read (realign.analysis.theta.paired):

* gains on the primary measure (P(run) - P(parent), on the table's joint item bootstrap), in units of kd's gain;
* delta CKA (run minus parent, debiased, layer mean over the pre-registered layers, on the similarity step's
  probe-sequence bootstrap, whose resamples are the same for every artifact), in units of kd's delta CKA;
* KL to the teacher over the divergence prompts (a bootstrap over prompts drawn here, the same for every
  artifact; the parent enters as an arm whose value every seed shares), in units of kd's KL reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from realign.analysis.arms import HELD_METHOD, KD_METHOD, Arm, Arms, pick
from realign.analysis.theta.paired import Paired, paired_seeds, take

ONLY_METHOD = "alignment-only"  # H1': (1 - CKA) alone; re-aligns without logits
CKA_INTERVAL_Z = 1.959964  # the table's delta CKA interval is the similarity step's 95% percentile interval


@dataclass(frozen=True, eq=False)
class Damage:
    """The arms of the test on one damaged parent (held or only None when the study has none)."""
    kd: Arm
    held: Arm | None
    only: Arm | None

    @property
    def label(self) -> str:
        return f"{self.kd.model}/{self.kd.degradation}"

    @property
    def family(self) -> str:
        return self.kd.parent.family

    def arms(self, roles: Sequence[str]) -> dict[str, Arm]:
        return {role: getattr(self, role) for role in roles}

    def seeds(self, roles: Sequence[str]) -> tuple[int, ...]:
        return paired_seeds(*(_seeds(a) for a in self.arms(roles).values()))

    def unpaired(self, roles: Sequence[str]) -> list[str]:
        """The runs left out of the pairing of `roles` (a seed one arm lacks)."""
        keep = set(self.seeds(roles))
        return [run for a in self.arms(roles).values() for run, s in zip(a.artifacts, _seeds(a)) if s not in keep]

    def gains(self, roles: Sequence[str]) -> Paired:
        seeds = self.seeds(roles)
        values, reps = [], []
        for arm in self.arms(roles).values():
            g, b = arm.gains()
            values.append(take(g, _seeds(arm), seeds))
            reps.append(take(b.T, _seeds(arm), seeds).T)
        p = Paired(tuple(roles), seeds, np.column_stack(values), np.stack(reps, -1), 1.0)
        return _scaled(p, float(p.means[p.index("kd")]) if "kd" in roles else 1.0)

    def delta_cka(self, roles: Sequence[str]) -> Paired:
        seeds = self.seeds(roles)
        arms = self.arms(roles)
        values = np.column_stack([take(a.delta_cka, _seeds(a), seeds) for a in arms.values()])
        if all(a.delta_cka_boot is not None for a in arms.values()) and \
                len({a.delta_cka_boot.shape[0] for a in arms.values()}) == 1:
            reps = np.stack([take(a.delta_cka_boot.T, _seeds(a), seeds).T for a in arms.values()], -1)
            p = Paired(tuple(roles), seeds, values, reps, 1.0)
        else:  # no paired replicates: each run's interval as independent noise (errs wide)
            se = np.column_stack([take((a.delta_cka_ci_high - a.delta_cka_ci_low) / (2 * CKA_INTERVAL_Z),
                                       _seeds(a), seeds) for a in arms.values()])
            p = Paired(tuple(roles), seeds, values, None, 1.0, se)
        return _scaled(p, float(p.means[p.index("kd")]) if "kd" in roles else 1.0)

    def kl(self, roles: Sequence[str], n_boot: int, seed: int) -> Paired:
        """KL of `roles` and of the parent ("parent": the same value for every seed), paired by seed, on one
        bootstrap over the divergence prompts (token-weighted mean KL per replicate); without per-prompt KL,
        each run's kl_stderr as independent noise."""
        seeds = self.seeds(roles)
        arms = self.arms(roles)
        parent = self.kd.parent
        names = (*roles, "parent")
        values = np.column_stack([take(a.kl, _seeds(a), seeds) for a in arms.values()]
                                 + [np.full(len(seeds), parent.kl)])
        per_prompt = [a.kl_prompts for a in arms.values()]
        n = parent.kl_prompts.size if parent.kl_prompts is not None else 0
        if n and all(p is not None and p.shape[1] == n for p in per_prompt) and parent.kl_tokens is not None:
            idx = np.random.default_rng([seed, 28]).integers(0, n, (n_boot, n))
            weights = parent.kl_tokens[idx]  # the prompts' token counts: the same prompts for every artifact

            def resample(kl: np.ndarray) -> np.ndarray:  # kl [n] -> [B]
                return (kl[idx] * weights).sum(1) / weights.sum(1)

            reps = np.stack([np.column_stack([resample(row) for row in take(p, _seeds(a), seeds)])
                             for a, p in zip(arms.values(), per_prompt)]
                            + [np.repeat(resample(parent.kl_prompts)[:, None], len(seeds), 1)], -1)
            p = Paired(names, seeds, values, reps, 1.0)
        else:
            se = np.column_stack([take(a.kl_stderr, _seeds(a), seeds) for a in arms.values()]
                                 + [np.full(len(seeds), parent.kl_stderr)])
            p = Paired(names, seeds, values, None, 1.0, se)
        reduction = float(parent.kl - p.means[p.index("kd")]) if "kd" in roles else 1.0
        return _scaled(p, reduction)


def _scaled(p: Paired, scale: float) -> Paired:
    ok = math.isfinite(scale) and scale != 0
    return Paired(p.names, p.seeds, p.values, p.replicates, abs(scale) if ok else 1.0, p.own_se)


def _seeds(arm: Arm) -> tuple[int, ...]:
    return arm.seeds if len(arm.seeds) == arm.n_seeds else tuple(range(arm.n_seeds))


def damages_of_arms(arms: Arms, *, held: str | None = None, kd: str | None = None,
                    only: str | None = None) -> tuple[Damage, ...]:
    """Every damaged parent with a kd arm from the undamaged teacher, with its held and alignment-only arms."""
    out = []
    for on_parent in arms.values():
        k = pick(on_parent, KD_METHOD, kd)
        if k is not None:
            out.append(Damage(k, pick(on_parent, HELD_METHOD, held), pick(on_parent, ONLY_METHOD, only)))
    return tuple(out)
