"""The real DAG end to end on a tiny random Llama: every rule, every degradation family, every recovery."""

import math
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny_study import snakemake

from realign.config import recovery_spec, study_cells
from realign.identity import ArtifactId
from realign.degrade import constraints
from realign.io import read_json, read_jsonl
from realign.models.artifact import load_artifact, load_constraint_tensors

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(tiny_study):
    return tiny_study


def cells(config):
    yield "none", "none"
    yield from study_cells(config)


def test_dry_run_lists_every_artifact_and_measurement(study):
    workdir, config, dry = study
    for degradation, recovery in cells(config):
        assert ArtifactId.parse("tiny", degradation, recovery).run_dir in dry
        for kind, suffix in (("activations", "safetensors"), ("similarity", "parquet"), ("divergence", "json"),
                             ("eval", "json")):
            assert f"results/{kind}/tiny/{degradation}/{recovery}.{suffix}" in dry


def test_report_and_table(study):
    workdir, config, _ = study
    report = (workdir / "results/report.html").read_text()
    stats = read_json(workdir / "results/stats.json", verify=True)  # sealed: its digest sidecar matches
    assert stats["association"] in ("supported", "refuted", "inconclusive")
    assert stats["association"] in report
    assert "<svg" in report and "https://" not in report.split("</style>")[-1]
    table = pd.read_parquet(workdir / "results/table.parquet")
    assert len(table) == len(list(cells(config)))
    for column in ("damage", "recovery_fraction", "delta_cka", "delta_kl", "nll_general", "acc_arc_easy",
                   "delta_procrustes_sim", "delta_knn_overlap", "delta_cka_ci_low", "cka_mean_ci_high"):
        assert column in table.columns
    assert (table["cka_estimator"] == "debiased").all()
    # every artifact records the CPU kernels it was computed with; one host made them all (issue 32)
    import torch
    assert (table["cpu_capability"] == torch.backends.cpu.get_cpu_capability()).all()
    assert "computed on different CPU kernels" not in report
    # and the precision it was measured in: measure.dtype's default, fp32
    assert (table["measure_precision"] == "float32").all() and "measured in different precisions" not in report
    for anchor in ("heatmaps", "nulls", "measures", "controls", "dose", "benchmarks"):
        assert f'id="{anchor}"' in report
    assert stats["dose_response"] and stats["by_measure"] and stats["per_benchmark"]["rows"]
    assert (table["performance_metric"] == "bench_logprob").all() and 'id="recovery"' in report
    recovered = table[table["role"] == "recovered"]
    for column in ("gain", "recovery_fraction", "secondary_gain"):
        # a recovery fraction exists where there is a damage (not for the undamaged model's self-distillation)
        rows = recovered[recovered[column].notna()]
        assert len(rows) >= len(recovered) - 1
        assert rows[f"{column}_ci_low"].notna().all() and rows[f"{column}_ci_high"].notna().all()
        if column != "recovery_fraction":  # a ratio's percentile interval need not hold its point value
            assert (rows[f"{column}_ci_low"] <= rows[column] + 1e-12).all()


def test_items_pair_every_artifact_and_the_interval_benchmark_agrees_with_the_table(study):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from interval_widths import widths

    workdir, config, _ = study
    ids = {(d, r): pd.read_parquet(workdir / f"results/eval/tiny/{d}/{r}.items.parquet")["item_id"].tolist()
           for d, r in cells(config)}
    assert len(set(map(tuple, ids.values()))) == 1  # the same items, in the same order, for every artifact
    assert len(ids["none", "none"]) == sum(config["measure"]["benchmarks"].values())
    table = pd.read_parquet(workdir / "results/table.parquet").set_index("recovery")
    rows = widths(workdir, n_boot=200)
    assert rows
    for row in rows:
        degradation, recovery = row["artifact"].split("/")[1:]
        expected = table[table["degradation"] == degradation].loc[recovery, "recovery_fraction"]
        assert row["c_paired_logprob"]["recovery_fraction"] == pytest.approx(expected, nan_ok=True)


