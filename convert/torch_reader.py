"""Read ``torch.save`` checkpoints without torch and without running pickled code.

A ``torch.save`` file (torch >= 1.6) is a zip archive: ``<prefix>/data.pkl`` (a pickle whose
tensors are calls to ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``,
storages being persistent ids), one raw buffer per storage in ``<prefix>/data/<key>``, and
``<prefix>/byteorder``. The unpickler's ``find_class`` hands out only our numpy versions of the
tensor-rebuild functions and a few inert data types; any other global refuses the whole file
before anything runs, so a malicious checkpoint cannot execute code here.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pathlib
import pickle
import pickletools
import types
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from convert.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["ConfigRecord", "NumpyDtype", "PickledArray", "TorchDtype", "read_torch_checkpoint"]

_STORAGE_DTYPES: dict[str, Any] = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}

_TORCH_DTYPES: dict[str, Any] = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64,
    "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}


@dataclass(frozen=True)
class TorchDtype:
    """A pickled ``torch.<dtype>`` value, kept as data."""

    name: str

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(_TORCH_DTYPES[self.name])


class ConfigRecord(dict):
    """Inert stand-in for dict-like config classes (yacs ``CfgNode``): items and attributes only."""


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _ClassMarker:
    """A class the pickle may name (``torch.Tensor``, ``numpy.ndarray``): compared, never called."""

    name: str


@dataclass(frozen=True)
class _Storage:
    raw: np.ndarray  # the storage's bytes (uint8)
    dtype: np.dtype  # element type (uint8 for an UntypedStorage)
    big_endian: bool


def _elements(storage: Any, dtype: np.dtype | None = None) -> np.ndarray:
    """The storage's bytes as a 1-D array of ``dtype`` (default: its own) in little-endian order."""
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"corrupt data.pkl: a tensor is built from {type(storage).__name__}, "
                              "not from a storage record")
    dtype = storage.dtype if dtype is None else dtype
    if storage.raw.size % dtype.itemsize:
        raise CheckpointError(f"corrupt checkpoint: a storage of {storage.raw.size} bytes cannot hold "
                              f"{dtype} elements ({dtype.itemsize} bytes each)")
    if not storage.big_endian or dtype.itemsize == 1:
        return storage.raw.view(dtype)
    if dtype.kind in "biufc":
        return storage.raw.view(dtype.newbyteorder(">")).astype(dtype)
    # ml_dtypes types (bfloat16) have no byte-order variants: swap as unsigned ints.
    return storage.raw.view(f">u{dtype.itemsize}").astype(f"<u{dtype.itemsize}").view(dtype)


def _as_ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise CheckpointError(f"corrupt data.pkl: tensor {what} {value!r} is not a tuple of "
                              "non-negative ints")
    return tuple(value)


# A view may repeat its storage (stride 0, as ``expand`` makes), but a copy this much larger than
# the file is an edited size field, not a checkpoint: refused before allocating it.
_MAX_REUSE = 64
_FREE_REUSE = 1 << 24  # elements any view may have, however small its storage


def _strided_copy(elements: np.ndarray, offset: Any, size: Any, stride: Any) -> np.ndarray:
    """Contiguous copy of the view ``(offset, size, stride)`` of ``elements`` (bounds checked)."""
    size, stride = _as_ints(size, "size"), _as_ints(stride, "stride")
    (offset,) = _as_ints((offset,), "offset")
    if len(size) != len(stride):
        raise CheckpointError(f"corrupt data.pkl: tensor size {size} and stride {stride} differ in rank")
    if 0 in size:
        return np.zeros(size, elements.dtype)
    if math.prod(size) > max(_MAX_REUSE * elements.size, _FREE_REUSE):
        raise CheckpointError(f"corrupt data.pkl: a tensor of size {size} (stride {stride}) would repeat its "
                              f"storage of {elements.size} elements more than {_MAX_REUSE} times over")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= elements.size:
        raise CheckpointError(
            f"corrupt checkpoint: a tensor (size {size}, stride {stride}, offset {offset}) reaches "
            f"element {last} of a storage that holds {elements.size}; the file is damaged or truncated"
        )
    # as_strided goes through __array_interface__, which cannot spell ml_dtypes types: stride raw bytes.
    raw = elements[offset:].view(np.dtype((np.void, elements.itemsize)))
    view = np.lib.stride_tricks.as_strided(
        raw, shape=size, strides=[s * elements.itemsize for s in stride], writeable=False
    )
    return np.array(view, copy=True, order="C").view(elements.dtype)


