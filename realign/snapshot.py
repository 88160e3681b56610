"""A study's finished cells carried to another machine, and the study resumed there without running them again.

Why: a study folder lives on one machine, and the machines this project runs on can be replaced between working
sessions, folder and all; a study that needs more hours than one session then never ends. What the analysis reads
of a finished cell (model, degradation, recovery) is small: its `artifact.json`, its evaluation records, its
similarity and divergence files, each with the digest its rule wrote (about 150 kB a cell). The weights,
activations and caches (gigabytes) are only the means of making them. A snapshot is those small files, copied
byte for byte and checked against their digests, with a manifest that pins what they were computed from.

`resume` in a fresh clone of the same commit, with the same config:
1. Make again what the carried cells were computed from and the remaining cells need: the teacher, the damaged
   parents, the data, the teacher's caches and activations. Every pinned file must come out byte-identical, or
   nothing is carried. A damaged parent made with other weights (a forgetting SFT run on another kind of CPU) drops
   its own cell and its recoveries, which are made again from it: a study never mixes two parents of one damage.
2. Run the cells the snapshot does not carry, one at a time and each seed's arms together, so that a session that
   ends midway leaves whole cells for the next `save` (explicit targets: nothing carried is in these DAGs).
3. Copy the carried files in. A carried recovery's model folder holds only its `artifact.json` and a note saying
   so. Its files are stamped later than everything steps 1 and 2 made, so Snakemake takes them as up to date; their
   missing intermediates (weights, activations) are asked for by no job that must run.
4. A dry run must list only `table` and `report`; then they run on every cell.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from realign.io import DIGEST_SUFFIX, file_sha256, read_json, read_verified, write_json
from realign.study_folder import Cell, SnapshotError, Study

MANIFEST = "MANIFEST.json"
STUB_NOTE = "WEIGHTS_NOT_CARRIED.txt"
PINNED_ROOTS = ("results/data", "results/teacher")  # with each teacher's activations: what every cell reads
TEACHER_ACTIVATIONS = "results/activations/{model}/none/none.safetensors"
NULL_FLOORS = "results/null/{model}/floors.parquet"
FINAL_RULES = {"table", "report"}
SNAKEMAKE_TIMESTAMP = ".snakemake_timestamp"  # Snakemake's mark in a directory output
# lm-eval's task files name the folder they lie in, and the benchmark manifest records their digests: not pinned
# (the items they point to, *.jsonl, are)
LOCATION_DEPENDENT = ("results/data/benchmarks/realign_*.yaml", "results/data/benchmarks/manifest.json")


def host_record() -> dict:
    """The CPU the cells of one save were made on (torch's kernels, and so a trained model's bits, depend on it)."""
    import torch
    flags, model = set(), platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {"cpu": model, "cores": os.cpu_count(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_units": sorted(flags & {"avx512_bf16", "amx_bf16"})}


def content_sha256(path: Path) -> str:
    """The file's digest, but of a safetensors file its header with sorted keys and its data: the safetensors
    writer orders the metadata differently from one process to the next, around the same tensors."""
    if path.suffix != ".safetensors":
        return file_sha256(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        digest.update(json.dumps(json.loads(handle.read(size)), sort_keys=True).encode())
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pinned_inputs(study: Study) -> dict[str, str]:
    """{path: content digest} of what every cell is computed from and step 1 makes again: the data, the teacher's
    caches and outputs, and each teacher's activations (the reference of every similarity job)."""
    paths = [p for root in PINNED_ROOTS if study.path(root).is_dir() for p in study.path(root).rglob("*")
             if p.is_file() and p.name != SNAKEMAKE_TIMESTAMP]
    paths += [study.path(TEACHER_ACTIVATIONS.format(model=m)) for m in study.models()]
    relative = [str(p.relative_to(study.folder)) for p in sorted(paths) if p.is_file()]
    return {p: content_sha256(study.path(p)) for p in relative
            if not any(fnmatch.fnmatch(p, pattern) for pattern in LOCATION_DEPENDENT)}


def damage_input(path: str, damages: list[str]) -> str | None:
    """The damage a pinned input is made from (`<damage>.…`: its parent's content states, its top-k as a teacher),
    or None for an input of every cell."""
    return next((d for d in damages if Path(path).name.startswith(d + ".")), None)


def rule_target(study: Study, path: str) -> str:
    """What Snakemake can be asked for to make `path`: the directory output that holds it, or the file itself."""
    for folder in Path(path).parents:
        if study.path(str(folder) + "/" + SNAKEMAKE_TIMESTAMP).is_file():
            return str(folder)
    return path


