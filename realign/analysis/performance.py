"""The performance measure P of every artifact from its per-item records, and its paired bootstrap over items.

Every artifact of a study is scored on the same benchmark items and held-out sequences, so a difference between two
artifacts (a damage, a gain, a contrast between arms) is a paired difference: the items' own difficulty, shared
by both, cancels. The bootstrap here resamples item indices once per replicate and applies them to every artifact
at once (stratified by task: each task keeps its item count), so every derived quantity -- damage, gain, recovery
fraction, arm contrasts -- gets a paired interval from the same replicates (Efron & Tibshirani 1993, ch. 6).

A measure is one entry of :data:`MEASURES`: which records it reads (benchmark items or held-out sequences), which
per-record value, whether it is a ratio of sums (NLL per token), and its orientation (higher = better). P is the
mean over tasks, with equal weights, of each task's mean (or pooled ratio) over its records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from realign.io import read_parquet

KEY = ["model", "degradation", "recovery"]
BLOCK = 256  # bootstrap replicates evaluated at once


@dataclass(frozen=True)
class Measure:
    name: str
    label: str
    records: str                # "items" (benchmark items) or "sequences" (held-out NLL sequences)
    value: str                  # per-record column summed (or averaged) over a stratum
    weight: str | None = None   # per-record column of a ratio of sums (tokens); None: a plain mean over records
    sign: float = 1.0           # orientation: P = sign * statistic, higher = better
    only: str | None = None     # one task (items) or corpus (sequences); None: every task, equal weights


MEASURES: dict[str, Measure] = {m.name: m for m in (
    Measure("bench_logprob", "gold log-prob (normalised over choices; LAMBADA per token)", "items", "gold_logprob"),
    Measure("bench_accuracy", "accuracy (acc_norm where the task has it)", "items", "accuracy"),
    Measure("bench_mean", "mean accuracy (acc)", "items", "acc"),
    Measure("nll_general", "held-out NLL on reference answers (negated)", "sequences", "nll_sum", "n_tokens", -1.0,
            "general"),
)}
SECONDARY = "bench_accuracy"  # reported beside the primary measure; the report flags a disagreement in sign


def measure(name: str) -> Measure:
    """The registered measure `name`, or `acc:<task>` (one task's accuracy)."""
    if name in MEASURES:
        return MEASURES[name]
    if name.startswith("acc:") and len(name) > 4:
        return Measure(name, f"{name[4:]} accuracy (acc)", "items", "acc", only=name[4:])
    raise ValueError(f"analysis.performance: unknown measure {name!r}; use one of {sorted(MEASURES)} or acc:<task>")


def load_records(paths_with_keys, kind: str) -> pd.DataFrame:
    """Long table of every artifact's records (`items` or `sequences` parquet of the evaluate rule), keyed by KEY
    and a stratum column `stratum` (task or corpus) and a record id `record`."""
    frames = []
    for (m, d, r), path in paths_with_keys:
        df = read_parquet(path, producer="the `evaluate` rule")
        stratum, record = ("task", "item_id") if kind == "items" else ("corpus", "sequence")
        missing = {stratum, record} - set(df.columns)
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)} of per-{kind[:-1]} records")
        frames.append(df.assign(model=m, degradation=d, recovery=r, stratum=df[stratum].astype(str),
                                record=df[record].astype(str)))
    if not frames:
        raise ValueError(f"no {kind} records to analyse")
    return pd.concat(frames, ignore_index=True)


@dataclass
class Paired:
    """Per stratum, the [n_records, n_artifacts] matrices of a measure's value (and weight), artifacts in `keys`
    order, records in one order shared by all artifacts."""
    keys: list[tuple[str, str, str]]
    strata: list[str]
    values: list[np.ndarray]
    weights: list[np.ndarray | None]


