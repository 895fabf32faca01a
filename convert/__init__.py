"""Torch-free reading of official checkpoints (``torch.save`` zip, ``.safetensors``) into flat NumPy
dicts, and the maps from official key names to our parameter paths.

A leaf: numpy, zip and pickle only, nothing from ``ptq4vm_jax`` and no jax (``import convert``
stays cheap). Building a model's params tree from what is read here, with shapes checked against
the model, is ``ptq4vm_jax.checkpoint.load_torch_checkpoint``.

Model families plug in by module: ``convert/<family>.py``, the family being
``ptq4vm_jax.models.model_family(name)``, defines ``SPEC: convert.mapping.FamilySpec``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

# Each public name and the module defining it, loaded on first use (PEP 562), so that importing
# ``convert.errors`` (which ``ptq4vm_jax.errors`` does for every command, ``--help`` included)
# does not load the readers and ml_dtypes with them.
_EXPORTS = {
    "CheckpointError": "convert.errors",
    "CheckpointMismatchError": "convert.errors",
    "UnsafeCheckpointError": "convert.errors",
    "FamilySpec": "convert.mapping",
    "Rule": "convert.mapping",
    "family_spec": "convert.reading",
    "name_coverage": "convert.reading",
    "read_checkpoint": "convert.reading",
    "state_dict_entry": "convert.reading",
    "read_safetensors": "convert.safetensors_reader",
    "read_torch_checkpoint": "convert.torch_reader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule, e.g. convert.mapping
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'convert' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
