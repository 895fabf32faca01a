"""The quantized-model format: float params of what stays float, plus each quantized layer's arrays.

On disk (see README, "Quantized checkpoint layout"): the tree ``{"params": ..., "qlayers": ...}``,
where ``qlayers`` mirrors the params tree and each quantized linear is a dict of ``w_int``,
``w_scale``, ``smooth``, ``a_scale``, ``a_zero`` and (if the layer has one) ``bias``;
``metadata.json`` records the model, the ``QuantConfig`` and every layer's leaf shapes and dtypes,
from which the expected tree is built before anything is restored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.qlinear import dense_weight
from ptq4vm_jax.checkpoint.checks import refuse_nonfinite
from ptq4vm_jax.checkpoint.store import (
    ARRAY_DIGESTS,
    METADATA_FILE,
    QUANT_FORMAT,
    invalid,
    model_from_metadata,
    read_metadata,
    require_format,
    restore_tree,
    write_checkpoint,
)
from ptq4vm_jax.errors import CheckpointError
from ptq4vm_jax.quant.config import QuantConfig
from ptq4vm_jax.quant.params import (
    QuantizedParams,
    abstract_checkpoint,
    layers_from_arrays,
    layers_to_arrays,
)
from ptq4vm_jax.quant.quantizers import act_qmax, weight_qmax
from ptq4vm_jax.trees import flatten_tree, set_path

# 1: no per-array digests (still read); 2: ``array_sha256`` in the sealed metadata, verified at load.
QUANT_FORMAT_VERSION = 2


def layers_to_disk(qlayers: Any) -> dict[str, Any]:
    """In-memory quantized layers -> the nested per-layer dicts stored on disk (numpy leaves)."""
    return jax.tree.map(np.asarray, layers_to_arrays(qlayers))


def layers_from_disk(stored: Mapping[str, Any], config: QuantConfig) -> Any:
    """The restored per-layer dicts -> the in-memory quantized layers of a ``QuantizedParams``."""
    return layers_from_arrays(jax.tree.map(jnp.asarray, dict(stored)), config.w_bits, config.a_bits)


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
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"unknown dtype {dtype!r}") from None


def _layer_specs(layers: Any, path: str) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """``metadata.json``'s "layers" -> {layer path: {leaf: abstract array}}, refusing any other form."""
    if not isinstance(layers, dict):
        raise invalid(path, f"'layers' must map each layer path to {{leaf: {_LEAF_FORM}}}, got "
                             f"{type(layers).__name__} {str(layers)[:80]}")
    specs: dict[str, dict[str, jax.ShapeDtypeStruct]] = {}
    for layer, leaves in layers.items():
        if not isinstance(leaves, dict) or not leaves:
            raise invalid(path, f"'layers' entry {layer!r} must map leaf names to {_LEAF_FORM}, got "
                                 f"{leaves!r}")
        specs[layer] = {}
        for leaf, value in leaves.items():
            try:
                spec = _leaf_spec(value)
            except ValueError as e:
                raise invalid(path, f"layer {layer}/{leaf}: {e}") from None
            want = _LEAF_DTYPES.get(leaf)
            if want is None:
                raise invalid(path, f"layer {layer} has an unknown leaf {leaf!r}; a quantized layer holds "
                                     f"{sorted(_LEAF_DTYPES)}")
            ok = jnp.issubdtype(spec.dtype, jnp.floating) if want == "floating" else spec.dtype == want
            if not ok:
                raise invalid(path, f"layer {layer}/{leaf} has dtype {spec.dtype}, it must be {want}")
            specs[layer][leaf] = spec
    return specs


