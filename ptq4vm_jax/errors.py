"""Error types of ptq4vm_jax that callers catch, in a leaf module every layer may import.

The checkpoint family is defined in ``convert.errors`` (the torch-free readers must not import
``ptq4vm_jax``) and re-exported here unchanged: ``ptq4vm_jax.CheckpointError`` is the one class
raised by the ``.pth``/``.safetensors`` readers and by the Orbax checkpoint loaders.
"""

from __future__ import annotations

from convert.errors import CheckpointError, CheckpointMismatchError, UnsafeCheckpointError

__all__ = ["CheckpointError", "CheckpointMismatchError", "UnsafeCheckpointError"]
