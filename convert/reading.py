"""Reading an official checkpoint file into a flat state dict, and choosing a family's key map."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from convert.errors import CheckpointError
from convert.mapping import FamilySpec, strip_module_prefix
from convert.safetensors_reader import read_safetensors
from convert.torch_reader import read_torch_checkpoint

__all__ = ["family_spec", "name_coverage", "read_checkpoint", "state_dict_entry"]

#: The entries that hold the weights when no key is given, in the order they are looked for: the
#: official Vim and VMamba training scripts save ``{'model': ...}``, LocalMamba's ``{'state_dict': ...}``.
DEFAULT_KEYS = ("model", "state_dict")


def _looks_like_safetensors(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {e.strerror or e}") from None
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Read a ``.safetensors`` file (by suffix or content) or else a ``torch.save`` zip."""
    path = os.fspath(path)
    if path.endswith(".safetensors") or (os.path.isfile(path) and _looks_like_safetensors(path)):
        return read_safetensors(path)
    return read_torch_checkpoint(path)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, np.ndarray) for v in obj.values()) and all(
        isinstance(k, str) and (isinstance(v, np.ndarray) or v is None) for k, v in obj.items()
    )


def _describe(value: Any) -> str:
    if _is_state_dict(value):
        return f"state_dict of {sum(isinstance(v, np.ndarray) for v in value.values())} tensors"
    return type(value).__name__


def state_dict_entry(checkpoint: Any, key: str | None = None, path: str = "checkpoint") -> str | None:
    """The top-level entry of ``checkpoint`` that holds its state_dict, or None for a bare state_dict.

    ``key=None`` (the default) takes the first of ``DEFAULT_KEYS`` the checkpoint has, else a bare
    state_dict. A ``key`` given explicitly must be an entry of the checkpoint: a bare state_dict
    has none, and is refused rather than read in place of the entry asked for.
    """
    if _is_state_dict(checkpoint):
        if key is None:
            return None
        raise CheckpointError(f"{path} is a bare {_describe(checkpoint)} with no entry {key!r}: drop key= "
                              "to read it", argument="key")
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a dict with a state_dict")
    listing = ", ".join(f"{k!r} ({_describe(v)})" for k, v in checkpoint.items())
    entry = key if key is not None else next((k for k in DEFAULT_KEYS if k in checkpoint), None)
    if entry is None or entry not in checkpoint:
        wanted = repr(key) if key is not None else " or ".join(map(repr, DEFAULT_KEYS))
        raise CheckpointError(f"{path} has no entry {wanted} and is not a bare state_dict; its top-level "
                              f"entries: {listing}. Pass key=<the entry holding the weights>", argument="key")
    if not _is_state_dict(checkpoint[entry]):
        raise CheckpointError(f"{path}: entry {entry!r} is a {_describe(checkpoint[entry])}, not a "
                              f"state_dict of tensors; top-level entries: {listing}", argument="key")
    return entry


def family_spec(family: str) -> FamilySpec:
    """The key map of a model family, from ``convert/<family>.py``."""
    try:
        module = importlib.import_module(f"convert.{family}")
    except ModuleNotFoundError as e:
        if e.name != f"convert.{family}":
            raise
        raise CheckpointError(f"no checkpoint converter for model family {family!r} "
                              f"(expected convert/{family}.py defining SPEC)") from None
    spec = getattr(module, "SPEC", None)
    if not isinstance(spec, FamilySpec):
        raise CheckpointError(f"convert/{family}.py does not define SPEC = FamilySpec(...)")
    return spec


def name_coverage(spec: FamilySpec, state_dict: Mapping[str, Any]) -> float:
    """The fraction of the checkpoint's keys that ``spec``'s rules know by name."""
    try:
        keys = [strip_module_prefix(k) for k in spec.preprocess(state_dict)]
    except Exception:  # another family's tensors may not fit this family's rewrites
        return 0.0
    return sum(any(r.to_ours(k) is not None for r in spec.rules) for k in keys) / max(len(keys), 1)
