"""envs/realign.yaml (for --use-conda) and pyproject.toml pin the same packages at the same versions."""

import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_conda_env_matches_pyproject_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "envs/realign.yaml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pinned = [p for p in pip_section if "==" in p]
    assert sorted(pinned) == sorted(project)
    assert all("==" in p for p in project), "every dependency must be pinned exactly"
    assert "torch==2.13.0" in project


def test_every_rule_declares_log_threads_resources_conda_and_benchmark():
    import re

    for smk in (REPO / "workflow/rules").glob("*.smk"):
        text = smk.read_text()
        for rule in re.split(r"\n(?=rule )", text)[1:]:
            name = rule.split(":")[0]
            for directive in ("log:", "threads:", "resources:", "conda:", "benchmark:"):
                assert directive in rule, f"{smk.name} {name} lacks {directive}"
            assert re.search(r'resources:\n\s+\*\*sized\("\w+"\)', rule), f"{smk.name} {name}: resources not sized"
