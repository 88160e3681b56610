"""realign.analysis.table: collect_row, build_table (hand-computed), load_similarity_layers."""

import math

import numpy as np
import pandas as pd
import pytest

from realign.analysis.table import build_table, collect_row, load_similarity_layers, read_table, write_table
from realign.io import IntegrityError, digest_path, write_json, write_parquet
from item_records import records_for


def _row(model, deg, rec, bench, se, cka, kl, nll=2.0, family="quantization"):
    return {
        "model": model, "degradation": deg, "recovery": rec,
        "family": "teacher" if deg == "none" else family,
        "degradation_method": "none" if deg == "none" else "rtn",
        "recovery_method": rec if rec == "none" else "kd",
        "tasks": "a,b", "acc_a": bench, "acc_a_stderr": se, "acc_b": bench, "acc_b_stderr": se,
        "bench_mean": bench, "bench_mean_stderr": se, "nll_general": nll, "cka_mean": cka, "kl": kl,
    }


def _rows():
    return [
        _row("m", "none", "none", 0.60, 0.01, 1.00, 0.0, nll=2.0),
        _row("m", "q4", "none", 0.40, 0.01, 0.70, 0.50, nll=2.5),
        _row("m", "q4", "kd", 0.55, 0.01, 0.90, 0.10, nll=2.1),
        _row("m", "q4", "sdft", 0.45, 0.01, 0.65, 0.30, nll=2.6),
        _row("m", "tiny", "none", 0.595, 0.01, 0.99, 0.01, nll=2.005),
        _row("m", "tiny", "kd", 0.60, 0.01, 0.995, 0.005, nll=2.0),
    ]


def _get(t, d, r):
    return t[(t.degradation == d) & (t.recovery == r)].iloc[0]


def test_build_table_hand_computed():
    t = build_table(_rows(), "bench_mean", records_for(_rows()))
    kd = _get(t, "q4", "kd")
    assert kd["damage"] == pytest.approx(0.20)
    assert kd["gain"] == pytest.approx(0.15)
    assert kd["recovery_fraction"] == pytest.approx(0.75)
    assert kd["delta_cka"] == pytest.approx(0.20)
    assert kd["delta_kl"] == pytest.approx(-0.40)
    assert kd["role"] == "recovered"
    assert not kd["damage_within_noise"]
    sd = _get(t, "q4", "sdft")
    assert sd["recovery_fraction"] == pytest.approx(0.25)
    assert sd["delta_cka"] == pytest.approx(-0.05)
    # 2 * sqrt(0.01^2 + 0.01^2) = 0.0283 > gain 0.05? no: 0.05 > 0.0283 -> beyond noise
    assert not sd["gain_within_noise"]
    parent = _get(t, "q4", "none")
    assert parent["role"] == "degraded" and math.isnan(parent["recovery_fraction"])
    assert parent["damage"] == pytest.approx(0.20)
    teacher = _get(t, "none", "none")
    assert teacher["role"] == "teacher"
    assert math.isnan(teacher["recovery_fraction"]) and math.isnan(teacher["damage"])
    # damage 0.005 < 2 * 0.01414 -> within noise
    assert _get(t, "tiny", "kd")["damage_within_noise"]
    assert t["damage_within_noise"].dtype == bool


def test_build_table_nll_orientation_and_noise():
    t = build_table(_rows(), "nll_general", records_for(_rows()))
    kd = _get(t, "q4", "kd")
    assert kd["damage"] == pytest.approx(0.5)  # -2.0 - (-2.5)
    assert kd["recovery_fraction"] == pytest.approx(0.8)
    assert not kd["damage_within_noise"]
    # The sequences' own difficulty is shared by every artifact and cancels in the paired difference: 0.005 nats
    # is beyond noise here. Noise of the damaged model's own (zero-mean, 0.2 nats/token) puts it within noise.
    assert not _get(t, "tiny", "kd")["damage_within_noise"]
    noisy = records_for(_rows())
    own = (noisy.sequences.degradation == "tiny") & (noisy.sequences.recovery == "none")
    noise = np.random.default_rng(1).normal(0.0, 2.0, own.sum())
    noisy.sequences.loc[own, "nll_sum"] += noise - noise.mean()
    tiny = _get(build_table(_rows(), "nll_general", noisy), "tiny", "kd")
    assert tiny["damage"] == pytest.approx(0.005) and tiny["damage_within_noise"]
    t2 = build_table(_rows(), "acc:a", records_for(_rows()))
    assert _get(t2, "q4", "kd")["recovery_fraction"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="analysis.performance: unknown measure 'f1'"):
        build_table(_rows(), "f1", records_for(_rows()))


