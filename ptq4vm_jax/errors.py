"""Error types of ptq4vm_jax that callers catch, in a leaf module every layer may import.

The checkpoint family is defined in ``convert.errors`` (the torch-free readers must not import
``ptq4vm_jax``) and re-exported here unchanged: ``ptq4vm_jax.CheckpointError`` is the one class
raised by the ``.pth``/``.safetensors`` readers and by the Orbax checkpoint loaders.
"""

from __future__ import annotations

from convert.errors import CheckpointError, CheckpointMismatchError, UnsafeCheckpointError

__all__ = ["ArgumentError", "ArgumentWarning", "CheckpointError", "CheckpointMismatchError",
           "UnsafeCheckpointError"]


class ArgumentError(ValueError):
    """A value passed to the library is unusable; ``argument`` names the parameter to change, so
    that a front end (the CLI) can name its own option for it."""

    def __init__(self, message: str, *, argument: str) -> None:
        super().__init__(message)
        self.argument = argument


class ArgumentWarning(UserWarning):
    """A warning about a value passed to the library; ``argument`` as for :class:`ArgumentError`."""

    def __init__(self, message: str, *, argument: str) -> None:
        super().__init__(message)
        self.argument = argument