def _verified(path: Path) -> bool:
    """The file and its digest exist and agree (a disagreement raises realign.io.IntegrityError)."""
    if not path.is_file() or not Path(str(path) + DIGEST_SUFFIX).is_file():
        return False
    read_verified(path)
    return True


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def read_manifest(snapshot: Path) -> dict:
    """The manifest, after checking that every carried file is there with the content it records."""
    manifest = read_json(snapshot / MANIFEST)
    for key, entry in manifest["cells"].items():
        for f, digest in entry["files"].items():
            if not (snapshot / f).is_file() or file_sha256(snapshot / f) != digest:
                raise SnapshotError(f"{snapshot / f} (cell {key}) is missing or is not the file the manifest records")
    return manifest


def save(study: Study, snapshot: Path, require_clean: bool = True) -> list[Cell]:
    """Add the study's finished cells to `snapshot` (with its null floors and every job's benchmark record), and
    return the cells added. A carried cell must be byte-identical to the study's; pinned inputs that differ are
    refused; a damage whose parent was made here with other weights has its carried cells replaced by this folder's
    (the resume that made them here had dropped them)."""
    identity = study.identity(require_clean)
    manifest = read_manifest(snapshot) if (snapshot / MANIFEST).is_file() else {
        "study": identity, "pinned": {}, "pinned_targets": [], "cells": {}, "null_floors": {}, "saves": []}
    if manifest["study"] != identity:
        raise SnapshotError(f"{snapshot} holds cells of commit {manifest['study']['commit'][:12]} and config "
                            f"{manifest['study']['config_sha256'][:12]}; {study.folder} is {identity['commit'][:12]} "
                            f"and {identity['config_sha256'][:12]}")
    pinned = pinned_inputs(study)
    # a damaged parent, or an input made from it, made here with other bytes than the carried one (a resume that
    # dropped its damage's cells, on another kind of CPU): the carried cells of that damage give way to this folder's
    stale = stale_cells(snapshot, study, manifest, pinned, missing_differs=False)
    for key in sorted(stale):
        for f in manifest["cells"].pop(key)["files"]:
            (snapshot / f).unlink()
    done = [c for c in study.cells() if all(_verified(study.path(f)) for f in [c.record, *c.measurements()])]
    saved_at, host, added = datetime.now(timezone.utc).isoformat(timespec="seconds"), host_record(), []
    for cell in done:
        files = {f: file_sha256(study.path(f)) for f in cell.files()}
        if cell.key in manifest["cells"]:
            # the teacher's and the parents' records are rewritten by each run (timings); their weights are the same
            same = {f: d for f, d in files.items() if f not in (cell.record, cell.record + DIGEST_SUFFIX)}
            if any(manifest["cells"][cell.key]["files"][f] != d for f, d in same.items()):
                raise SnapshotError(f"{cell.key}: the study's measurements differ from the carried ones")
            continue
        for f in files:
            _copy(study.path(f), snapshot / f)
        manifest["cells"][cell.key] = {"saved": saved_at, "host": host, "files": files,
                                       "parent_weights": _parent_weights(study, cell),
                                       **({"teacher_weights": study.weights(teacher)}
                                          if (teacher := study.teacher_of(cell)) is not None else {})}
        added.append(cell)
    for model in study.models():
        floors = NULL_FLOORS.format(model=model)
        if floors not in manifest["null_floors"] and _verified(study.path(floors)):
            for f in (floors, floors + DIGEST_SUFFIX):
                _copy(study.path(f), snapshot / f)
            manifest["null_floors"][floors] = file_sha256(study.path(floors))
    bench = study.path("results/benchmarks")
    for tsv in sorted(bench.rglob("*.tsv")):  # none if no folder; a job made again here has its latest record
        _copy(tsv, snapshot / tsv.relative_to(study.folder))
    manifest["pinned"] = {**manifest["pinned"], **pinned}  # equal where both have a path, but a redone damage's
    manifest["pinned_targets"] = sorted(set(manifest["pinned_targets"]) | {rule_target(study, p) for p in pinned})
    manifest["saves"].append({"at": saved_at, "host": host, "cells_added": [c.key for c in added],
                              "cells_replaced": sorted(stale)})
    write_json(snapshot / MANIFEST, manifest)
    return added


def _parent_weights(study: Study, cell: Cell) -> dict | None:
    return None if cell.parent is None else study.weights(cell.parent)