def _apply_metadata(array: np.ndarray, metadata: Any) -> np.ndarray:
    """Resolve torch's lazy conjugate / negative bits, as ``resolve_conj().resolve_neg()`` would."""
    if not metadata:
        return array
    if not isinstance(metadata, dict) or set(metadata) - {"conj", "neg"}:
        raise CheckpointError(f"unsupported tensor metadata {metadata!r} (only conj/neg bits are known)")
    if metadata.get("conj"):
        array = np.conj(array)
    if metadata.get("neg"):
        array = np.negative(array)
    return array


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> np.ndarray:
    return _strided_copy(_elements(storage), storage_offset, size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
    del requires_grad, backward_hooks
    return _apply_metadata(_rebuild_tensor(storage, storage_offset, size, stride), metadata)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> np.ndarray:
    """Newer dtypes (float8, uint16, ...) come from an untyped byte storage plus a dtype."""
    del requires_grad, backward_hooks
    if not isinstance(dtype, TorchDtype):
        raise CheckpointError(f"corrupt data.pkl: tensor dtype {dtype!r} is not a torch dtype")
    elements = _elements(storage, dtype.numpy_dtype)
    return _apply_metadata(_strided_copy(elements, storage_offset, size, stride), metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Any:
    del requires_grad, backward_hooks
    return data


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> Any:
    del requires_grad, backward_hooks, state
    return data


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
               _rebuild_parameter_with_state)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """A plain tensor/Parameter carrying Python attributes: keep the array, drop the attributes."""
    del state
    if func not in _REBUILDERS or not isinstance(new_type, _ClassMarker) or not isinstance(args, tuple):
        raise CheckpointError(
            f"corrupt or unsupported data.pkl: _rebuild_from_type_v2({func!r}, {new_type!r})"
        )
    return func(*args)


def _device(spec: Any, index: Any = None) -> str:
    return str(spec) if index is None else f"{spec}:{index}"


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode``: how protocol-2 pickles spell ``bytes`` objects."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError(
            f"corrupt data.pkl: unexpected _codecs.encode({type(text).__name__}, {encoding!r})"
        )
    return text.encode("latin1")


class NumpyDtype:
    """A pickled ``numpy.dtype`` built by us: plain bool/int/float/complex only, never object or struct."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = False) -> None:
        del align, copy
        spec = spec.decode("ascii", "replace") if isinstance(spec, bytes) else spec
        try:
            dtype = np.dtype(spec) if isinstance(spec, str) else None
        except TypeError:
            dtype = None
        if dtype is None or dtype.kind not in "biufc":
            raise UnsafeCheckpointError(f"refused numpy dtype {spec!r}: only plain numeric dtypes allowed")
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"NumpyDtype({self.dtype.str!r})"

    def __setstate__(self, state: Any) -> None:
        """Protocol-2 state ``(version, byteorder, subarray, names, fields, ...)``: byte order only."""
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ("<", ">", "|", "=")
                and state[2:5] == (None, None, None)):
            raise UnsafeCheckpointError(f"refused numpy dtype state {state!r}: only plain numeric dtypes")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


class PickledArray(np.ndarray):
    """A pickled numpy array, filled only after its dtype and byte count are checked."""

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], NumpyDtype)
                and isinstance(state[4], bytes)):
            raise UnsafeCheckpointError("refused a numpy array that is not a plain numeric buffer")
        version, shape, dtype, fortran, raw = state
        shape = _as_ints(shape, "numpy array shape")
        if len(raw) != math.prod(shape) * dtype.dtype.itemsize:
            raise CheckpointError(f"corrupt data.pkl: numpy array of shape {shape} with {len(raw)} bytes")
        super().__setstate__((version, shape, dtype.dtype, bool(fortran), raw))


_NDARRAY = _ClassMarker("numpy.ndarray")


def _np_reconstruct(subtype: Any, shape: Any, typecode: Any) -> PickledArray:
    """Empty array that the pickle's BUILD then fills through ``PickledArray.__setstate__``."""
    del shape, typecode
    if subtype is not _NDARRAY:
        raise UnsafeCheckpointError(f"refused numpy array type {subtype!r}; only plain ndarrays are allowed")
    return np.ndarray.__new__(PickledArray, (0,), np.uint8)


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, NumpyDtype) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise UnsafeCheckpointError(f"refused numpy scalar ({dtype!r}, {type(data).__name__}); only plain "
                                    "numeric scalars are allowed")
    return np.frombuffer(data, dtype.dtype, count=1)[0]


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "Tensor"): _ClassMarker("Tensor"),
        ("torch._tensor", "Tensor"): _ClassMarker("Tensor"),
        ("torch.nn.parameter", "Parameter"): _ClassMarker("Parameter"),
        ("torch", "Size"): tuple,
        ("torch", "device"): _device,
        ("torch", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
        ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
        # Inert data: training scripts store their argparse args / yacs config next to the weights.
        ("argparse", "Namespace"): types.SimpleNamespace,
        ("yacs.config", "CfgNode"): ConfigRecord,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "slice"): slice,
        ("_codecs", "encode"): _latin1_encode,
        ("numpy", "dtype"): NumpyDtype,
        ("numpy", "ndarray"): _NDARRAY,
    }
    paths = {"PosixPath": pathlib.PurePosixPath, "PurePosixPath": pathlib.PurePosixPath,
             "WindowsPath": pathlib.PureWindowsPath, "PureWindowsPath": pathlib.PureWindowsPath}
    for module in ("pathlib", "pathlib._local"):
        for name, cls in paths.items():
            allowed[(module, name)] = cls
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _np_reconstruct
        allowed[(module, "scalar")] = _np_scalar
    for name, dtype in _STORAGE_DTYPES.items():
        for module in ("torch", "torch.cuda"):
            allowed[(module, name)] = _StorageType(name, np.dtype(dtype))
    for name in _TORCH_DTYPES:
        allowed[("torch", name)] = TorchDtype(name)
    return allowed


