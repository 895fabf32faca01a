"""Calibration state after each stage, so an interrupted run continues where it stopped.

Internal format (not a user checkpoint): ``state.npz`` is the single source of truth. It holds
the learned layer states, both activation chains and a ``meta`` entry (format version, next
stage, per-stage report, and a fingerprint of model, params, calibration images and config:
resuming with anything different is refused). It is written to a temp file, synced and renamed
over the old one in one ``os.replace``, so a kill at any moment leaves either the previous stage's
state or the new one, never a mix. ``progress.json`` repeats ``meta`` for people to read; it is
written after the rename and never read back.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import zipfile
from pathlib import Path as FsPath
from typing import Any

import jax
import numpy as np

from ptq4vm_jax.calibrate.report import StageReport
from ptq4vm_jax.dirs import RESUME_FILES, foreign_files, probe_writable
from ptq4vm_jax.errors import ArgumentError

RESUME_VERSION = 2
# What a damaged state.npz raises from zipfile/np.load/json/tree_unflatten: a truncated zip, a
# garbled entry, a file that is not a zip at all, an entry or key that is missing or malformed.
_CORRUPT = (zipfile.BadZipFile, ValueError, KeyError, IndexError, TypeError, EOFError)


def fingerprints(**parts: Any) -> tuple[str, dict[str, str]]:
    """sha256 over the bytes of every array leaf and the JSON of everything else: of all parts
    together, and of each part alone (what ``fingerprints(key=value)`` gives as the whole), in
    one pass over the data."""
    whole, each = hashlib.sha256(), {key: hashlib.sha256() for key in parts}

    def feed(key: str, data: bytes) -> None:
        whole.update(data)
        each[key].update(data)

    for key in sorted(parts):
        feed(key, key.encode())
        leaves, treedef = jax.tree_util.tree_flatten(parts[key])
        feed(key, str(treedef).encode())
        for leaf in leaves:
            if hasattr(leaf, "shape"):
                a = np.asarray(leaf)
                feed(key, f"{a.dtype}{a.shape}".encode())
                feed(key, np.ascontiguousarray(a).tobytes())
            else:
                feed(key, json.dumps(leaf, sort_keys=True, default=str).encode())
    return whole.hexdigest(), {key: h.hexdigest() for key, h in each.items()}


class ResumeStore:
    """``digests`` (one fingerprint per input) and ``settings`` (the small JSON inputs: model,
    overrides, config) are kept beside the fingerprint so that a refusal can say what differs."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str, carry_treedef: Any, *,
                 digests: dict[str, str] | None = None, settings: dict[str, Any] | None = None) -> None:
        self.directory = FsPath(directory).absolute()
        self.fingerprint = fingerprint
        self.carry_treedef = carry_treedef
        self.digests = dict(digests or {})
        self.settings = json.loads(json.dumps(settings or {}, default=str))  # as stored and read back
        self.restored: list[StageReport] = []  # the finished blocks' reports that load() returned

    def _differences(self, meta: dict) -> str:
        theirs, their_settings = meta.get("digests") or {}, meta.get("settings") or {}
        if not theirs:
            return "model, params, calibration images or config differ"
        out = []
        for key in sorted(self.digests):
            if theirs.get(key) == self.digests[key]:
                continue
            mine, old = self.settings.get(key), their_settings.get(key)
            if isinstance(mine, dict) and isinstance(old, dict):
                fields = [f"{k} {old.get(k)!r} -> {mine.get(k)!r}" for k in sorted(mine.keys() | old.keys())
                          if old.get(k) != mine.get(k)]
                out.append(f"{key}: {', '.join(fields)}")
            elif key in self.settings:
                out.append(f"{key}: {old!r} -> {mine!r}")
            else:
                out.append(f"{key} differ" if key.endswith("s") else f"{key} differs")
        return "; ".join(out) or "the combined fingerprint differs"

    @property
    def _json(self) -> FsPath:
        return self.directory / "progress.json"

    @property
    def _npz(self) -> FsPath:
        return self.directory / "state.npz"

    def _corrupt(self, reason: str) -> ArgumentError:
        return ArgumentError(f"{self.directory}: resume state is corrupt ({reason}); delete the directory "
                             "to start afresh", argument="resume_dir")

    def _read(self, arrays: bool) -> tuple[dict, dict[str, np.ndarray]]:
        """``meta`` of state.npz, checked for the format version, and its arrays if asked."""
        if not zipfile.is_zipfile(self._npz):  # else np.load takes it for a pickle and says so
            raise self._corrupt("state.npz is not an .npz archive")
        try:
            with np.load(self._npz) as data:
                # no meta entry: written by the first format, which kept it in progress.json
                meta = json.loads(str(data["meta"])) if "meta" in data.files else {"version": 1}
                version = meta["version"]
                content = {k: data[k] for k in data.files if k != "meta"} if arrays else {}
        except _CORRUPT as e:
            raise self._corrupt(f"{type(e).__name__}: {e}") from e
        if version != RESUME_VERSION:
            raise ArgumentError(
                f"{self.directory} holds calibration state of another format version "
                f"({version}); delete it or pick another resume directory", argument="resume_dir"
            )
        return meta, content

    def exists(self) -> bool:
        """True when this directory holds state of this very run; refuses another run's state."""
        if not self._npz.exists():
            return False
        meta, _ = self._read(arrays=False)
        if meta.get("fingerprint") != self.fingerprint:
            raise ArgumentError(
                f"{self.directory} holds calibration state of a different run ({self._differences(meta)}); "
                "resume only with the exact same inputs, or delete the directory to start afresh",
                argument="resume_dir")
        return True

    def prepare(self) -> None:
        """Before any calibration: the directory must be ours (new, empty or holding resume state)
        and writable, so that the first block's save cannot fail after the work."""
        d = self.directory
        if d.exists() and not d.is_dir():
            raise ArgumentError(f"resume_dir {d} is a file; give a directory for the resume state",
                                argument="resume_dir")
        shown = foreign_files(d, RESUME_FILES)
        if shown:
            raise ArgumentError(f"resume_dir {d} holds other files ({shown}) and no resume state; give "
                                "a new or empty directory, so that the resume state is never mixed "
                                "with (or deleted along with) other files", argument="resume_dir")
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe_writable(d)
        except OSError as e:
            raise ArgumentError(f"resume_dir {d} cannot be created or written ({e.strerror or e}); "
                                "choose a writable directory", argument="resume_dir") from None

    def save(self, next_stage: int, layers: dict, fp_carry: Any, q_carry: Any, reports: list) -> None:
        """``layers``: {path: {name: array}}, the learned state without the float weights."""
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = dict(version=RESUME_VERSION, fingerprint=self.fingerprint, next_stage=next_stage,
                    reports=[dataclasses.asdict(r) for r in reports], digests=self.digests,
                    settings=self.settings)
        arrays = {"meta": np.array(json.dumps(meta))}
        for path, st in layers.items():
            for k, v in st.items():
                arrays[f"layer|{'/'.join(path)}|{k}"] = np.asarray(v)
        for name, carry in (("fp", fp_carry), ("q", q_carry)):
            for i, leaf in enumerate(jax.tree_util.tree_leaves(carry)):
                arrays[f"{name}|{i}"] = np.asarray(leaf)
        tmp, tmpj = self.directory / "state.tmp.npz", self.directory / "progress.tmp.json"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._npz)  # the commit point
            tmpj.write_text(json.dumps(meta, indent=1))
            os.replace(tmpj, self._json)
        except OSError as e:  # a full disk, above all: say where, and leave no partial file filling it
            for partial in (tmp, tmpj):
                partial.unlink(missing_ok=True)
            full = e.errno == errno.ENOSPC
            raise ArgumentError(
                f"saving the resume state in {self.directory} failed ("
                f"{'no space left on the device' if full else e.strerror or e}); the blocks saved "
                "before are kept. "
                f"{'Free some space' if full else 'Fix this'} and rerun with the same resume_dir to "
                "continue, or give a resume_dir elsewhere", argument="resume_dir") from e

    def load(self) -> tuple[int, dict, Any, Any, list]:
        """(next stage, layer states without kernel/bias, float chain, quantized chain, reports).

        The chains come back as arrays on the default device; the caller places them.
        """
        meta, arrays = self._read(arrays=True)
        try:
            loaded = self._unpack(meta, arrays)
        except _CORRUPT as e:
            raise self._corrupt(f"{type(e).__name__}: {e}") from e
        self.restored = list(loaded[4])
        return loaded

    def _unpack(self, meta: dict, arrays: dict[str, np.ndarray]) -> tuple[int, dict, Any, Any, list]:
        layers: dict = {}
        chains: dict[str, dict[int, np.ndarray]] = {"fp": {}, "q": {}}
        for key, value in arrays.items():
            parts = key.split("|")
            if parts[0] == "layer":
                layers.setdefault(tuple(parts[1].split("/")), {})[parts[2]] = jax.numpy.asarray(value)
            else:
                chains[parts[0]][int(parts[1])] = jax.numpy.asarray(value)
        carry = {
            name: jax.tree_util.tree_unflatten(self.carry_treedef, [c[i] for i in range(len(c))])
            for name, c in chains.items()
        }
        reports = [StageReport(**r) for r in meta["reports"]]
        return int(meta["next_stage"]), layers, carry["fp"], carry["q"], reports
