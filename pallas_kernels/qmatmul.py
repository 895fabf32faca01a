"""W2..8 A2..8 integer matmul for PTQ4VM linears: Pallas (Triton backend) kernels + jnp references.

Quantization scheme (docs/method.md §3, §11.6; see ARCHITECTURE.md): activations per token position, static,
asymmetric, unsigned; weights per output channel, symmetric, already smoothed and rounded.

    q[b,l,k]  = clip(round((x[b,l,k] * (1/smooth[k])) * (1/a_scale[l])) + a_zero[l], 0, 2^a_bits - 1)
    y[b,l,n]  = a_scale[l] * w_scale[n] * sum_k (q[b,l,k] - a_zero[l]) * w_q[k,n] + bias[n]

``round`` is round-half-to-even. The division is written as multiplication by IEEE reciprocals,
as the fake-quant quantizers also write it, so fake-quant, reference and kernel agree bit for
bit. The product runs in int8 with an int32 accumulator on codes ``q - c``, ``c = 2^(a_bits-1)``,
the zero point restored with the weight column sums. Both rules live in ``pallas_kernels.qlinear``
(read its module doc): ``quantize_tile``, ``zero_correction``, ``dequantize``.

Every entry point takes the layer as a :class:`~pallas_kernels.qlinear.QuantizedLinear`.
Its 4-bit weights (``w_bits <= 4``) come packed two per byte (see ``pallas_kernels.qlinear``)
or unpacked, as (K, N) codes, int8 (any ``w_bits``) or ``jnp.int4`` (``w_bits <= 4``): the shape
against x's K tells packed and unpacked apart, and an unpacked weight runs as int8 (same sums;
it only reads twice the weight bytes of the packed form).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from jax.typing import DTypeLike

from pallas_kernels.qlinear import (
    QuantizedLinear,
    dense_weight,
    dequantize,
    is_packed,
    nibbles,
    quantize_tile,
    reciprocal,
    weight_colsum,
    zero_correction,
)
from pallas_kernels.token_loop import masked_load

__all__ = [
    "GemmConfig",
    "default_gemm_config",
    "qmatmul",
    "qmatmul_codes",
    "qmatmul_codes_ref",
    "qmatmul_int32",
    "qmatmul_int32_ref",
    "qmatmul_ref",
    "quantize_activations",
]


# ----------------------------------------------------------------------------- references


def _check_args(x: jax.Array, layer: QuantizedLinear, *, codes: bool = False) -> tuple[jax.Array, int]:
    """Shape/dtype validation shared by every entry point (all checks are static). Returns the
    weight as the kernels take it and the width that says how it is stored: packed (K/2, N) int8
    with ``w_bits`` itself, or (K, N) int8 with 8 (from a ``jnp.int4`` or an unpacked int8 weight;
    the sums do not depend on the storage). ``codes``: x holds int8 codes (no smoothing applies)."""
    if not isinstance(layer, QuantizedLinear):
        raise TypeError(f"layer must be a pallas_kernels.QuantizedLinear, got {type(layer).__name__}")
    w_q, w_bits = layer.w_int, layer.w_bits
    if x.ndim != 3:
        raise ValueError(f"x must be (B, L, K), got shape {x.shape}")
    _, seq, k = x.shape
    if w_q.ndim != 2 or w_q.dtype not in (jnp.int8, jnp.int4):
        raise ValueError(f"w_int must be a 2-D int8 or jnp.int4 array, got {w_q.dtype}{list(w_q.shape)}")
    if w_q.dtype == jnp.int4:
        if w_bits > 4:
            raise ValueError(f"a jnp.int4 weight holds at most 4-bit codes, but w_bits={w_bits}; "
                             "pass int8 codes for wider weights")
        w_q, storage_bits = w_q.astype(jnp.int8), 8
    elif is_packed(w_bits) and w_q.shape[0] != k:
        storage_bits = w_bits
    else:
        storage_bits = 8
    if storage_bits == 8 and w_q.shape[0] != k:
        raise ValueError(f"w_int must be (K, N) with K={k} (x's last dim), got {w_q.shape}")
    if storage_bits != 8 and (k % 2 or w_q.shape[0] != k // 2):
        raise ValueError(
            f"w_bits={w_bits} takes the weight as (K, N) = ({k}, N) codes (int8 or jnp.int4) or "
            f"packed by pack_int4 as (K/2, N) (K even), got {w_q.shape}"
        )
    if not codes and layer.smooth.shape != (k,):
        raise ValueError(f"smooth must be (K,) = ({k},), got {layer.smooth.shape}")
    if layer.a_scale.shape != (seq,) or layer.a_zero.shape != (seq,):
        raise ValueError(
            f"a_scale and a_zero must be (L,) = ({seq},) (per token position), "
            f"got {layer.a_scale.shape} and {layer.a_zero.shape}"
        )
    if not jnp.issubdtype(layer.a_zero.dtype, jnp.integer):
        raise ValueError(f"a_zero must be an integer array, got {layer.a_zero.dtype}")
    n = w_q.shape[1]
    if layer.w_scale.shape != (n,):
        raise ValueError(f"w_scale must be (N,) = ({n},), got {layer.w_scale.shape}")
    if layer.bias is not None and layer.bias.shape != (n,):
        raise ValueError(f"bias must be (N,) = ({n},), got {layer.bias.shape}")
    return w_q, storage_bits


def quantize_activations(x: jax.Array, layer: QuantizedLinear) -> jax.Array:
    """Signed int8 codes ``q - 2^(a_bits-1)`` of (B, L, K) activations (fuses into the producer in XLA)."""
    return quantize_tile(x, reciprocal(layer.smooth), reciprocal(layer.a_scale)[:, None],
                         layer.a_zero.astype(jnp.float32)[:, None], layer.a_bits, exact_ptx=False)


def _codes_matmul_int32(codes, w_q, a_zero, a_bits, w_bits, colsum=None):
    w = dense_weight(w_q, w_bits)
    k = w.shape[0]
    if k % 16:
        # XLA's GPU int8 GEMM has returned wrong int32 sums for a K that is not a multiple of 16
        # (BENCHMARKS.md). Zero rows of w add nothing, whatever the padded codes are, so the
        # reference pads K to a multiple of 16 on every backend.
        pad = -k % 16
        codes = jnp.pad(codes, ((0, 0), (0, 0), (0, pad)))
        w = jnp.pad(w, ((0, pad), (0, 0)))
    acc = lax.dot_general(codes, w, (((2,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    if colsum is None:
        colsum = weight_colsum(w_q, w_bits)
    return acc + zero_correction(a_zero, colsum, a_bits)


@jax.jit
def qmatmul_int32_ref(x: jax.Array, layer: QuantizedLinear) -> jax.Array:
    """Exact int32 accumulator sum_k (q - z) w_q (B, L, N): the ground truth for the kernel.

    The exactness oracle of the tests and ``experiments/bench_gemm.py``; no dispatcher selects it."""
    w_q, w_bits = _check_args(x, layer)
    codes = quantize_activations(x, layer)
    return _codes_matmul_int32(codes, w_q, layer.a_zero, layer.a_bits, w_bits)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def qmatmul_ref(
    x: jax.Array,
    layer: QuantizedLinear,
    *,
    out_dtype: DTypeLike | None = None,
    colsum: jax.Array | None = None,
) -> jax.Array:
    """Plain-XLA integer linear (quantize -> s8 x s8 -> s32 dot -> dequant); the non-Pallas path.

    ``colsum`` = :func:`weight_colsum` (precompute it once per layer); computed here when not given.
    """
    _check_args(x, layer)
    return qmatmul_codes_ref(quantize_activations(x, layer), layer, out_dtype=out_dtype or x.dtype,
                             colsum=colsum)


def _check_codes(codes: jax.Array, layer: QuantizedLinear) -> tuple[jax.Array, int]:
    if codes.dtype != jnp.int8:
        raise ValueError(f"codes must be int8 from quantize_activations, got {codes.dtype}")
    return _check_args(codes, layer, codes=True)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def qmatmul_codes_ref(
    codes: jax.Array,
    layer: QuantizedLinear,
    *,
    out_dtype: DTypeLike = jnp.float32,
    colsum: jax.Array | None = None,
) -> jax.Array:
    """:func:`qmatmul_ref` on int8 codes ``q - 2^(a_bits-1)`` that a producer already quantized
    with the layer's input quantizer (``quantize_activations``' contract; ``smooth`` not read)."""
    return _codes_linear(codes, layer, out_dtype, colsum, _codes_matmul_int32)


def _codes_linear(codes, layer, out_dtype, colsum, matmul):
    """The integer linear on producer codes with the int32 accumulator of ``matmul``."""
    w_q, w_bits = _check_codes(codes, layer)
    acc = matmul(codes, w_q, layer.a_zero, layer.a_bits, w_bits, colsum)
    return dequantize(acc, layer).astype(out_dtype)


# ----------------------------------------------------------------------------- kernel


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Triton tile sizes and launch parameters.

    Tiles are powers of two (Triton's tensor sizes); ``block_m, block_n >= 16`` and
    ``block_k >= 32`` because int8 MMA instructions consume K in steps of 32.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name, least in (("block_m", 16), ("block_n", 16), ("block_k", 32)):
            v = getattr(self, name)
            if v < least or v & (v - 1):
                raise ValueError(f"GemmConfig.{name} must be a power of two >= {least}, got {v}")


def _pow2_at_least(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, math.ceil(math.log2(max(v, 1))))))


def default_gemm_config(m: int, k: int, n: int, w_bits: int = 8) -> GemmConfig:
    """Tiles for an (m, k) x (k, n) problem: 128 x 128 x 64 with 4 warps, smaller where the
    problem is: the tile sweep's choice (BENCHMARKS.md)."""
    k_eff = k // 2 if is_packed(w_bits) else k
    block_n = _pow2_at_least(n, 16, 128)
    block_m = _pow2_at_least(m, 16, 128)
    block_k = _pow2_at_least(k_eff, 32, 64)
    return GemmConfig(block_m, block_n, block_k, 4, 3)


