"""Errors raised while reading or mapping foreign checkpoints."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the requested model."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle asks for a Python global outside the allow-list; nothing was executed."""


class CheckpointMismatchError(CheckpointError):
    """The state_dict's keys or shapes do not match the model's parameter tree."""
