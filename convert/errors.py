"""The checkpoint error family.

``CheckpointError`` is defined here, in the leaf that reads foreign checkpoints, so that the
readers need nothing from ``ptq4vm_jax``; ``ptq4vm_jax.errors`` re-exports the same classes, and
``ptq4vm_jax``'s own Orbax checkpoints raise them too: one family to catch for every checkpoint.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointMismatchError", "UnsafeCheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not hold what the caller asked for. ``argument``: the
    caller's parameter to change, when one is at fault (a command line names its flag)."""

    def __init__(self, *args: object, argument: str | None = None) -> None:
        super().__init__(*args)
        self.argument = argument


class UnsafeCheckpointError(CheckpointError):
    """The pickle asks for a Python global outside the allow-list; nothing was executed."""


class CheckpointMismatchError(CheckpointError):
    """The state_dict's keys or shapes do not match the model's parameter tree."""
