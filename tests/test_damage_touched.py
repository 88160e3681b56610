"""A constrained recovery records how much of the damage it changed (artifact.json `damage_touched`, written by
realign.recover.stage.run_recovery from realign.degrade.touched.damage_touched), and the table reads it.

Issue 28, finding 7: under 3-bit RTN, kd changed none of the targeted matrices (the straight-through latent weights
never moved half a grid step), while the embeddings and norms trained, and nothing in the record said so."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from realign.degrade import constraints
from realign.degrade.touched import damage_touched, stored_values
from realign.degrade.targets import damage_targets
from realign.io import write_json, write_parquet
from realign.models.artifact import load_artifact, load_constraint_tensors, read_record
from realign.models.record import ArtifactRecord

KEYS = ("matrices_changed", "matrices", "values_changed", "values", "fraction")


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    """The teacher, its RTN 3-bit, magnitude-pruned and NF4 (frozen base) damages, and the teacher's answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from realign.degrade.stage import degrade
    from realign.io import write_jsonl
    from realign.models.artifact import save_artifact

    root = tmp_path_factory.mktemp("touched")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    teacher = save_artifact(model, tokenizer, root / "tiny/none/none", ArtifactRecord("tiny"))
    damages = {"rtn-w3": {"method": "rtn", "bits": 3, "group_size": 32},
               "magnitude-0.5": {"method": "magnitude", "sparsity": 0.5},
               "nf4": {"method": "bnb", "quant_type": "nf4", "lora_r": 4, "lora_alpha": 8}}
    parents = {}
    for name, params in damages.items():
        parents[name] = root / f"tiny/{name}/none"
        degrade(teacher, parents[name], "tiny", name, params, seed=0)
    records = root / "teacher_answers.jsonl"
    write_jsonl(records, [{"instruction": f"q{i}", "reference": f"answer number {i}", "teacher_answer": f"a{i}"}
                          for i in range(6)], digest=True)
    return root, teacher, parents, records


def recover(inputs, damage: str, name: str, method: str, lr: float, checkpoint_steps=(), **options):
    """Two steps of recovery `method` at `lr` (and `options`) through the DAG's recovery step; (its directory, its
    record)."""
    from realign.recover.stage import run_recovery

    root, teacher, parents, records = inputs
    params = {"method": method, "steps": 2, "lr": lr, "batch_size": 2, "max_len": 32, **options}
    out = root / f"tiny/{damage}/{name}"
    return out, run_recovery(teacher, parents[damage], records, out, name, params, 0,
                             checkpoint_steps=list(checkpoint_steps))


