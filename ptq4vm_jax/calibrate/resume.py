"""Calibration state after each stage, so an interrupted run continues where it stopped.

Internal format (not a user checkpoint): ``state.npz`` (learned layer states and both
activation chains, written to a temp file then renamed, so a kill never leaves half a file)
and ``progress.json`` (next stage, per-stage report, and a fingerprint of model, params,
calibration images and config: resuming with anything different is refused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path as FsPath
from typing import Any

import jax
import numpy as np

RESUME_VERSION = 1


def fingerprint(**parts: Any) -> str:
    """sha256 over the bytes of every array leaf and the JSON of everything else."""
    h = hashlib.sha256()
    for key in sorted(parts):
        h.update(key.encode())
        leaves, treedef = jax.tree_util.tree_flatten(parts[key])
        h.update(str(treedef).encode())
        for leaf in leaves:
            if hasattr(leaf, "shape"):
                a = np.asarray(leaf)
                h.update(f"{a.dtype}{a.shape}".encode())
                h.update(np.ascontiguousarray(a).tobytes())
            else:
                h.update(json.dumps(leaf, sort_keys=True, default=str).encode())
    return h.hexdigest()


class ResumeStore:
    def __init__(self, directory: str | os.PathLike, fingerprint: str, carry_treedef: Any):
        self.directory = FsPath(directory).absolute()
        self.fingerprint = fingerprint
        self.carry_treedef = carry_treedef

    @property
    def _json(self) -> FsPath:
        return self.directory / "progress.json"

    @property
    def _npz(self) -> FsPath:
        return self.directory / "state.npz"

    def exists(self) -> bool:
        if not self._json.exists():
            return False
        meta = json.loads(self._json.read_text())
        if meta.get("version") != RESUME_VERSION:
            raise ValueError(
                f"{self.directory} holds calibration state of another format version "
                f"({meta.get('version')}); delete it or pick another --resume directory"
            )
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"{self.directory} holds calibration state of a different run (model, params, "
                "calibration images or config differ); resume only with the exact same inputs, or "
                "delete the directory to start afresh"
            )
        if not self._npz.exists():
            raise ValueError(f"{self.directory}: progress.json present but state.npz missing; delete it")
        return True

    def save(self, next_stage: int, layers: dict, fp_carry: Any, q_carry: Any, reports: list) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for path, st in layers.items():
            for k, v in st.items():
                if k != "kernel" and k != "bias":  # float weights come from params again
                    arrays[f"layer|{'/'.join(path)}|{k}"] = np.asarray(v)
        for name, carry in (("fp", fp_carry), ("q", q_carry)):
            for i, leaf in enumerate(jax.tree_util.tree_leaves(carry)):
                arrays[f"{name}|{i}"] = np.asarray(leaf)
        tmp = self.directory / "state.tmp.npz"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, self._npz)
        meta = dict(version=RESUME_VERSION, fingerprint=self.fingerprint, next_stage=next_stage,
                    reports=[dataclasses.asdict(r) for r in reports])
        tmpj = self.directory / "progress.tmp.json"
        tmpj.write_text(json.dumps(meta, indent=1))
        os.replace(tmpj, self._json)

    def load(self) -> tuple[int, dict, Any, Any, list]:
        from ptq4vm_jax.calibrate.jlss import StageReport

        meta = json.loads(self._json.read_text())
        data = np.load(self._npz)
        layers: dict = {}
        chains: dict[str, dict[int, np.ndarray]] = {"fp": {}, "q": {}}
        for key in data.files:
            parts = key.split("|")
            if parts[0] == "layer":
                layers.setdefault(tuple(parts[1].split("/")), {})[parts[2]] = jax.numpy.asarray(data[key])
            else:
                chains[parts[0]][int(parts[1])] = jax.numpy.asarray(data[key])
        carry = {
            name: jax.tree_util.tree_unflatten(self.carry_treedef, [c[i] for i in range(len(c))])
            for name, c in chains.items()
        }
        reports = [StageReport(**r) for r in meta["reports"]]
        return meta["next_stage"], layers, carry["fp"], carry["q"], reports
