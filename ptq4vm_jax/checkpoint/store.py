"""A checkpoint directory: an Orbax array tree plus a sealed ``metadata.json`` that says what it holds.

Layout: ``params/`` (an Orbax ``StandardCheckpointer`` tree) and ``metadata.json`` (``format``,
``format_version``, model name and overrides, provenance, ``array_sha256``: a digest per array,
and ``metadata_sha256`` over all of it). Writes are atomic (a temporary sibling swapped into
place); reads check the seal, the tree's shapes against an abstract tree, and every array against
its digest, so a damaged file is refused by name instead of served. Formats (float params,
quantized models) build on this.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ptq4vm_jax.checkpoint.checks import (
    abstract_params,
    nonfinite_report,
    raise_mismatch,
    raise_nonfinite,
    tree_mismatches,
)
from ptq4vm_jax.checkpoint.quiet_orbax import quiet_late_orbax_callbacks
from ptq4vm_jax.dirs import listing
from ptq4vm_jax.errors import CheckpointError
from ptq4vm_jax.held_signals import signals_held
from ptq4vm_jax.models import canonical_name
from ptq4vm_jax.trees import flatten_tree

METADATA_FILE = "metadata.json"
METADATA_HASH = "metadata_sha256"  # guards the settings that decide how the arrays are read
ARRAY_DIGESTS = "array_sha256"  # {tree path: sha256 of the array}, guards the arrays themselves
TREE_DIR = "params"
#: What file browsers leave in a directory they showed: never a reason to keep a checkpoint.
OS_METADATA_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})

FLOAT_FORMAT = "ptq4vm-jax/float-params"
QUANT_FORMAT = "ptq4vm-jax/quantized"
# format name -> the function that loads it, for "wrong loader" errors.
KNOWN_FORMATS: dict[str, str] = {FLOAT_FORMAT: "ptq4vm_jax.checkpoint.load_params",
                                 QUANT_FORMAT: "ptq4vm_jax.checkpoint.load_quantized"}


def json_default(value: Any) -> Any:
    """``json.dumps``'s ``default`` for metadata: numpy scalars as Python numbers, dtypes by name."""
    if isinstance(value, np.generic):  # before np.dtype(), which would read np.float32(0.5) as "float32"
        return value.item()
    try:
        return np.dtype(value).name  # dtype overrides such as jnp.bfloat16
    except TypeError:
        raise TypeError(f"metadata value {value!r} ({type(value).__name__}) is not JSON-serialisable") \
            from None


def _held_model(meta: Mapping[str, Any]) -> str | None:
    """Canonical model name in a checkpoint's metadata, or the raw value if it names no model."""
    name = meta.get("model_name")
    try:
        return canonical_name(name)
    except (TypeError, ValueError):
        return name


def check_replaceable(path: str, metadata: Mapping[str, Any]) -> None:
    """Overwriting replaces only a checkpoint of the same format and model (``metadata``'s
    ``model_name`` None: any model, for checks made before the model is known), holding nothing
    but a checkpoint's own entries.

    A mistyped output path must neither wipe unrelated files (also not the notes or results
    someone put inside a checkpoint's directory) nor turn a float checkpoint (the expensive,
    converted or trained one) into a quantized one or into another model's params.
    """
    if os.path.isdir(path) and not os.listdir(path):
        return
    try:
        found = read_metadata(path)
    except CheckpointError:
        found = None
    if found is None or found["format"] not in KNOWN_FORMATS:
        raise CheckpointError(f"{path} exists and is not a ptq4vm-jax checkpoint; refusing to replace "
                              "it. Choose a new directory or remove it yourself")
    held, new = _held_model(found), _held_model(metadata)
    fix = f"choose another output path (CLI: --out) or delete {path} yourself if it is no longer needed"
    if found["format"] != metadata["format"]:
        raise CheckpointError(f"{path} holds a {found['format']!r} checkpoint of {held}; refusing to replace "
                              f"it with a {metadata['format']!r} checkpoint: overwriting only replaces a "
                              f"checkpoint of the same format. To keep it, {fix}")
    if new is not None and held != new:
        kind = "float params" if found["format"] == FLOAT_FORMAT else "a quantized model"
        raise CheckpointError(f"{path} holds {kind} of {held}; refusing to replace it with {kind} of "
                              f"{new}: a checkpoint is only replaced by one of the same model. To keep "
                              f"it, {fix}")
    others = set(os.listdir(path)) - {METADATA_FILE, TREE_DIR, *OS_METADATA_FILES}
    if others:
        raise CheckpointError(f"{path} holds a checkpoint and also other files ({listing(others)}), which "
                              f"replacing it would delete; refusing to replace it. Move them out of {path}, "
                              f"or {fix}")


