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
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.qmatmul import dense_weight, is_packed
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
from ptq4vm_jax.quant.quantizers import act_qmax, weight_qmax
from ptq4vm_jax.trees import copy_tree, flatten_tree, prune_empty

if TYPE_CHECKING:
    from ptq4vm_jax.api import QuantizedParams

# 1: no per-array digests (still read); 2: ``array_sha256`` in the sealed metadata, verified at load.
QUANT_FORMAT_VERSION = 2


def _quantized_params_type() -> type[QuantizedParams]:
    # LAYERING: the one import of QuantizedParams in the checkpoint package. It lives in api.py
    # (above checkpoint) until it moves below it; then import it at the top of this module.
    from ptq4vm_jax.api import QuantizedParams

    return QuantizedParams


def layers_to_disk(qlayers: Any) -> dict[str, Any]:
    """In-memory quantized layers -> the nested per-layer dicts stored on disk (numpy leaves)."""
    return jax.tree.map(np.asarray, dict(qlayers))


def layers_from_disk(stored: Mapping[str, Any]) -> Any:
    """The restored per-layer dicts -> the in-memory quantized layers of a ``QuantizedParams``."""
    return jax.tree.map(jnp.asarray, dict(stored))


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
    if not isinstance(qparams, _quantized_params_type()):
        raise TypeError(f"save_quantized needs a QuantizedParams (from quantize_params or load_quantized), "
                        f"got {type(qparams).__name__}; float params are saved with save_params")
    qlayers = layers_to_disk(qparams.qlayers)
    metadata = {
        "format": QUANT_FORMAT, "format_version": QUANT_FORMAT_VERSION,
        "model_name": qparams.model_name, "model_overrides": dict(qparams.model_overrides),
        "config": qparams.config.to_json(), "calibration": qparams.summary, "layers": _layer_shapes(qlayers),
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
    name, overrides, abstract = model_from_metadata(meta, path)
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
    tree = restore_tree(path, _quantized_abstract(abstract, name, specs, is_packed(config.w_bits), path),
                        meta.get(ARRAY_DIGESTS))
    refuse_nonfinite(path, tree)
    _check_ranges(path, tree["qlayers"], config)
    return _quantized_params_type()(
        params=jax.tree.map(jnp.asarray, tree["params"]),
        qlayers=layers_from_disk(tree["qlayers"]),
        model_name=name, config=config, model_overrides=tuple(sorted(overrides.items())),
        info=json.dumps(calibration),
    )
