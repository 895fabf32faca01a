"""Checks on a directory a run will write, made before its long work: whether it is someone
else's, and whether it can be written (tried, leaving nothing behind)."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path

#: What a resume directory (``calibrate.resume``) holds: one with other files and none of these
#: is someone else's.
RESUME_FILES = frozenset({"progress.json", "state.npz", "progress.tmp.json", "state.tmp.npz"})


def listing(names: Iterable[str], most: int = 3) -> str:
    """The first ``most`` names in sorted order, then "..." when there are more: for messages."""
    names = sorted(names)
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def foreign_files(directory: Path, ours: Collection[str]) -> str | None:
    """The ``listing`` of ``directory`` when it holds files and none of ``ours``: someone else's
    directory, which a run must not mix its files with (or delete along with its own). None when
    it does not exist, is empty or holds one of ``ours``."""
    if not directory.is_dir():
        return None
    names = set(os.listdir(directory))
    return listing(names) if names and not names & set(ours) else None


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    while not path.exists():
        path = path.parent
    return path


def probe_writable(path: Path) -> None:
    """Raise OSError unless ``path`` can be written: a temporary file in it when it exists, else
    a temporary directory in its nearest existing ancestor (which must be a directory)."""
    existing = nearest_existing(path)
    if existing == path:
        with tempfile.TemporaryFile(dir=path):
            pass
    elif not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file")
    else:
        with tempfile.TemporaryDirectory(dir=existing):
            pass
