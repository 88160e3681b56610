"""A study carried to a fresh folder by its snapshot (realign/snapshot.py) ends with the table the uninterrupted
study ended with, running only the cells the snapshot lacks; a damaged parent made again with other weights drops
its own cell and its recoveries; an input made again with other bytes, or a carried file that is not what its digest
says, is refused."""

from __future__ import annotations

import shutil
import sys

import pandas as pd
import pytest
from tiny_study import REPO, jobs_to_run, snakemake

from realign import snapshot as snap
from realign.io import IntegrityError, file_sha256, read_json, write_json

sys.path.insert(0, str(REPO / "tools"))
import study_snapshot  # noqa: E402

TIMINGS = ["seconds", "eval_seconds", "divergence_seconds"]  # each run's own job times


def study(folder):
    return snap.Study(folder, REPO)  # the tests' checkout may be uncommitted: require_clean=False below


@pytest.fixture(scope="module")
def carried(tiny_study, tmp_path_factory):
    workdir, _, _ = tiny_study
    snapshot = tmp_path_factory.mktemp("snapshot")
    added = snap.save(study(workdir), snapshot, require_clean=False)
    return workdir, snapshot, added


def copy_of(snapshot, tmp_path):
    target = tmp_path / "snapshot"
    shutil.copytree(snapshot, target)
    return target, read_json(target / snap.MANIFEST)


def test_save_carries_each_finished_cell_once(carried, tmp_path):
    workdir, snapshot, added = carried
    cells = study(workdir).cells()
    assert [c.key for c in added] == [c.key for c in cells]
    manifest = read_json(snapshot / snap.MANIFEST)
    assert set(manifest["null_floors"]) == {snap.NULL_FLOORS.format(model=m) for m in study(workdir).models()}
    assert "results/data/prompts.json" in manifest["pinned"]
    assert "results/data/benchmarks" in manifest["pinned_targets"]  # a directory output is asked for as a whole
    again, _ = copy_of(snapshot, tmp_path)
    assert snap.save(study(workdir), again, require_clean=False) == []


def test_resumed_study_ends_with_the_uninterrupted_table(carried, tmp_path):
    workdir, snapshot, _ = carried
    partial, manifest = copy_of(snapshot, tmp_path)
    # a snapshot saved before one recovery and the null floors were finished
    unfinished = next(c for c in study(workdir).cells() if c.recovery != "none")
    del manifest["cells"][unfinished.key]
    manifest["null_floors"] = {}
    write_json(partial / snap.MANIFEST, manifest)
    folder = tmp_path / "study"
    folder.mkdir()
    shutil.copy(workdir / "config.yaml", folder / "config.yaml")

    chosen = snap.resume(partial, study(folder), lambda *args: snakemake(folder, *args), require_clean=False,
                         report=lambda text: None)
    assert [c.key for c in chosen.remaining] == [unfinished.key] and not chosen.dropped
    assert jobs_to_run(folder) == {}
    for cell in chosen.carried:  # no carried recovery was trained again
        if cell.recovery != "none":
            run_dir = folder / cell.artifact.run_dir
            assert (run_dir / snap.STUB_NOTE).is_file() and not (run_dir / "config.json").exists()
    assert (folder / unfinished.artifact.location / "config.json").is_file()
    before = pd.read_parquet(workdir / "results/table.parquet").drop(columns=TIMINGS)
    after = pd.read_parquet(folder / "results/table.parquet").drop(columns=TIMINGS)
    pd.testing.assert_frame_equal(after, before)


def test_a_parent_made_with_other_weights_drops_its_cells(carried, tmp_path):
    workdir, snapshot, _ = carried
    other, manifest = copy_of(snapshot, tmp_path)
    damage = next(c for c in study(workdir).cells() if c.recovery == "none" and c.degradation != "none")
    record = read_json(other / damage.record)
    record["weights_sha256"] = {name: "0" * 64 for name in record["weights_sha256"]}  # the other machine's parent
    write_json(other / damage.record, record, digest=True)
    for f in (damage.record, damage.record + ".sha256"):
        manifest["cells"][damage.key]["files"][f] = file_sha256(other / f)
    below = [c for c in study(workdir).cells() if c.degradation == damage.degradation and c.recovery != "none"]
    for cell in below:
        manifest["cells"][cell.key]["parent_weights"] = record["weights_sha256"]
    write_json(other / snap.MANIFEST, manifest)

    chosen = snap.plan(other, study(workdir), require_clean=False)
    assert set(chosen.dropped) == {damage.key} | {c.key for c in below}
    assert {c.key for c in chosen.carried} == {c.key for c in study(workdir).cells()} - set(chosen.dropped)
    # saving the folder that made them again replaces that damage's carried cells, and only those
    assert {c.key for c in snap.save(study(workdir), other, require_clean=False)} == set(chosen.dropped)
    saved = read_json(other / snap.MANIFEST)
    assert saved["saves"][-1]["cells_replaced"] == sorted(chosen.dropped)
    assert read_json(other / damage.record)["weights_sha256"] == study(workdir).weights(damage)


