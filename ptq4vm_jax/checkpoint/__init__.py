"""Checkpoints: ptq4vm-jax's own (float params, quantized models) and official ones converted.

- ``store``: the directory format shared by both (Orbax tree + sealed ``metadata.json`` with a
  digest per array), atomic writes, checked reads.
- ``float_params``: ``save_params`` / ``load_params``.
- ``quantized``: ``save_quantized`` / ``load_quantized``.
- ``official``: ``load_torch_checkpoint`` / ``convert_checkpoint`` (official ``.pth`` /
  ``.safetensors``, read by the torch-free ``convert`` package).
- ``checks``: abstract params, shape and finiteness checks; ``quiet_orbax``: keeps a failed
  Orbax read to one error.
"""

from ptq4vm_jax.checkpoint.checks import abstract_params, nonfinite_report, tree_mismatches
from ptq4vm_jax.checkpoint.float_params import FLOAT_FORMAT_VERSION, load_params, save_params
from ptq4vm_jax.checkpoint.official import convert_checkpoint, load_official_checkpoint, load_torch_checkpoint
from ptq4vm_jax.checkpoint.quantized import QUANT_FORMAT_VERSION, load_quantized, save_quantized
from ptq4vm_jax.checkpoint.store import (
    ARRAY_DIGESTS,
    FLOAT_FORMAT,
    KNOWN_FORMATS,
    METADATA_FILE,
    METADATA_HASH,
    QUANT_FORMAT,
    TREE_DIR,
    check_replaceable,
    file_sha256,
    read_metadata,
    require_format,
    restore_tree,
    write_checkpoint,
)
from ptq4vm_jax.errors import CheckpointError, CheckpointMismatchError, UnsafeCheckpointError

__all__ = [
    "ARRAY_DIGESTS",
    "FLOAT_FORMAT",
    "FLOAT_FORMAT_VERSION",
    "KNOWN_FORMATS",
    "METADATA_FILE",
    "METADATA_HASH",
    "QUANT_FORMAT",
    "QUANT_FORMAT_VERSION",
    "TREE_DIR",
    "CheckpointError",
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "abstract_params",
    "check_replaceable",
    "convert_checkpoint",
    "file_sha256",
    "load_official_checkpoint",
    "load_params",
    "load_quantized",
    "load_torch_checkpoint",
    "nonfinite_report",
    "read_metadata",
    "require_format",
    "restore_tree",
    "save_params",
    "save_quantized",
    "tree_mismatches",
    "write_checkpoint",
]
