"""Read ``.safetensors`` files with numpy alone.

Layout: an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the byte buffer that
follows), then the raw little-endian buffer.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_dtypes
import numpy as np

from convert.errors import CheckpointError

__all__ = ["read_safetensors"]

_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "C64": np.complex64,
}

_MAX_HEADER = 100 * 1024 * 1024


def _parse_header(path: str, data: bytes) -> dict[str, Any]:
    bad = lambda why: CheckpointError(f"{path}: not a valid .safetensors file: {why}")
    if len(data) < 8:
        raise bad(f"only {len(data)} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > min(_MAX_HEADER, len(data) - 8):
        raise bad(f"header length {n} exceeds the file ({len(data)} bytes): truncated or not safetensors")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"unreadable JSON header ({e})") from None
    if not isinstance(header, dict):
        raise bad("the JSON header is not an object")
    header.pop("__metadata__", None)
    return header


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as contiguous numpy arrays (bf16 as ml_dtypes)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"safetensors file {path!r} does not exist or is not a file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read safetensors file {path!r}: {e.strerror or e}") from None
    header = _parse_header(path, data)
    start = 8 + int.from_bytes(data[:8], "little")
    buffer = memoryview(data)[start:]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{where}: header entry lacks dtype/shape/data_offsets")
        if info["dtype"] not in _DTYPES:
            known = ", ".join(_DTYPES)
            raise CheckpointError(f"{where}: unsupported dtype {info['dtype']!r} (known: {known})")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{where}: bad data_offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= len(buffer) or end - begin != nbytes:
            raise CheckpointError(
                f"{where}: data_offsets {offsets} do not hold {nbytes} bytes inside a buffer of "
                f"{len(buffer)}: the file is truncated or corrupt"
            )
        tensors[name] = np.frombuffer(buffer[begin:end], dtype).reshape(shape).copy()
    return tensors
