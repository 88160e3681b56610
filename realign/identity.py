"""The identity of an artifact: (model, degradation, recovery, replicate seed, checkpoint step), with the one parser
of its recovery name `<recovery>[+seed<N>][@step<K>]` and the one builder of its paths.

A replicate trained with another seed than the config's carries `+seed<N>`; `@step<K>` is the checkpoint of that run
after K optimizer steps, stored inside its run's directory. "none" as a degradation is the undamaged model, as a
recovery the damaged parent itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

_RECOVERY_NAME = re.compile(r"^(?P<recovery>.+?)(?:\+seed(?P<seed>[0-9]+))?(?:@step(?P<step>[0-9]+))?$")
CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class ArtifactId:
    model: str
    degradation: str
    recovery: str  # the configured recovery (or "none"), without seed or step
    seed: int | None = None  # a replicate's training seed; None: the config's seed
    step: int | None = None  # a checkpoint's optimizer step; None: the final model

    @classmethod
    def parse(cls, model: str, degradation: str, recovery_name: str) -> ArtifactId:
        return cls(model, degradation, *parse_recovery_name(recovery_name))

    @property
    def recovery_name(self) -> str:
        return format_recovery_name(self.recovery, self.seed, self.step)

    @property
    def run(self) -> ArtifactId:
        """The training run this artifact belongs to (itself unless it is a checkpoint)."""
        return replace(self, step=None)

    @property
    def is_configured_run(self) -> bool:
        """Neither a replicate nor a checkpoint: the run the config names."""
        return self.seed is None and self.step is None

    @property
    def run_dir(self) -> str:
        """The directory a DAG job writes for the artifact: a checkpoint lives inside its run's directory."""
        return f"results/models/{self.model}/{self.degradation}/{self.run.recovery_name}"

    @property
    def location(self) -> str:
        """Where the artifact itself lies (artifact.json, weights, tokenizer), relative to the study."""
        return self.run_dir + (f"/{checkpoint_subdir(self.step)}" if self.step is not None else "")


def parse_recovery_name(name: str) -> tuple[str, int | None, int | None]:
    """(configured recovery, replicate seed or None, checkpoint step or None) of a recovery artifact name; the one
    parser of `<recovery>[+seed<N>][@step<K>]` (a study's cells name recoveries before any model is chosen)."""
    match = _RECOVERY_NAME.match(name)
    if match is None:
        raise ValueError(f"not a recovery artifact name: {name!r}")
    seed, step = match["seed"], match["step"]
    return match["recovery"], int(seed) if seed else None, int(step) if step else None


def format_recovery_name(recovery: str, seed: int | None = None, step: int | None = None) -> str:
    """The artifact name of a configured recovery's replicate `seed` (None: the config's) at checkpoint `step`."""
    return recovery + (f"+seed{seed}" if seed is not None else "") + (f"@step{step}" if step is not None else "")


def is_configured_run(recovery_name: str) -> bool:
    """Neither a replicate nor a checkpoint: the run the config names (ArtifactId.is_configured_run of a name)."""
    return parse_recovery_name(recovery_name)[1:] == (None, None)


def run_name(recovery_name: str) -> str:
    """The recovery name of the training run an artifact belongs to (its name without `@step<K>`)."""
    recovery, seed, _ = parse_recovery_name(recovery_name)
    return format_recovery_name(recovery, seed)


def checkpoint_subdir(step: int) -> str:
    return f"{CHECKPOINTS_DIR}/step-{step}"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / checkpoint_subdir(step)


def layers_label(alignment_layers) -> str:
    """The file-name form of a measure.alignment_layers value: `inner`, or `first-last`."""
    return "inner" if alignment_layers == "inner" else "-".join(str(int(v)) for v in alignment_layers)


def layers_from_label(label: str):
    """The measure.alignment_layers value that `layers_label` wrote as `label`."""
    return "inner" if label == "inner" else [int(v) for v in label.split("-")]
