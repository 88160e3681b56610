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
    # Every recovery on one damage per family; kd under each remaining constraint kind (NVFP4 grid, frozen
    # QLoRA base, N:M mask); the other methods, whose constraint kinds are already trained under, damaged only.
    config["study"] = [{"degradations": ["sft-code", "rtn-w2g32", "magnitude-60"]},
                       {"degradations": ["nvfp4", "bnb-nf4", "wanda-2of4"], "recoveries": ["kd"]},
                       {"degradations": ["sft-math", "gptq-w2g32", "sparsegpt-50"], "recoveries": []}]
    for recovery in config["recoveries"].values():
        recovery.update(steps=3, lr=1.0e-3)
    config["data"].update(prompt_splits={"distill": 8, "probe": 6, "divergence": 4, "heldout": 4},
                          teacher_max_new_tokens=12, code_heldout_chunks=4, resources_dir=str(resources_dir),
                          calibration={"sequences": 4, "max_len": 32})
    config["measure"].update(probe_max_tokens=32, positions_per_sequence=8, eval_batch_size=8,
                             benchmarks={"arc_easy": 6, "hellaswag": 4, "piqa": 6, "lambada": 6})
    config["analysis"].update(n_boot=200, n_perm=200)
    return copy.deepcopy(config)
