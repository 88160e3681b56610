"""The Slurm profile against a real one-node Slurm cluster (tools/local_slurm.sh: munge, slurmctld, slurmd on
private ports, installed with apt when missing): part of the tiny study runs as Slurm jobs, and its outputs must
equal the local run's."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file
from tiny_study import REPO, snakemake

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]

SCRIPT = REPO / "tools" / "local_slurm.sh"
# One damaged-and-recovered cell with every kind of rule on its path: data, teacher, answers, degrade, recover,
# and all four measurements (teacher included), so each rule is submitted to Slurm at least once.
CELL = ("rtn-w2g32", "kd")
TARGETS = [f"results/similarity/tiny/{CELL[0]}/{CELL[1]}.parquet", f"results/eval/tiny/{CELL[0]}/{CELL[1]}.json",
           f"results/divergence/tiny/{CELL[0]}/{CELL[1]}.json", f"results/eval/tiny/{CELL[0]}/none.json"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True, timeout=60)
    assert started.returncode == 0, started.stdout + started.stderr
    yield state
    stopped = subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    for pidfile in ("slurmctld.pid", "slurmd.pid", "munged.pid"):
        assert not (state / pidfile).exists()


@pytest.fixture(scope="module")
def slurm_run(cluster, tiny_study, tmp_path_factory):
    local_dir, config, _ = tiny_study
    workdir = tmp_path_factory.mktemp("slurm-study")
    shutil.copytree(local_dir / "tiny-model", workdir / "tiny-model")
    config = {**config, "models": {"tiny": {"source": "path", "path": str(workdir / "tiny-model")}}}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    # The profile as shipped, with status polling shortened for seconds-long jobs.
    run = snakemake(workdir, "--profile", str(REPO / "profiles" / "slurm"),
                    "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2",
                    "--latency-wait", "5", "--", *TARGETS, timeout=1200)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    return local_dir, workdir, log


def test_jobs_ran_as_slurm_jobs(slurm_run, request):
    _, _, log = slurm_run
    job_ids = set(re.findall(r"SLURM jobid (\d+)", log))
    rules = set(re.findall(r"rule (\w+):", log))
    assert {"prepare_teacher", "teacher_answers", "degrade", "recover", "activations", "similarity", "divergence",
            "evaluate"} <= rules
    assert len(job_ids) >= 12, log[-3000:]
    # The controller's own record: every id the plugin reported is a job Slurm ran to completion.
    listed = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i %T"], capture_output=True, text=True)
    states = dict(line.split() for line in listed.stdout.splitlines())
    assert {states.get(i) for i in job_ids} == {"COMPLETED"}, (job_ids, states)
    # Shown at the end of the pytest run (conftest.py), so the CI log names the Slurm jobs.
    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+)/", log)
    assert {i for i, _ in submitted} == job_ids
    request.config.realign_slurm_jobs = sorted((int(i), rule) for i, rule in submitted)


def test_outputs_equal_the_local_run(slurm_run):
    local, remote, _ = slurm_run
    degradation, recovery = CELL
    for artifact in (f"{degradation}/none", f"{degradation}/{recovery}"):
        ours = load_file(remote / f"results/models/tiny/{artifact}/model.safetensors")
        theirs = load_file(local / f"results/models/tiny/{artifact}/model.safetensors")
        assert ours.keys() == theirs.keys()
        assert all((ours[k] == theirs[k]).all() for k in ours), artifact
    for path in TARGETS:
        if path.endswith(".parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(remote / path), pd.read_parquet(local / path))
        else:
            ours, theirs = json.loads((remote / path).read_text()), json.loads((local / path).read_text())
            ours.pop("seconds"), theirs.pop("seconds")
            assert ours == theirs, path


def test_jobs_asked_for_the_sized_resources(slurm_run):
    _, _, log = slurm_run
    # The recover job of the tiny model: sized by realign.resources from its parameter count (no GPU here).
    block = log[log.index("rule recover:"):]
    block = block[:block.index("\n\n")]
    mem = int(re.search(r"mem_mb=(\d+)", block).group(1))
    assert 3000 <= mem < 3100 and "gpu=0" in block, block
