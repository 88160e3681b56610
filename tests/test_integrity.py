"""Digests (realign.io): a file written with its sidecar `<file>.sha256` is read only if its bytes match it; a
file without a digest is an error, not a pass; a failed or interrupted write never leaves a pair that verifies."""

from __future__ import annotations

import hashlib

import pytest

from realign.io import (IntegrityError, atomic_path, digest_path, read_json, read_jsonl, read_verified, write_json,
                        write_jsonl)


def test_a_sidecar_in_sha256sum_format_is_written_with_the_file_and_checked_on_read(tmp_path):
    path = tmp_path / "prompts.json"
    write_json(path, {"probe": [1, 2]}, digest=True)
    assert digest_path(path).read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  prompts.json\n"
    assert read_json(path, verify=True) == {"probe": [1, 2]}
    path.write_text(path.read_text().replace("2", "3"))  # still valid JSON
    with pytest.raises(IntegrityError, match=f"{path} does not match the sha256 digest recorded in prompts.json.sha256"):
        read_json(path, verify=True, producer="the `prompt_splits` rule")
    digest_path(path).write_text("not a digest\n")
    with pytest.raises(IntegrityError, match="is not a sha256 digest"):
        read_json(path, verify=True)
    digest_path(path).unlink()
    with pytest.raises(IntegrityError, match=f"{path} has no sha256 digest.*delete {path} and rerun the `x` rule"):
        read_json(path, verify=True, producer="the `x` rule")
    assert read_json(path) == {"probe": [1, 3]}  # unverified reads are unchanged


def test_a_failed_write_keeps_the_old_consistent_pair(tmp_path):
    path = tmp_path / "answers.jsonl"
    write_jsonl(path, [{"a": 1}], digest=True)
    with pytest.raises(RuntimeError):
        with atomic_path(path, digest=True) as tmp:
            tmp.write_text('{"a": 2}\n')
            raise RuntimeError("killed mid-write")
    assert read_jsonl(path, verify=True) == [{"a": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "answers.jsonl.sha256"]  # no temporaries
    with pytest.raises(FileNotFoundError, match="rerun"):
        read_verified(tmp_path / "missing.jsonl")


def test_narrow_corpora_carry_digests_that_their_readers_check(tmp_path):
    from realign.data.stage import prepare_code_corpus

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"m{i}.py").write_text(f"def f{i}():\n    return {i}\n")
    train, heldout = tmp_path / "code_train.jsonl", tmp_path / "code_heldout.jsonl"
    prepare_code_corpus(str(corpus), 0.3, 10_000, train, heldout)
    assert read_jsonl(train, verify=True) and read_jsonl(heldout, verify=True)
    heldout.write_text(heldout.read_text().replace("return", "yield"))
    with pytest.raises(IntegrityError, match=f"{heldout} does not match"):
        read_jsonl(heldout, verify=True)
