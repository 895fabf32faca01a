"""Orbax checkpoints of parameter trees, with a JSON metadata file that says what they hold.

Layout of a checkpoint directory: ``params/`` (an Orbax ``StandardCheckpointer`` tree) and
``metadata.json`` (``format``, ``format_version``, model name and overrides, provenance).
The generic pieces (write atomically, read and check metadata, restore against an abstract
tree with shapes checked) serve every checkpoint format; float params are one format.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ptq4vm_jax.models import canonical_name, create_model, image_shape
from ptq4vm_jax.trees import copy_tree, flatten_tree, prune_empty

if TYPE_CHECKING:
    from ptq4vm_jax.api import QuantizedParams

FLOAT_FORMAT = "ptq4vm-jax/float-params"
FLOAT_FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
METADATA_HASH = "metadata_sha256"  # guards the settings that decide how the arrays are read
TREE_DIR = "params"

# format name -> the function that loads it, for "wrong loader" errors.
KNOWN_FORMATS: dict[str, str] = {FLOAT_FORMAT: "ptq4vm_jax.checkpoint.load_params"}


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not hold what the caller asked for."""


def abstract_params(model_name: str, **overrides: Any) -> dict[str, Any]:
    """``ShapeDtypeStruct`` tree of ``create_model(model_name, **overrides)``'s params (no compute)."""
    model = create_model(model_name, **overrides)
    images = jax.ShapeDtypeStruct(image_shape(model), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def tree_mismatches(tree: Mapping[str, Any], abstract: Mapping[str, Any]) -> list[str]:
    """Every leaf of ``tree`` (anything with .shape/.dtype) that differs from ``abstract``, by path."""
    have, want = flatten_tree(tree), flatten_tree(abstract)
    problems = [f"missing {p} {tuple(want[p].shape)}" for p in want if p not in have]
    problems += [f"unexpected {p} {tuple(have[p].shape)}" for p in have if p not in want]
    for p in have.keys() & want.keys():
        got = (tuple(have[p].shape), np.dtype(have[p].dtype))
        exp = (tuple(want[p].shape), np.dtype(want[p].dtype))
        if got != exp:
            problems.append(f"{p}: {got[0]} {got[1]}, expected {exp[0]} {exp[1]}")
    return sorted(problems)


def _raise_nonfinite(what: str, lines: list[str], fix: str) -> NoReturn:
    more = f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else ""
    raise CheckpointError(f"{what} (a model with them computes garbage):\n  " + "\n  ".join(lines[:10])
                          + f"{more}\n{fix}")


def _raise_mismatch(what: str, problems: list[str], fix: str) -> NoReturn:
    more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
    shown = "\n  ".join(problems[:25]) + more
    raise CheckpointError(f"{what}:\n  {shown}\n{fix}")


def nonfinite_report(arrays: Mapping[str, Any]) -> list[str]:
    """One line per floating-point array that holds NaN or inf, by name (others are skipped).

    Values are judged as float32, what our params hold: a wider value beyond its range counts
    as inf. Such params still run, so a checkpoint holding them would evaluate to garbage.
    """
    lines = []
    for name, value in arrays.items():
        array = np.asarray(value)
        if not jnp.issubdtype(array.dtype, jnp.floating):
            continue
        with np.errstate(over="ignore"):
            array = array.astype(np.float32, copy=False)
        if np.isfinite(array).all():
            continue
        nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        lines.append(f"{name}: {nan + inf} of {array.size} values ({nan} NaN, {inf} inf)")
    return lines


def _json_default(value: Any) -> Any:
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
    ``model_name`` None: any model, for checks made before the model is known).

    A mistyped output path must neither wipe unrelated files nor turn a float checkpoint (the
    expensive, converted or trained one) into a quantized one or into another model's params.
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


