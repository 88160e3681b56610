"""realign.identity.ArtifactId: the one parser of recovery names and the one builder of artifact paths."""

import pytest

from realign.config import artifact_location, parse_recovery_name, recovery_name, run_dir
from realign.identity import ArtifactId, checkpoint_dir


@pytest.mark.parametrize("name, parts", [("kd", ("kd", None, None)), ("kd+seed1", ("kd", 1, None)),
                                         ("kd@step6", ("kd", None, 6)), ("alignment-held+seed12@step3",
                                                                          ("alignment-held", 12, 3)),
                                         ("none", ("none", None, None))])
def test_names_round_trip_and_paths_are_built_in_one_place(name, parts):
    artifact = ArtifactId.parse("m", "d", name)
    assert (artifact.recovery, artifact.seed, artifact.step) == parts == parse_recovery_name(name)
    assert artifact.recovery_name == name == recovery_name(*parts)
    assert artifact.is_configured_run == (parts[1:] == (None, None))
    assert artifact.run_dir == run_dir("m", "d", name) == f"results/models/m/d/{artifact.run.recovery_name}"
    expected = artifact.run_dir + (f"/checkpoints/step-{parts[2]}" if parts[2] is not None else "")
    assert artifact.location == artifact_location("m", "d", name) == expected
    if parts[2] is not None:
        assert str(checkpoint_dir(artifact.run_dir, parts[2])) == expected
