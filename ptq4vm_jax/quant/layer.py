"""The quantized linear, and how it replaces ``nn.Dense`` calls in an unmodified model.

A layer's quantization state is a typed pytree, kept in a tree that mirrors the params tree
(``qtree["layers_3"]["mixer"]["in_proj"]``). Two forms exist:

* :class:`TrainLinear`: the float ``kernel`` with the learnable ``smooth``, ``w_scale``,
  ``a_scale`` (and ``a_zero``, ``bias``), what calibration differentiates through;
* :class:`~pallas_kernels.qlinear.QuantizedLinear`: ``w_int`` (already smoothed and rounded)
  instead of the kernel, what ``quantize_params`` returns and checkpoints store.

``intercept_dense`` swaps every ``nn.Dense.__call__`` whose module path holds a layer for
``qlinear`` (the qwix idea), so the model definition knows nothing about quantization.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.qlinear import (
    LinearOperands,
    QuantizedActivation,
    QuantizedLinear,
    check_bits,
    dequantize,
    unpack_weight,
    weight_colsum,
    zero_correction,
    zero_shift,
)
from pallas_kernels.qmatmul import quantize_activations
from ptq4vm_jax.choices import MODES
from ptq4vm_jax.quant import quantizers as qz
from ptq4vm_jax.quant.config import QuantConfig, QuantProgram
from ptq4vm_jax.quant.integer import check_gemm, int_linear


@dataclasses.dataclass(frozen=True)
class TrainLinear:
    """Calibration's form of a quantized linear: the float ``kernel`` (K, N) and ``bias`` (N,) or
    None, with the quantization state of :class:`~pallas_kernels.qlinear.QuantizedLinear`.

    Its bit widths are pytree leaves, not static fields: only fake quantizers read them, as
    values, so the compiled calibration programs serve every width. They are Python ints
    outside ``jit`` (checked here), traced inside.
    """

    kernel: jax.Array
    smooth: jax.Array
    w_scale: jax.Array
    a_scale: jax.Array
    a_zero: jax.Array
    bias: jax.Array | None = None
    w_bits: qz.Bits = 8
    a_bits: qz.Bits = 8

    def __post_init__(self) -> None:
        if isinstance(self.w_bits, int) or isinstance(self.a_bits, int):  # (jax rebuilds it with tracers)
            check_bits(self.a_bits, self.w_bits)


jax.tree_util.register_dataclass(
    TrainLinear,
    data_fields=["kernel", "smooth", "w_scale", "a_scale", "a_zero", "bias", "w_bits", "a_bits"],
    meta_fields=[],
)

#: Either form of a quantized linear.
Linear = TrainLinear | QuantizedLinear
#: What the quantized linear reads of a configuration: ``dynamic_activations``.
Method = QuantConfig | QuantProgram


def is_layer(node: Any) -> bool:
    return isinstance(node, (TrainLinear, QuantizedLinear))


def lookup(tree: Mapping | None, path: tuple[str, ...]) -> Linear | None:
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node if is_layer(node) else None


def dequantized_kernel(layer: Linear) -> jax.Array:
    """Ŵ: from the float kernel (differentiable in σ and s_w) or from the stored integers."""
    if isinstance(layer, QuantizedLinear):
        codes = unpack_weight(layer.w_int, layer.w_bits, layer.in_features)
        return codes.astype(jnp.float32) * layer.w_scale
    return qz.fake_quant_weight(layer.kernel, layer.smooth, layer.w_scale, layer.w_bits)


def fake_quant_input(x: jax.Array, layer: Linear, cfg: Method) -> jax.Array:
    if cfg.dynamic_activations:
        return qz.fake_quant_act_dynamic(x, layer.smooth, layer.a_bits)
    return qz.fake_quant_act(x, layer.smooth, layer.a_scale, layer.a_zero, layer.a_bits)


def qlinear(x: jax.Array, layer: Linear, cfg: Method, mode: str, gemm: str = "auto") -> jax.Array:
    """y = Q_a(x/σ) · Q_w(W·diag(σ)) + b, in fake-quant (fp32) or integer arithmetic (on the
    integer GEMM ``gemm``, see ``ptq4vm_jax.choices.GEMM_BACKENDS``).

    A 2-D input (batch, features), e.g. the classifier head, is one token per example.
    ``per_token_dynamic`` has no static activation scales, so it runs fake (:func:`intercept_dense`
    refuses ``mode="int"`` for it). A ``QuantizedActivation`` input (codes its producer quantized
    for this layer, integer mode only) goes straight to the integer GEMM.
    """
    if isinstance(x, QuantizedActivation):
        if mode != "int" or not isinstance(layer, QuantizedLinear) or cfg.dynamic_activations:
            raise ValueError("a QuantizedActivation is the input of an integer-mode QuantizedLinear with "
                             f"static scales only (mode={mode!r}, layer {type(layer).__name__})")
        return int_linear(x, layer, gemm).astype(x.dtype)
    if x.ndim == 2:
        return qlinear(x[:, None, :], layer, cfg, mode, gemm)[:, 0, :]
    out_dtype = x.dtype
    if isinstance(layer, QuantizedLinear) and not cfg.dynamic_activations:
        if mode == "int":
            return int_linear(x, layer, gemm).astype(out_dtype)
        return simulate_int_linear(x.astype(jnp.float32), layer).astype(out_dtype)
    x_hat = fake_quant_input(x.astype(jnp.float32), layer, cfg)
    y = jnp.einsum("...k,kn->...n", x_hat, dequantized_kernel(layer),
                   precision=jax.lax.Precision.HIGHEST)
    if layer.bias is not None:
        y = y + layer.bias
    return y.astype(out_dtype)


def simulate_int_linear(x: jax.Array, layer: QuantizedLinear) -> jax.Array:
    """Fake-quant of a stored (integer-form) layer in the integer kernel's association order.

    (s_a (q - z)) @ (s_w w) == s_a s_w ((q - z) @ w) exactly in real numbers; summing the integer
    codes first (exact in fp32 while partial sums stay below 2^24) and scaling after, as the
    kernels do, makes this simulation agree with ``mode="int"`` to the last bit in practice.
    It takes the integer path's own steps around the dot (``quantize_activations``' signed codes
    ``q - c``, ``zero_correction``'s int32 ``(c - z) colsum(w)``, ``dequantize``).
    XLA fuses that epilogue into the next float ops (LocalVim's RoPE, whose products LLVM
    contracts into FMAs), and it can only contract them the same way in both modes when the
    fused loops are the same.
    """
    codes = quantize_activations(x, layer).astype(jnp.float32)
    w = unpack_weight(layer.w_int, layer.w_bits, layer.in_features)
    acc = jnp.einsum("...k,kn->...n", codes, w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    colsum = weight_colsum(layer.w_int, layer.w_bits)
    return dequantize(acc.astype(jnp.int32) + zero_correction(layer.a_zero, colsum, layer.a_bits), layer)


def integer_operands(x: jax.Array, layer: QuantizedLinear) -> LinearOperands:
    """A stored layer with static scales as a kernel multiplies it on chip: the centred codes
    ``q - a_zero`` and the weight codes (exact in fp32), the per-token and per-channel steps and
    the bias. Scaled in ``simulate_int_linear``'s order, it gives that function's output to the
    last bit in fake and in integer mode alike."""
    if x.ndim != 3:
        raise ValueError(f"integer_operands: the input must be (B, L, K) tokens, got shape {x.shape}")
    shift = zero_shift(layer.a_zero, layer.a_bits)[:, None]
    centred = (quantize_activations(x, layer).astype(jnp.int32) + shift).astype(jnp.float32)
    w = unpack_weight(layer.w_int, layer.w_bits, layer.in_features).astype(jnp.float32)
    return LinearOperands(centred, w, layer.a_scale, layer.w_scale, layer.bias)


def qlinear_float_backward(x: jax.Array, layer: TrainLinear, cfg: Method) -> jax.Array:
    """The quantized linear forward, differentiated as the float linear ``x @ kernel + bias``.

    What the released Vim code does for x_proj/dt_proj (docs/method.md §6.4): they run quantized inside a
    fused autograd Function whose backward rebuilds the input gradient from the float,
    unsmoothed weights, with no quantizer in the way. The forward value is the quantized one
    exactly (``stop_gradient(y_q) + (y_fp - stop_gradient(y_fp))`` adds an exact zero); the
    layer's own scales get no gradient.
    """
    y_q = qlinear(x, layer, cfg, "fake")
    y_fp = jnp.einsum("...k,kn->...n", x, layer.kernel.astype(x.dtype),
                      precision=jax.lax.Precision.HIGHEST)
    if layer.bias is not None:
        y_fp = y_fp + layer.bias.astype(x.dtype)
    y_fp = y_fp.astype(y_q.dtype)
    return jax.lax.stop_gradient(y_q) + (y_fp - jax.lax.stop_gradient(y_fp))


def check_mode(mode: str, cfg: Method) -> None:
    """``mode`` is one of ``MODES``, and "int" only for static activation scales."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "int" and cfg.dynamic_activations:
        raise ValueError("mode='int' needs static activation scales, and method='per_token_dynamic' "
                         "computes them from each input at run time: evaluate it with mode='fake'")


