"""An artifact is a directory: safetensors weights + tokenizer + `artifact.json` (+ `constraint.safetensors`).

A bitsandbytes-quantized artifact stores its quantized weights (transformers reloads them from `config.json`'s
`quantization_config`); one recovered with LoRA also has `adapter/`, loaded back with
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d), d / "adapter")`.

`artifact.json` records parents, exact parameters, the constraint the weights must keep, seeds, library
versions, timings and the training curve, so every number in the report can be traced to how it was made.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from realign.device import compute_device
from realign.io import IntegrityError, atomic_path, digest_path, file_sha256, read_json, verify_file, write_json
from realign.models.record import ArtifactRecord
from realign.models.sources import require_eos

ARTIFACT_JSON = "artifact.json"
CONSTRAINT_FILE = "constraint.safetensors"
ADAPTER_DIR = "adapter"
# Files of a frozen base that a LoRA-recovered artifact copies unchanged from its damaged parent (big models
# shard their weights into model-0000k-of-0000n.safetensors + an index).
BASE_FILES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json")


def library_versions() -> dict:
    import importlib.metadata as md

    import torch

    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "safetensors", "lm_eval", "snakemake", "realign"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    # The kernels float arithmetic ran on: the same code and inputs give other low-order bits on another instruction
    # set or thread count, and a chaotic run (forgetting SFT at a high rate) amplifies them (issue 32).
    versions["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    versions["torch_threads"] = torch.get_num_threads()
    return versions


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _sort_adapter_targets(config_path: Path) -> None:
    """peft keeps `target_modules` as a set and saves it in hash order, which differs from process to process: sorted,
    the same run saves the same bytes (and the same files_sha256) every time."""
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_artifact(model, tokenizer, out_dir: str | Path, record: ArtifactRecord,
                  constraint_tensors: dict[str, torch.Tensor] | None = None,
                  frozen_base_dir: str | Path | None = None, include: dict[str, Path] | None = None) -> Path:
    """Write the whole artifact into a temporary directory, then rename it into place.

    `include` moves finished directories into the artifact before the rename ({name inside: source}; a missing
    source is skipped), so e.g. a run's checkpoints appear together with the final model or not at all.
    A LoRA-wrapped model (recovery of a frozen quantized base) saves its adapter; the base weights are copied
    from `frozen_base_dir`, whose weights the caller has verified unchanged (constraint check)."""
    if not isinstance(record, ArtifactRecord):
        raise TypeError(f"save_artifact records an ArtifactRecord, not {type(record).__name__}")
    with atomic_path(out_dir, is_dir=True) as tmp:
        if _is_peft(model):
            if frozen_base_dir is None:
                raise ValueError("saving LoRA adapters needs the directory of their frozen base")
            for pattern in BASE_FILES:
                for path in Path(frozen_base_dir).glob(pattern):
                    shutil.copy2(path, tmp / path.name)
            model.save_pretrained(tmp / ADAPTER_DIR)
            _sort_adapter_targets(tmp / ADAPTER_DIR / "adapter_config.json")
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if constraint_tensors:
            tensors = {k: v.detach().cpu().contiguous() for k, v in constraint_tensors.items()}
            save_file(tensors, str(tmp / CONSTRAINT_FILE))
        # A digest per weight file: a flipped byte passes safetensors' own (format-only) checks. The other files
        # (config, tokenizer, adapter config) change the model as surely, so they have theirs too.
        weights = sorted(tmp.glob("*.safetensors")) + sorted(tmp.glob(f"{ADAPTER_DIR}/*.safetensors"))
        record = replace(record, versions=record.versions or library_versions(),
                         weights_sha256={path.name: file_sha256(path) for path in weights},
                         files_sha256={path.relative_to(tmp).as_posix(): file_sha256(path)
                                       for path in sorted(tmp.rglob("*")) if path.is_file() and path not in weights})
        for inside, source in (include or {}).items():
            if Path(source).is_dir():
                shutil.move(str(source), str(tmp / inside))
        write_json(tmp / ARTIFACT_JSON, record.to_json(), digest=True)
    return Path(out_dir)


def verify_weights(artifact_dir: Path, record: ArtifactRecord) -> None:
    """Compare every weight file and every other file of the artifact with the digests saved in artifact.json;
    an artifact without them (saved by an older realign) cannot be verified and is an error."""
    recorded = f"{artifact_dir / ARTIFACT_JSON}"
    for key in ("weights_sha256", "files_sha256"):
        if not getattr(record, key):
            raise IntegrityError(f"cannot load artifact {artifact_dir}: {recorded} records no {key}, so its files "
                                 "cannot be verified (saved by an older version?); delete the artifact and rerun "
                                 "the step that made it")
    for name, expected in record.weights_sha256.items():
        path = artifact_dir / name if (artifact_dir / name).is_file() else artifact_dir / ADAPTER_DIR / name
        if not path.is_file():
            raise RuntimeError(f"cannot load weights of artifact {artifact_dir}: {name} is missing")
        if file_sha256(path) != expected:
            raise RuntimeError(f"cannot load weights of artifact {artifact_dir}: {path} does not match its saved "
                               "sha256 (corrupted on disk?); delete the artifact and rerun")
    for name, expected in record.files_sha256.items():
        verify_file(artifact_dir / name, expected, recorded, "the step that made the artifact (delete the whole "
                    f"artifact {artifact_dir})")


def read_record(artifact_dir: str | Path) -> ArtifactRecord:
    """artifact.json, verified against its sidecar digest artifact.json.sha256."""
    path = Path(artifact_dir) / ARTIFACT_JSON
    if path.is_file() and not digest_path(path).is_file():
        raise IntegrityError(f"{path} has no sha256 digest ({digest_path(path).name} is missing), so it cannot be "
                             f"verified (saved by an older version?); delete the artifact {artifact_dir} and rerun "
                             "the step that made it")
    return ArtifactRecord.from_json(read_json(path, verify=True, producer="the step that made the artifact (delete the "
                                              f"whole artifact {artifact_dir})"), path)


def artifact_facts(artifact_dir: str | Path):
    """Vocabulary and context of an artifact from its config.json, without loading it (realign.models.checks)."""
    from realign.models.checks import ModelFacts, facts_from_config

    config_file = Path(artifact_dir) / "config.json"
    return facts_from_config(read_json(config_file)) if config_file.is_file() else ModelFacts()


def keep_canonical_format(model):
    """Stop bitsandbytes from repacking 4-bit layers for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit in place on its first no-grad eval forward
    and rounds the per-block absmax statistics to bfloat16 on the way (measured: 0.0614 -> 0.0615); saving the
    layer afterwards keeps the rounded values. Evaluation would then see a slightly different model than
    training, and a measured model would no longer be the saved one. The plain dequantize path is used instead.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def load_artifact(artifact_dir: str | Path, device: str | None = None):
    """Load (model, tokenizer, record) in fp32 on `device` (default: realign.device.compute_device(), the GPU when
    there is one); a damaged or incomplete directory is a clear error."""
    artifact_dir = Path(artifact_dir)
    if not (artifact_dir / ARTIFACT_JSON).is_file():
        raise FileNotFoundError(f"{artifact_dir} is not a complete artifact (no {ARTIFACT_JSON})")
    record = read_record(artifact_dir)
    if not (artifact_dir / "config.json").is_file():
        raise FileNotFoundError(f"{artifact_dir} is not a complete artifact (no config.json)")
    verify_weights(artifact_dir, record)
    quantized = "quantization_config" in json.loads((artifact_dir / "config.json").read_text())
    device = device or compute_device()
    # bitsandbytes layers must be placed at load time; everything else loads in fp32 and then moves.
    placement = {"device_map": {"": device}} if quantized else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(artifact_dir, dtype=torch.float32, **placement)
        if quantized:
            keep_canonical_format(model)
        else:
            model.to(device)
        if (artifact_dir / ADAPTER_DIR).is_dir():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, artifact_dir / ADAPTER_DIR)
    except (OSError, SafetensorError, RuntimeError, ValueError) as err:
        raise RuntimeError(f"cannot load weights of artifact {artifact_dir}: {err}") from err
    tokenizer = AutoTokenizer.from_pretrained(artifact_dir)
    require_eos(tokenizer, f"artifact {artifact_dir}")
    model.eval()
    return model, tokenizer, record


def load_constraint_tensors(artifact_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(artifact_dir) / CONSTRAINT_FILE
    if not path.is_file():
        return {}
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as err:
        raise RuntimeError(f"constraint file {path} is corrupted: {err}") from err
