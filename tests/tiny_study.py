"""A complete study config around a tiny random Llama: all rules, all families, minutes on 2 cores."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_config(model_dir: Path, resources_dir: Path) -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["models"] = {"tiny": {"source": "path", "path": str(model_dir)}}
    config["training"].update(batch_size=2, max_len=64, warmup_steps=1)
    config["degradations"] = {
        "sft-code": {"method": "sft", "steps": 3, "lr": 1.0e-3},
        "rtn-w2g32": {"method": "rtn", "bits": 2, "group_size": 32},
        "magnitude-60": {"method": "magnitude", "sparsity": 0.6},
    }
    for recovery in config["recoveries"].values():
        recovery.update(steps=3, lr=1.0e-3)
    config["data"].update(prompt_splits={"distill": 8, "probe": 6, "divergence": 4, "heldout": 4},
                          teacher_max_new_tokens=12, code_heldout_chunks=4, resources_dir=str(resources_dir))
    config["measure"].update(probe_max_tokens=32, positions_per_sequence=8, eval_batch_size=8,
                             benchmarks={"arc_easy": 6, "hellaswag": 4, "piqa": 6, "lambada": 6})
    config["analysis"].update(n_boot=200, n_perm=200)
    return copy.deepcopy(config)