def write_checkpoint(path: str | os.PathLike, tree: Mapping[str, Any], metadata: Mapping[str, Any], *,
                     overwrite: bool = True) -> dict[str, Any]:
    """Write ``tree`` + ``metadata.json`` to a temporary sibling, then swap it into place.

    An existing directory is only replaced if it is one of our checkpoints of the same format
    and model, so a mistyped path cannot wipe unrelated files
    or another checkpoint. Returns the metadata as written.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not overwrite:
            raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it")
        check_replaceable(path, metadata)
    arrays = jax.tree.map(np.asarray, dict(tree))  # every leaf an array: numpy scalars break restores
    bad = nonfinite_report(flatten_tree(arrays))
    if bad:
        _raise_nonfinite(f"refusing to write {path}: the parameters hold NaN or infinite values", bad,
                         "find where they came from (a diverged run, a broken source checkpoint) and save "
                         "finite parameters")
    meta = {**metadata, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax_version": jax.__version__}
    meta = json.loads(json.dumps(meta, default=_json_default))
    meta[METADATA_HASH] = _metadata_digest(meta)
    text = json.dumps(meta, indent=2, sort_keys=True)
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    try:  # first, so an unwritable place fails here, not in Orbax's background threads (minutes later)
        os.makedirs(tmp)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: cannot create a directory in {parent} "
                              f"({e.strerror or e}); choose an output path in a directory you can write to"
                              ) from None
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, TREE_DIR), arrays)
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            f.write(text)
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
    except OSError as e:
        raise CheckpointError(f"writing {path} failed ({e}); nothing was replaced") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return json.loads(text)


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
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} is unreadable ({e}); the checkpoint is corrupt, re-create "
                              "it") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), str) \
            or not isinstance(meta.get("format_version"), int):
        raise CheckpointError(f"{meta_path} lacks a 'format' string and an integer 'format_version'; "
                              "the checkpoint is corrupt or not from ptq4vm-jax")
    if METADATA_HASH in meta and meta[METADATA_HASH] != _metadata_digest(meta):
        raise CheckpointError(
            f"{meta_path} was changed after it was written (its {METADATA_HASH} no longer matches): "
            "its model sizes and quantization settings decide how the stored arrays are read, so an "
            "edit silently changes the model. Restore the file or re-create the checkpoint"
        )
    return meta


def _metadata_digest(meta: Mapping[str, Any]) -> str:
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
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def require_format(metadata: Mapping[str, Any], path: str, *, format: str, version: int, loader: str) -> None:
    """Refuse other formats (naming their loader) and versions newer than this code reads."""
    found, found_version = metadata["format"], metadata["format_version"]
    if found != format:
        known = KNOWN_FORMATS.get(found)
        how = f"load it with {known}" if known else "it was not written by this version of ptq4vm-jax"
        raise CheckpointError(f"{path} is a {found!r} checkpoint, not {format!r}, so {loader} cannot "
                              f"read it; {how}")
    if not 1 <= found_version <= version:
        raise CheckpointError(f"{path} is {format} version {found_version}; this ptq4vm-jax reads "
                              f"versions 1 to {version}: upgrade ptq4vm-jax or re-create the checkpoint")


def _drop_closed_loop_noise(unraisable: Any, *, previous: Any) -> None:
    if unraisable.object is None and unraisable.exc_type is RuntimeError \
            and str(unraisable.exc_value) == "Event loop is closed":
        return
    previous(unraisable)


class _LateReadFailures(logging.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" for reads of trees already refused."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(("Task exception was never retrieved",
                                           "Future exception was never retrieved")):
            return True
        text = record.getMessage()
        return not any(f'"{path}/"' in text or f'"{path}"' in text for path in self.refused)


_late_read_failures = _LateReadFailures()


class _NoMetadataWarning(logging.Filter):
    """Orbax's warning before the damaged-metadata error we raise ourselves says the same, less clearly."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to get item metadata from directory")