def array_digest(array: Any) -> str:
    """sha256 of an array's dtype, shape and C-order bytes."""
    array = np.ascontiguousarray(np.asarray(array))
    digest = hashlib.sha256(f"{array.dtype.name}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def array_digests(tree: Mapping[str, Any]) -> dict[str, str]:
    """``array_digest`` of every leaf of ``tree``, keyed by its "/"-joined path."""
    return {path: array_digest(value) for path, value in sorted(flatten_tree(tree).items())}


def tree_sha256(tree: Mapping[str, Any]) -> str:
    """One sha256 of a whole tree of arrays: of its ``array_digests`` as sorted JSON (the same
    weights give the same digest however they were stored)."""
    return hashlib.sha256(json.dumps(array_digests(tree), sort_keys=True).encode()).hexdigest()


def write_checkpoint(path: str | os.PathLike, tree: Mapping[str, Any], metadata: Mapping[str, Any], *,
                     overwrite: bool = True) -> dict[str, Any]:
    """Write ``tree`` + ``metadata.json`` (sealed, with a digest per array) to a temporary sibling,
    then swap it into place.

    An existing directory is only replaced if it is one of our checkpoints of the same format
    and model holding nothing else (``check_replaceable``), so a mistyped path cannot wipe
    unrelated files, another checkpoint or files kept beside a checkpoint. Returns the metadata
    as written.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not overwrite:
            raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it")
        check_replaceable(path, metadata)
    arrays = jax.tree.map(np.asarray, dict(tree))  # every leaf an array: numpy scalars break restores
    bad = nonfinite_report(flatten_tree(arrays))
    if bad:
        raise_nonfinite(f"refusing to write {path}: the parameters hold NaN or infinite values", bad,
                        "find where they came from (a diverged run, a broken source checkpoint) and save "
                        "finite parameters")
    meta = {**metadata, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax_version": jax.__version__, ARRAY_DIGESTS: array_digests(arrays)}
    meta = json.loads(json.dumps(meta, default=json_default))
    meta[METADATA_HASH] = metadata_digest(meta)
    text = json.dumps(meta, indent=2, sort_keys=True)
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    try:  # first, so an unwritable place fails here, not in Orbax's background threads (minutes later)
        os.makedirs(tmp)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: cannot create a directory in {parent} "
                              f"({e.strerror or e}); choose an output path in a directory you can write to"
                              ) from None
    # Ctrl-C or SIGTERM during the save takes effect once Orbax has finished (nothing is
    # published then): an exception in mid-save would race Orbax's writers for the directory.
    with signals_held() as interrupted:
        try:
            with quiet_late_orbax_callbacks(os.path.join(tmp, TREE_DIR)), ocp.StandardCheckpointer() as ckptr:
                ckptr.save(os.path.join(tmp, TREE_DIR), arrays)
            with open(os.path.join(tmp, METADATA_FILE), "w") as f:
                f.write(text)
            if not interrupted():
                _swap_into_place(tmp, path)
        except Exception as e:  # OSError, and Orbax's or TensorStore's own errors from the writes
            raise CheckpointError(f"writing {path} failed ({_write_failure(e)}); nothing was replaced") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return json.loads(text)


def _swap_into_place(tmp: str, path: str) -> None:
    """Rename the finished ``tmp`` to ``path``, the directory there (if any) moved aside first and
    put back if the rename fails."""
    parent, name = os.path.split(path)
    old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex}")
    if os.path.exists(path):
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        if os.path.exists(old):
            os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_failure(e: Exception) -> str:
    """What went wrong in a write, with what to do where the cause is a full disk."""
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
        return "no space left on the device: free some, or write to another disk"
    return str(e)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """``metadata.json`` of a checkpoint directory, with clear errors when it is not one."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist" if not os.path.exists(path)
                              else f"{path} is a file, not a checkpoint directory; an official .pth / "
                              ".safetensors file is read by load_torch_checkpoint (CLI: --checkpoint)")
    meta_path = os.path.join(path, METADATA_FILE)
    parent = os.path.dirname(path)
    if not os.path.isfile(meta_path) and os.path.basename(path) == TREE_DIR \
            and os.path.isfile(os.path.join(parent, METADATA_FILE)):
        raise CheckpointError(f"{path} is the {TREE_DIR}/ subdirectory of a checkpoint; pass the checkpoint "
                              f"itself, its parent {parent}")
    if not os.path.isfile(meta_path) and any(os.path.exists(os.path.join(path, f))
                                             for f in ("progress.json", "state.npz")):
        raise CheckpointError(f"{path} holds the resume state of a calibration (resume_dir, CLI: --resume), "
                              "not a checkpoint: the checkpoint is written where --out (save_quantized) "
                              "points once calibration ends")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path} has no {METADATA_FILE}: it is not a ptq4vm-jax checkpoint, or its "
                              "save was interrupted; re-create it")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8, bad JSON, huge ints
        raise CheckpointError(f"{meta_path} is unreadable ({str(e)[:200]}); the checkpoint is corrupt, "
                              "re-create it") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), str) \
            or type(meta.get("format_version")) is not int:
        raise CheckpointError(f"{meta_path} lacks a 'format' string and an integer 'format_version'; "
                              "the checkpoint is corrupt or not from ptq4vm-jax")
    if METADATA_HASH in meta and meta[METADATA_HASH] != metadata_digest(meta):
        raise CheckpointError(
            f"{meta_path} was changed after it was written (its {METADATA_HASH} no longer matches): "
            "its model sizes and quantization settings decide how the stored arrays are read, so an "
            "edit silently changes the model. Restore the file or re-create the checkpoint"
        )
    return meta