def test_null_floors_are_measured_against_a_different_model(study):
    workdir, _, _ = study
    floors = pd.read_parquet(workdir / "results/null/tiny/floors.parquet")
    full = floors[(floors["n_samples"] == floors["n_samples"].max()) & (floors["layer"] >= 1)]
    random_init = full[full["null"] == "random-init"]
    assert len(random_init) and random_init["debiased_cka"].max() < 0.999  # not the teacher again
    shuffled = full[full["null"] == "token-shuffled"]
    # 48 probe tokens against a 64-wide model: the biased estimator's floor is far above the debiased one's ~0
    assert abs(shuffled["debiased_cka"].mean()) < 0.1 and shuffled["linear_cka"].mean() > 0.3


def test_snakemake_report_archive_holds_the_report_and_its_figures(study, tmp_path):
    workdir, config, _ = study
    figures = sorted(p.name for p in (workdir / "results/figures").glob("*.svg"))  # + Snakemake's timestamp
    expected = {f"cka-tiny-{d}.svg" for d in config["degradations"]} | {"scatter.svg", "bars.svg"}
    assert expected <= set(figures)
    for name in figures:
        svg = (workdir / "results/figures" / name).read_text()
        assert svg.startswith("<?xml") and "<svg" in svg and 'width="' in svg.split(">", 2)[1]
    archive = tmp_path / "report.zip"
    made = snakemake(workdir, "--report", str(archive))
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        assert "report/report.html" in names  # Snakemake's own report page
        kept = {Path(n).name: n for n in names if "/data/raw/" in n}
        assert set(figures) | {"report.html"} <= set(kept), sorted(kept)
        assert zf.read(kept["scatter.svg"]) == (workdir / "results/figures/scatter.svg").read_bytes()
        page = zf.read("report/report.html").decode()
    assert "Layerwise alignment for one damaged model" in page and "Recovery vs re-alignment" in page


def test_teacher_measures_identical_to_itself(study):
    workdir, _, _ = study
    cka = pd.read_parquet(workdir / "results/similarity/tiny/none/none.parquet")
    for measure in ("linear_cka", "debiased_cka", "rbf_cka", "procrustes_sim", "knn_overlap"):
        assert cka[measure].sub(1).abs().max() < 1e-6, measure
    divergence = read_json(workdir / "results/divergence/tiny/none/none.json")
    assert abs(divergence["kl_teacher_artifact"]) < 1e-9 and divergence["top1_agreement"] == 1.0


def test_damage_is_real_and_measured(study):
    workdir, config, _ = study
    for degradation in config["degradations"]:
        divergence = read_json(workdir / f"results/divergence/tiny/{degradation}/none.json")
        assert divergence["kl_teacher_artifact"] > 1e-6, degradation
        evaluation = read_json(workdir / f"results/eval/tiny/{degradation}/none.json")
        for task, limit in config["measure"]["benchmarks"].items():
            assert evaluation["benchmarks"][task]["n"] == limit
            assert 0.0 <= evaluation["benchmarks"][task]["acc"] <= 1.0
        assert math.isfinite(evaluation["perplexity"]["general"]["nll"])


def test_saved_artifacts_keep_their_constraint_after_every_recovery(study):
    workdir, config, _ = study
    checked = set()
    for degradation, recovery in cells(config):
        artifact = workdir / ArtifactId.parse("tiny", degradation, recovery).location
        model, _, meta = load_artifact(artifact)
        assert meta.recovery == recovery
        masks = load_constraint_tensors(artifact)
        result = constraints.check(model, meta.constraint, masks)
        assert result["ok"]
        checked.add(meta.constraint["kind"])
        if recovery != "none":
            curve = meta.training_curve
            spec, seed = recovery_spec(config, recovery)
            expected_steps = ArtifactId.parse("tiny", degradation, recovery).step or spec["steps"]
            assert len(curve) == meta.step == expected_steps
            assert meta.seed == seed
            assert all(math.isfinite(point["loss"]) for point in curve)
            # the constraint is the damaged parent's own, not one re-derived from the recovered weights
            parent = workdir / ArtifactId("tiny", degradation, "none").location
            assert meta.constraint == read_json(parent / "artifact.json")["constraint"]
            parent_tensors = load_constraint_tensors(parent)
            assert masks.keys() == parent_tensors.keys()
            assert all(torch.equal(masks[k], parent_tensors[k]) for k in masks)
            if meta.constraint["kind"] == "frozen":  # QLoRA: the base is unchanged, the adapter is trained
                assert (artifact / "adapter" / "adapter_config.json").is_file()
                from peft import PeftModel

                assert isinstance(model, PeftModel)
    assert checked == {"none", "grid", "fp4-grid", "mask", "frozen"}


