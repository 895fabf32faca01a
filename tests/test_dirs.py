"""ptq4vm_jax.dirs: the directory checks made before long work, and the resume store's use of them."""

import errno
from pathlib import Path

import jax
import pytest

from ptq4vm_jax.calibrate.resume import RESUME_FILES, ResumeStore
from ptq4vm_jax.dirs import foreign_files, listing, nearest_existing, probe_writable
from ptq4vm_jax.errors import ArgumentError


def test_listing_is_sorted_and_cut():
    assert listing(["b", "a"]) == "a, b"
    assert listing(["d", "c", "b", "a"]) == "a, b, c, ..."
    assert listing(["b", "a"], most=1) == "a, ..."


def test_foreign_files_names_someone_elses_directory_only(tmp_path):
    ours = {"state.npz"}
    assert foreign_files(tmp_path / "missing", ours) is None
    assert foreign_files(tmp_path, ours) is None  # empty
    (tmp_path / "notes.txt").write_text("mine")
    assert foreign_files(tmp_path, ours) == "notes.txt"
    (tmp_path / "state.npz").write_bytes(b"")
    assert foreign_files(tmp_path, ours) is None  # holds ours: a directory of the run's own kind
    assert foreign_files(tmp_path / "notes.txt", ours) is None  # a file is not a directory


def test_probe_writable_tries_without_leaving_anything(tmp_path):
    probe_writable(tmp_path)
    probe_writable(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []
    assert nearest_existing(tmp_path / "a" / "b") == tmp_path
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        probe_writable(tmp_path / "f" / "sub")
    # A kernel file system, where nothing can be made: the probe's directory, made in the nearest
    # existing ancestor (/proc), is refused as the system refuses it.
    with pytest.raises(FileNotFoundError, match=r"No such file or directory: '/proc/[^/]+'$") as e:
        probe_writable(Path("/proc/ptq4vm_no/dir"))
    assert e.value.errno == errno.ENOENT and Path(e.value.filename).parent == Path("/proc")


def test_resume_store_refuses_a_foreign_or_unusable_directory(tmp_path):
    treedef = jax.tree_util.tree_structure([0])
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ArgumentError, match=r"holds other files \(notes.txt\) and no resume state"):
        ResumeStore(tmp_path, "", treedef).prepare()
    with pytest.raises(ArgumentError, match="is a file"):
        ResumeStore(tmp_path / "notes.txt", "", treedef).prepare()
    fresh = tmp_path / "new" / "resume"
    ResumeStore(fresh, "", treedef).prepare()
    assert fresh.is_dir() and list(fresh.iterdir()) == []
    (fresh / sorted(RESUME_FILES)[0]).write_text("{}")
    (fresh / "notes.txt").write_text("kept beside our state")
    ResumeStore(fresh, "", treedef).prepare()  # holds resume state: ours