def _mask2(rows_ok, cols_ok):
    """Combine optional 1-D masks into a 2-D one; None means statically all-true."""
    if rows_ok is None and cols_ok is None:
        return None
    if rows_ok is None:
        return cols_ok[None, :]
    if cols_ok is None:
        return rows_ok[:, None]
    return rows_ok[:, None] & cols_ok[None, :]


def _gemm_kernel(*refs, m, seq, kq, n, packed, fused, has_bias, int_out, a_bits, cfg, exact_ptx):
    # Operand order of _gemm_call: x, w, a_scale, a_zero, colsum, then the optional ones.
    x_ref, w_ref, as_ref, az_ref, cs_ref, *refs = refs
    sm_ref, inv_as_ref = (refs.pop(0), refs.pop(0)) if fused else (None, None)  # 1/smooth, 1/a_scale
    ws_ref = None if int_out else refs.pop(0)
    b_ref = refs.pop(0) if has_bias and not int_out else None
    (o_ref,) = refs

    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    row0 = pl.program_id(1) * bm
    col0 = pl.program_id(0) * bn
    rows = row0 + lax.broadcasted_iota(jnp.int32, (bm,), 0)
    cols = col0 + lax.broadcasted_iota(jnp.int32, (bn,), 0)
    rows_ok = None if m % bm == 0 else rows < m
    cols_ok = None if n % bn == 0 else cols < n
    tok = rows % seq  # token position of each flattened (b, l) row
    a_scale = as_ref[tok]
    a_zero = az_ref[tok]
    a_scale_col = a_scale[:, None]
    inv_scale_col = inv_as_ref[tok][:, None] if fused else None
    zero_col = a_zero.astype(jnp.float32)[:, None]

    def codes_at(k0, k_ok):
        """Int8 codes of x[rows, k0:k0+bk] (masked K columns give code of 0 -> times w=0)."""
        xm = _mask2(rows_ok, k_ok)
        x = masked_load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], xm, jnp.zeros((), x_ref.dtype))
        if not fused:
            return x
        inv_smooth = masked_load(sm_ref.at[pl.ds(k0, bk)], k_ok, jnp.float32(1.0))[None, :]
        return quantize_tile(x, inv_smooth, inv_scale_col, zero_col, a_bits, exact_ptx)

    def body(step, acc):
        k0 = step * bk
        k_ok = None if kq % bk == 0 else (k0 + lax.broadcasted_iota(jnp.int32, (bk,), 0)) < kq
        w = masked_load(w_ref.at[pl.ds(k0, bk), pl.ds(col0, bn)], _mask2(k_ok, cols_ok), jnp.int8(0))
        if not packed:
            return acc + jnp.dot(codes_at(k0, k_ok), w, preferred_element_type=jnp.int32)
        w_low, w_high = nibbles(w)
        acc = acc + jnp.dot(codes_at(k0, k_ok), w_low, preferred_element_type=jnp.int32)
        return acc + jnp.dot(codes_at(kq + k0, k_ok), w_high, preferred_element_type=jnp.int32)

    acc = lax.fori_loop(0, pl.cdiv(kq, bk), body, jnp.zeros((bm, bn), jnp.int32))
    colsum = masked_load(cs_ref.at[pl.ds(col0, bn)], cols_ok, jnp.int32(0))
    acc = acc + zero_correction(a_zero, colsum, a_bits)
    if int_out:
        y = acc
    else:
        w_scale = masked_load(ws_ref.at[pl.ds(col0, bn)], cols_ok, jnp.float32(0.0))
        y = acc.astype(jnp.float32) * a_scale_col * w_scale[None, :]
        if b_ref is not None:
            y = y + masked_load(b_ref.at[pl.ds(col0, bn)], cols_ok, jnp.float32(0.0))[None, :]
    out = o_ref.at[pl.ds(row0, bm), pl.ds(col0, bn)]
    mask = _mask2(rows_ok, cols_ok)
    if mask is None:
        out[...] = y.astype(o_ref.dtype)
    else:
        plt.store(out, y.astype(o_ref.dtype), mask=mask)