@dataclass(frozen=True)
class Plan:
    """What a resume carries and what it makes: `carried` cells are copied in, `remaining` ones are run."""
    carried: list[Cell]
    remaining: list[Cell]
    dropped: dict[str, str]  # cell key -> why a cell the snapshot holds is made again

    def describe(self) -> str:
        lines = [f"carried: {len(self.carried)} cells; to make here: {len(self.remaining)}"]
        return "\n".join(lines + [f"  not carried: {key}: {why}" for key, why in self.dropped.items()])


def step1_targets(snapshot: Path, study: Study) -> list[str]:
    """The teacher, each damaged parent and damaged teacher, and the pinned inputs: what the carried cells were
    computed from."""
    made_from = [c for c in study.cells() if c.recovery == "none"] + [study.teacher_of(c) for c in study.cells()]
    return [c.artifact.run_dir for c in dict.fromkeys(made_from) if c is not None] \
        + read_manifest(snapshot)["pinned_targets"]


def plan(snapshot: Path, study: Study, require_clean: bool = True) -> Plan:
    """After step 1: carry every cell whose inputs were made again with the same bytes."""
    manifest = read_manifest(snapshot)
    if manifest["study"] != study.identity(require_clean):
        raise SnapshotError(f"{study.folder} is not the commit and config of {snapshot}: clone commit "
                            f"{manifest['study']['commit']} with its config.yaml and resume there")
    dropped = stale_cells(snapshot, study, manifest, pinned_inputs(study), missing_differs=True)
    carried = [c for c in study.cells() if c.key in manifest["cells"] and c.key not in dropped]
    remaining = [c for c in study.cells() if c not in carried]
    return Plan(carried, remaining, dropped)


def stale_cells(snapshot: Path, study: Study, manifest: dict, made: dict[str, str],
                missing_differs: bool) -> dict[str, str]:
    """{carried cell: why it cannot stand beside what was made in `study`}: an input made from its damage or its
    damaged teacher (`<damage>.…`) has other bytes here, or its own weights (the teacher, a parent), its parent's or
    its damaged teacher's do. `made`: the pinned inputs' digests here. `missing_differs`: whether what is not here
    counts as different (a resume after its step 1, which made everything) or as no evidence (a save from a folder
    that need not hold everything). An input of every cell with other bytes here is an error: no carried cell could
    be used."""
    def differs(carried, here) -> bool:
        return carried != here and (here is not None or missing_differs)

    differ = sorted(p for p, digest in manifest["pinned"].items() if differs(digest, made.get(p)))
    shared = [p for p in differ if damage_input(p, study.damages()) is None]
    if shared:
        raise SnapshotError(f"{', '.join(shared)}: made here with other bytes than the carried cells were computed "
                            + ("from, or not made: no carried cell can be used here" if missing_differs else
                               "from; resume from the snapshot (tools/study_snapshot.py resume) in a fresh clone"))
    redone = {damage_input(p, study.damages()): p for p in differ}
    why = {}
    for key, entry in manifest["cells"].items():
        cell = Cell(*key.split("/"))
        teacher = study.teacher_of(cell)
        if cell.degradation in redone:
            why[key] = f"its damage's input {redone[cell.degradation]} was made again here with other bytes"
        elif teacher is not None and teacher.degradation in redone:
            why[key] = f"its teacher's input {redone[teacher.degradation]} was made again here with other bytes"
        elif cell.recovery == "none" and differs(_carried_weights(snapshot, cell), study.weights(cell)):
            why[key] = "made again here with other weights"
        elif cell.parent is not None and differs(entry["parent_weights"], study.weights(cell.parent)):
            why[key] = f"its parent {cell.parent.key} was made again here with other weights"
        # a snapshot saved before damaged teachers' weights were recorded has none: such a cell is made again
        elif teacher is not None and differs(entry.get("teacher_weights"), study.weights(teacher)):
            why[key] = f"its teacher {teacher.key} was made again here with other weights"
    return why


def _carried_weights(snapshot: Path, cell: Cell) -> dict:
    return read_json(snapshot / cell.record, verify=True)["weights_sha256"]


