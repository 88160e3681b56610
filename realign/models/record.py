"""`artifact.json`: what one artifact is and how it was made, as one typed record that every stage writes and the
table reads back (realign.models.artifact saves and verifies it beside the weights).

The three stages fill different parts: the teacher (`prepare_teacher`) its `source` and `n_parameters`; a damage
its `degradation_*` fields, the constraint its weights keep and, by kind of method, `damage` (what it changed),
`calibration` or `data` (the narrow corpus of forgetting); a recovery its `recovery_*` fields, the teacher it
learned from, `data_split`, either `checkpoints` (a run) or `checkpoint_of` (a checkpoint of that run), and,
under a constraint, `damage_touched`: how much of the damage it changed, per target kind
{kind: {matrices_changed, matrices, values_changed, values, fraction}} (realign.degrade.touched.damage_touched:
the targeted values whose stored grid point, or kept unmasked weight, differs from the damaged parent's; a LoRA
recovery of a frozen bitsandbytes base changes no base value by design and adds `adapter`, its trained B values).
Records saved before the field existed read back with None.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

NO_CONSTRAINT = {"kind": "none"}


@dataclass
class ArtifactRecord:
    model: str
    degradation: str = "none"  # the damage's name in the config; "none": the undamaged model
    recovery: str = "none"  # the recovery's artifact name, `<recovery>[+seed<N>][@step<K>]`; "none": no recovery
    family: str = "teacher"  # forgetting, quantization or pruning; "teacher" for the undamaged model
    degradation_method: str = "none"
    degradation_params: dict = field(default_factory=dict)
    recovery_method: str = "none"
    recovery_params: dict = field(default_factory=dict)
    constraint: dict = field(default_factory=lambda: dict(NO_CONSTRAINT))  # what the weights must keep
    constraint_check: dict | None = None  # the re-check of that constraint on the saved weights
    seed: int | None = None  # the training seed of a damage or recovery
    step: int | None = None  # optimizer steps of a recovery (or of its checkpoint)
    parents: list[str] = field(default_factory=list)  # artifact directories it was made from
    teacher: str | None = None  # the artifact a recovery distilled from
    training_curve: list[dict] = field(default_factory=list)
    training_precision: str | None = None  # a trained artifact: its training forwards' precision (training.dtype)
    timings: dict = field(default_factory=dict)  # seconds (and device) of the step that made it
    checkpoints: list[int] | None = None  # a recovery run: the steps of its saved checkpoints
    checkpoint_of: str | None = None  # a checkpoint: the recovery run it was saved from
    source: dict | None = None  # the teacher: the configured model source
    n_parameters: int | None = None  # the teacher
    damage: dict | None = None  # a post-training damage: what it touched (realign.degrade.coverage)
    calibration: dict | None = None  # a calibrated damage: the calibration sequences
    data: dict | None = None  # forgetting: the narrow corpus it was trained on
    data_split: dict | None = None  # a recovery: the records it trained on
    damage_touched: dict | None = None  # a constrained recovery: per target kind, how much of the damage it changed
    versions: dict | None = None  # library versions (filled in when saved)
    weights_sha256: dict | None = None  # digests of the weight files (filled in when saved)
    files_sha256: dict | None = None  # digests of every other file (filled in when saved)

    @property
    def seconds(self) -> float | None:
        return self.timings.get("seconds")

    def to_json(self) -> dict:
        """The JSON object (fields left unset are left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_json(cls, obj: dict, path: str | Path = "artifact.json") -> ArtifactRecord:
        """The record of a parsed artifact.json; a missing identity or an unknown key is an error naming `path`."""
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: not a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown} (written by another version of realign?); delete the "
                             "artifact and rerun the step that made it")
        if "model" not in obj:
            raise ValueError(f"{path}: missing key 'model'")
        return cls(**obj)

    def content_digest(self) -> str:
        """One sha256 naming the artifact's content: over the digests of its weights and files (not its timings)."""
        return hashlib.sha256(json.dumps([self.weights_sha256, self.files_sha256], sort_keys=True).encode()).hexdigest()