def _stored_layers(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{path: per-layer dict} of an on-disk ``qlayers`` tree (a dict holding ``w_int`` is a layer)."""
    if "w_int" in tree:
        return {prefix: tree}
    return {k: v for key, node in tree.items() for k, v in _stored_layers(node, (*prefix, key)).items()}


def _expected_tree(name: str, overrides: Mapping[str, Any], specs: Mapping[str, Mapping[str, Any]],
                   config: QuantConfig, path: str) -> dict[str, Any]:
    """The tree to restore: what saving a ``quantize_params`` result of this model writes
    (``abstract_checkpoint``, an ``eval_shape`` of the same code), with each layer's leaves checked
    against ``specs`` (from ``metadata.json``), whose float dtypes are kept."""

    def wrong(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}/{METADATA_FILE} does not match {name}: {problem}; the checkpoint "
                               "is corrupt or was written for another model: re-create it")

    tokens = {}
    for layer, leaves in specs.items():
        a_scale = leaves.get("a_scale")
        if a_scale is None:
            raise wrong(f"{layer} lacks ['a_scale']")
        if len(a_scale.shape) != 1 or a_scale.shape[0] < 1:
            raise wrong(f"{layer}/a_scale must have shape (tokens,), got {a_scale.shape}")
        tokens[tuple(layer.split("/"))] = a_scale.shape[0]
    try:
        want = abstract_checkpoint(name, overrides, tokens, config)
    except ValueError as e:
        raise wrong(str(e)) from None
    restore: dict[str, Any] = {}
    for keys, expected in _stored_layers(want["qlayers"]).items():
        layer = "/".join(keys)
        have = specs[layer]
        if expected.keys() - have.keys():
            raise wrong(f"{layer} lacks {sorted(expected.keys() - have.keys())}")
        if have.keys() - expected.keys():
            raise wrong(f"{layer} has a bias, the model's layer has none")
        for leaf in sorted(expected):
            if have[leaf].shape != expected[leaf].shape:
                raise wrong(f"{layer}/{leaf} has shape {have[leaf].shape}, the model needs "
                            f"{expected[leaf].shape}")
        set_path(restore, keys, dict(have))
    return {"params": want["params"], "qlayers": restore}


def _layer_shapes(qlayers: Mapping[str, Any]) -> dict[str, Any]:
    flat = flatten_tree(qlayers)
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        path, _, leaf = key.rpartition("/")
        arr = np.asarray(value)
        out.setdefault(path, {})[leaf] = [list(arr.shape), arr.dtype.name]
    return out


def save_quantized(path: str | os.PathLike, qparams: QuantizedParams, *,
                   provenance: Mapping[str, Any] | None = None, overwrite: bool = True) -> dict[str, Any]:
    """Save a ``QuantizedParams`` (see README, "Quantized checkpoint layout"); returns the metadata.
    ``provenance``: where it came from (JSON values: the float model, the calibration data), kept
    in the metadata as given; the library does not know the paths its arrays came from."""
    if not isinstance(qparams, QuantizedParams):
        raise TypeError(f"save_quantized needs a QuantizedParams (from quantize_params or load_quantized), "
                        f"got {type(qparams).__name__}; float params are saved with save_params")
    qlayers = layers_to_disk(qparams.qlayers)
    metadata = {
        "format": QUANT_FORMAT, "format_version": QUANT_FORMAT_VERSION,
        "model_name": qparams.model_name, "model_overrides": dict(qparams.model_overrides),
        "config": qparams.config.to_json(), "calibration": qparams.summary, "layers": _layer_shapes(qlayers),
        "provenance": dict(provenance or {}),
    }
    tree = {"params": qparams.params, "qlayers": qlayers}
    return write_checkpoint(path, tree, metadata, overwrite=overwrite)


def _check_ranges(path: str, qlayers: Mapping[str, Any], config: QuantConfig) -> None:
    """Scales usable, zero points and integer weights inside their bit widths' ranges."""
    a_max, w_max = act_qmax(config.a_bits), weight_qmax(config.w_bits)
    for key, value in flatten_tree(qlayers).items():
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


def load_quantized(path: str | os.PathLike) -> QuantizedParams:
    """Read a quantized checkpoint back into a ``QuantizedParams``, validating it on the way."""
    path = os.path.abspath(os.fspath(path))
    meta = read_metadata(path)
    require_format(meta, path, format=QUANT_FORMAT, version=QUANT_FORMAT_VERSION, loader="load_quantized",
                   sealed_from=2)
    name, overrides, _ = model_from_metadata(meta, path)
    if not isinstance(meta.get("config"), dict):
        raise invalid(path, f"'config' must be the QuantConfig as an object, got {meta.get('config')!r}")
    try:
        config = QuantConfig.from_json(meta["config"])
    except (TypeError, ValueError, OverflowError) as e:
        raise invalid(path, f"'config': {str(e)[:300]}") from None
    calibration = meta.get("calibration", {})
    if not isinstance(calibration, dict):
        raise invalid(path, f"'calibration' must be an object, got {calibration!r}")
    specs = _layer_specs(meta.get("layers"), path)
    tree = restore_tree(path, _expected_tree(name, overrides, specs, config, path),
                        meta.get(ARRAY_DIGESTS))
    refuse_nonfinite(path, tree)
    _check_ranges(path, tree["qlayers"], config)
    return QuantizedParams(
        params=jax.tree.map(jnp.asarray, tree["params"]),
        qlayers=layers_from_disk(tree["qlayers"], config),
        model_name=name, config=config, model_overrides=tuple(sorted(overrides.items())),
        info=json.dumps(calibration),
    )