@contextlib.contextmanager
def intercept_dense(qtree: Mapping, cfg: Method, mode: str = "fake",
                    float_backward: frozenset[tuple[str, ...]] = frozenset(), *,
                    gemm: str = "auto") -> Iterator[None]:
    """Within this context, ``nn.Dense`` calls at paths present in ``qtree`` are quantized; those
    in ``float_backward`` (train form) are differentiated as float (:func:`qlinear_float_backward`).
    ``gemm``: the integer GEMM of ``mode="int"`` (``ptq4vm_jax.choices.GEMM_BACKENDS``).

    In integer mode, a module that names the linear its output feeds (a ``feeds`` path from its
    parent, e.g. Vim's add + norm feeding ``mixer/in_proj``) is called with that linear as
    ``quant=`` when it is quantized here, and hands it the input codes (a ``QuantizedActivation``)
    from its own kernel: no separate quantize pass. A Dense that returns its operands for its
    consumer's kernel (``emits_operands``, e.g. ``models.layers.OperandDense``) returns, for a
    stored layer with static scales, :func:`integer_operands` in every mode; any other (calibration's
    train form, dynamic activations) returns its output as for any Dense, which the kernel takes
    as given."""
    check_gemm(gemm)
    check_mode(mode, cfg)
    fuse_producers = mode == "int" and not cfg.dynamic_activations

    def interceptor(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        feeds = getattr(module, "feeds", None)
        if feeds and fuse_producers:
            consumer = lookup(qtree, tuple(module.path[:-1]) + tuple(feeds))
            if isinstance(consumer, QuantizedLinear):
                return next_fun(*args, **kwargs, quant=consumer)
            return next_fun(*args, **kwargs)
        if not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        layer = lookup(qtree, path)
        if layer is None:
            return next_fun(*args, **kwargs)
        if getattr(module, "emits_operands", False) and isinstance(layer, QuantizedLinear) \
                and not cfg.dynamic_activations:
            return integer_operands(args[0], layer)  # the same in both modes: int == fake
        if path in float_backward:
            return qlinear_float_backward(args[0], layer, cfg)
        return qlinear(args[0], layer, cfg, mode, gemm)

    with nn.intercept_methods(interceptor):
        yield


@contextlib.contextmanager
def capture_dense(paths: Collection[tuple[str, ...]] | None = None, *, inputs: dict | None = None,
                  outputs: dict | None = None, called: list | None = None) -> Iterator[None]:
    """Record each ``nn.Dense`` call at ``paths`` (None: every one): its input into ``inputs``
    and its output into ``outputs`` (path -> array), its path into ``called``, those given.
    Installed outside ``intercept_dense``, it sees the quantized layer's output (Flax runs the
    interceptor installed first outermost)."""

    def interceptor(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, nn.Dense):
            path = tuple(module.path)
            if paths is None or path in paths:
                if inputs is not None:
                    inputs[path] = args[0]
                if outputs is not None:
                    outputs[path] = out
                if called is not None:
                    called.append(path)
        return out

    with nn.intercept_methods(interceptor):
        yield


def train_form(layer: QuantizedLinear, kernel: jax.Array) -> TrainLinear:
    """The train form with ``layer``'s state and the float ``kernel`` it was made from: the
    forward calibration optimised, which the integer form reproduces."""
    return TrainLinear(kernel=kernel, smooth=layer.smooth, w_scale=layer.w_scale, a_scale=layer.a_scale,
                       a_zero=layer.a_zero, bias=layer.bias, w_bits=layer.w_bits, a_bits=layer.a_bits)
