"""One row per artifact, then damage / recovery / alignment deltas relative to the teacher and the damaged parent.

Vocabulary (see docs/DESIGN.md, "Statistics and the verdict"):

* the *teacher* of model ``m`` is the artifact ``(m, "none", "none")``;
* the *parent* (damaged model) of ``(m, d, r)`` is ``(m, d, "none")``;
* ``P`` is the performance measure, oriented so that higher is better;
* ``damage = P(teacher) - P(parent)``;
* ``gain = P(row) - P(parent)``;
* ``recovery_fraction = gain / damage`` (NaN for the teacher, for parents and where damage == 0);
* ``delta_cka = cka_mean(row) - cka_mean(parent)``, ``delta_kl = kl(row) - kl(parent)``.

Noise rule (``damage_within_noise`` / ``gain_within_noise``): the difference is within noise when its paired
item-bootstrap interval (realign.analysis.performance; every artifact resampled on the same items) reaches 0.
A negative damage (the "damaged" model is better than the teacher) is therefore always within noise.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from realign.analysis.arms import HELD_METHOD
from realign.analysis.performance import SECONDARY, bootstrap, interval, paired_matrices, statistic
from realign.analysis.performance import measure as performance_measure
from realign.identity import ArtifactId
from realign.io import read_json, read_parquet, write_parquet
from realign.measure.similarity import MEASURE_NAMES
from realign.models.record import ArtifactRecord

TEACHER = "none"
NLL_NOISE_NATS = 0.01

KEY = ["model", "degradation", "recovery"]


def _f(x) -> float:
    """float, with None -> NaN."""
    if x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


SIMILARITY_MEASURES = MEASURE_NAMES  # realign.measure.similarity.MEASURES, in its order
CKA_ESTIMATORS = ("debiased", "linear")
LAYER_COLUMNS = (*SIMILARITY_MEASURES, "debiased_cka_ci_low", "debiased_cka_ci_high")


def collect_row(artifact_json, eval_json, divergence_json, similarity_parquet, similarity_summary=None,
                cka_estimator: str = "debiased") -> dict:
    """Read the per-artifact files and return one flat row (scalars, plus the `cka_boot` replicate list).

    Columns: model, degradation, recovery, family, degradation_method, recovery_method, seed, recovery_base
    (the configured recovery of a replicate or checkpoint), checkpoint (bool), step (optimizer steps of a
    recovery or checkpoint), teacher (the teacher's degradation: none = the undamaged original),
    changed_fraction, changed_matrices and targeted_matrices (how much of the damage a constrained recovery changed),
    tasks (comma-joined sorted task names), acc_<task>, acc_<task>_stderr, bench_mean, bench_mean_stderr
    (stderr of the unweighted mean assuming independent tasks: sqrt(sum se^2) / k), nll_general, nll_code, nll_math,
    kl, kl_stderr (KL(teacher || artifact) and its standard error over tokens), reverse_kl, reverse_kl_stderr
    (KL(artifact || teacher)), js, js_stderr (Jensen-Shannon), kl_prompts and kl_prompt_tokens (per divergence
    prompt), top1, alignment_first/alignment_last (the
    pre-registered range of hidden states that the `similarity` rule flagged, measure.alignment_layers), cka_mean
    and cka_min (mean and minimum over that range of the `cka_estimator`'s CKA, debiased or linear), <measure>_mean
    for every measure of realign.measure.similarity.MEASURES (NaN where the parquet lacks it), n_layers (in the range),
    cka_embedding and cka_final (the estimator's CKA at the embeddings, layer 0, and at the final post-norm state,
    layer L, both outside the range); from the JSON summary of the similarity step (when given, debiased estimator only;
    its range must be the parquet's): cka_mean_ci_low/high (95% bootstrap over probe sequences) and cka_boot (the
    replicates over the same range, paired across artifacts), and <measure>_mean_ci_low/high of rbf_cka,
    procrustes_sim and knn_overlap (delete-a-group jackknife over probe sequences, where the summary has it);
    seconds (training/degradation time of the artifact), eval_seconds, divergence_seconds, path_artifact, path_eval,
    path_divergence, path_similarity, path_similarity_summary.
    """
    art = ArtifactRecord.from_json(read_json(artifact_json, verify=True, producer="the step that made the artifact"),
                                   artifact_json)
    ev = read_json(eval_json, verify=True, producer="the `evaluate` rule")
    div = read_json(divergence_json, verify=True, producer="the `divergence` rule")
    layers = read_parquet(similarity_parquet, producer="the `similarity` rule")
    missing = {"layer", "linear_cka"} - set(layers.columns)
    if missing:
        raise ValueError(f"{similarity_parquet}: missing column(s) {sorted(missing)}")

    row: dict = {
        "model": art.model,
        "degradation": art.degradation,
        "recovery": art.recovery,
        "family": art.family,
        "degradation_method": art.degradation_method,
        "recovery_method": art.recovery_method,
        "seed": int(art.seed) if art.seed is not None else -1,
    }
    # Recovery artifact names carry replicates and checkpoints: `<recovery>[+seed<N>][@step<K>]`.
    identity = ArtifactId.parse(art.model, art.degradation, art.recovery)
    row["recovery_base"] = identity.recovery
    row["checkpoint"] = identity.step is not None
    row["step"] = float(art.step) if art.step is not None else math.nan
    row["teacher"] = str(art.recovery_params.get("teacher", "none"))
    # The CPU kernels its weights were computed with (issue 32: another instruction set gives other low-order bits,
    # and a forgetting SFT amplifies them into another parent); records made before it was recorded say so.
    row["cpu_capability"] = str((art.versions or {}).get("torch_cpu_capability") or "unrecorded")
    # The dose of an alignment-held run (its allowed CKA rise; 0 = hold the damaged value): the test takes the
    # arm at dose 0, the others are dose arms (realign.analysis.arms.pick).
    row["hold_fraction"] = (float(art.recovery_params["hold_fraction"])
                            if art.recovery_method == HELD_METHOD else math.nan)
    # How much of the damage a constrained recovery changed (artifact.json `damage_touched`, per target kind;
    # realign.degrade.touched.damage_touched): changed_fraction, the targeted values whose stored value (grid
    # point, kept unmasked weight) changed, over every kind weighted by values, and changed_matrices of
    # targeted_matrices. NaN without a constraint or a record made before it.
    # A LoRA recovery on a frozen quantized base changes the effective weights through its adapter: there the
    # adapter's share of moved values is what counts (its base stays untouched by design).
    touched = [] if art.constraint.get("kind", "none") == "none" else [
        kind.get("adapter", kind) for kind in (art.damage_touched or {}).values()]
    values = sum(kind["values"] for kind in touched)
    row["changed_fraction"] = sum(kind["values_changed"] for kind in touched) / values if values else math.nan
    row["changed_matrices"] = float(sum(kind["matrices_changed"] for kind in touched)) if touched else math.nan
    row["targeted_matrices"] = float(sum(kind["matrices"] for kind in touched)) if touched else math.nan

    # The precision its measurements ran in (measure.dtype, resolved; evaluation and divergence): a study whose
    # artifacts were measured in two precisions compares numbers that differ by the precision, and says so.
    precisions = sorted({str(record.get("precision") or "unrecorded") for record in (ev, div)})
    row["measure_precision"] = "/".join(precisions)

    benches = ev.get("benchmarks") or {}
    tasks = sorted(benches)
    row["tasks"] = ",".join(tasks)
    accs, ses = [], []
    for task in tasks:
        b = benches[task]
        acc, se = _f(b.get("acc")), _f(b.get("acc_stderr"))
        row[f"acc_{task}"] = acc
        row[f"acc_{task}_stderr"] = se
        accs.append(acc)
        ses.append(se)
    if accs:
        row["bench_mean"] = float(np.mean(accs))
        row["bench_mean_stderr"] = float(math.sqrt(sum(s * s for s in ses)) / len(ses))
    else:
        row["bench_mean"] = math.nan
        row["bench_mean_stderr"] = math.nan

    ppl = ev.get("perplexity") or {}
    row["nll_general"] = _f((ppl.get("general") or {}).get("nll"))
    row["nll_code"] = _f((ppl.get("code") or {}).get("nll"))
    row["nll_math"] = _f((ppl.get("math") or {}).get("nll"))

    row["kl"] = _f(div.get("kl_teacher_artifact"))
    # the reverse KL(artifact || teacher) and Jensen-Shannon divergence beside it (NaN for divergence files made
    # before they were measured)
    for name in ("reverse_kl", "js"):
        row[name], row[f"{name}_stderr"] = _f(div.get(name)), _f(div.get(f"{name}_stderr"))
    row["kl_stderr"] = _f(div.get("kl_stderr"))
    # Per divergence prompt: KL and token count, so that the manipulation check resamples every artifact on the
    # same prompts (realign.analysis.theta.check); empty for divergence files without per-prompt records.
    prompts = div.get("per_prompt") or []
    row["kl_prompts"] = [_f(p.get("kl")) for p in prompts]
    row["kl_prompt_tokens"] = [_f(p.get("n_tokens")) for p in prompts]
    row["top1"] = _f(div.get("top1_agreement"))

    if cka_estimator not in CKA_ESTIMATORS:
        raise ValueError(f"analysis.cka_estimator must be one of {CKA_ESTIMATORS}, got {cka_estimator!r}")
    column = f"{cka_estimator}_cka"
    if column not in layers:
        raise ValueError(f"{similarity_parquet}: no {column!r} column for analysis.cka_estimator {cka_estimator!r}")
    if "in_alignment_range" not in layers:
        raise ValueError(f"{similarity_parquet}: no 'in_alignment_range' column (written before "
                         "measure.alignment_layers existed): rerun the `similarity` rule")
    body = layers[layers["in_alignment_range"].astype(bool)]
    if body.empty:
        raise ValueError(f"{similarity_parquet}: no layer in the alignment range (measure.alignment_layers)")
    first, last, final = int(body["layer"].min()), int(body["layer"].max()), int(layers["layer"].max())
    row["cka_estimator"] = cka_estimator
    row["alignment_first"], row["alignment_last"] = first, last
    row["cka_mean"] = float(body[column].mean())
    row["cka_min"] = float(body[column].min())
    for measure in SIMILARITY_MEASURES:
        row[f"{measure}_mean"] = float(body[measure].mean()) if measure in body else math.nan
    # Reported apart from the range: the embeddings (layer 0) and the final post-norm state (layer L).
    embedding = layers["layer"] == 0
    row["cka_embedding"] = float(layers.loc[embedding, column].iloc[0]) if embedding.any() else math.nan
    row["cka_final"] = float(layers.loc[layers["layer"] == final, column].iloc[0])
    row["n_layers"] = int(body["layer"].nunique())
    row["cka_mean_ci_low"] = row["cka_mean_ci_high"] = math.nan
    row["cka_boot"] = []
    summary = (read_json(similarity_summary, verify=True, producer="the `similarity` rule")
               if similarity_summary is not None else None)
    if summary is not None and cka_estimator == "debiased":
        if summary.get("alignment_layers") != [first, last]:
            raise ValueError(f"{similarity_summary}: its alignment range {summary.get('alignment_layers')} is not "
                             f"the range [{first}, {last}] flagged in {similarity_parquet} (measure.alignment_layers): "
                             "rerun the `similarity` rule")
        low, high = summary["debiased_cka_mean_ci"]
        row["cka_mean_ci_low"], row["cka_mean_ci_high"] = _f(low), _f(high)
        row["cka_boot"] = [float(v) for v in summary["debiased_cka_mean_replicates"]]
    if summary is not None:
        for measure, jackknifed in (summary.get("other_means_jackknife") or {}).items():
            row[f"{measure}_mean_ci_low"], row[f"{measure}_mean_ci_high"] = (_f(v) for v in jackknifed["ci"])

    row["seconds"] = _f(art.seconds)
    row["eval_seconds"] = _f(ev.get("seconds"))
    row["divergence_seconds"] = _f(div.get("seconds"))

    row["path_artifact"] = str(artifact_json)
    row["path_eval"] = str(eval_json)
    row["path_divergence"] = str(divergence_json)
    row["path_similarity"] = str(similarity_parquet)
    row["path_similarity_summary"] = str(similarity_summary) if similarity_summary is not None else ""
    return row


def _iter_keyed_paths(paths_with_keys) -> Iterable[tuple[tuple[str, str, str], str]]:
    if isinstance(paths_with_keys, Mapping):
        items = paths_with_keys.items()
    else:
        items = paths_with_keys
    for item in items:
        if isinstance(item, Mapping):
            yield (item["model"], item["degradation"], item["recovery"]), item["path"]
        else:
            key, path = item
            if len(key) != 3:
                raise ValueError(f"key {key!r} must be (model, degradation, recovery)")
            yield tuple(key), path


def load_similarity_layers(paths_with_keys) -> pd.DataFrame:
    """Long table of per-layer similarity: columns model, degradation, recovery, layer, and every measure of
    SIMILARITY_MEASURES with its CI columns where the parquet has them (NaN otherwise).

    ``paths_with_keys``: a mapping ``{(model, degradation, recovery): path}``, an iterable of
    ``((model, degradation, recovery), path)`` pairs, or an iterable of dicts with those four keys.
    """
    frames = []
    for (m, d, r), path in _iter_keyed_paths(paths_with_keys):
        df = read_parquet(path, producer="the `similarity` rule")
        for column in LAYER_COLUMNS:
            if column not in df:
                df[column] = math.nan
        df = df[["layer", *LAYER_COLUMNS]].copy()
        df.insert(0, "recovery", str(r))
        df.insert(0, "degradation", str(d))
        df.insert(0, "model", str(m))
        frames.append(df)
    if not frames:
        return pd.DataFrame({**{c: pd.Series(dtype="object") for c in KEY + ["layer"]},
                             **{c: pd.Series(dtype="float64") for c in LAYER_COLUMNS}})
    out = pd.concat(frames, ignore_index=True)
    out["layer"] = out["layer"].astype("int64")
    return out.sort_values(KEY + ["layer"], kind="stable").reset_index(drop=True)


def _within_noise(diff: np.ndarray, se_a: np.ndarray, se_b: np.ndarray, kind: str, nll_noise: float):
    """The stderr rule of two independent evaluations (used where no item records exist: the calibration
    simulation and the per-benchmark breakdown); the table's own flags come from the paired item bootstrap."""
    diff = np.asarray(diff, dtype=float)
    if kind == "nll":
        return diff < nll_noise
    combined = np.sqrt(np.asarray(se_a, float) ** 2 + np.asarray(se_b, float) ** 2)
    return np.where(np.isfinite(combined), diff < 2.0 * combined, diff <= 0.0)


@dataclass
class Records:
    """Every artifact's per-item benchmark records and per-sequence held-out NLL records (long tables from
    realign.analysis.performance.load_records), the bootstrap's size and seed, and the intervals' alpha."""
    items: pd.DataFrame
    sequences: pd.DataFrame
    n_boot: int = 2000
    seed: int = 0
    alpha: float = 0.05


def _paired_estimates(df: pd.DataFrame, name: str, records: Records, t_idx, p_idx, is_teacher, is_parent,
                      prefix: str = "") -> np.ndarray:
    """Adds `{prefix}P`, `{prefix}damage`, `{prefix}gain`, `{prefix}recovery_fraction` and their paired item-bootstrap
    intervals (`_ci_low`/`_ci_high`) and standard errors (`P_stderr`, `damage_stderr`); returns the replicates."""
    m = performance_measure(name)
    keys = [tuple(k) for k in df[KEY].itertuples(index=False, name=None)]
    source = records.items if m.records == "items" else records.sequences
    paired = paired_matrices(source, m, keys)
    point = statistic(paired, m)
    boot = bootstrap(paired, m, records.n_boot, records.seed)
    nan = np.full(len(df), np.nan)
    damage, gain = point[t_idx] - point[p_idx], point - point[p_idx]
    damage_b, gain_b = boot[:, t_idx] - boot[:, p_idx], boot - boot[:, p_idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        rf = np.where(damage != 0, gain / damage, np.nan)
        rf_b = gain_b / damage_b
    ci = {label: np.array([interval(b[:, i], records.alpha) for i in range(len(df))]).reshape(len(df), 2)
          for label, b in (("damage", damage_b), ("gain", gain_b), ("recovery_fraction", rf_b))}
    df[f"{prefix}P"] = point
    df[f"{prefix}damage"] = np.where(is_teacher, nan, damage)
    df[f"{prefix}gain"] = np.where(is_teacher, nan, gain)
    df[f"{prefix}recovery_fraction"] = np.where(is_teacher | is_parent, nan, rf)
    for label, bounds in ci.items():
        mask = is_teacher if label == "damage" else is_teacher | is_parent
        df[f"{prefix}{label}_ci_low"] = np.where(mask, nan, bounds[:, 0])
        df[f"{prefix}{label}_ci_high"] = np.where(mask, nan, bounds[:, 1])
    if not prefix:
        df["P_stderr"] = boot.std(0, ddof=1)
        df["n_records"] = sum(len(v) for v in paired.values)  # items (or sequences) every artifact was scored on
        df["damage_stderr"] = np.where(is_teacher, nan, damage_b.std(0, ddof=1))
    return boot


def build_table(rows: list[dict], performance: str, records: Records) -> pd.DataFrame:
    """Rows from :func:`collect_row` and every artifact's item records -> the analysis table (one row per artifact).

    P is computed from the records (realign.analysis.performance), and every interval is a paired bootstrap over
    items, resampled jointly for all artifacts and stratified by task. Added columns: performance_metric, P, P_stderr
    (bootstrap SD), n_records (the items or sequences of the measure: the same for every artifact), P_boot (the
    replicates, for paired contrasts), role ('teacher' | 'degraded' | 'recovered'),
    P_teacher, P_parent, damage (+ _ci_low/_ci_high, damage_stderr), damage_within_noise (the damage's interval
    reaches 0), gain (+ CI), gain_within_noise (the gain's interval reaches 0), recovery_fraction (+ CI: the
    percentile interval of the replicates' ratio); the same for the secondary measure (accuracy) prefixed
    `secondary_`, and sign_disagrees (a recovered row whose gain has opposite signs on the two measures);
    cka_parent, delta_cka, delta_cka_ci_low/high (paired bootstrap over probe sequences), delta_cka_boot (its replicates), delta_<measure> for each
    similarity measure, kl_parent, delta_kl. The teacher rows have NaN damage/deltas and False flags; a parent row
    has gain 0 and NaN recovery_fraction. Raises ValueError naming any missing teacher or parent artifact,
    duplicates, or artifacts scored on different items.
    """
    if not rows:
        raise ValueError("build_table: no rows")
    df = pd.DataFrame(list(rows))
    for c in KEY + ["cka_mean", "kl"]:
        if c not in df:
            raise ValueError(f"build_table: rows lack column {c!r}")
    dup = df.duplicated(KEY, keep=False)
    if dup.any():
        keys = sorted(set(map(tuple, df.loc[dup, KEY].values.tolist())))
        raise ValueError(f"build_table: duplicate artifacts {keys}")
    performance_measure(performance)  # an unknown measure is an error before anything else

    index = {tuple(k): i for i, k in enumerate(df[KEY].itertuples(index=False, name=None))}
    missing = []
    t_idx, p_idx = [], []
    for m, d, r in df[KEY].itertuples(index=False, name=None):
        t = (m, TEACHER, TEACHER)
        p = (m, d, TEACHER)
        if t not in index:
            missing.append(f"teacher artifact (model={m!r}, degradation='none', recovery='none')")
        if p not in index:
            missing.append(f"parent artifact (model={m!r}, degradation={d!r}, recovery='none') of {(m, d, r)}")
        t_idx.append(index.get(t, -1))
        p_idx.append(index.get(p, -1))
    if missing:
        raise ValueError("build_table: missing " + "; ".join(dict.fromkeys(missing)))
    t_idx, p_idx = np.array(t_idx), np.array(p_idx)
    is_teacher = (df["degradation"] == TEACHER).to_numpy() & (df["recovery"] == TEACHER).to_numpy()
    is_parent = (df["recovery"] == TEACHER).to_numpy() & ~is_teacher

    df["performance_metric"] = performance
    df["role"] = np.where(is_teacher, "teacher", np.where(is_parent, "degraded", "recovered"))
    boot = _paired_estimates(df, performance, records, t_idx, p_idx, is_teacher, is_parent)
    df["P_boot"] = list(boot.T)
    if performance == "bench_mean" and "bench_mean" in df:  # the items and the summary come from one evaluation
        off = np.abs(df["P"].to_numpy(float) - df["bench_mean"].to_numpy(float))
        if np.nanmax(off) > 1e-9:
            bad = df.loc[off > 1e-9, KEY].astype(str).agg("/".join, axis=1).tolist()
            raise ValueError(f"build_table: the item records of {bad} do not reproduce their evaluation summary's "
                             "mean accuracy: records and summary come from different evaluations")
    df["P_teacher"] = df["P"].to_numpy(float)[t_idx]
    df["P_parent"] = df["P"].to_numpy(float)[p_idx]
    df["damage_within_noise"] = np.where(is_teacher, False, ~(df["damage_ci_low"] > 0)).astype(bool)
    df["gain_within_noise"] = np.where(is_teacher | is_parent, False, ~(df["gain_ci_low"] > 0)).astype(bool)
    df["secondary_metric"] = SECONDARY
    if performance_measure(SECONDARY).records == "items" and len(records.items):
        _paired_estimates(df, SECONDARY, records, t_idx, p_idx, is_teacher, is_parent, prefix="secondary_")
        signs = np.sign(df["gain"].to_numpy(float)) * np.sign(df["secondary_gain"].to_numpy(float))
        df["sign_disagrees"] = (df["role"] == "recovered").to_numpy() & (signs < 0)
    else:
        df["sign_disagrees"] = False

    cka, kl = df["cka_mean"].to_numpy(float), df["kl"].to_numpy(float)
    nan = np.full(len(df), np.nan)
    df["cka_parent"] = np.where(is_teacher, nan, cka[p_idx])
    df["delta_cka"] = np.where(is_teacher, nan, cka - cka[p_idx])
    df["kl_parent"] = np.where(is_teacher, nan, kl[p_idx])
    df["delta_kl"] = np.where(is_teacher, nan, kl - kl[p_idx])
    for measure_name in SIMILARITY_MEASURES:
        if f"{measure_name}_mean" in df:
            values = df[f"{measure_name}_mean"].to_numpy(float)
            df[f"delta_{measure_name}"] = np.where(is_teacher, nan, values - values[p_idx])
    df["delta_cka_boot"] = _paired_delta_replicates(df, p_idx, is_teacher)
    df["delta_cka_ci_low"], df["delta_cka_ci_high"] = _percentile_interval(df["delta_cka_boot"])
    df = df.drop(columns=["cka_boot"], errors="ignore")

    role_order = df["role"].map({"teacher": 0, "degraded": 1, "recovered": 2})
    df = df.assign(_ro=role_order, _nt=role_order > 0)
    df = df.sort_values(["model", "_nt", "degradation", "_ro", "recovery"], kind="stable")
    return df.drop(columns=["_ro", "_nt"]).reset_index(drop=True)


def _percentile_interval(replicates: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile CI of delta_cka from its paired bootstrap replicates over probe sequences (NaN where a row has
    none): the same resampled sequences for an artifact and its parent, so the probe-set noise they share cancels."""
    low, high = np.full(len(replicates), np.nan), np.full(len(replicates), np.nan)
    for i, boot in enumerate(replicates):
        if boot:
            low[i], high[i] = np.percentile(boot, [2.5, 97.5])
    return low, high


def _paired_delta_replicates(df: pd.DataFrame, p_idx: np.ndarray, is_teacher: np.ndarray) -> list[list[float]]:
    """Each artifact's delta CKA replicates (its bootstrap replicates minus its parent's, on the same resampled
    probe sequences: the similarity step draws them from one seed for every artifact), for the delta CKA interval
    and the per-arm manipulation check; empty where there are none (the teacher, a parent, fewer than 10)."""
    out: list[list[float]] = [[] for _ in range(len(df))]
    if "cka_boot" not in df:
        return out
    boots = [np.asarray(b if b is not None else [], float) for b in df["cka_boot"]]
    for i, parent in enumerate(p_idx):
        own, theirs = boots[i], boots[parent]
        if not is_teacher[i] and parent != i and own.size >= 10 and own.size == theirs.size:
            out[i] = (own - theirs).tolist()
    return out


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write the table as parquet, atomically, with its digest in the sidecar `<path>.sha256`."""
    write_parquet(table, path)


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """A table written by write_table, verified against its sidecar digest (a flipped bit is an error)."""
    return read_parquet(Path(path), producer="the `table` rule")
