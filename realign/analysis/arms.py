"""Arms of the analysis table: the training runs (seeds) of one configured recovery on one damaged parent.

An artifact's recovery name is ``<recovery>[+seed<N>][@step<K>]`` (realign.config.recovery_name): the configured
run itself, its replicates with other training seeds, and their checkpoints. An arm gathers the final runs
(checkpoints excluded: they are repeated measures of a run, not replicates) of one configured recovery on one
damaged parent; each run is one seed. The self-distillation of the undamaged model (degradation none) has no
damaged parent and forms no arm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from realign.config import parse_recovery_name

HELD_METHOD = "alignment-held"  # kd with each pre-registered layer's CKA held at or below the damaged model's
KD_METHOD = "kd"


@dataclass(frozen=True, eq=False)
class Arm:
    """The final runs of recovery `recovery` (the configured name, without +seed) on the damaged parent
    (model, degradation): `runs` one table row per seed, `parent` the damaged model's row."""
    model: str
    degradation: str
    recovery: str
    method: str
    teacher: str
    runs: pd.DataFrame = field(repr=False)
    parent: pd.Series = field(repr=False)

    @property
    def artifacts(self) -> tuple[str, ...]:
        return tuple(f"{self.model}/{self.degradation}/{r}" for r in self.runs["recovery"])

    @property
    def label(self) -> str:
        return f"{self.model}/{self.degradation}/{self.recovery}"

    @property
    def n_seeds(self) -> int:
        return len(self.runs)

    def column(self, name: str) -> np.ndarray:
        """One value per run (NaN for a column the table lacks)."""
        return self.runs[name].to_numpy(float) if name in self.runs else np.full(self.n_seeds, np.nan)

    def gains(self) -> tuple[np.ndarray, np.ndarray]:
        """Each run's gain on the primary measure, P(run) - P(parent) ([S]), and its item-bootstrap replicates
        ([B, S]: the table's jointly drawn P_boot, so the parent's and the items' noise stay paired)."""
        parent_boot = np.asarray(self.parent["P_boot"], float)
        replicates = np.column_stack([np.asarray(b, float) - parent_boot for b in self.runs["P_boot"]])
        return self.runs["P"].to_numpy(float) - float(self.parent["P"]), replicates


def arms_by_parent(table: pd.DataFrame) -> dict[tuple[str, str], tuple[Arm, ...]]:
    """Every arm of the table, grouped by damaged parent (model, degradation), in table order. ValueError when a
    damaged parent's row is missing or an arm's runs disagree on their method or teacher."""
    out: dict[tuple[str, str], tuple[Arm, ...]] = {}
    parsed = [parse_recovery_name(str(r)) for r in table["recovery"]]
    final = np.array([r != "none" and step is None for r, (_, _, step) in zip(table["recovery"], parsed)])
    base = pd.Series([p[0] for p in parsed], index=table.index)
    damaged = (table["degradation"] != "none").to_numpy()
    teacher = table["teacher"].astype(str) if "teacher" in table else pd.Series("none", index=table.index)
    runs_all = table[final & damaged].assign(_base=base[final & damaged], _teacher=teacher[final & damaged])
    for (model, degradation), group in runs_all.groupby(["model", "degradation"], sort=False):
        parent = table[(table["model"] == model) & (table["degradation"] == degradation)
                       & (table["recovery"] == "none")]
        if parent.empty:
            raise ValueError(f"no damaged parent row ({model}/{degradation}/none) for its arms")
        arms = []
        for recovery, runs in group.groupby("_base", sort=False):
            methods, teachers = set(runs["recovery_method"]), set(runs["_teacher"])
            if len(methods) != 1 or len(teachers) != 1:
                raise ValueError(f"{model}/{degradation}/{recovery}: its runs disagree on method {sorted(methods)} "
                                 f"or teacher {sorted(teachers)}")
            arms.append(Arm(str(model), str(degradation), str(recovery), methods.pop(), teachers.pop(),
                            runs.drop(columns=["_base", "_teacher"]), parent.iloc[0]))
        out[(str(model), str(degradation))] = tuple(arms)
    return out


def pick(arms: tuple[Arm, ...], method: str, name: str | None = None) -> Arm | None:
    """The arm of `method` from the undamaged teacher (kd from a damaged teacher is another control), or the one
    named `name`; None when there is none; ValueError when several match and none is named."""
    if name is not None:
        found = [a for a in arms if a.recovery == name]
        return found[0] if found else None
    found = [a for a in arms if a.method == method and a.teacher == "none"]
    if len(found) > 1:
        raise ValueError(f"{found[0].model}/{found[0].degradation}: several {method} arms "
                         f"({', '.join(a.recovery for a in found)}); name the one that enters theta")
    return found[0] if found else None