def test_missing_teacher_and_parent_named():
    rows = [r for r in _rows() if r["degradation"] != "none"]
    with pytest.raises(ValueError, match=r"teacher artifact \(model='m'"):
        build_table(rows, "bench_mean", records_for(rows))
    rows = [r for r in _rows() if not (r["degradation"] == "q4" and r["recovery"] == "none")]
    with pytest.raises(ValueError, match=r"parent artifact \(model='m', degradation='q4'"):
        build_table(rows, "bench_mean", records_for(rows))
    with pytest.raises(ValueError, match="duplicate"):
        build_table(_rows() + [_rows()[0]], "bench_mean", records_for(_rows()))


def _write_artifact(root, model, deg, rec, accs, cka_vals, alignment=None):
    """`alignment`: the (first, last) layers the `similarity` rule flagged; by default 1..L-1 (1 when there is no other)."""
    d = root / model / deg / rec
    d.mkdir(parents=True)
    write_json(d / "artifact.json", digest=True, obj={
        "model": model, "degradation": deg, "recovery": rec, "family": "pruning",
        "degradation_method": "magnitude", "degradation_params": {"sparsity": 0.5}, "recovery_method": "kd",
        "recovery_params": {}, "constraint": {}, "seed": 3, "timings": {"seconds": 12.5},
        "training_curve": [{"step": 1, "loss": 2.0}], "parents": [], "data_split": {}, "versions": {},
    })
    write_json(d / "eval.json", digest=True, obj={
        "benchmarks": {t: {"acc": a, "acc_stderr": 0.03, "acc_norm": None, "acc_norm_stderr": None, "n": 100}
                       for t, a in accs.items()},
        "perplexity": {"general": {"nll": 2.5, "ppl": 12.18, "n_tokens": 1000},
                       "code": {"nll": 1.5, "ppl": 4.48, "n_tokens": 1000}},
        "seconds": 4.0,
    })
    write_json(d / "divergence.json", digest=True, obj={"kl_teacher_artifact": 0.2, "kl_stderr": 0.01,
                                                        "top1_agreement": 0.8, "n_tokens": 500, "n_prompts": 10,
                                                        "seconds": 1.0})
    first, last = alignment or (1, max(1, len(cka_vals) - 2))
    write_parquet(pd.DataFrame({"layer": list(range(len(cka_vals))), "linear_cka": cka_vals,
                                "debiased_cka": [v - 0.01 for v in cka_vals],
                                "in_alignment_range": [first <= i <= last for i in range(len(cka_vals))]}),
                  d / "cka.parquet")
    return [d / f for f in ("artifact.json", "eval.json", "divergence.json", "cka.parquet")]


def test_collect_row_and_similarity_layers(tmp_path):
    paths = _write_artifact(tmp_path, "m", "p50", "kd", {"arc": 0.5, "hella": 0.7}, [0.2, 0.9, 0.7, 0.8])
    row = collect_row(*paths)
    assert row["model"] == "m" and row["family"] == "pruning" and row["recovery_method"] == "kd"
    assert row["acc_arc"] == 0.5 and row["acc_hella_stderr"] == 0.03
    assert row["bench_mean"] == pytest.approx(0.6)
    assert row["bench_mean_stderr"] == pytest.approx(math.sqrt(2 * 0.03**2) / 2)
    # the debiased estimator by default, over the flagged range 1..2: neither the embeddings nor the final state
    assert row["cka_mean"] == pytest.approx(0.79)
    assert row["cka_min"] == pytest.approx(0.69)
    assert (row["alignment_first"], row["alignment_last"], row["n_layers"]) == (1, 2, 2)
    assert row["cka_embedding"] == pytest.approx(0.19) and row["cka_final"] == pytest.approx(0.79)
    linear = collect_row(*paths, cka_estimator="linear")
    assert linear["cka_mean"] == pytest.approx(0.8) and linear["cka_final"] == pytest.approx(0.8)
    assert row["linear_cka_mean"] == pytest.approx(0.8) and math.isnan(row["rbf_cka_mean"])
    with pytest.raises(ValueError, match="cka_estimator"):
        collect_row(*paths, cka_estimator="rbf")
    assert row["kl"] == 0.2 and row["top1"] == 0.8 and row["nll_code"] == 1.5 and row["seconds"] == 12.5
    assert row["path_similarity"] == str(paths[3])

    paths2 = _write_artifact(tmp_path, "m", "p50", "none", {"arc": 0.4, "hella": 0.6}, [0.2, 0.5, 0.6, 0.7])
    long = load_similarity_layers({("m", "p50", "kd"): paths[3], ("m", "p50", "none"): paths2[3]})
    assert list(long.columns)[:6] == ["model", "degradation", "recovery", "layer", "linear_cka", "debiased_cka"]
    assert long["knn_overlap"].isna().all()  # a parquet without the measure reads as missing, not as zero
    assert len(long) == 8
    assert long[long.recovery == "kd"]["linear_cka"].tolist() == [0.2, 0.9, 0.7, 0.8]
    long2 = load_similarity_layers([(("m", "p50", "kd"), paths[3])])
    assert len(long2) == 4