def stored_targets(artifact_dir) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(targets' [out, in] weights, every other parameter) as saved, read back independently of the recovery."""
    model = load_artifact(artifact_dir, device="cpu")[0]
    targets = {name: t.weight.detach().clone() for name, t in damage_targets(model).items()}
    covered = {t.parameter_name for t in damage_targets(model).values()}
    others = {k: v.clone() for k, v in model.state_dict().items() if k not in covered}
    return targets, others


def counted(parent_dir, recovered_dir, masks: dict | None = None) -> tuple[int, int, int]:
    """(matrices changed, values changed, values) counted from the two saved artifacts (only kept values where
    `masks` is given)."""
    before, after = stored_targets(parent_dir)[0], stored_targets(recovered_dir)[0]
    assert set(before) == set(after)
    matrices = changed = values = 0
    for name in before:
        differs = after[name] != before[name]
        keep = masks[name].bool() if masks else torch.ones_like(differs)
        n = int((differs & keep).sum())
        matrices += n > 0
        changed += n
        values += int(keep.sum())
    return matrices, changed, values


def test_an_rtn_recovery_at_a_tiny_learning_rate_records_that_it_moved_no_grid_point(inputs):
    root, _, parents, _ = inputs
    out, record = recover(inputs, "rtn-w3", "kd-tiny-lr", "kd", lr=1e-6)
    touched = record.damage_touched
    assert list(touched) == ["grid"] and tuple(touched["grid"]) == KEYS
    n_targets = len(damage_targets(load_artifact(parents["rtn-w3"], device="cpu")[0]))
    n_values = sum(t.numel() for t in stored_targets(parents["rtn-w3"])[0].values())
    assert touched["grid"] == {"matrices_changed": 0, "matrices": n_targets, "values_changed": 0, "values": n_values,
                               "fraction": 0.0}
    assert counted(parents["rtn-w3"], out) == (0, 0, n_values)
    # ... while the model did train: embeddings and norms moved (the finding's situation, not an untrained run)
    before, after = stored_targets(parents["rtn-w3"])[1], stored_targets(out)[1]
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # saved as written, read back by the record reader
    assert read_record(out).damage_touched == touched


def test_an_rtn_recovery_at_a_large_learning_rate_records_the_grid_points_it_moved(inputs):
    _, _, parents, _ = inputs
    out, record = recover(inputs, "rtn-w3", "kd-large-lr", "kd", lr=1e-1, checkpoint_steps=[1])
    grid = record.damage_touched["grid"]
    matrices, changed, values = counted(parents["rtn-w3"], out)
    assert changed > 0 and grid["fraction"] > 0
    assert (grid["matrices_changed"], grid["values_changed"], grid["values"]) == (matrices, changed, values)
    assert grid["fraction"] == pytest.approx(changed / values)
    assert read_record(out).damage_touched == record.damage_touched
    # a checkpoint records its own (step 1 of 2)
    from realign.identity import checkpoint_dir

    step1 = checkpoint_dir(out, 1)
    assert read_record(step1).damage_touched["grid"]["values_changed"] == counted(parents["rtn-w3"], step1)[1]


def test_a_pruned_recovery_records_the_kept_values_it_changed(inputs):
    _, _, parents, _ = inputs
    out, record = recover(inputs, "magnitude-0.5", "sft", "sft", lr=1e-3)
    masks = load_constraint_tensors(parents["magnitude-0.5"])
    mask = record.damage_touched["mask"]
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert mask["values"] == kept < total  # the kept values only, not the pruned ones
    assert (mask["matrices_changed"], mask["values_changed"], mask["values"]) == counted(parents["magnitude-0.5"],
                                                                                         out, masks)
    assert mask["values_changed"] > 0 and 0 < mask["fraction"] <= 1
    assert mask["matrices"] == len(masks)
    assert read_record(out).damage_touched == record.damage_touched


def test_a_recovery_trained_in_bf16_keeps_its_constraint_and_records_its_precision(inputs, monkeypatch):
    """training.dtype bfloat16 (autocast) rounds the products, not the weights: the pruned parent's zeros stay zero,
    the kept values move, and the record says which precision trained it; the default on a CPU is float32."""
    monkeypatch.setenv("REALIGN_DEVICE", "cpu")  # the default is bf16 on CUDA
    _, _, parents, _ = inputs
    out, record = recover(inputs, "magnitude-0.5", "sft-bf16", "sft", lr=1e-3, dtype="bfloat16")
    assert record.training_precision == read_record(out).training_precision == "bfloat16"
    assert record.recovery_params["dtype"] == "bfloat16"
    assert record.constraint_check["ok"] and record.damage_touched["mask"]["values_changed"] > 0
    masks = load_constraint_tensors(parents["magnitude-0.5"])
    assert counted(parents["magnitude-0.5"], out, masks) == (len(masks), record.damage_touched["mask"]["values_changed"],
                                                            record.damage_touched["mask"]["values"])
    assert recover(inputs, "magnitude-0.5", "sft-fp32", "sft", lr=1e-3)[1].training_precision == "float32"


def test_a_lora_recovery_of_a_frozen_base_changes_no_base_value_and_records_its_trained_adapter(inputs):
    out, record = recover(inputs, "nf4", "sft", "sft", lr=1e-2)
    frozen = record.damage_touched["frozen"]
    assert frozen["matrices"] == len(record.constraint["digests"]) > 0
    assert frozen["values"] > 0 and (frozen["matrices_changed"], frozen["values_changed"], frozen["fraction"]) \
        == (0, 0, 0.0)
    adapter = frozen["adapter"]
    assert adapter["values_changed"] > 0 and adapter["matrices_changed"] == adapter["matrices"] > 0
    assert read_record(out).damage_touched == record.damage_touched


def test_damage_touched_counts_a_moved_grid_point_of_rtn_and_nvfp4(tiny):
    from realign.degrade.nvfp4 import nvfp4_quantize_model
    from realign.degrade.quantize import quantize_model

    model, _ = tiny
    for quantize in (lambda m: quantize_model(m, 3, 32), nvfp4_quantize_model):
        model = type(model)(model.config)
        constraint, tensors = quantize(model)
        before = stored_values(model, constraint)
        assert damage_touched(model, constraint, tensors, before)[constraint["kind"]]["values_changed"] == 0
        name = sorted(before)[1]
        weight = damage_targets(model)[name].weight
        with torch.no_grad():  # the value of another grid point of the same group: still on the grid
            row = weight[0, :16]
            other = row[row != row[0]][0]
            weight[0, 0] = other
        assert constraints.check(model, constraint, tensors)["ok"]
        result = damage_touched(model, constraint, tensors, before)[constraint["kind"]]
        assert (result["matrices_changed"], result["values_changed"]) == (1, 1)
        assert result["fraction"] == 1 / sum(t.numel() for t in before.values())


def test_an_old_record_without_the_field_reads_and_a_forgetting_recovery_records_none():
    old = ArtifactRecord.from_json({"model": "m", "recovery": "kd", "constraint": {"kind": "grid"}})
    assert old.damage_touched is None and "damage_touched" not in old.to_json()
    assert damage_touched(None, {"kind": "none"}, {}, None) is None
    assert stored_values(None, {"kind": "none"}) is None


def _row(artifact_dir, tmp_path):
    from realign.analysis.table import collect_row

    d = tmp_path / artifact_dir.parent.name / artifact_dir.name
    d.mkdir(parents=True)
    write_json(d / "eval.json", {"benchmarks": {}, "perplexity": {}}, digest=True)
    write_json(d / "divergence.json", {"kl_teacher_artifact": 0.1}, digest=True)
    write_parquet(pd.DataFrame({"layer": [0, 1, 2], "linear_cka": [1.0, 0.9, 0.8], "debiased_cka": [1.0, 0.9, 0.8],
                                "in_alignment_range": [False, True, False]}), d / "cka.parquet")
    return collect_row(artifact_dir / "artifact.json", d / "eval.json", d / "divergence.json", d / "cka.parquet")


def test_the_table_reads_how_much_of_the_damage_a_recovery_changed(inputs, tmp_path):
    root, _, parents, _ = inputs
    for damage, name in (("rtn-w3", "kd-large-lr"), ("magnitude-0.5", "sft"), ("rtn-w3", "kd-tiny-lr"),
                         ("nf4", "sft")):
        touched = read_record(root / f"tiny/{damage}/{name}").damage_touched
        (entry,) = touched.values()
        entry = entry.get("adapter", entry)  # a LoRA recovery: the table reads its adapter's share
        row = _row(root / f"tiny/{damage}/{name}", tmp_path)
        assert row["changed_fraction"] == pytest.approx(entry["values_changed"] / entry["values"])
        assert (row["changed_matrices"], row["targeted_matrices"]) == (entry["matrices_changed"], entry["matrices"])
    assert _row(root / "tiny/rtn-w3/kd-tiny-lr", tmp_path / "b")["changed_fraction"] == 0.0
    assert _row(root / "tiny/rtn-w3/kd-large-lr", tmp_path / "c")["changed_fraction"] > 0
    assert _row(root / "tiny/nf4/sft", tmp_path / "f")["changed_fraction"] > 0  # its adapter trained
    # NaN for an artifact without a constraint (the teacher) and for a record made before the field existed
    teacher = _row(root / "tiny/none/none", tmp_path / "d")
    assert all(math.isnan(teacher[c]) for c in ("changed_fraction", "changed_matrices", "targeted_matrices"))
    parent = _row(parents["rtn-w3"], tmp_path / "e")  # the damaged model itself: constrained, no recovery
    assert math.isnan(parent["changed_fraction"]) and math.isnan(parent["targeted_matrices"])


def _codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Integer codes of a [out, in] weight on a per-group grid, written apart from realign's grid_codes."""
    out, n_groups = scale.shape
    w = weight.to(torch.float64).reshape(out, n_groups, -1)
    return torch.round(w / scale[..., None].to(torch.float64)) + zero[..., None].to(torch.float64)


def test_trained_scales_keep_every_integer_code_and_record_the_scales_they_moved(inputs):
    """Issue 30's quantization candidate 2 (EfficientQAT's end-to-end step): the scales train over the damaged
    model's frozen codes. The saved model has the parent's codes on its own, trained grid (read back from the two
    artifacts), its constraint file carries that grid, and its record says how many scales moved."""
    _, _, parents, _ = inputs
    out, record = recover(inputs, "rtn-w3", "kd-scales", "kd", lr=1e-2, checkpoint_steps=[1],
                          quantized_training="scales")
    assert record.constraint["trained"] == "scales"
    parent_grid, grid = load_constraint_tensors(parents["rtn-w3"]), load_constraint_tensors(out)
    before, after = stored_targets(parents["rtn-w3"])[0], stored_targets(out)[0]
    moved = groups = 0
    for name in before:
        scale, zero = grid[f"{name}.scale"], grid[f"{name}.zero"]
        assert torch.equal(zero, parent_grid[f"{name}.zero"])
        codes = _codes(before[name], parent_grid[f"{name}.scale"], zero)
        assert torch.equal(_codes(after[name], scale, zero), codes), name
        rebuilt = ((codes - zero[..., None]) * scale[..., None]).reshape(after[name].shape)
        torch.testing.assert_close(after[name].to(torch.float64), rebuilt, rtol=1e-6, atol=1e-9)
        moved += int((scale != parent_grid[f"{name}.scale"]).sum())
        groups += scale.numel()
    assert 0 < moved and record.constraint_check["codes"] == {"groups": groups, "scales_changed": moved,
                                                              "fraction": moved / groups}
    assert record.constraint_check["max_grid_violation_steps"] < constraints.GRID_TOLERANCE
    assert record.damage_touched["grid"]["values_changed"] > 0  # the weights moved with their scales
    from realign.identity import checkpoint_dir

    step1 = checkpoint_dir(out, 1)  # a checkpoint saves the grid of its own step
    assert read_record(step1).constraint_check["codes"]["scales_changed"] > 0
    assert any(not torch.equal(load_constraint_tensors(step1)[k], grid[k]) for k in grid if k.endswith(".scale"))


def test_trained_scales_need_an_integer_grid(inputs):
    with pytest.raises(constraints.ConstraintViolation, match="trained scales need an integer grid"):
        recover(inputs, "magnitude-0.5", "kd-scales-mask", "kd", lr=1e-2, quantized_training="scales")


def test_lora_over_the_frozen_grid_keeps_every_grid_point_and_records_its_trained_adapter(inputs):
    """Issue 30's quantization candidate 3 (QLoRA-style over an RTN grid): the base stays the parent's grid, value for
    value; the adapter trains; the artifact is the base plus adapter/, loaded back as a PeftModel whose effective
    weights moved; the record counts the adapter as what changed (as for a frozen bitsandbytes base)."""
    _, _, parents, _ = inputs
    out, record = recover(inputs, "rtn-w3", "kd-lora", "kd", lr=1e-2, checkpoint_steps=[1],
                          quantized_training="lora", lora_r=4, lora_alpha=8)
    assert record.constraint["trained"] == "lora" and record.constraint["lora"]["r"] == 4
    touched = record.damage_touched["grid"]
    assert touched["values_changed"] == 0 and touched["adapter"]["values_changed"] > 0
    assert (out / "adapter").is_dir() and read_record(out).damage_touched == record.damage_touched
    model = load_artifact(out, device="cpu")[0]
    base = constraints.adapter_base_targets(model)
    parent = stored_targets(parents["rtn-w3"])[0]
    assert set(base) == set(parent)
    for name, weight in base.items():
        assert torch.equal(weight.detach(), parent[name]), name
    # the effective (merged) weights moved, though not one base value did
    merged = model.merge_and_unload()
    assert any(not torch.equal(t.weight.detach(), parent[n]) for n, t in damage_targets(merged).items())
    assert record.constraint_check["max_grid_violation_steps"] < constraints.GRID_TOLERANCE
    from realign.identity import checkpoint_dir

    assert (checkpoint_dir(out, 1) / "adapter").is_dir()