def _gemm_call(x, smooth, w_q, w_bits, layer, colsum, *, out_dtype, int_out, interpret, config):
    """Flatten (B, L) into M rows and launch the (N tiles, M tiles) grid. ``smooth`` None: x holds
    codes already; ``w_q``/``w_bits``: the weight as :func:`_check_args` returns it."""
    a_scale, a_zero, w_scale, bias, a_bits = (layer.a_scale, layer.a_zero, layer.w_scale, layer.bias,
                                              layer.a_bits)
    batch, seq, k = x.shape
    n = w_q.shape[1]
    m = batch * seq
    packed = is_packed(w_bits)
    kq = k // 2 if packed else k
    if max(m * k, m * n) >= 2**31:
        raise ValueError(
            f"qmatmul: {m} rows x max(K={k}, N={n}) elements overflow the kernel's int32 offsets; "
            "split the batch into chunks"
        )
    cfg = config or default_gemm_config(m, k, n, w_bits)
    fused = smooth is not None
    if colsum is None:
        colsum = weight_colsum(w_q, w_bits)
    operands = [x.reshape(m, k), w_q, a_scale.astype(jnp.float32), a_zero.astype(jnp.int32),
                colsum.astype(jnp.int32)]
    if fused:
        operands += [reciprocal(smooth), reciprocal(a_scale)]
    if not int_out:
        operands.append(w_scale.astype(jnp.float32))
        if bias is not None:
            operands.append(bias.astype(jnp.float32))
    kernel = functools.partial(
        _gemm_kernel, m=m, seq=seq, kq=kq, n=n, packed=packed, fused=fused,
        has_bias=bias is not None, int_out=int_out, a_bits=a_bits, cfg=cfg, exact_ptx=not interpret,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), jnp.int32 if int_out else out_dtype),
        grid=(pl.cdiv(n, cfg.block_n), pl.cdiv(m, cfg.block_m)),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="ptq4vm_qmatmul",
    )(*operands)
    return out.reshape(batch, seq, n)


