"""Atomic file writing: nothing half-written is ever left where the next step reads it; and digests: a file
written with `digest=True` gets a sidecar `<file>.sha256` (sha256sum format, `sha256sum -c` checks it), and a
reader that asks for verification refuses a file whose bytes do not match it, or that has none. Also
`jsonable`: results (numpy and pandas scalars, NaN) as plain JSON values."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


DIGEST_SUFFIX = ".sha256"


class IntegrityError(RuntimeError):
    """A file a step reads does not match the digest written by the step that made it, or has no digest."""


class UnreadableFileError(ValueError, RuntimeError):
    """A file a step reads cannot be parsed at all (truncated or corrupted). Both a ValueError (bad input) and a
    RuntimeError, as the readers it replaced raised one or the other."""


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, is_dir: bool = False, digest: bool = False):
    """Yield a temporary sibling path; rename it to `final` only if the block finishes without error.

    With `digest` (files only), the sidecar `final.sha256` of the written bytes is published just before the
    file itself: a kill between the two renames leaves a sidecar that the old file (if any) does not match, an
    error when read, never a wrong file that verifies."""
    final = Path(final)
    if digest and is_dir:
        raise ValueError("digest=True is for files; a directory records the digests of its files itself")
    final.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create private (0600/0700) entries; published results use the usual modes.
    tmp.chmod(0o755 if is_dir else 0o644)
    try:
        yield tmp
        if digest:
            write_digest(final, file_sha256(tmp))
        if final.is_dir() and is_dir:
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def write_digest(path: str | os.PathLike, sha256: str) -> Path:
    """Publish (atomically) the sidecar of `path` recording `sha256`; returns the sidecar's path."""
    sidecar = digest_path(path)
    with atomic_path(sidecar) as tmp:
        tmp.write_text(f"{sha256}  {Path(path).name}\n")
    return sidecar


def _rerun(path: Path, producer: str | None) -> str:
    return f"delete {path} and rerun {producer or 'the step that makes it'}"


def check_digest(path: str | os.PathLike, actual: str, expected: str | None, recorded_in: str,
                 producer: str | None = None) -> None:
    """Raise IntegrityError unless `actual` equals the `expected` sha256 recorded in `recorded_in`; a missing
    digest is an error (a file that cannot be verified is not trusted)."""
    path = Path(path)
    if not expected:
        raise IntegrityError(f"{path} has no sha256 digest (none recorded in {recorded_in}), so it cannot be "
                             f"verified: it was made by an older version or not by its step; {_rerun(path, producer)}")
    if actual != expected:
        raise IntegrityError(f"{path} does not match the sha256 digest recorded in {recorded_in} (corrupted or "
                             f"edited since it was written); {_rerun(path, producer)}")


def verify_file(path: str | os.PathLike, expected: str | None, recorded_in: str, producer: str | None = None) -> None:
    """Check a file against a digest recorded elsewhere (a manifest, artifact.json)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing ({recorded_in} records it); {_rerun(path, producer)}")
    check_digest(path, file_sha256(path) if expected else "", expected, recorded_in, producer)


def read_verified(path: str | os.PathLike, producer: str | None = None) -> bytes:
    """The bytes of `path`, checked against its sidecar `path.sha256` (read once: what is checked is what is
    used). A missing file, a missing or malformed sidecar and a mismatch are errors naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"expected file {path} does not exist; rerun {producer or 'the step that makes it'}") from None
    sidecar = digest_path(path)
    try:
        expected = sidecar.read_text().split()[0]
    except (FileNotFoundError, IndexError):
        expected = None
    if expected is not None and (len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected)):
        raise IntegrityError(f"{sidecar} is not a sha256 digest; {_rerun(path, producer)}")
    check_digest(path, hashlib.sha256(data).hexdigest(), expected, sidecar.name, producer)
    return data