@contextlib.contextmanager
def _quiet_late_orbax_callbacks(tree_path: str) -> Iterator[None]:
    """Keep a failed Orbax read of ``tree_path`` to our one-line error.

    Orbax runs each operation on a fresh asyncio loop and closes it as soon as one read fails;
    TensorStore reads still in flight then complete later than the error reaches the caller, from
    TensorStore's threads: onto the closed loop ("Event loop is closed" unraisables) or as failed
    tasks and futures nobody awaits (asyncio logs each "... exception was never retrieved" when
    it is collected). Up to dozens of tracebacks would follow our error. Those reads have nothing left
    to do, so after a failure both filters stay, for this tree only (anything else still reaches
    the previous hook and the log); after a success none are pending.
    """
    previous = sys.unraisablehook
    if getattr(previous, "func", None) is not _drop_closed_loop_noise:
        sys.unraisablehook = functools.partial(_drop_closed_loop_noise, previous=previous)
    absl_log, quiet_metadata = logging.getLogger("absl"), _NoMetadataWarning()
    absl_log.addFilter(quiet_metadata)
    try:
        yield
    except BaseException:
        _late_read_failures.refused.add(tree_path.rstrip("/"))
        asyncio_log = logging.getLogger("asyncio")
        if _late_read_failures not in asyncio_log.filters:
            asyncio_log.addFilter(_late_read_failures)
        raise
    else:
        sys.unraisablehook = previous
    finally:
        absl_log.removeFilter(quiet_metadata)


def restore_tree(path: str | os.PathLike, abstract: Mapping[str, Any]) -> dict[str, Any]:
    """Restore ``path/params`` into the structure, shapes and dtypes of ``abstract`` (checked first)."""
    tree_path = os.path.join(os.path.abspath(os.fspath(path)), TREE_DIR)
    redo = "the checkpoint is incomplete or corrupt: re-create it"
    if not os.path.isdir(tree_path):
        raise CheckpointError(f"{tree_path} is missing; {redo}")
    if not os.path.isfile(os.path.join(tree_path, "_METADATA")):
        raise CheckpointError(f"{tree_path}/_METADATA (the parameter tree's layout) is missing; {redo}")
    try:
        with _quiet_late_orbax_callbacks(tree_path), ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.metadata(tree_path).item_metadata
            if stored is None:
                raise CheckpointError(f"cannot read the parameter tree's metadata in {tree_path} (its "
                                      f"_METADATA or the array metadata it refers to is damaged); {redo}")
            problems = tree_mismatches(stored.tree, abstract)
            if problems:
                _raise_mismatch(f"{tree_path} does not match the model", problems,
                                "the checkpoint was written for another model or with other overrides")
            target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), dict(abstract))
            return ckptr.restore(tree_path, target)
    except CheckpointError:
        raise
    except Exception as e:  # orbax/tensorstore raise many types for missing or damaged files
        raise CheckpointError(f"cannot read the parameter tree in {tree_path} ({type(e).__name__}: "
                              f"{str(e)[:300]}); {redo}") from None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_params(path: str | os.PathLike, params: Mapping[str, Any], *, model_name: str,
                model_overrides: Mapping[str, Any] | None = None, source: str | None = None,
                source_sha256: str | None = None, extra: Mapping[str, Any] | None = None,
                overwrite: bool = True) -> dict[str, Any]:
    """Save float params of ``create_model(model_name, **model_overrides)``; returns the metadata."""
    name, overrides = canonical_name(model_name), dict(model_overrides or {})
    params = jax.tree.map(np.asarray, dict(params))
    problems = tree_mismatches(params, abstract_params(name, **overrides))
    if problems:
        _raise_mismatch(f"params do not match {name} {overrides or ''}".rstrip(), problems,
                        "pass the model_name/model_overrides these params were built with")
    metadata = {"format": FLOAT_FORMAT, "format_version": FLOAT_FORMAT_VERSION, "model_name": name,
                "model_overrides": overrides, "source": source, "source_sha256": source_sha256,
                "extra": dict(extra or {})}
    return write_checkpoint(path, params, metadata, overwrite=overwrite)


def _invalid(path: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}/{METADATA_FILE} is invalid ({problem}); re-create the checkpoint")


