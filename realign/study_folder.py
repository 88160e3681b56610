"""A study folder as a snapshot sees it (realign/snapshot.py): its cells, each a (model, degradation, recovery)
artifact with the small files the analysis reads of it, and what the folder's config and code say about them."""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from realign.config import load_schema, study_artifacts, study_degradations, validate_config
from realign.identity import ArtifactId
from realign.io import DIGEST_SUFFIX, file_sha256, read_json


class SnapshotError(RuntimeError):
    """The snapshot cannot be saved into, or resumed from, as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Cell:
    model: str
    degradation: str
    recovery: str

    @property
    def key(self) -> str:
        return f"{self.model}/{self.degradation}/{self.recovery}"

    @property
    def artifact(self) -> ArtifactId:
        return ArtifactId.parse(self.model, self.degradation, self.recovery)

    @property
    def parent(self) -> Cell | None:
        """The model this cell's artifact is made from: the damaged model of a recovery, the teacher of a damage."""
        if self.recovery != "none":
            return Cell(self.model, self.degradation, "none")
        return None if self.degradation == "none" else Cell(self.model, "none", "none")

    @property
    def record(self) -> str:
        return f"{self.artifact.location}/artifact.json"

    def measurements(self) -> list[str]:
        """The files the `evaluate`, `similarity` and `divergence` rules write for this cell (digests not listed)."""
        stem = self.key
        return [f"results/eval/{stem}.json", f"results/eval/{stem}.items.parquet",
                f"results/eval/{stem}.sequences.parquet", f"results/similarity/{stem}.parquet",
                f"results/similarity/{stem}.json", f"results/divergence/{stem}.json"]

    def files(self) -> list[str]:
        """What a snapshot carries of the cell: its artifact record and its measurements, each with its digest."""
        return [path for f in [self.record, *self.measurements()] for path in (f, f + DIGEST_SUFFIX)]


@dataclass(frozen=True)
class Study:
    """A study folder (results/, config.yaml) and the checkout whose workflow runs there (for a clone: itself)."""
    folder: Path
    code: Path

    @functools.cached_property
    def _config(self) -> dict:  # read and validated once per Study
        config = yaml.safe_load((self.folder / "config.yaml").read_text())
        return validate_config(config, load_schema(self.code / "workflow/schemas/config.schema.yaml"))

    def cells(self) -> list[Cell]:
        return [Cell(*cell) for cell in study_artifacts(self._config)]

    def models(self) -> list[str]:
        return sorted({c.model for c in self.cells()})

    def damages(self) -> list[str]:
        """The damages the study applies, damaged teachers included (their inputs, `<damage>.…`, are theirs)."""
        return sorted(study_degradations(self._config))

    def teacher_of(self, cell: Cell) -> Cell | None:
        """The damaged model a recovery distils from (`teacher: <damage>`); None for the undamaged teacher."""
        if cell.recovery == "none":
            return None
        teacher = self._config["recoveries"][cell.artifact.recovery].get("teacher", "none")
        return None if teacher == "none" else Cell(cell.model, teacher, "none")

    def identity(self, require_clean: bool = True) -> dict:
        """The code's commit and the config's digest: a snapshot belongs to one of each."""
        def git(*args):
            return subprocess.run(["git", "-C", str(self.code), *args], capture_output=True, text=True,
                                  check=True).stdout
        if require_clean and git("status", "--porcelain", "--untracked-files=no").strip():
            raise SnapshotError(f"{self.code} has uncommitted changes to tracked files: a snapshot belongs to one "
                                "commit")
        return {"commit": git("rev-parse", "HEAD").strip(), "config_sha256": file_sha256(self.folder / "config.yaml")}

    def path(self, relative: str) -> Path:
        return self.folder / relative

    def weights(self, cell: Cell) -> dict | None:
        """{file: sha256} of the weights of the cell's model here (None where the cell has no model here)."""
        if not self.path(cell.record).is_file():
            return None
        return read_json(self.path(cell.record), verify=True)["weights_sha256"]