def write_json(path: str | os.PathLike, obj, digest: bool = False) -> None:
    with atomic_path(path, digest=digest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike, verify: bool = False, producer: str | None = None):
    """Parse a JSON file; with `verify`, only after checking it against its sidecar digest (read_verified)."""
    path = Path(path)
    try:
        text = read_verified(path, producer).decode() if verify else path.read_text()
        return json.loads(text)
    except FileNotFoundError as err:
        if verify:
            raise
        raise FileNotFoundError(f"expected JSON file {path} does not exist") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupted?): {err}") from None


def write_jsonl(path: str | os.PathLike, rows, digest: bool = False) -> None:
    with atomic_path(path, digest=digest) as tmp:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike, verify: bool = False, producer: str | None = None) -> list[dict]:
    if verify:
        lines = read_verified(path, producer).decode().splitlines()
    else:
        with open(path) as f:
            lines = f.readlines()
    try:
        return [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON lines (truncated or corrupted?): {err}") from None


def write_parquet(frame, path: str | os.PathLike) -> None:
    """A pandas DataFrame as parquet, atomically, with its sidecar digest (which covers every byte, the
    parquet metadata included)."""
    with atomic_path(path, digest=True) as tmp:
        frame.to_parquet(tmp, index=False)


def read_parquet(path: str | os.PathLike, producer: str | None = None):
    """A parquet file written by write_parquet, verified against its sidecar digest."""
    import io

    import pandas as pd

    return pd.read_parquet(io.BytesIO(read_verified(path, producer)))


def tensors_sha256(tensors: dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a dict of tensors (for safetensors files, whose own
    checks catch truncation but not flipped bytes); stored in the file's metadata."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def jsonable(obj: Any) -> Any:
    """Recursively convert numpy / pandas scalars to Python types and NaN/inf to None (results as JSON)."""
    import numpy as np
    import pandas as pd

    def convert(obj):
        if isinstance(obj, dict):
            return {str(k): convert(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [convert(v) for v in obj]
        if isinstance(obj, np.ndarray):
            return [convert(v) for v in obj.tolist()]
        if isinstance(obj, (bool, np.bool_)):
            return bool(obj)
        if isinstance(obj, (int, np.integer)):
            return int(obj)
        if isinstance(obj, (float, np.floating)):
            x = float(obj)
            return x if math.isfinite(x) else None
        if obj is None or isinstance(obj, str):
            return obj
        if obj is pd.NA or obj is pd.NaT:
            return None
        return str(obj)

    return convert(obj)


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def save_checked_tensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically with `metadata` plus the tensors' sha256 digest (`tensors_sha256`), which
    `load_checked_tensors` verifies: safetensors' own checks catch truncation, not flipped bytes."""
    from safetensors.torch import save_file

    tensors = {name: t.contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**metadata, "sha256": tensors_sha256(tensors)})


def load_checked_tensors(path: str | os.PathLike, what: str, step: str) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a file written by `save_checked_tensors`; `what` names the file in errors ("activation
    cache <path>"), `step` the step that writes it. Unreadable, corrupted or undigested files are errors."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UnreadableFileError(f"{what} is unreadable (truncated or corrupted?): {err}; delete it and rerun the "
                                  f"{step} step") from None
    check_tensors_digest(tensors, metadata.get("sha256"), what, step)
    return tensors, metadata


def check_tensors_digest(tensors: dict, expected: str | None, what: str, step: str) -> None:
    """Check tensors read from a safetensors file against the tensors_sha256 stored in its metadata; `what` names
    the file ("activation cache <path>"), `step` the step that writes it. A missing digest is an error too."""
    if expected is None:
        raise IntegrityError(f"{what} has no sha256 digest in its metadata, so it cannot be verified; delete it and "
                             f"rerun the {step} step")
    if tensors_sha256(tensors) != expected:
        raise IntegrityError(f"{what} is corrupted: its content does not match the sha256 digest written with it; "
                             f"delete it and rerun the {step} step")