def _model_from_metadata(meta: Mapping[str, Any], path: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Model name, overrides and abstract params that ``metadata.json`` names, or why they are unusable.

    A hand-edited or damaged file must not surface as a registry or model-builder error.
    """
    name, overrides = meta.get("model_name"), meta.get("model_overrides", {})
    if not isinstance(name, str):
        raise _invalid(path, f"'model_name' must be a model name string, got {name!r}")
    if not isinstance(overrides, dict):
        raise _invalid(path, f"'model_overrides' must be an object of model arguments, got {overrides!r}")
    try:
        name = canonical_name(name)
        return name, overrides, abstract_params(name, **overrides)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # TypeError: unknown builder argument
        raise _invalid(path, f"model {name!r} with overrides {overrides}: {e}") from None


def load_params(
    path: str | os.PathLike, *, model_name: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Float params (numpy float32 tree) and metadata; checks format, model name and shapes."""
    path = os.path.abspath(os.fspath(path))
    meta = read_metadata(path)
    require_format(meta, path, format=FLOAT_FORMAT, version=FLOAT_FORMAT_VERSION, loader="load_params")
    held, _, abstract = _model_from_metadata(meta, path)
    if model_name is not None and canonical_name(model_name) != held:
        raise CheckpointError(f"{path} holds {held}, you asked for {canonical_name(model_name)}; pass "
                              f"model_name={held!r} or convert a {canonical_name(model_name)} checkpoint")
    params = restore_tree(path, abstract)
    _refuse_nonfinite(path, params)
    return params, meta


def _refuse_nonfinite(path: str, tree: Mapping[str, Any]) -> None:
    bad = nonfinite_report(flatten_tree(tree))
    if bad:
        _raise_nonfinite(f"{path} holds NaN or infinite parameters", bad,
                         "the checkpoint is damaged or was saved from a diverged run: re-create it")


def convert_checkpoint(checkpoint_path: str | os.PathLike, model_name: str, out_dir: str | os.PathLike, *,
                       key: str | None = "model", **overrides: Any) -> dict[str, Any]:
    """Official ``.pth``/``.safetensors`` -> float-params checkpoint in ``out_dir``; returns its metadata."""
    from convert import load_torch_checkpoint  # convert/ builds on this module

    params = load_torch_checkpoint(checkpoint_path, model_name, key=key, **overrides)
    return save_params(out_dir, params, model_name=model_name, model_overrides=overrides,
                       source=os.path.basename(os.fspath(checkpoint_path)),
                       source_sha256=file_sha256(checkpoint_path), extra={"key": key})


# ----------------------------------------------------------------------------- quantized models

QUANT_FORMAT = "ptq4vm-jax/quantized"
QUANT_FORMAT_VERSION = 1
KNOWN_FORMATS[QUANT_FORMAT] = "ptq4vm_jax.checkpoint.load_quantized"


_LEAF_FORM = "[shape (list of non-negative ints), dtype name]"
# leaf -> its dtype ("floating": any float dtype); the integer ones are what the int GEMMs read
_LEAF_DTYPES = {"w_int": "int8", "a_zero": "int32", "smooth": "floating", "w_scale": "floating",
                "a_scale": "floating", "bias": "floating"}


def _leaf_spec(value: Any) -> jax.ShapeDtypeStruct:
    """``[shape, dtype]`` from ``metadata.json`` -> its abstract array; ValueError if malformed."""
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"must be {_LEAF_FORM}, got {value!r}")
    shape, dtype = value
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"shape must be a list of non-negative ints, got {shape!r}")
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be a dtype name, got {dtype!r}")
    try:
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}") from None


