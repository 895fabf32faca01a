"""Errors raised while reading or mapping foreign checkpoints (all are ``CheckpointError``s)."""

from __future__ import annotations

from ptq4vm_jax.checkpoint import CheckpointError

__all__ = ["CheckpointError", "CheckpointMismatchError", "UnsafeCheckpointError"]


class UnsafeCheckpointError(CheckpointError):
    """The pickle asks for a Python global outside the allow-list; nothing was executed."""


class CheckpointMismatchError(CheckpointError):
    """The state_dict's keys or shapes do not match the model's parameter tree."""