def test_table_parquet_roundtrip(tmp_path):
    t = build_table(_rows(), "bench_mean", records_for(_rows()))
    write_table(t, tmp_path / "table.parquet")
    back = pd.read_parquet(tmp_path / "table.parquet")
    assert list(back.columns) == list(t.columns)
    np.testing.assert_allclose(back["recovery_fraction"], t["recovery_fraction"], equal_nan=True)
    pd.testing.assert_frame_equal(read_table(tmp_path / "table.parquet"), back)


def test_every_single_bit_flip_in_the_table_is_refused(tmp_path):
    """A digest over every byte (data and parquet metadata): 40 single-bit flips, 40 refusals naming the file."""
    path = tmp_path / "table.parquet"
    write_table(build_table(_rows(), "bench_mean", records_for(_rows())), path)
    assert digest_path(path).read_text().split() == [__import__("hashlib").sha256(path.read_bytes()).hexdigest(),
                                                     "table.parquet"]  # sha256sum -c format
    original = path.read_bytes()
    rng = np.random.default_rng(0)
    for position in rng.choice(len(original) * 8, 40, replace=False):
        data = bytearray(original)
        data[position // 8] ^= 1 << (position % 8)
        path.write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match=f"{path} does not match the sha256 digest recorded in table.parquet.sha256"):
            read_table(path)
    path.write_bytes(original)
    read_table(path)
    digest_path(path).unlink()
    with pytest.raises(IntegrityError, match=f"{path} has no sha256 digest.*rerun the `table` rule"):
        read_table(path)


def test_table_inputs_are_verified(tmp_path):
    artifact_json, eval_json, divergence_json, cka = _write_artifact(tmp_path, "m", "p50", "kd", {"arc": 0.5}, [0.2, 0.9])
    cka.write_bytes(cka.read_bytes()[:-1] + bytes([cka.read_bytes()[-1] ^ 1]))
    with pytest.raises(IntegrityError, match=f"{cka} does not match"):
        collect_row(artifact_json, eval_json, divergence_json, cka)
    with pytest.raises(IntegrityError, match=f"{cka} does not match"):
        load_similarity_layers({("m", "p50", "kd"): cka})
    digest_path(artifact_json).unlink()
    with pytest.raises(IntegrityError, match=f"{artifact_json} has no sha256 digest"):
        collect_row(artifact_json, eval_json, divergence_json, cka)


@pytest.mark.parametrize("name", ["eval.json", "divergence.json"])
def test_edited_measurements_are_not_tabulated(tmp_path, name):
    """A benchmark or divergence result edited after its rule wrote it (here one accuracy / KL digit) is refused,
    as is one without its digest."""
    paths = _write_artifact(tmp_path, "m", "p50", "kd", {"arc": 0.5}, [0.2, 0.9])
    target = paths[0].parent / name
    text = target.read_text()
    edited = text.replace("0.5", "0.6", 1) if name == "eval.json" else text.replace("0.2", "0.1", 1)
    assert edited != text
    target.write_text(edited)
    with pytest.raises(IntegrityError, match=f"{target} does not match"):
        collect_row(*paths)
    digest_path(target).unlink()
    with pytest.raises(IntegrityError, match=f"{target} has no sha256 digest"):
        collect_row(*paths)