def metadata_digest(meta: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of everything in the metadata but the digest itself.

    Whole-number floats count as integers: JSON tools (jq, JavaScript) rewrite ``2.0`` as ``2``,
    which changes no value a loader reads.
    """
    def canonical(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, dict):
            return {k: canonical(v) for k, v in value.items()}
        if isinstance(value, list):
            return [canonical(v) for v in value]
        return value

    body = canonical({k: v for k, v in meta.items() if k != METADATA_HASH})
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    except (TypeError, ValueError, RecursionError, OverflowError):  # e.g. mixed-type keys from an edit
        return ""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def require_format(metadata: Mapping[str, Any], path: str, *, format: str, version: int, loader: str,
                   sealed_from: int) -> None:
    """Refuse other formats (naming their loader), versions newer than this code reads, and
    versions from ``sealed_from`` on that lack their seal or their array digests."""
    found, found_version = metadata["format"], metadata["format_version"]
    if found != format:
        known = KNOWN_FORMATS.get(found)
        how = f"load it with {known}" if known else "it was not written by this version of ptq4vm-jax"
        raise CheckpointError(f"{path} is a {found!r} checkpoint, not {format!r}, so {loader} cannot "
                              f"read it; {how}")
    if not 1 <= found_version <= version:
        raise CheckpointError(f"{path} is {format} version {found_version}; this ptq4vm-jax reads "
                              f"versions 1 to {version}: upgrade ptq4vm-jax or re-create the checkpoint")
    if found_version >= sealed_from:
        for key in (METADATA_HASH, ARRAY_DIGESTS):
            if key not in metadata:
                raise invalid(path, f"{format} version {found_version} records {key!r}, this file has none")
        digests = metadata[ARRAY_DIGESTS]
        if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
            raise invalid(path, f"{ARRAY_DIGESTS!r} must map each array path to its sha256")


def invalid(path: str, problem: str) -> CheckpointError:
    """The error for a ``metadata.json`` whose content cannot describe a checkpoint."""
    return CheckpointError(f"{path}/{METADATA_FILE} is invalid ({problem}); re-create the checkpoint")


def model_from_metadata(meta: Mapping[str, Any], path: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Model name, overrides and abstract params that ``metadata.json`` names, or why they are unusable.

    A hand-edited or damaged file must not surface as a registry or model-builder error.
    """
    name, overrides = meta.get("model_name"), meta.get("model_overrides", {})
    if not isinstance(name, str):
        raise invalid(path, f"'model_name' must be a model name string, got {name!r}")
    if not isinstance(overrides, dict):
        raise invalid(path, f"'model_overrides' must be an object of model arguments, got {overrides!r}")
    try:
        name = canonical_name(name)
        return name, overrides, abstract_params(name, **overrides)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, MemoryError) as e:
        raise invalid(path, f"model {name!r} with overrides {overrides}: {str(e)[:300]}") from None