def test_methods_controls_replicates_and_checkpoints_are_artifacts(study):
    workdir, config, _ = study
    models = workdir / "results/models/tiny"
    table = pd.read_parquet(workdir / "results/table.parquet").set_index(["degradation", "recovery"])
    # kd-topk trained on the cached top-k of the original teacher, and saved its half-way checkpoint inside its run
    topk = read_json(models / "magnitude-60/kd-topk/artifact.json")
    cache = Path(topk["data_split"]["teacher_top_k"])
    assert cache.name == "none.len64.k16.t1.0.safetensors" and (workdir / cache).is_file()
    assert topk["checkpoints"] == [2]
    checkpoint = read_json(models / "magnitude-60/kd-topk/checkpoints/step-2/artifact.json")
    assert checkpoint["training_curve"] == topk["training_curve"][:2]
    assert bool(table.loc[("magnitude-60", "kd-topk@step2"), "checkpoint"])
    assert table.loc[("magnitude-60", "kd-topk@step2"), "step"] == 2
    # the damaged-teacher control learned from the RTN model, the replicate from another seed
    damaged = read_json(models / "magnitude-60/kd-damaged-teacher/artifact.json")
    assert damaged["teacher"].endswith("results/models/tiny/rtn-w2g32/none")
    assert table.loc[("magnitude-60", "kd-damaged-teacher"), "teacher"] == "rtn-w2g32"
    replicate = read_json(models / "magnitude-60/kd+seed1/artifact.json")
    assert replicate["seed"] == 1 and replicate["training_curve"] != read_json(
        models / "magnitude-60/kd/artifact.json")["training_curve"]
    assert table.loc[("magnitude-60", "kd+seed1"), "recovery_base"] == "kd"
    # self-distillation of the undamaged model: no damage, so no recovery fraction; the sdft arm used rewrites
    assert math.isnan(table.loc[("none", "kd"), "recovery_fraction"])
    rewrites = read_jsonl(workdir / "results/data/tiny/teacher_rewrites.jsonl")
    assert len(rewrites) == config["data"]["prompt_splits"]["distill"]
    assert all(r["rewrite"] == r["rewrite_raw"] if r["rewrite_accepted"] else r["rewrite"] == r["reference"]
               for r in rewrites)
    assert read_json(models / "sft-code/sdft/artifact.json")["data_split"]["targets"] == "rewrite"


def test_second_run_has_nothing_to_do(study):
    workdir, _, _ = study
    again = snakemake(workdir, "-n")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr


def test_snakemake_lint_is_clean():
    """Input and parameter functions live in common.smk, paths are built without '+': `snakemake --lint` passes."""
    import subprocess
    import sys

    from tiny_study import REPO

    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "-s", str(REPO / "Snakefile"),
                             "--directory", str(REPO)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert "Congratulations, your workflow is in a good condition" in result.stdout + result.stderr, result.stdout


def test_final_outputs_are_sealed(study, tmp_path):
    """stats.json and report.html carry digest sidecars: an edited digit in a copy of stats.json is caught by the
    verified reader (issue 32), and the report's digest is that of the report as written."""
    import shutil

    from realign.io import IntegrityError, file_sha256

    workdir, _, _ = study
    results = workdir / "results"
    assert (results / "report.html.sha256").read_text().split()[0] == file_sha256(results / "report.html")
    for name in ("stats.json", "stats.json.sha256"):
        shutil.copy(results / name, tmp_path / name)
    text = (tmp_path / "stats.json").read_text()
    digit = next(i for i, c in enumerate(text) if c.isdigit())
    (tmp_path / "stats.json").write_text(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1:])
    with pytest.raises(IntegrityError):
        read_json(tmp_path / "stats.json", verify=True)