def _layer_specs(layers: Any, path: str) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """``metadata.json``'s "layers" -> {layer path: {leaf: abstract array}}, refusing any other form."""
    if not isinstance(layers, dict):
        raise _invalid(path, f"'layers' must map each layer path to {{leaf: {_LEAF_FORM}}}, got "
                             f"{type(layers).__name__} {str(layers)[:80]}")
    specs: dict[str, dict[str, jax.ShapeDtypeStruct]] = {}
    for layer, leaves in layers.items():
        if not isinstance(leaves, dict) or not leaves:
            raise _invalid(path, f"'layers' entry {layer!r} must map leaf names to {_LEAF_FORM}, got "
                                 f"{leaves!r}")
        specs[layer] = {}
        for leaf, value in leaves.items():
            try:
                spec = _leaf_spec(value)
            except ValueError as e:
                raise _invalid(path, f"layer {layer}/{leaf}: {e}") from None
            want = _LEAF_DTYPES.get(leaf)
            if want is None:
                raise _invalid(path, f"layer {layer} has an unknown leaf {leaf!r}; a quantized layer holds "
                                     f"{sorted(_LEAF_DTYPES)}")
            ok = jnp.issubdtype(spec.dtype, jnp.floating) if want == "floating" else spec.dtype == want
            if not ok:
                raise _invalid(path, f"layer {layer}/{leaf} has dtype {spec.dtype}, it must be {want}")
            specs[layer][leaf] = spec
    return specs


