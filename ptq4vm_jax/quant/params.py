"""A quantized model as one pytree (``QuantizedParams``), how calibration's train form becomes it
(:func:`finalize`), and how its layers map to the per-layer arrays of a checkpoint.

On disk (every format version) each quantized layer is a dict of arrays, ``w_int``, ``w_scale``,
``smooth``, ``a_scale``, ``a_zero`` and ``bias`` when the layer has one; the bit widths live in the
checkpoint's config. :func:`to_arrays` / :func:`from_arrays` convert one layer, and
:func:`abstract_checkpoint` gives the whole tree a checkpoint of a model must hold, as
``jax.eval_shape`` of the same :func:`finalize` that ``quantize_params`` runs.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels.qlinear import QuantizedLinear, pack_weight
from ptq4vm_jax.models import create_model, param_shapes
from ptq4vm_jax.quant import quantizers as qz
from ptq4vm_jax.quant.config import QuantConfig
from ptq4vm_jax.quant.layer import TrainLinear, is_layer
from ptq4vm_jax.trees import copy_tree, get_path, prune_empty, set_path

Path = tuple[str, ...]
#: The arrays of one layer on disk, in the order of a checkpoint's per-layer dict.
ARRAY_NAMES = ("w_int", "w_scale", "smooth", "a_scale", "a_zero", "bias")


@flax.struct.dataclass
class QuantizedParams:
    """A quantized model as one pytree: float params of what stays float + quantized layers.

    ``qlayers`` mirrors the params tree; each quantized linear is a
    :class:`~pallas_kernels.qlinear.QuantizedLinear` (``w_int`` int8, smoothed and rounded,
    packed two per byte for w_bits <= 4; ``w_scale`` (out,), ``smooth`` (in,), ``a_scale`` (L,),
    ``a_zero`` (L,) int32 and its ``bias``); its float kernel is not kept. ``info`` is the
    calibration summary as JSON text.
    """

    params: Any
    qlayers: Any
    model_name: str = flax.struct.field(pytree_node=False)
    config: QuantConfig = flax.struct.field(pytree_node=False)
    model_overrides: tuple = flax.struct.field(pytree_node=False, default=())
    info: str = flax.struct.field(pytree_node=False, default="{}")

    def model(self, *, dtype: Any = None, scan: str | None = None) -> nn.Module:
        """The model these parameters belong to; ``dtype`` (e.g. ``jnp.bfloat16``) sets its
        projections' compute dtype (the bf16 speed variant of the integer mode), ``scan`` its
        selective scan's backend (``ptq4vm_jax.choices.SCAN_BACKENDS``; None: "auto")."""
        overrides = dict(self.model_overrides)
        if dtype is not None:
            overrides["dtype"] = dtype
        if scan is not None:
            overrides["scan"] = scan
        return create_model(self.model_name, **overrides)

    @property
    def summary(self) -> dict:
        return json.loads(self.info)

    def __repr__(self) -> str:  # what it is, not every array (a notebook would print megabytes)
        c, seconds = self.config, self.summary.get("calibration_seconds")
        sizes = f", {dict(self.model_overrides)}" if self.model_overrides else ""
        took = f", calibrated in {seconds:.1f} s" if seconds is not None else ""
        return (f"QuantizedParams({self.model_name}{sizes}: {c.method} W{c.w_bits}A{c.a_bits}, "
                f"{len(flatten_layers(self.qlayers))} quantized linears{took})")


# ----------------------------------------------------------------------------- layer trees


def flatten_layers(qtree: Any, prefix: Path = ()) -> dict[Path, Any]:
    """Nested tree of layers -> {path: layer}."""
    if is_layer(qtree):
        return {prefix: qtree}
    out = {}
    for k, v in qtree.items():
        out.update(flatten_layers(v, prefix + (k,)))
    return out


def nest_layers(flat: Mapping[Path, Any]) -> dict:
    """{path: layer} -> the nested tree that mirrors the params tree."""
    tree: dict = {}
    for path, v in flat.items():
        set_path(tree, path, v)
    return tree


def to_arrays(layer: QuantizedLinear) -> dict[str, jax.Array]:
    """One layer as a checkpoint stores it: its arrays by name, ``bias`` only when it has one."""
    return {name: getattr(layer, name) for name in ARRAY_NAMES if getattr(layer, name) is not None}


