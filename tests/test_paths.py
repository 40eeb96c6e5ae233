"""kvdistill.paths: names that become one path segment, directories a command owns, writes that do not follow
symlinks, and errors that mean a full disk."""

from __future__ import annotations

import errno
import json

import pytest

from kvdistill.errors import KvdistillError
from kvdistill.paths import (
    MARKER,
    check_segment,
    claim,
    dir_problem,
    escapes,
    is_disk_full,
    open_append,
    open_new,
    segment_problem,
)


@pytest.mark.parametrize("name", ["run1", "kd-seed0", "phase_1", "größe", "a" * 100, "x.y"])
def test_plain_names_are_segments(name):
    assert segment_problem(name, "name") is None and check_segment(name, "name") == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "non-empty"),
        (".", "directory itself"),
        ("..", "directory itself"),
        ("../x", "one path segment"),
        ("/etc", "one path segment"),
        ("a\\b", "one path segment"),
        ("a\nb", "one path segment"),
        ("a\x00b", "one path segment"),
        ("é" * 51, "102 bytes long"),
        (None, "non-empty"),
    ],
)
def test_names_that_are_not_one_segment_are_refused(name, why):
    assert why in segment_problem(name, "conditions.x")
    with pytest.raises(KvdistillError, match="rename it"):
        check_segment(name, "name")


def test_a_directory_is_writable_when_new_empty_or_marked_as_its_kind(tmp_path):
    assert dir_problem(tmp_path / "new" / "deeper", "run") is None
    (tmp_path / "empty").mkdir()
    assert dir_problem(tmp_path / "empty", "run") is None
    claim(tmp_path / "empty", "run")
    assert json.loads((tmp_path / "empty" / MARKER).read_text())["kind"] == "run"
    (tmp_path / "empty" / "config.yaml").write_text("x")
    assert dir_problem(tmp_path / "empty", "run") is None
    assert (
        "is a kvdistill run directory, not an experiment"
        in dir_problem(tmp_path / "empty", "experiment").problem
    )
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert (
        "holds files that kvdistill did not write (notes.txt)"
        in dir_problem(tmp_path / "mine", "run").problem
    )
    (tmp_path / "mine" / "plan.json").write_text("{}")
    assert dir_problem(tmp_path / "mine", "run", legacy=("notes.txt", "plan.json")) is None  # before markers
    (tmp_path / "file").write_text("x")
    assert "is a file, not a directory" in dir_problem(tmp_path / "file", "run").problem
    assert "which is a file" in dir_problem(tmp_path / "file" / "sub", "run").problem
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert "which does not exist" in dir_problem(tmp_path / "dangling", "run", flag="--out").problem


def test_writes_never_follow_a_planted_symlink(tmp_path):
    target = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    (tmp_path / "log.jsonl").symlink_to(target)
    with pytest.raises(KvdistillError, match="is a symlink"):
        open_append(tmp_path / "log.jsonl")
    (tmp_path / "x.tmp").symlink_to(target)
    with open_new(tmp_path / "x.tmp") as f:  # the link itself is replaced by a new file
        f.write("new")
    assert not target.exists() and not (tmp_path / "x.tmp").is_symlink()
    assert (tmp_path / "x.tmp").read_text() == "new"
    (tmp_path / "inside").mkdir()
    (tmp_path / "in").symlink_to(tmp_path / "inside")
    (tmp_path / "out").symlink_to(tmp_path.parent)
    assert escapes(tmp_path) == [f"log.jsonl -> {target}", f"out -> {tmp_path.parent}"]


def test_disk_full_is_recognised_through_wrappers():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"))
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("bad value"))
