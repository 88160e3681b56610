"""An artifact is a directory: safetensors weights + tokenizer + `artifact.json` (+ `constraint.safetensors`).

`artifact.json` records parents, exact parameters, the constraint the weights must keep, seeds, library
versions, timings and the training curve, so every number in the report can be traced to how it was made.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from realign.io import atomic_path, read_json, write_json

ARTIFACT_JSON = "artifact.json"
CONSTRAINT_FILE = "constraint.safetensors"


def library_versions() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "safetensors", "lm_eval", "snakemake", "realign"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return versions


def save_artifact(model, tokenizer, out_dir: str | Path, meta: dict,
                  constraint_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the whole artifact into a temporary directory, then rename it into place."""
    meta = dict(meta)
    meta.setdefault("versions", library_versions())
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if constraint_tensors:
            save_file({k: v.contiguous() for k, v in constraint_tensors.items()}, str(tmp / CONSTRAINT_FILE))
        write_json(tmp / ARTIFACT_JSON, meta)
    return Path(out_dir)


def read_meta(artifact_dir: str | Path) -> dict:
    return read_json(Path(artifact_dir) / ARTIFACT_JSON)


def load_artifact(artifact_dir: str | Path):
    """Load (model, tokenizer, meta) in fp32 on CPU; a damaged or incomplete directory is a clear error."""
    artifact_dir = Path(artifact_dir)
    if not (artifact_dir / ARTIFACT_JSON).is_file():
        raise FileNotFoundError(f"{artifact_dir} is not a complete artifact (no {ARTIFACT_JSON})")
    meta = read_meta(artifact_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(artifact_dir, dtype=torch.float32)
    except (OSError, SafetensorError, RuntimeError) as err:
        raise RuntimeError(f"cannot load weights of artifact {artifact_dir}: {err}") from err
    tokenizer = AutoTokenizer.from_pretrained(artifact_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer, meta


def load_constraint_tensors(artifact_dir: str | Path) -> dict[str, torch.Tensor]:
    path = Path(artifact_dir) / CONSTRAINT_FILE
    if not path.is_file():
        return {}
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise RuntimeError(f"constraint file {path} is corrupted: {err}") from err