def _check_digests(tree_path: str, tree: Mapping[str, Any], digests: Mapping[str, str]) -> None:
    have = array_digests(tree)
    damaged = sorted(p for p in have.keys() & digests.keys() if have[p] != digests[p])
    unlisted = sorted(have.keys() ^ digests.keys())
    if damaged or unlisted:
        shown = ", ".join(damaged[:10]) + (" ..." if len(damaged) > 10 else "")
        what = (f"the arrays {shown} differ from what was saved" if damaged else
                "the arrays and the recorded digests disagree on which arrays exist "
                f"({', '.join(unlisted[:5])})")
        raise CheckpointError(f"{tree_path}: {what} (their sha256 in {METADATA_FILE} no longer matches); "
                              "the checkpoint is damaged: re-create it or restore it from a good copy")


def restore_tree(path: str | os.PathLike, abstract: Mapping[str, Any],
                 digests: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Restore ``path/params`` into the structure, shapes and dtypes of ``abstract`` (checked first);
    with ``digests`` (``array_sha256`` of the metadata), every array must match its digest."""
    tree_path = os.path.join(os.path.abspath(os.fspath(path)), TREE_DIR)
    redo = "the checkpoint is incomplete or corrupt: re-create it"
    if not os.path.isdir(tree_path):
        what = "is a file, not the parameter tree's directory" if os.path.exists(tree_path) else "is missing"
        raise CheckpointError(f"{tree_path} {what}; {redo}")
    if not os.path.isfile(os.path.join(tree_path, "_METADATA")):
        raise CheckpointError(f"{tree_path}/_METADATA (the parameter tree's layout) is missing; {redo}")
    try:
        with quiet_late_orbax_callbacks(tree_path), ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.metadata(tree_path).item_metadata
            if stored is None:
                raise CheckpointError(f"cannot read the parameter tree's metadata in {tree_path} (its "
                                      f"_METADATA or the array metadata it refers to is damaged); {redo}")
            problems = tree_mismatches(stored.tree, abstract)
            if problems:
                raise_mismatch(f"{tree_path} does not match the model", problems,
                               "the checkpoint was written for another model or with other overrides")
            target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), dict(abstract))
            tree = ckptr.restore(tree_path, target)
    except CheckpointError:
        raise
    except Exception as e:  # orbax/tensorstore raise many types for missing or damaged files
        raise CheckpointError(f"cannot read the parameter tree in {tree_path} ({type(e).__name__}: "
                              f"{str(e)[:300]}); {redo}") from None
    if digests is not None:
        _check_digests(tree_path, tree, digests)
    return tree


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
