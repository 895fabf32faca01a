"""Integer inference of a quantized linear, and the stored integer weight layout.

``w_int`` holds the smoothed, rounded weight codes. For ``w_bits <= 4`` they are packed two per
byte as ``pallas_kernels.pack_int4`` defines (rows i and i + K/2 share a byte; an odd K gets a
zero row first), so memory and checkpoints hold 4-bit weights at half the int8 size.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from pallas_kernels.qmatmul import pack_int4, qmatmul, qmatmul_ref, unpack_int4
from ptq4vm_jax.quant.config import QuantConfig


def packs(w_bits: int) -> bool:
    return w_bits <= 4


def store_weight(w_codes: jax.Array, w_bits: int) -> jax.Array:
    """(K, N) int8 codes -> the stored ``w_int``."""
    if not packs(w_bits):
        return w_codes.astype(jnp.int8)
    if w_codes.shape[0] % 2:
        w_codes = jnp.pad(w_codes, ((0, 1), (0, 0)))
    return pack_int4(w_codes)


def weight_codes(w_int: jax.Array, w_bits: int, k: int) -> jax.Array:
    """The stored ``w_int`` -> (K, N) int8 codes."""
    return unpack_int4(w_int)[:k] if packs(w_bits) else w_int


def use_pallas() -> bool:
    return jax.default_backend() == "gpu"


def int_linear(x: jax.Array, layer: Mapping[str, jax.Array], cfg: QuantConfig) -> jax.Array:
    """Integer-arithmetic linear: the fused Pallas kernel on GPU, integer-exact XLA elsewhere."""
    smooth = layer["smooth"]
    if packs(cfg.w_bits) and smooth.shape[0] % 2:
        # The packed weight carries one zero row: a zero input column quantizes to the zero point
        # and adds nothing.
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, 1)])
        smooth = jnp.pad(smooth, (0, 1), constant_values=1.0)
    fn = qmatmul if use_pallas() else qmatmul_ref
    return fn(x, layer["w_int"], layer["w_scale"], smooth, layer["a_scale"], layer["a_zero"],
              layer.get("bias"), a_bits=cfg.a_bits, w_bits=cfg.w_bits, out_dtype=x.dtype)
