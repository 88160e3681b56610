"""The narrow corpus used to cause forgetting: Python standard-library source (or any local text files).

Files are split into train / held-out by a hash of their relative path, so the split is stable across
machines and runs and no file contributes to both.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: str | Path, pattern: str = "**/*.py") -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus directory {root} does not exist (data.code_corpus)")
    skip = ("site-packages", "test", "tests", "idlelib", "__pycache__")
    files = [p for p in sorted(root.glob(pattern))
             if p.is_file() and not any(part in skip for part in p.relative_to(root).parts)]
    if not files:
        raise FileNotFoundError(f"no files matching {pattern!r} under {root} (data.code_corpus)")
    return files


def split_files(root: str | Path, files: list[Path], heldout_fraction: float) -> dict[str, list[Path]]:
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"data.code_heldout_fraction must be in (0, 1), got {heldout_fraction}")
    splits: dict[str, list[Path]] = {"train": [], "heldout": []}
    for f in files:
        digest = hashlib.sha256(str(f.relative_to(root)).encode()).digest()
        bucket = int.from_bytes(digest[:8], "big") / 2**64
        splits["heldout" if bucket < heldout_fraction else "train"].append(f)
    return splits


def read_texts(files: list[Path], max_chars: int) -> list[str]:
    """Read files in order until `max_chars` characters are collected."""
    texts, total = [], 0
    for f in files:
        text = f.read_text(errors="ignore")
        texts.append(text[: max_chars - total])
        total += len(texts[-1])
        if total >= max_chars:
            break
    return texts
