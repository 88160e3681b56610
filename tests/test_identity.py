"""realign.identity.ArtifactId: the one parser of recovery names and the one builder of artifact paths."""

import pytest

from realign.identity import (ArtifactId, checkpoint_dir, format_recovery_name, is_configured_run, parse_recovery_name,
                              run_name)


@pytest.mark.parametrize("name, parts", [("kd", ("kd", None, None)), ("kd+seed1", ("kd", 1, None)),
                                         ("kd@step6", ("kd", None, 6)), ("alignment-held+seed12@step3",
                                                                          ("alignment-held", 12, 3)),
                                         ("none", ("none", None, None))])
def test_names_round_trip_and_paths_are_built_in_one_place(name, parts):
    artifact = ArtifactId.parse("m", "d", name)
    assert (artifact.recovery, artifact.seed, artifact.step) == parts == parse_recovery_name(name)
    assert artifact.recovery_name == name == format_recovery_name(*parts)
    assert artifact.is_configured_run == is_configured_run(name) == (parts[1:] == (None, None))
    assert artifact.run.recovery_name == run_name(name) == format_recovery_name(*parts[:2])
    assert artifact.run_dir == f"results/models/m/d/{artifact.run.recovery_name}"
    expected = artifact.run_dir + (f"/checkpoints/step-{parts[2]}" if parts[2] is not None else "")
    assert artifact.location == expected
    if parts[2] is not None:
        assert str(checkpoint_dir(artifact.run_dir, parts[2])) == expected


def test_any_configured_name_survives_a_seed_and_a_step():
    for name in ("kd", "kd-topk.v2", "a+b"):
        for seed in (None, 3):
            for step in (None, 7):
                assert parse_recovery_name(format_recovery_name(name, seed, step)) == (name, seed, step)
    assert ArtifactId.parse("m", "d", "kd+seed1@step3").location == "results/models/m/d/kd+seed1/checkpoints/step-3"