def _quantized_abstract(params: Mapping[str, Any], name: str, specs: Mapping[str, Mapping[str, Any]],
                        packed: bool, path: str) -> dict[str, Any]:
    """Expected tree of a quantized checkpoint: ``params`` (the model's) with ``specs``' layers moved out.

    Each layer is checked against the model's linear layer, so a restored tree has the shapes
    ``quantized_apply`` expects (bar the token count, set by the calibration input); ``packed``: two
    4-bit codes per stored ``w_int`` byte.
    """
    params = copy_tree(params)

    def wrong(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}/{METADATA_FILE} does not match {name}: {problem}; the checkpoint "
                               "is corrupt or was written for another model: re-create it")

    qlayers: dict[str, Any] = {}
    for path_s, q in specs.items():
        keys = tuple(path_s.split("/"))
        node = params
        for key in keys:
            if not isinstance(node, Mapping) or key not in node:
                raise wrong(f"quantized layer {path_s} does not exist in {name}")
            node = node[key]
        kernel = node.get("kernel") if isinstance(node, Mapping) else None
        if kernel is None or len(kernel.shape) != 2:
            raise wrong(f"{path_s} in {name} is not a linear layer")
        leaves = {"w_int", "smooth", "w_scale", "a_scale", "a_zero"} | ({"bias"} if "bias" in node else set())
        if leaves - q.keys():
            raise wrong(f"{path_s} lacks {sorted(leaves - q.keys())}")
        if q.keys() - leaves:
            raise wrong(f"{path_s} has a bias, the model's layer has none")
        k, n = kernel.shape
        tokens = q["a_scale"].shape
        if len(tokens) != 1 or tokens[0] < 1:
            raise wrong(f"{path_s}/a_scale must have shape (tokens,), got {tokens}")
        want = {"w_int": ((k + 1) // 2 if packed else k, n), "smooth": (k,), "w_scale": (n,),
                "a_scale": tokens, "a_zero": tokens, "bias": (n,)}
        for key in sorted(leaves):
            if q[key].shape != want[key]:
                raise wrong(f"{path_s}/{key} has shape {q[key].shape}, the model needs {want[key]}")
        parent = params
        for key in keys[:-1]:
            parent = parent[key]
        del parent[keys[-1]]
        node_q = qlayers
        for key in keys[:-1]:
            node_q = node_q.setdefault(key, {})
        node_q[keys[-1]] = dict(q)
    return {"params": prune_empty(params), "qlayers": qlayers}


def _layer_shapes(qlayers: Mapping[str, Any]) -> dict[str, Any]:
    flat = flatten_tree(qlayers)
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        path, _, leaf = key.rpartition("/")
        arr = np.asarray(value)
        out.setdefault(path, {})[leaf] = [list(arr.shape), arr.dtype.name]
    return out


def save_quantized(path: str | os.PathLike, qparams: QuantizedParams, *, overwrite: bool = True
                   ) -> dict[str, Any]:
    """Save a ``QuantizedParams`` (see README, "Quantized checkpoint layout"); returns the metadata."""
    from ptq4vm_jax.quant.params import QuantizedParams, layers_to_arrays

    if not isinstance(qparams, QuantizedParams):
        raise TypeError(f"save_quantized needs a QuantizedParams (from quantize_params or load_quantized), "
                        f"got {type(qparams).__name__}; float params are saved with save_params")
    qlayers = layers_to_arrays(qparams.qlayers)  # on disk: one dict of arrays per layer
    shapes = _layer_shapes(qlayers)
    metadata = {
        "format": QUANT_FORMAT, "format_version": QUANT_FORMAT_VERSION,
        "model_name": qparams.model_name, "model_overrides": dict(qparams.model_overrides),
        "config": qparams.config.to_json(), "calibration": qparams.summary, "layers": shapes,
    }
    tree = {"params": qparams.params, "qlayers": qlayers}
    return write_checkpoint(path, tree, metadata, overwrite=overwrite)


def load_quantized(path: str | os.PathLike) -> QuantizedParams:
    """Read a quantized checkpoint back into a ``QuantizedParams``, validating it on the way."""
    from pallas_kernels.qmatmul import dense_weight, is_packed
    from ptq4vm_jax.quant.config import QuantConfig
    from ptq4vm_jax.quant.params import QuantizedParams, layers_from_arrays
    from ptq4vm_jax.quant.quantizers import act_qmax, weight_qmax

    path = os.path.abspath(os.fspath(path))
    meta = read_metadata(path)
    require_format(meta, path, format=QUANT_FORMAT, version=QUANT_FORMAT_VERSION, loader="load_quantized")
    name, overrides, abstract = _model_from_metadata(meta, path)
    if not isinstance(meta.get("config"), dict):
        raise _invalid(path, f"'config' must be the QuantConfig as an object, got {meta.get('config')!r}")
    try:
        config = QuantConfig.from_json(meta["config"])
    except (TypeError, ValueError) as e:
        raise _invalid(path, f"'config': {e}") from None
    calibration = meta.get("calibration", {})
    if not isinstance(calibration, dict):
        raise _invalid(path, f"'calibration' must be an object, got {calibration!r}")
    specs = _layer_specs(meta.get("layers"), path)
    tree = restore_tree(path, _quantized_abstract(abstract, name, specs, is_packed(config.w_bits), path))
    _refuse_nonfinite(path, tree)
    a_max, w_max = act_qmax(config.a_bits), weight_qmax(config.w_bits)
    for key, value in flatten_tree(tree["qlayers"]).items():
        layer, _, leaf = key.rpartition("/")
        value = np.asarray(value)
        bad = None
        usable = np.all(np.isfinite(value)) and np.all(value != 0)  # learned values carry no sign rule
        if leaf in ("smooth", "w_scale", "a_scale") and not usable:
            bad = "must be finite and non-zero"
        elif leaf == "a_zero" and (value.min() < 0 or value.max() > a_max):
            bad = f"must lie in [0, {a_max}] for {config.a_bits}-bit activations"
        elif leaf == "w_int" and np.abs(np.asarray(dense_weight(value, config.w_bits), int)).max() > w_max:
            bad = f"must lie in [-{w_max}, {w_max}] for {config.w_bits}-bit weights"
        if bad:
            raise CheckpointError(f"{path}: {layer}/{leaf} {bad}; the checkpoint is corrupt")
    return QuantizedParams(
        params=jax.tree.map(jnp.asarray, tree["params"]),
        qlayers=layers_from_arrays(jax.tree.map(jnp.asarray, tree["qlayers"]), config.w_bits, config.a_bits),
        model_name=name, config=config, model_overrides=tuple(sorted(overrides.items())),
        info=json.dumps(calibration),
    )
