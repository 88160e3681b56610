"""artifact.json as one typed record (realign.models.record): what a stage writes is what the table reads."""

import json

import pytest

from realign.models.record import ArtifactRecord


def test_a_record_survives_its_json_and_leaves_unset_fields_out():
    record = ArtifactRecord("m", degradation="p50", recovery="kd+seed1@step2", family="pruning", seed=1, step=2,
                            recovery_params={"lr": 1e-3}, timings={"seconds": 3.5}, checkpoint_of="kd+seed1")
    obj = json.loads(json.dumps(record.to_json()))
    assert "damage" not in obj and "source" not in obj  # None: not written
    assert ArtifactRecord.from_json(obj) == record
    assert record.seconds == 3.5 and ArtifactRecord("m").seconds is None


def test_an_unknown_or_missing_key_is_an_error_naming_the_file():
    with pytest.raises(ValueError, match=r"x/artifact.json: unknown key\(s\) \['colour'\]"):
        ArtifactRecord.from_json({"model": "m", "colour": "red"}, "x/artifact.json")
    with pytest.raises(ValueError, match="x/artifact.json: missing key 'model'"):
        ArtifactRecord.from_json({"degradation": "p50"}, "x/artifact.json")


def test_the_content_digest_names_the_files_not_the_timings():
    a = ArtifactRecord("m", weights_sha256={"model.safetensors": "aa"}, files_sha256={"config.json": "bb"})
    later = ArtifactRecord("m", weights_sha256={"model.safetensors": "aa"}, files_sha256={"config.json": "bb"},
                           timings={"seconds": 9.0}, training_curve=[{"step": 1, "loss": 1.0}])
    other = ArtifactRecord("m", weights_sha256={"model.safetensors": "ab"}, files_sha256={"config.json": "bb"})
    assert a.content_digest() == later.content_digest() != other.content_digest()


def test_save_artifact_takes_a_record_not_a_dict(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from realign.models.artifact import read_record, save_artifact

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(TypeError, match="ArtifactRecord, not dict"):
        save_artifact(model, tokenizer, tmp_path / "a", {"model": "tiny"})
    assert not (tmp_path / "a").exists()
    save_artifact(model, tokenizer, tmp_path / "a", ArtifactRecord("tiny", seed=4))
    saved = read_record(tmp_path / "a")
    assert saved.seed == 4 and saved.versions["torch"] and saved.weights_sha256["model.safetensors"]