def paired_matrices(records: pd.DataFrame, m: Measure, keys: list[tuple[str, str, str]]) -> Paired:
    """Align every artifact's records by (stratum, record id). Two artifacts scored on different items (a record
    one has and another lacks, or a duplicate id) cannot be paired: ValueError naming both and the records."""
    if m.only is not None:
        records = records[records["stratum"] == m.only]
        if records.empty:
            raise ValueError(f"analysis.performance {m.name!r}: no records of {m.only!r}")
    strata, values, weights = [], [], []
    for stratum, group in records.groupby("stratum", sort=True):
        ids: dict[tuple, set] = {}
        for key, rows in group.groupby(KEY, sort=False):
            if rows["record"].duplicated().any():
                raise ValueError(f"{'/'.join(key)}: duplicate record ids in {stratum}: "
                                 f"{sorted(rows.loc[rows['record'].duplicated(), 'record'])[:5]}")
            ids[tuple(key)] = set(rows["record"])
        absent = [k for k in keys if k not in ids]
        if absent:
            raise ValueError(f"{stratum}: no records for {['/'.join(k) for k in absent]}; every artifact must be "
                             "scored on the same items to be paired")
        reference = keys[0]
        for k in keys[1:]:
            if ids[k] != ids[reference]:
                only_ref, only_k = sorted(ids[reference] - ids[k])[:5], sorted(ids[k] - ids[reference])[:5]
                raise ValueError(f"{stratum}: {'/'.join(reference)} and {'/'.join(k)} were scored on different "
                                 f"items (only in the first: {only_ref}; only in the second: {only_k}); they "
                                 "cannot be paired -- evaluate both on one export of the benchmarks")
        order = sorted(ids[reference])
        pivot = group.pivot(index="record", columns=KEY, values=m.value).reindex(order)
        values.append(np.column_stack([pivot[k].to_numpy(float) for k in keys]))
        if m.weight is not None:
            wpivot = group.pivot(index="record", columns=KEY, values=m.weight).reindex(order)
            weights.append(np.column_stack([wpivot[k].to_numpy(float) for k in keys]))
        else:
            weights.append(None)
        strata.append(str(stratum))
    return Paired(list(keys), strata, values, weights)


def statistic(paired: Paired, m: Measure, picks: list[np.ndarray] | None = None) -> np.ndarray:
    """P per artifact ([n_artifacts]), or per replicate ([n_boot, n_artifacts]) when `picks` holds each stratum's
    resampled record indices ([n_boot, n_records] per stratum)."""
    per_stratum = []
    for s, (v, w) in enumerate(zip(paired.values, paired.weights)):
        if picks is None:
            per_stratum.append(v.mean(0) if w is None else v.sum(0) / w.sum(0))
        else:
            idx = picks[s]
            per_stratum.append(v[idx].mean(1) if w is None else v[idx].sum(1) / w[idx].sum(1))
    return m.sign * np.mean(per_stratum, axis=0)


def bootstrap(paired: Paired, m: Measure, n_boot: int, seed: int, *, joint: bool = True) -> np.ndarray:
    """[n_boot, n_artifacts] replicates of P. joint=True: the same resampled items for every artifact (paired);
    joint=False: each artifact resampled on its own (what an analysis that ignores the pairing assumes)."""
    rng = np.random.default_rng(seed)
    sizes = [len(v) for v in paired.values]
    if joint:  # in blocks of replicates: a study of hundreds of artifacts stays within memory
        picks = [rng.integers(0, n, (n_boot, n)) for n in sizes]
        return np.concatenate([statistic(paired, m, [p[b:b + BLOCK] for p in picks]) for b in range(0, n_boot, BLOCK)])
    columns = []
    for a in range(len(paired.keys)):
        one = Paired([paired.keys[a]], paired.strata, [v[:, [a]] for v in paired.values],
                     [None if w is None else w[:, [a]] for w in paired.weights])
        columns.append(statistic(one, m, [rng.integers(0, n, (n_boot, n)) for n in sizes])[:, 0])
    return np.column_stack(columns)


def interval(replicates: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of finite replicates (NaN, NaN when fewer than 10 are finite)."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size < 10:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_p(replicates: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a difference being 0: twice the smaller tail beyond 0 (at least 1/n)."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return float("nan")
    tail = min(np.mean(finite <= 0), np.mean(finite >= 0))
    return float(min(1.0, max(2 * tail, 1 / finite.size)))
