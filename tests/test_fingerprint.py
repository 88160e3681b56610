"""Folder inputs by content (realign.fingerprint, issue 32): the fingerprint's time follows the folder's content,
and it is rewritten only when the content changed."""

import os
from pathlib import Path

from realign.fingerprint import folder_fingerprint


def _mtime(path) -> int:
    return Path(path).stat().st_mtime_ns


def _set_mtime(path: Path, ns: int) -> None:
    os.utime(path, ns=(ns, ns))


def test_a_folder_not_there_yet_gets_a_placeholder_at_the_epoch(tmp_path):
    fp = folder_fingerprint(tmp_path / "wheel", tmp_path / "store")
    assert _mtime(fp) == 0 and "does not exist yet" in Path(fp).read_text()


def test_the_fingerprint_follows_an_edit_inside_the_folder(tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    for name in ("config.json", "sub/model.safetensors"):
        (folder / name).write_text("x")
    old = 1_000_000_000 * 10**9
    for p in (folder / "config.json", folder / "sub/model.safetensors", folder / "sub", folder):
        _set_mtime(p, old)
    fp = folder_fingerprint(folder, tmp_path / "store")
    assert _mtime(fp) == old and "sub/model.safetensors\t1\t" in Path(fp).read_text()
    # unchanged: the same file, the same time (a finished study stays finished)
    assert folder_fingerprint(folder, tmp_path / "store") == fp and _mtime(fp) == old
    # overwritten in place with the same size (what `cp` does): the folder's own time does not move, the print does
    (folder / "sub/model.safetensors").write_text("y")
    assert _mtime(folder) == old
    folder_fingerprint(folder, tmp_path / "store")
    assert _mtime(fp) == _mtime(folder / "sub/model.safetensors") > old
    # a file removed: its folder's time moves, and so does the print's listing
    _set_mtime(folder / "sub/model.safetensors", old)
    (folder / "config.json").unlink()
    folder_fingerprint(folder, tmp_path / "store")
    assert "config.json" not in Path(fp).read_text() and _mtime(fp) == _mtime(folder) > old


def test_two_folders_of_one_name_get_two_prints(tmp_path):
    a, b = tmp_path / "a" / "corpus", tmp_path / "b" / "corpus"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    assert folder_fingerprint(a, tmp_path / "s") != folder_fingerprint(b, tmp_path / "s")