_ALLOWED = _allowed_globals()
# Protocol-2 pickles written by Python 3 use the Python 2 module name.
_MODULE_ALIASES = {"__builtin__": "builtins"}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str, load_storage: Callable[[Any], _Storage]) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        module = _MODULE_ALIASES.get(module, module)
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._path}: refused to load: its pickle names the Python global {module}.{name}, "
                "which is not a tensor-rebuild function or a plain data type. Loading it with "
                "pickle/torch.load could execute arbitrary code; nothing was executed here. If you "
                "trust the file, re-save only the weights (torch.save(ckpt['model'], path) or "
                "safetensors) and convert that."
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        return self._load_storage(pid)


def _open_zip(path: str) -> zipfile.ZipFile:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise CheckpointError(f"checkpoint {path!r} is a directory, not a .pth file; an Orbax directory "
                                  "from `ptq4vm convert` is read by load_params (CLI: --params)")
        raise CheckpointError(f"checkpoint {path!r} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {e.strerror or e}") from None
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        pass
    except Exception as e:  # zipfile also raises UnicodeDecodeError, NotImplementedError, ... on bad fields
        raise CheckpointError(f"{path}: the zip archive's directory is corrupt ({type(e).__name__}: "
                              f"{str(e)[:200]}); copy or download the checkpoint again") from None
    if head.startswith(b"PK"):
        raise CheckpointError(f"{path}: the zip archive is truncated or corrupt (no readable central "
                              "directory); copy or download the checkpoint again")
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes); copy or download the checkpoint again")
    if head[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: not a zip archive. This looks like torch's legacy (pre-1.6) serialization or "
            "a plain pickle, which cannot be read safely; re-save it with a modern torch: "
            "torch.save(torch.load(path, weights_only=True), new_path)"
        )
    raise CheckpointError(f"{path}: not a torch.save checkpoint (not a zip archive; starts with {head!r}). "
                          "Pass a .pth/.pt/.bin written by torch.save, or a .safetensors file")


def _find_prefix(zf: zipfile.ZipFile, path: str) -> str:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        names = ", ".join(map(repr, zf.namelist()[:10]))
        raise CheckpointError(f"{path}: a zip archive but not a torch.save checkpoint: expected one "
                              f"<archive>/data.pkl, found {len(pickles)} (members: {names})")
    return pickles[0][: -len("data.pkl")]


# torch.save stores members uncompressed; deflate is what a re-zipping tool would use.
_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_MAX_DEFLATE_RATIO = 1032  # deflate's best ratio: a larger declared size is a lie (or a zip bomb)


