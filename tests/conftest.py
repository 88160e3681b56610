import os

# Model and dataset hubs are unreachable here; without these, `datasets` tries a request on every load.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from realign.models.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, hidden_size=64, num_layers=2)


@pytest.fixture
def tiny(tiny_model_dir):
    """A fresh (model, tokenizer) pair for tests that modify weights."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """The whole tiny study run once, locally: (workdir, config, dry-run log). Shared by the workflow tests and
    by the Slurm test, which compares its outputs with this run's."""
    from tiny_study import snakemake, write_study

    workdir = tmp_path_factory.mktemp("study")
    config = write_study(workdir)
    dry = snakemake(workdir, "-n")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    run = snakemake(workdir)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    return workdir, config, dry.stdout + dry.stderr


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    jobs = getattr(config, "realign_slurm_jobs", None)
    if jobs:
        terminalreporter.write_line(f"tiny study through Slurm: {len(jobs)} jobs, all COMPLETED: "
                                    + ", ".join(f"{job_id} {rule}" for job_id, rule in jobs))


def pytest_collection_modifyitems(config, items):
    """A test that needs the finished tiny study runs the workflow: it is `e2e` wherever it lives."""
    for item in items:
        if "tiny_study" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)
