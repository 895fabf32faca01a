"""The integer linear of ``pallas_kernels.qmatmul`` with its integer dot run as XLA bf16 dots with
f32 accumulation: plain XLA, no Pallas.

Its one job: ``qmatmul_ref``'s result (the same codes, int32 accumulators and epilogue) on the
bf16 units of any accelerator, for the layers too narrow for an int8 kernel to win. The codes and
weight codes are integers of at most 8 significant bits, exact in bf16, and :func:`bf16_dot_plan`
keeps every f32 partial sum an exact integer, so the sums are exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from pallas_kernels.qlinear import QuantizedLinear, dense_weight, weight_colsum, zero_correction
from pallas_kernels.qmatmul import _check_args, _codes_linear, quantize_activations

__all__ = ["bf16_dot_plan", "qmatmul_bf16_dot", "qmatmul_codes_bf16_dot"]


#: The largest integer up to which every f32 integer is exact: a bf16 dot with f32 accumulation
#: gives exact integer sums while every partial sum stays within it.
_F32_EXACT = 2**24


def bf16_dot_plan(k: int, a_bits: int, w_bits: int) -> tuple[bool, int]:
    """(split, chunk) for :func:`qmatmul_bf16_dot`: whether the weight codes are split into
    two 4-bit planes, and the most K rows one f32-accumulated dot may sum exactly.

    Codes ``q - 2^(a_bits-1)`` lie in [-2^(a_bits-1), 2^(a_bits-1)) and weights in
    [-2^(w_bits-1), 2^(w_bits-1)), so no partial sum of ``chunk`` products exceeds
    ``chunk * 2^(a_bits-1) * max|w|``; that bound is kept <= 2^24. Splitting ``w = 16 hi + lo``
    (``lo`` in [0, 15], ``hi`` in [-8, 8)) lowers ``max|w|`` from 128 to 15 at w_bits = 8: one dot
    of twice the width then covers K <= 8738 (every Vim and VMamba layer) instead of 1024.
    """
    amax, wmax = 2 ** (a_bits - 1), 2 ** (w_bits - 1)
    if k * amax * wmax <= _F32_EXACT or w_bits <= 4:
        return False, _F32_EXACT // (amax * wmax)
    return True, _F32_EXACT // (amax * 15)


def _codes_matmul_bf16(codes, w_q, a_zero, a_bits, w_bits, colsum=None):
    """The int32 accumulator of ``qmatmul_codes_ref``, from bf16 dots with f32 accumulation
    (every code and weight plane is an integer of at most 8 significant bits: exact in bf16)."""
    w = dense_weight(w_q, w_bits)
    k, n = w.shape
    split, chunk = bf16_dot_plan(k, a_bits, w_bits)
    if split:
        planes = (jnp.right_shift(w, 4), jnp.bitwise_and(w, 15))  # w = 16 hi + lo
        w = jnp.concatenate(planes, axis=1)
    w = w.astype(jnp.bfloat16)
    acc = None
    for k0 in range(0, k, chunk):  # one chunk for every Vim / VMamba layer
        part = lax.dot_general(codes[..., k0:k0 + chunk].astype(jnp.bfloat16), w[k0:k0 + chunk],
                               (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        part = part.astype(jnp.int32)
        acc = part if acc is None else acc + part
    if split:
        acc = 16 * acc[..., :n] + acc[..., n:]
    if colsum is None:
        colsum = weight_colsum(w_q, w_bits)
    return acc + zero_correction(a_zero, colsum, a_bits)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def qmatmul_bf16_dot(
    x: jax.Array,
    layer: QuantizedLinear,
    *,
    out_dtype: DTypeLike | None = None,
    colsum: jax.Array | None = None,
) -> jax.Array:
    """:func:`~pallas_kernels.qmatmul.qmatmul_ref`'s integer linear with the integer dot run as an
    XLA bf16 dot with f32 accumulation, on any accelerator's bf16 units (Ampere and Hopper tensor
    cores, the TPU MXU).

    Its int32 accumulators equal ``qmatmul_ref``'s exactly (the codes and weights are exact
    in bf16, and :func:`bf16_dot_plan` keeps every f32 partial sum an exact integer), and so does
    its output, up to the epilogue's FMA contraction on a GPU. It exists for speed
    where an int8 kernel loses: the narrow layers (x_proj: N = 44..80; dt_proj: K = 12..48),
    where XLA can fuse the quantization and the dequantization into its own GEMM.
    """
    _check_args(x, layer)
    return qmatmul_codes_bf16_dot(quantize_activations(x, layer), layer, out_dtype=out_dtype or x.dtype,
                                  colsum=colsum)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def qmatmul_codes_bf16_dot(
    codes: jax.Array,
    layer: QuantizedLinear,
    *,
    out_dtype: DTypeLike = jnp.float32,
    colsum: jax.Array | None = None,
) -> jax.Array:
    """:func:`qmatmul_bf16_dot` on int8 codes from a producer (see
    :func:`~pallas_kernels.qmatmul.qmatmul_codes_ref`)."""
    return _codes_linear(codes, layer, out_dtype, colsum, _codes_matmul_bf16)
