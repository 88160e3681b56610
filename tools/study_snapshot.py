"""Carry a study's finished cells to another machine, and resume the study there (realign/snapshot.py says how).

    .venv/bin/python tools/study_snapshot.py save   <study clone> <snapshot folder>
    .venv/bin/python tools/study_snapshot.py plan   <snapshot folder> <study clone>
    .venv/bin/python tools/study_snapshot.py resume <snapshot folder> <study clone> [--snakemake "<command>"]

`save` adds the study's finished cells to the snapshot, a folder to commit (about 150 kB a cell). `resume`, in a
fresh clone of the snapshot's commit: makes the teacher, the damaged parents and the pinned inputs again and
compares them with the pinned digests; runs the cells the snapshot does not carry; copies the carried ones in;
checks with a dry run that only `table` and `report` are left; and runs them. It can be interrupted and run again.
`plan` prints what a resume would carry and make (after its first step has made the parents).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from realign import snapshot as snap

DEFAULT_SNAKEMAKE = f"{sys.executable} -m snakemake --cores all --rerun-incomplete"


def snakemake_in(study: Path, command: str):
    """Run Snakemake in the study clone with the clone's own code on the path, never this checkout's."""
    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = shlex.split(command) + list(args)
        print("+", " ".join(cmd[:12]) + (f" ... ({len(cmd) - 12} more)" if len(cmd) > 12 else ""), flush=True)
        # a dry run's output is read (its job table); a real run's goes to the terminal
        return subprocess.run(cmd, cwd=study, env={**os.environ, "PYTHONPATH": str(study)}, text=True,
                              capture_output="-n" in args)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("save").add_argument("study", type=Path)
    sub.choices["save"].add_argument("snapshot", type=Path)
    for name in ("plan", "resume"):
        sub.add_parser(name).add_argument("snapshot", type=Path)
        sub.choices[name].add_argument("study", type=Path)
    sub.choices["resume"].add_argument("--snakemake", default=DEFAULT_SNAKEMAKE,
                                       help="the Snakemake command, run in the study clone (default: %(default)s)")
    args = parser.parse_args(argv)
    study = snap.Study(args.study.resolve(), args.study.resolve())
    try:
        if args.command == "save":
            added = snap.save(study, args.snapshot.resolve())
            print(f"{len(added)} cells added to {args.snapshot}: " + ", ".join(c.key for c in added))
        elif args.command == "plan":
            print(snap.plan(args.snapshot.resolve(), study).describe())
        else:
            snap.resume(args.snapshot.resolve(), study, snakemake_in(study.folder, args.snakemake))
    except snap.SnapshotError as err:
        print(f"study_snapshot: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