def missing_floors(snapshot: Path, study: Study) -> list[str]:
    """The null floors the snapshot does not carry."""
    carried = read_manifest(snapshot)["null_floors"]
    return [f for f in (NULL_FLOORS.format(model=m) for m in study.models()) if f not in carried]


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def restore(snapshot: Path, study: Study, carried: list[Cell]) -> None:
    """Copy the carried cells' files, the null floors and the benchmark records into the study; stamp the files
    later than everything made here, the model records before the measurements, so Snakemake takes them as done."""
    manifest = read_manifest(snapshot)
    # the teacher and the parents were made again in step 1 with the carried weights (plan): their own record (this
    # run's timings) stays; a carried recovery's folder gets the carried record and a note
    records = [f for c in carried if not _has_weights(study.path(c.artifact.location))
               for f in (c.record, c.record + DIGEST_SUFFIX)]
    measurements = [f for c in carried for m in c.measurements() for f in (m, m + DIGEST_SUFFIX)]
    measurements += [f for floors in manifest["null_floors"] for f in (floors, floors + DIGEST_SUFFIX)]
    for f in records + measurements:
        if study.path(f).exists():
            if file_sha256(study.path(f)) != file_sha256(snapshot / f):
                raise SnapshotError(f"{study.path(f)} exists and is not the carried file: resume in a fresh clone")
            continue
        _copy(snapshot / f, study.path(f))
    bench = snapshot / "results/benchmarks"
    timings = [str(tsv.relative_to(snapshot)) for tsv in sorted(bench.rglob("*.tsv"))]  # none if no folder
    timings = [f for f in timings if not study.path(f).exists()]
    for f in timings:
        _copy(snapshot / f, study.path(f))
    now = time.time()
    for f in timings:  # Snakemake counts a job's benchmark record among its outputs
        os.utime(study.path(f), (now, now))
    for cell in carried:
        run_dir = study.path(cell.artifact.run_dir)
        if _has_weights(study.path(cell.artifact.location)):
            continue
        entry = manifest["cells"][cell.key]
        (run_dir / STUB_NOTE).write_text(
            f"Carried from a study snapshot ({snapshot.name}): only artifact.json is here. The weights stayed on the "
            f"machine that trained them ({entry['host']['cpu']}, saved {entry['saved']}).\n")
        for path in (run_dir / STUB_NOTE, study.path(cell.record), study.path(cell.record + DIGEST_SUFFIX),
                     study.path(cell.record).parent, run_dir):
            os.utime(path, (now, now))
    for f in measurements:  # two seconds later than the model folders
        os.utime(study.path(f), (now + 2, now + 2))


def jobs_in_dry_run(output: str) -> dict[str, int]:
    """{rule: jobs} from the job-stats table of `snakemake -n --quiet rules` ({} when nothing is to be done);
    the target rule `all` left out."""
    lines = output.splitlines()
    header = [i for i, line in enumerate(lines) if line.split() == ["job", "count"]]
    if not header:
        if "Nothing to be done" not in output:
            raise SnapshotError("a dry run printed neither a job table nor 'Nothing to be done':\n" + output[-2000:])
        return {}
    counts = {}
    for line in lines[header[0] + 2:]:
        rule, count = line.split()
        if rule == "total":
            break
        counts[rule] = int(count)
    counts.pop("all", None)
    return counts


Snakemake = Callable[..., subprocess.CompletedProcess]  # snakemake(*args) -> the finished run (stdout captured)


def resume(snapshot: Path, study: Study, snakemake: Snakemake, require_clean: bool = True,
           report: Callable[[str], None] = print) -> Plan:
    """Steps 1 to 4 of the module's docstring; each can be interrupted and run again."""
    def run(*args):
        done = snakemake(*args)
        if done.returncode != 0:
            raise SnapshotError(f"snakemake {' '.join(args[:3])}... failed (exit {done.returncode}):\n"
                                f"{(done.stdout or '')[-3000:]}{(done.stderr or '')[-3000:]}")
        return done

    # a first dry run of the whole study writes the folder fingerprints (realign.fingerprint) that its rules take
    # as inputs: with explicit targets in a fresh folder, Snakemake looks for them before they are written
    run("-n", "--quiet", "rules")
    run(*step1_targets(snapshot, study))
    chosen = plan(snapshot, study, require_clean)
    report(chosen.describe())
    # one cell at a time, each seed's arms together: what is finished when a session ends is whole cells, which the
    # next `save` carries (one Snakemake run of all targets would train every model before measuring any)
    for cell in sorted(chosen.remaining, key=lambda c: (c.artifact.seed is not None, c.artifact.seed or 0)):
        run(*cell.measurements())
    floors = missing_floors(snapshot, study)
    if floors:
        run(*floors)
    restore(snapshot, study, chosen.carried)
    dry = run("-n", "--quiet", "rules")
    jobs = jobs_in_dry_run(dry.stdout + dry.stderr)
    if not set(jobs) <= FINAL_RULES:
        raise SnapshotError(f"after the restore a dry run would still run {jobs}; only table and report may be left. "
                            "Nothing more was run; `snakemake -n` in the study says why")
    run()
    return chosen
