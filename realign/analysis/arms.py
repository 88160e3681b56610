"""Arms of the analysis table: the training runs (seeds) of one configured recovery on one damaged parent.

An artifact's recovery name is ``<recovery>[+seed<N>][@step<K>]`` (realign.config.recovery_name): the configured
run itself, its replicates with other training seeds, and their checkpoints. An arm gathers the final runs
(checkpoints excluded: they are repeated measures of a run, not replicates) of one configured recovery on one
damaged parent; each run is one seed. The self-distillation of the undamaged model (degradation none) has no
damaged parent and forms no arm.

Arms hold arrays, not table rows, so that the calibration simulation (realign.analysis.calibration) can build
them directly; :func:`arms_by_parent` reads them from the table.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd

from realign.identity import parse_recovery_name
from realign.measure.similarity import CHECKED_MEASURES

HELD_METHOD = "alignment-held"  # kd with each pre-registered layer's CKA held at or below the damaged model's
KD_METHOD = "kd"
OTHER_SIMILARITY = CHECKED_MEASURES  # RBF CKA, Procrustes, k-NN: the pre-registered manipulation check reads these

Arms = Mapping[tuple[str, str], tuple["Arm", ...]]  # (model, degradation) -> the arms on that damaged parent


@dataclass(frozen=True, eq=False)
class Parent:
    """The damaged model: P and its item-bootstrap replicates [B], its KL to the teacher and standard error,
    n_records (items of the primary measure; None when unknown), and for each similarity measure of
    OTHER_SIMILARITY whose interval the table carries, its upper bound."""
    P: float
    P_boot: np.ndarray
    kl: float
    kl_stderr: float
    n_records: int | None
    similarity_high: Mapping[str, float]
    damage: float = math.nan            # teacher's P minus the parent's, and its paired item-bootstrap lower bound
    damage_low: float = math.nan
    family: str = ""
    kl_prompts: np.ndarray | None = None  # per divergence prompt: KL and tokens (None: the table has none)
    kl_tokens: np.ndarray | None = None
    similarity: Mapping[str, float] = dataclasses.field(default_factory=dict)  # OTHER_SIMILARITY layer means


@dataclass(frozen=True, eq=False)
class Arm:
    """The final runs of recovery `recovery` (the configured name, without +seed) on a damaged parent: per run
    (`runs`: artifact recovery names) P [S] and its item-bootstrap replicates P_boot [B, S] (drawn jointly with
    the parent's and every other artifact's), delta CKA with its interval, KL to the teacher with its standard
    error, and the values of the OTHER_SIMILARITY measures the table has."""
    model: str
    degradation: str
    recovery: str
    method: str
    teacher: str
    runs: tuple[str, ...]
    P: np.ndarray
    P_boot: np.ndarray
    delta_cka: np.ndarray
    delta_cka_ci_low: np.ndarray
    delta_cka_ci_high: np.ndarray
    kl: np.ndarray
    kl_stderr: np.ndarray
    similarity: Mapping[str, np.ndarray]
    parent: Parent
    hold_fraction: float = math.nan  # alignment-held's dose (allowed share of the CKA rise; 0 = held); NaN otherwise
    seeds: tuple[int, ...] = ()      # each run's training seed (the pairing across arms); () when unknown
    delta_cka_boot: np.ndarray | None = None  # [B, S] paired probe-bootstrap replicates of delta CKA (None: none)
    kl_prompts: np.ndarray | None = None      # [S, n_prompts] per-prompt KL to the teacher (None: none)
    changed_fraction: np.ndarray | None = None  # [S] share of the targeted values the run changed (NaN: unknown)

    @property
    def artifacts(self) -> tuple[str, ...]:
        return tuple(f"{self.model}/{self.degradation}/{r}" for r in self.runs)

    @property
    def label(self) -> str:
        return f"{self.model}/{self.degradation}/{self.recovery}"

    @property
    def n_seeds(self) -> int:
        return len(self.runs)

    def gains(self) -> tuple[np.ndarray, np.ndarray]:
        """Each run's gain on the primary measure, P(run) - P(parent) ([S]), and its item-bootstrap replicates
        ([B, S]: jointly drawn, so the parent's and the items' noise stay paired)."""
        return self.P - self.parent.P, self.P_boot - self.parent.P_boot[:, None]


def _values(rows: pd.DataFrame, name: str) -> np.ndarray:
    """One value per run (NaN for a column the table lacks: the check that needs it says so)."""
    return rows[name].to_numpy(float) if name in rows else np.full(len(rows), np.nan)


def _scalar(row: pd.Series, name: str) -> float:
    return float(row[name]) if name in row else math.nan


def _dose(rows: pd.DataFrame, label: str) -> float:
    """The arm's alignment-held dose (hold_fraction), one value for all its runs; NaN for other methods or a
    table without the column (0 is then assumed for a held arm: the schema's default)."""
    if "hold_fraction" not in rows:
        return math.nan
    doses = set(rows["hold_fraction"].dropna().astype(float))
    if len(doses) > 1:
        raise ValueError(f"{label}: its runs disagree on hold_fraction {sorted(doses)}")
    return doses.pop() if doses else math.nan


def _lists(rows: pd.DataFrame, name: str) -> np.ndarray | None:
    """A list column as [runs, n] (None when the table lacks it or a run has none or they differ in length)."""
    if name not in rows:
        return None
    values = [np.asarray(v if v is not None else [], float) for v in rows[name]]
    if not values or any(v.size == 0 or v.size != values[0].size for v in values):
        return None
    return np.vstack(values)


def _parent(row: pd.Series) -> Parent:
    n = _scalar(row, "n_records")
    high = {m: _scalar(row, f"{m}_mean_ci_high") for m in OTHER_SIMILARITY}
    frame = row.to_frame().T
    prompts, tokens = _lists(frame, "kl_prompts"), _lists(frame, "kl_prompt_tokens")
    return Parent(float(row["P"]), np.asarray(row["P_boot"], float), _scalar(row, "kl"), _scalar(row, "kl_stderr"),
                  int(n) if math.isfinite(n) else None, {m: v for m, v in high.items() if math.isfinite(v)},
                  _scalar(row, "damage"), _scalar(row, "damage_ci_low"), str(row["family"]) if "family" in row else "",
                  prompts[0] if prompts is not None else None, tokens[0] if tokens is not None else None,
                  {m: v for m in OTHER_SIMILARITY if math.isfinite(v := _scalar(row, f"{m}_mean"))})


def _seeds(rows: pd.DataFrame) -> tuple[int, ...]:
    """Each run's training seed: the table's `seed`, or parsed from the name (`+seed<N>`; none: the study seed,
    which the table does not carry, so the configured run counts as seed 0 of the pairing)."""
    if "seed" in rows and (rows["seed"] >= 0).all():
        return tuple(int(s) for s in rows["seed"])
    return tuple(parse_recovery_name(str(r))[1] or 0 for r in rows["recovery"])


def arms_by_parent(table: pd.DataFrame) -> dict[tuple[str, str], tuple[Arm, ...]]:
    """Every arm of the table, grouped by damaged parent (model, degradation), in table order. ValueError when a
    damaged parent's row is missing or an arm's runs disagree on their method or teacher."""
    out: dict[tuple[str, str], tuple[Arm, ...]] = {}
    parsed = [parse_recovery_name(str(r)) for r in table["recovery"]]
    final = np.array([r != "none" and step is None for r, (_, _, step) in zip(table["recovery"], parsed)])
    base = pd.Series([p[0] for p in parsed], index=table.index)
    chosen = final & (table["degradation"] != "none").to_numpy()
    teacher = table["teacher"].astype(str) if "teacher" in table else pd.Series("none", index=table.index)
    runs_all = table[chosen].assign(_base=base[chosen], _teacher=teacher[chosen])
    for (model, degradation), group in runs_all.groupby(["model", "degradation"], sort=False):
        parent = table[(table["model"] == model) & (table["degradation"] == degradation)
                       & (table["recovery"] == "none")]
        if parent.empty:
            raise ValueError(f"no damaged parent row ({model}/{degradation}/none) for its arms")
        p = _parent(parent.iloc[0])
        arms = []
        for recovery, rows in group.groupby("_base", sort=False):
            methods, teachers = set(rows["recovery_method"]), set(rows["_teacher"])
            if len(methods) != 1 or len(teachers) != 1:
                raise ValueError(f"{model}/{degradation}/{recovery}: its runs disagree on method {sorted(methods)} "
                                 f"or teacher {sorted(teachers)}")
            similarity = {m: rows[f"{m}_mean"].to_numpy(float) for m in OTHER_SIMILARITY if f"{m}_mean" in rows}
            arms.append(Arm(
                str(model), str(degradation), str(recovery), methods.pop(), teachers.pop(),
                tuple(str(r) for r in rows["recovery"]), rows["P"].to_numpy(float),
                np.column_stack([np.asarray(b, float) for b in rows["P_boot"]]), _values(rows, "delta_cka"),
                _values(rows, "delta_cka_ci_low"), _values(rows, "delta_cka_ci_high"), _values(rows, "kl"),
                _values(rows, "kl_stderr"), similarity, p, _dose(rows, f"{model}/{degradation}/{recovery}"),
                _seeds(rows), None if (boot := _lists(rows, "delta_cka_boot")) is None else boot.T,
                _lists(rows, "kl_prompts"), _values(rows, "changed_fraction")))
        out[(str(model), str(degradation))] = tuple(arms)
    return out


def held_kd_pairs(arms: Arms, held: str | None = None, kd: str | None = None) -> list[tuple[Arm, Arm]]:
    """(held arm, kd arm) on every damaged parent that has both, chosen by :func:`pick` (`held` / `kd` name them
    where a parent has several of a method)."""
    pairs = [(pick(on_parent, HELD_METHOD, held), pick(on_parent, KD_METHOD, kd)) for on_parent in arms.values()]
    return [(h, k) for h, k in pairs if h is not None and k is not None]


def pick(arms: tuple[Arm, ...], method: str, name: str | None = None) -> Arm | None:
    """The arm of `method` from the undamaged teacher (kd from a damaged teacher is another control), or the one
    named `name`; None when there is none. Of several alignment-held arms, the one at dose 0 (hold_fraction 0: the
    others allow part of the rise and are dose arms). ValueError when several match and none is named."""
    if name is not None:
        found = [a for a in arms if a.recovery == name]
        return found[0] if found else None
    found = [a for a in arms if a.method == method and a.teacher == "none"]
    if method == HELD_METHOD and len(found) > 1:  # the held arm of the estimand is the one at dose 0
        found = [a for a in found if not a.hold_fraction > 0] or found
    if len(found) > 1:
        raise ValueError(f"{found[0].model}/{found[0].degradation}: several {method} arms "
                         f"({', '.join(a.recovery for a in found)}); name the one that enters theta")
    return found[0] if found else None