def test_a_damaged_teacher_made_with_other_weights_drops_the_cells_it_taught(carried, tmp_path):
    """magnitude-60/kd-damaged-teacher distils from rtn-w2g32: a save records that teacher's weights, and a resume
    where it comes out with other weights makes the cells it taught again (its own cells are judged as a parent's)."""
    workdir, snapshot, _ = carried
    other, manifest = copy_of(snapshot, tmp_path)
    here = study(workdir)
    taught = [c for c in here.cells() if here.teacher_of(c) is not None]
    assert [c.key for c in taught] == ["tiny/magnitude-60/kd-damaged-teacher"]
    teacher = here.teacher_of(taught[0])
    assert manifest["cells"][taught[0].key]["teacher_weights"] == here.weights(teacher)
    assert here.teacher_of(teacher) is None and "teacher_weights" not in manifest["cells"][teacher.key]
    manifest["cells"][taught[0].key]["teacher_weights"] = {name: "0" * 64 for name in here.weights(teacher)}
    write_json(other / snap.MANIFEST, manifest)
    chosen = snap.plan(other, here, require_clean=False)
    assert chosen.dropped == {taught[0].key: f"its teacher {teacher.key} was made again here with other weights"}
    assert teacher.artifact.run_dir in snap.step1_targets(other, here)


def test_an_input_made_from_one_damage_drops_only_that_damage(carried, tmp_path):
    workdir, snapshot, _ = carried
    other, manifest = copy_of(snapshot, tmp_path)
    damage = study(workdir).damages()[0]
    path = f"results/data/tiny/content_states/{damage}.len64.layers-inner.safetensors"  # made here otherwise
    manifest["pinned"][path] = "0" * 64
    write_json(other / snap.MANIFEST, manifest)
    chosen = snap.plan(other, study(workdir), require_clean=False)
    assert set(chosen.dropped) == {c.key for c in study(workdir).cells() if c.degradation == damage}
    assert all(path in why for why in chosen.dropped.values())


def test_an_input_made_again_with_other_bytes_carries_nothing(carried, tmp_path):
    workdir, snapshot, _ = carried
    other, manifest = copy_of(snapshot, tmp_path)
    manifest["pinned"]["results/data/prompts.json"] = "0" * 64
    write_json(other / snap.MANIFEST, manifest)
    with pytest.raises(snap.SnapshotError, match="results/data/prompts.json"):
        snap.plan(other, study(workdir), require_clean=False)


def test_a_damaged_file_is_neither_saved_nor_resumed_from(carried, tmp_path):
    workdir, snapshot, _ = carried
    copy = tmp_path / "study"
    shutil.copytree(snapshot / "results", copy / "results")
    shutil.copy(workdir / "config.yaml", copy / "config.yaml")
    cell = next(c for c in study(workdir).cells() if c.recovery != "none")
    with open(copy / cell.measurements()[0], "a") as handle:
        handle.write(" ")
    with pytest.raises(IntegrityError):
        snap.save(study(copy), tmp_path / "new", require_clean=False)
    damaged, _ = copy_of(snapshot, tmp_path)
    shutil.copy(copy / cell.measurements()[0], damaged / cell.measurements()[0])
    with pytest.raises(snap.SnapshotError, match=cell.key):
        snap.read_manifest(damaged)


def test_the_command_runs_snakemake_in_the_clone_with_its_own_code(tmp_path, capsys):
    """tools/study_snapshot.py resume hands Snakemake the clone's folder as its working directory and the clone's
    code on PYTHONPATH (a study never runs this checkout's code); a failing Snakemake is a clear error, exit 1."""
    clone = tmp_path / "clone"
    clone.mkdir()
    probe = 'pwd > where.txt; echo "$PYTHONPATH" >> where.txt; exit 3'
    code = study_snapshot.main(["resume", str(tmp_path / "snapshot"), str(clone),
                                "--snakemake", f"sh -c '{probe}' snakemake"])
    assert code == 1
    assert "snakemake -n --quiet rules... failed (exit 3)" in capsys.readouterr().err
    assert (clone / "where.txt").read_text().split() == [str(clone.resolve())] * 2