def from_arrays(arrays: Mapping[str, Any], w_bits: int, a_bits: int) -> QuantizedLinear:
    """Inverse of :func:`to_arrays`; the bit widths come from the checkpoint's config."""
    return QuantizedLinear(**{name: arrays.get(name) for name in ARRAY_NAMES}, w_bits=w_bits,
                           a_bits=a_bits)


def layers_to_arrays(qlayers: Any) -> dict:
    """A tree of layers -> the same tree with each layer's :func:`to_arrays` dict."""
    return nest_layers({p: to_arrays(layer) for p, layer in flatten_layers(qlayers).items()})


def layers_from_arrays(tree: Mapping, w_bits: int, a_bits: int) -> dict:
    """Inverse of :func:`layers_to_arrays`: a dict holding ``w_int`` is a layer."""

    def convert(node: Any) -> Any:
        if "w_int" in node:
            return from_arrays(node, w_bits, a_bits)
        return {k: convert(v) for k, v in node.items()}

    return convert(tree)


# ----------------------------------------------------------------------------- finalize


@functools.partial(jax.jit, static_argnames="w_bits")
def _integer_weight(kernel: jax.Array, smooth: jax.Array, w_scale: jax.Array, w_bits: int) -> jax.Array:
    """The stored integer weight; one program per layer shape, not one per elementwise op."""
    codes = qz.quantize_weight_int(kernel.astype(jnp.float32), smooth, w_scale, w_bits)
    return pack_weight(codes, w_bits)


def quantized_layer(layer: TrainLinear) -> QuantizedLinear:
    """Train form -> the integer form that inference runs and checkpoints store."""
    return QuantizedLinear(
        w_int=_integer_weight(layer.kernel, layer.smooth, layer.w_scale, layer.w_bits),
        w_scale=layer.w_scale, smooth=layer.smooth, a_scale=layer.a_scale,
        a_zero=layer.a_zero.astype(jnp.int32),
        bias=None if layer.bias is None else layer.bias.astype(jnp.float32),
        w_bits=layer.w_bits, a_bits=layer.a_bits,
    )


def finalize(layers: Mapping[Path, TrainLinear], params: Mapping) -> tuple[dict, dict]:
    """(nested quantized layers, float params without them): the quantized kernels (and their
    biases) leave the params."""
    float_params = copy_tree(params)
    for path in layers:
        get_path(float_params, path[:-1])[path[-1]] = {}
    return nest_layers({p: quantized_layer(st) for p, st in layers.items()}), prune_empty(float_params)


def abstract_checkpoint(model_name: str, model_overrides: Mapping[str, Any], tokens: Mapping[Path, int],
                        config: QuantConfig) -> dict[str, Any]:
    """The tree of ``jax.ShapeDtypeStruct`` that a quantized checkpoint of this model holds:
    ``{"params": float params without the quantized linears, "qlayers": per-layer array dicts}``.

    ``tokens``: the quantized layers' paths and each one's token count L (the length of its
    ``a_scale``). Built by ``jax.eval_shape`` of :func:`finalize`, so it is what saving a
    ``quantize_params`` result writes. A path that is not a linear layer of the model (a
    ``kernel`` of rank 2) raises ValueError.
    """
    params = param_shapes(create_model(model_name, **dict(model_overrides)))
    biased = {}
    for path in tokens:
        try:
            dense = get_path(params, path)
        except (KeyError, TypeError):
            raise ValueError(f"quantized layer {'/'.join(path)} does not exist in {model_name}") from None
        kernel = dense.get("kernel") if isinstance(dense, Mapping) else None
        if kernel is None or len(kernel.shape) != 2:
            raise ValueError(f"{'/'.join(path)} in {model_name} is not a linear layer")
        biased[path] = "bias" in dense

    def build(params: Mapping) -> dict[str, Any]:
        layers = {}
        for path, length in tokens.items():
            dense = get_path(params, path)
            k, n = dense["kernel"].shape
            layers[path] = TrainLinear(
                kernel=dense["kernel"], smooth=jnp.ones((k,), jnp.float32),
                w_scale=jnp.ones((n,), jnp.float32), a_scale=jnp.ones((length,), jnp.float32),
                a_zero=jnp.zeros((length,), jnp.int32), bias=dense["bias"] if biased[path] else None,
                w_bits=config.w_bits, a_bits=config.a_bits,
            )
        qlayers, float_params = finalize(layers, params)
        return {"params": float_params, "qlayers": layers_to_arrays(qlayers)}

    return jax.eval_shape(build, params)