def test_paired_bootstrap_delta_ci(tmp_path):
    """The delta-CKA CI comes from the paired replicates: a shared probe-set fluctuation cancels."""
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 0.05, 200)  # the probe-set noise every artifact sees on the same resampled sequences
    rows = []
    for rec, level, accs in (("none", 0.6, {"arc": 0.4, "hella": 0.5}), ("kd", 0.63, {"arc": 0.6, "hella": 0.7})):
        for deg, lv in (("p50", level), ("none", 1.0)):
            if deg == "none" and rec != "none":
                continue
            paths = _write_artifact(tmp_path, "m", deg, rec, accs if deg != "none" else {"arc": 0.7, "hella": 0.8},
                                    [0.2, lv, lv])
            summary = paths[3].with_suffix(".json")
            replicates = lv - 0.01 + shared + 0.001 * rng.normal(size=200)
            write_json(summary, digest=True, obj={"alignment_layers": [1, 1],
                                                  "debiased_cka_mean_ci": [lv - 0.1, lv + 0.1],
                                                  "debiased_cka_mean_replicates": replicates.tolist()})
            rows.append(collect_row(*paths, summary))
    t = build_table(rows, "bench_mean", records_for(rows))
    kd = t[t.recovery == "kd"].iloc[0]
    assert kd["delta_cka"] == pytest.approx(0.03)
    assert 0.02 < kd["delta_cka_ci_low"] < 0.03 < kd["delta_cka_ci_high"] < 0.04  # width ~ 0.001 noise, not 0.05
    assert "cka_boot" not in t and kd["cka_mean_ci_low"] == pytest.approx(0.63 - 0.1)
    parent = t[(t.degradation == "p50") & (t.recovery == "none")].iloc[0]
    assert math.isnan(parent["delta_cka_ci_low"])  # a parent is not compared with itself


def test_cka_summary_over_the_flagged_range_only(tmp_path):
    """cka_mean and its replicates come from the range the `similarity` rule flagged (measure.alignment_layers), not from
    `layer >= 1`; a summary made over another range, or a parquet from before the range existed, is refused."""
    paths = _write_artifact(tmp_path, "m", "p50", "kd", {"arc": 0.5}, [0.1, 0.5, 0.6, 0.7, 0.9], alignment=(2, 3))
    row = collect_row(*paths)
    assert row["cka_mean"] == pytest.approx(0.64) and row["cka_min"] == pytest.approx(0.59)
    assert (row["alignment_first"], row["alignment_last"]) == (2, 3) and row["cka_final"] == pytest.approx(0.89)
    summary = paths[3].with_suffix(".json")
    write_json(summary, digest=True, obj={"alignment_layers": [1, 3], "debiased_cka_mean_ci": [0.5, 0.7],
                                          "debiased_cka_mean_replicates": [0.6] * 20})
    with pytest.raises(ValueError, match=r"alignment range \[1, 3\] is not the range \[2, 3\]"):
        collect_row(*paths, summary)
    old = paths[3].parent.parent / "old.parquet"
    write_parquet(pd.DataFrame({"layer": [0, 1, 2], "linear_cka": [0.1, 0.5, 0.9], "debiased_cka": [0.1, 0.5, 0.9]}),
                  old)
    with pytest.raises(ValueError, match=f"{old}: no 'in_alignment_range' column .* rerun the `similarity` rule"):
        collect_row(*paths[:3], old)


def test_table_carries_the_other_measures_jackknife_intervals(tmp_path):
    """<measure>_mean_ci_low/high come from the CKA summary's jackknife intervals (the manipulation check reads
    the damaged parent's upper bound); a summary without them leaves the columns out."""
    paths = _write_artifact(tmp_path, "m", "p50", "none", {"arc": 0.5}, [0.1, 0.5, 0.6, 0.9])
    summary = paths[3].with_suffix(".json")
    write_json(summary, digest=True, obj={"alignment_layers": [1, 2], "debiased_cka_mean_ci": [0.5, 0.6],
                                          "debiased_cka_mean_replicates": [0.55] * 20,
                                          "other_means_jackknife": {"procrustes_sim": {"ci": [0.41, 0.47]},
                                                                    "knn_overlap": {"ci": [0.2, 0.3]}}})
    row = collect_row(*paths, summary)
    assert (row["procrustes_sim_mean_ci_low"], row["procrustes_sim_mean_ci_high"]) == (0.41, 0.47)
    assert row["knn_overlap_mean_ci_high"] == 0.3 and "rbf_cka_mean_ci_high" not in row
