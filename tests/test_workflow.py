"""The real DAG end to end on a tiny random Llama: every rule, every degradation family, every recovery."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny_study import snakemake

from realign.config import study_cells
from realign.degrade import constraints
from realign.io import read_json
from realign.models.artifact import load_artifact, load_constraint_tensors

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
        assert f"results/models/tiny/{degradation}/{recovery}" in dry
        for kind, suffix in (("activations", "safetensors"), ("cka", "parquet"), ("divergence", "json"),
                             ("eval", "json")):
            assert f"results/{kind}/tiny/{degradation}/{recovery}.{suffix}" in dry


def test_report_and_table(study):
    workdir, config, _ = study
    report = (workdir / "results/report.html").read_text()
    stats = read_json(workdir / "results/stats.json")
    assert stats["verdict"] in ("supported", "refuted", "inconclusive")
    assert stats["verdict"] in report
    assert "<svg" in report and "https://" not in report.split("</style>")[-1]
    table = pd.read_parquet(workdir / "results/table.parquet")
    assert len(table) == len(list(cells(config)))
    for column in ("damage", "recovery_fraction", "delta_cka", "delta_kl", "nll_general", "acc_arc_easy"):
        assert column in table.columns


def test_teacher_measures_identical_to_itself(study):
    workdir, _, _ = study
    cka = pd.read_parquet(workdir / "results/cka/tiny/none/none.parquet")
    assert cka["linear_cka"].sub(1).abs().max() < 1e-6
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
        artifact = workdir / f"results/models/tiny/{degradation}/{recovery}"
        model, _, meta = load_artifact(artifact)
        masks = load_constraint_tensors(artifact)
        result = constraints.check(model, meta["constraint"], masks)
        assert result["ok"]
        checked.add(meta["constraint"]["kind"])
        if recovery != "none":
            curve = meta["training_curve"]
            assert len(curve) == config["recoveries"][recovery]["steps"]
            assert all(math.isfinite(point["loss"]) for point in curve)
            # the constraint is the damaged parent's own, not one re-derived from the recovered weights
            parent = workdir / f"results/models/tiny/{degradation}/none"
            assert meta["constraint"] == read_json(parent / "artifact.json")["constraint"]
            parent_tensors = load_constraint_tensors(parent)
            assert masks.keys() == parent_tensors.keys()
            assert all(torch.equal(masks[k], parent_tensors[k]) for k in masks)
            if meta["constraint"]["kind"] == "frozen":  # QLoRA: the base is unchanged, the adapter is trained
                assert (artifact / "adapter" / "adapter_config.json").is_file()
                from peft import PeftModel

                assert isinstance(model, PeftModel)
    assert checked == {"none", "grid", "fp4-grid", "mask", "frozen"}


def test_second_run_has_nothing_to_do(study):
    workdir, _, _ = study
    again = snakemake(workdir, "-n")
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