_STATIC = ("out_dtype", "interpret", "config")


@functools.partial(jax.jit, static_argnames=_STATIC)
def qmatmul(
    x: jax.Array,
    layer: QuantizedLinear,
    *,
    out_dtype: DTypeLike | None = None,
    interpret: bool = False,
    config: GemmConfig | None = None,
    colsum: jax.Array | None = None,
) -> jax.Array:
    """Fused quantize -> int8 GEMM (int32 acc) -> dequant + bias, as one Pallas kernel.

    ``x`` (B, L, K) f32/bf16; ``layer`` the quantized linear (its ``w_int`` (K, N) int8 or
    ``jnp.int4``, or (K/2, N) packed for ``w_bits <= 4``). ``colsum`` (N,) int32 =
    :func:`weight_colsum`, computed here when not given. Output (B, L, N) in ``out_dtype``
    (default ``x.dtype``). Matches :func:`qmatmul_ref`.
    """
    w_q, w_bits = _check_args(x, layer)
    return _gemm_call(x, layer.smooth, w_q, w_bits, layer, colsum, out_dtype=out_dtype or x.dtype,
                      int_out=False, interpret=interpret, config=config)


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def qmatmul_int32(
    x: jax.Array,
    layer: QuantizedLinear,
    *,
    interpret: bool = False,
    config: GemmConfig | None = None,
) -> jax.Array:
    """The kernel's exact int32 accumulator sum_k (q - z) w_q (B, L, N); compare to qmatmul_int32_ref.

    What the tests and ``experiments/bench_gemm.py`` check exactness with; no dispatcher selects it."""
    w_q, w_bits = _check_args(x, layer)
    return _gemm_call(x, layer.smooth, w_q, w_bits, layer, None, out_dtype=None, int_out=True,
                      interpret=interpret, config=config)


@functools.partial(jax.jit, static_argnames=_STATIC)
def qmatmul_codes(
    codes: jax.Array,
    layer: QuantizedLinear,
    *,
    out_dtype: DTypeLike = jnp.float32,
    interpret: bool = False,
    config: GemmConfig | None = None,
    colsum: jax.Array | None = None,
) -> jax.Array:
    """Same GEMM + epilogue on pre-quantized int8 codes from :func:`quantize_activations` (the
    layer's ``smooth`` is not read).

    The two-pass alternative to :func:`qmatmul`: quantization fused into the producer by XLA,
    each activation quantized once instead of once per N tile.
    """
    w_q, w_bits = _check_codes(codes, layer)
    return _gemm_call(codes, None, w_q, w_bits, layer, colsum, out_dtype=out_dtype, int_out=False,
                      interpret=interpret, config=config)