def _read_member(zf: zipfile.ZipFile, name: str, path: str) -> bytes:
    """A member's bytes, CRC-checked by zipfile; declared sizes are bounded by the file's, so no
    edited size field can make this allocate or inflate more than the archive can hold."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise CheckpointError(f"{path}: corrupt checkpoint: data.pkl refers to {name}, which the archive "
                              "does not contain") from None
    if info.compress_type not in _COMPRESSION:
        raise CheckpointError(f"{path}: archive member {name} uses compression method {info.compress_type}, "
                              "which torch.save never writes; the archive is corrupt")
    archive = os.path.getsize(path)
    limit = archive if info.compress_type == zipfile.ZIP_STORED else archive * _MAX_DEFLATE_RATIO
    if info.compress_size > archive or info.file_size > limit:
        raise CheckpointError(f"{path}: archive member {name} declares {info.file_size} bytes "
                              f"({info.compress_size} stored) in a {archive}-byte file; the archive is "
                              "corrupt")
    try:
        return zf.read(name)
    except Exception as e:  # BadZipFile (bad CRC, header), EOFError, zlib.error, UnicodeDecodeError, ...
        raise CheckpointError(f"{path}: corrupt or truncated archive member {name} ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None


def _check_memo_indices(data: bytes, path: str) -> None:
    """Refuse memo indices beyond the pickle's own length before unpickling: the C unpickler grows
    its memo table to the largest index a PUT names, so one edited byte could ask for gigabytes.
    Pickles number their memo entries from 0, one per PUT, so a real index is always smaller."""
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and not (isinstance(arg, int)
                                                                       and 0 <= arg < len(data)):
                raise CheckpointError(f"{path}: corrupt data.pkl: memo index {arg!r} beyond the pickle's "
                                      f"{len(data)} bytes")
    except CheckpointError:
        raise
    except Exception as e:  # genops raises ValueError and others on malformed opcodes
        raise CheckpointError(f"{path}: corrupt data.pkl ({type(e).__name__}: {str(e)[:200]})") from None


def read_torch_checkpoint(path: str | os.PathLike) -> Any:
    """Unpickle a ``torch.save`` zip checkpoint: tensors become numpy arrays (contiguous copies).

    Non-tensor entries come back as data: ``argparse.Namespace`` as ``types.SimpleNamespace``,
    torch dtypes as ``TorchDtype``, devices as strings. Raises ``UnsafeCheckpointError`` for
    any other global and ``CheckpointError`` for unreadable files.
    """
    path = os.fspath(path)
    with _open_zip(path) as zf:
        prefix = _find_prefix(zf, path)
        names = set(zf.namelist())
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = _read_member(zf, prefix + "byteorder", path).decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"{path}: corrupt checkpoint: byteorder record says {byteorder!r}")
        storages: dict[str, _Storage] = {}

        def load_storage(pid: Any) -> _Storage:
            if not isinstance(pid, tuple) or len(pid) != 5:
                raise CheckpointError(f"{path}: corrupt data.pkl: unexpected persistent id {pid!r}")
            kind, storage_type, key, _location, numel = pid
            kind = kind.decode("ascii") if isinstance(kind, bytes) else kind
            key = key.decode("ascii") if isinstance(key, bytes) else key
            if kind != "storage" or not isinstance(storage_type, _StorageType) or not isinstance(key, str) \
                    or not isinstance(numel, int) or numel < 0:
                raise CheckpointError(f"{path}: corrupt data.pkl: unexpected persistent id {pid!r}")
            if key not in storages:
                raw = _read_member(zf, f"{prefix}data/{key}", path)
                nbytes = numel * storage_type.dtype.itemsize
                if len(raw) < nbytes:
                    raise CheckpointError(f"{path}: corrupt checkpoint: storage {key} has {len(raw)} bytes, "
                                          f"data.pkl says {nbytes}")
                storages[key] = _Storage(np.frombuffer(raw, np.uint8, count=nbytes), storage_type.dtype,
                                         byteorder == "big")
            return storages[key]

        data = _read_member(zf, prefix + "data.pkl", path)
        _check_memo_indices(data, path)
        try:
            return _RestrictedUnpickler(data, path, load_storage).load()
        except CheckpointError as e:
            message = str(e)
            raise type(e)(message if message.startswith(path) else f"{path}: {message}") from None
        except Exception as e:  # any malformed pickle: report it as what it is, a damaged file
            raise CheckpointError(f"{path}: corrupt data.pkl ({type(e).__name__}: {e})") from None
