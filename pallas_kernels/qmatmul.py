"""W2..8 A2..8 integer matmul for PTQ4VM linears: Pallas (Triton backend) kernels + jnp references.

Quantization scheme (spec §3, §11.6; see ARCHITECTURE.md): activations per token position, static,
asymmetric, unsigned; weights per output channel, symmetric, already smoothed and rounded.

    q[b,l,k]  = clip(round((x[b,l,k] * (1/smooth[k])) * (1/a_scale[l])) + a_zero[l], 0, 2^a_bits - 1)
    y[b,l,n]  = a_scale[l] * w_scale[n] * sum_k (q[b,l,k] - a_zero[l]) * w_q[k,n] + bias[n]

``round`` is round-half-to-even (``jnp.round``). The division is written as multiplication by
IEEE reciprocals, as the fake-quant quantizers also write it: XLA keeps true quotients on the
GPU but rewrites them into reciprocal products on the CPU, so only the explicit form gives one
set of codes on every backend, and fake-quant, reference and kernel agree bit for bit. The
product runs in int8 with an int32 accumulator: codes ``q - c`` with ``c = 2^(a_bits-1)`` fit
int8, and the zero point is restored exactly with the weight column sums,
``sum_k (q - z) w = sum_k (q - c) w + (c - z) * colsum(w)``.

4-bit weights (``w_bits <= 4``) are stored two per byte in an int8 array of shape (K/2, N):
``packed[i, n] = (w[i, n] & 0xF) | (w[i + K/2, n] << 4)``, i.e. row i of the first half of K
in the low nibble and row i of the second half in the high nibble (see :func:`pack_int4`).
Pairing rows K/2 apart (rather than neighbours) lets the kernel multiply each nibble plane
with a contiguous slice of the activations; no strided loads, no interleaving. Every entry point
also takes the weight unpacked, as (K, N) codes, int8 (any ``w_bits``) or ``jnp.int4``
(``w_bits <= 4``): the shape against x's K tells packed and unpacked apart, and an unpacked
weight runs as int8 (same sums; it only reads twice the weight bytes of the packed form).
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

__all__ = [
    "GemmConfig",
    "check_bits",
    "default_gemm_config",
    "dense_weight",
    "is_packed",
    "pack_int4",
    "unpack_int4",
    "weight_colsum",
    "quantize_activations",
    "quantize_activations_pallas",
    "qmatmul",
    "qmatmul_int32",
    "qmatmul_codes",
    "qmatmul_ref",
    "qmatmul_int32_ref",
    "qmatmul_bf16_dot",
    "bf16_dot_plan",
]


# ----------------------------------------------------------------------------- weights


def pack_int4(w_q: jax.Array) -> jax.Array:
    """(K, N) int values in [-8, 7] -> (K/2, N) int8, two nibbles per byte (rows i and i + K/2)."""
    if w_q.ndim != 2:
        raise ValueError(f"pack_int4 expects a 2-D (K, N) weight, got shape {w_q.shape}")
    k = w_q.shape[0]
    if k % 2:
        raise ValueError(f"pack_int4 needs an even K (got K={k}); pad K with a zero row first")
    if not isinstance(w_q, jax.core.Tracer):
        lo, hi = int(jnp.min(w_q)), int(jnp.max(w_q))
        if lo < -8 or hi > 7:
            raise ValueError(f"pack_int4 values must lie in [-8, 7], got range [{lo}, {hi}]")
    w8 = w_q.astype(jnp.int8)
    low, high = w8[: k // 2], w8[k // 2 :]
    return (low & jnp.int8(0x0F)) | lax.shift_left(high, jnp.int8(4))


def _nibbles(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sign-extended low and high nibbles of an int8 array (arithmetic shifts)."""
    four = jnp.int8(4)
    low = lax.shift_right_arithmetic(lax.shift_left(packed, four), four)
    high = lax.shift_right_arithmetic(packed, four)
    return low, high


def unpack_int4(packed: jax.Array) -> jax.Array:
    """Inverse of :func:`pack_int4`: (K/2, N) int8 -> (K, N) int8."""
    low, high = _nibbles(packed.astype(jnp.int8))
    return jnp.concatenate([low, high], axis=0)


def is_packed(w_bits: int) -> bool:
    """Whether ``w_bits`` weights are stored two per byte (:func:`pack_int4`)."""
    return w_bits <= 4


def dense_weight(w_q: jax.Array, w_bits: int) -> jax.Array:
    """(K, N) int8 codes of a stored weight: unpacked when ``w_bits <= 4`` (a ``jnp.int4`` array
    is already one value per element)."""
    if w_q.dtype == jnp.int4:
        return w_q.astype(jnp.int8)
    return unpack_int4(w_q) if is_packed(w_bits) else w_q


def weight_colsum(w_q: jax.Array, w_bits: int) -> jax.Array:
    """Column sums (N,) int32 of the integer weight; precompute once per layer for inference."""
    return jnp.sum(dense_weight(w_q, w_bits).astype(jnp.int32), axis=0)


# ----------------------------------------------------------------------------- references


def check_bits(a_bits: int, w_bits: int) -> None:
    """Both widths must be Python ints in 2..8 (int8 codes / int8 or packed int4 storage)."""
    for name, bits in (("a_bits", a_bits), ("w_bits", w_bits)):
        if not isinstance(bits, int) or isinstance(bits, bool):
            raise ValueError(f"{name} must be a Python int in 2..8, got {bits!r}")
    if not 2 <= a_bits <= 8:
        raise ValueError(f"a_bits must be in 2..8 (int8 codes), got {a_bits}")
    if not 2 <= w_bits <= 8:
        raise ValueError(f"w_bits must be in 2..8 (int8 or packed int4 storage), got {w_bits}")


def _check_args(x, w_q, smooth, a_scale, a_zero, w_scale, bias, a_bits, w_bits) -> tuple[jax.Array, int]:
    """Shape/dtype validation shared by every entry point (all checks are static). Returns the
    weight as the kernels take it and the width that says how it is stored: packed (K/2, N) int8
    with ``w_bits`` itself, or (K, N) int8 with 8 (from a ``jnp.int4`` or an unpacked int8 weight;
    the sums do not depend on the storage)."""
    check_bits(a_bits, w_bits)
    if x.ndim != 3:
        raise ValueError(f"x must be (B, L, K), got shape {x.shape}")
    k = x.shape[-1]
    if w_q.ndim != 2 or w_q.dtype not in (jnp.int8, jnp.int4):
        raise ValueError(f"w_q must be a 2-D int8 or jnp.int4 array, got {w_q.dtype}{list(w_q.shape)}")
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
        raise ValueError(f"w_q must be (K, N) with K={k} (x's last dim), got {w_q.shape}")
    if storage_bits != 8 and (k % 2 or w_q.shape[0] != k // 2):
        raise ValueError(
            f"w_bits={w_bits} takes the weight as (K, N) = ({k}, N) codes (int8 or jnp.int4) or "
            f"packed by pack_int4 as (K/2, N) (K even), got {w_q.shape}"
        )
    _check_activation_args(x, smooth, a_scale, a_zero)
    n = w_q.shape[1]
    if w_scale is not None and w_scale.shape != (n,):
        raise ValueError(f"w_scale must be (N,) = ({n},), got {w_scale.shape}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be (N,) = ({n},), got {bias.shape}")
    return w_q, storage_bits


def _check_activation_args(x, smooth, a_scale, a_zero) -> None:
    if x.ndim != 3:
        raise ValueError(f"x must be (B, L, K), got shape {x.shape}")
    _, seq, k = x.shape
    if smooth is not None and smooth.shape != (k,):
        raise ValueError(f"smooth must be (K,) = ({k},), got {smooth.shape}")
    if a_scale.shape != (seq,) or a_zero.shape != (seq,):
        raise ValueError(
            f"a_scale and a_zero must be (L,) = ({seq},) (per token position), "
            f"got {a_scale.shape} and {a_zero.shape}"
        )
    if not jnp.issubdtype(a_zero.dtype, jnp.integer):
        raise ValueError(f"a_zero must be an integer array, got {a_zero.dtype}")


def _reciprocal(v: jax.Array) -> jax.Array:
    """IEEE f32 1/v, computed once per layer; the quantizer multiplies by it (see module doc)."""
    return 1.0 / v.astype(jnp.float32)


def quantize_activations(
    x: jax.Array, smooth: jax.Array, a_scale: jax.Array, a_zero: jax.Array, *, a_bits: int = 8
) -> jax.Array:
    """Signed int8 codes ``q - 2^(a_bits-1)`` of (B, L, K) activations (fuses into the producer in XLA)."""
    inv_smooth, inv_scale = _reciprocal(smooth), _reciprocal(a_scale)
    v = x.astype(jnp.float32) * inv_smooth * inv_scale[:, None]
    qmax = 2**a_bits - 1
    q = jnp.clip(jnp.round(v) + a_zero.astype(jnp.float32)[:, None], 0, qmax)
    return (q.astype(jnp.int32) - 2 ** (a_bits - 1)).astype(jnp.int8)


def _zero_correction(a_zero: jax.Array, colsum: jax.Array, a_bits: int) -> jax.Array:
    """(L, N) int32 term (c - z[l]) * colsum[n] that turns sum (q-c)w into sum (q-z)w."""
    shift = (2 ** (a_bits - 1) - a_zero.astype(jnp.int32))[:, None]
    return shift * colsum[None, :]


def _codes_matmul_int32(codes, w_q, a_zero, a_bits, w_bits, colsum=None):
    w = dense_weight(w_q, w_bits)
    k = w.shape[0]
    if k % 16:
        # XLA's GPU int8 GEMM returned wrong int32 sums for K = 3 (vim_micro's dt_proj) on an
        # H200 with jax 0.11.2, while K = 24 was exact. Zero rows of w add nothing, whatever the
        # padded codes are, so the reference pads K to a multiple of 16 on every backend.
        pad = -k % 16
        codes = jnp.pad(codes, ((0, 0), (0, 0), (0, pad)))
        w = jnp.pad(w, ((0, pad), (0, 0)))
    acc = lax.dot_general(codes, w, (((2,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    if colsum is None:
        colsum = weight_colsum(w_q, w_bits)
    return acc + _zero_correction(a_zero, colsum.astype(jnp.int32), a_bits)


def _dequantize(acc, a_scale, w_scale, bias):
    y = acc.astype(jnp.float32) * a_scale.astype(jnp.float32)[:, None] * w_scale.astype(jnp.float32)
    return y if bias is None else y + bias.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("a_bits", "w_bits"))
def qmatmul_int32_ref(
    x: jax.Array,
    w_q: jax.Array,
    smooth: jax.Array,
    a_scale: jax.Array,
    a_zero: jax.Array,
    *,
    a_bits: int = 8,
    w_bits: int = 8,
) -> jax.Array:
    """Exact int32 accumulator sum_k (q - z) w_q (B, L, N): the ground truth for the kernel."""
    w_q, w_bits = _check_args(x, w_q, smooth, a_scale, a_zero, None, None, a_bits, w_bits)
    codes = quantize_activations(x, smooth, a_scale, a_zero, a_bits=a_bits)
    return _codes_matmul_int32(codes, w_q, a_zero, a_bits, w_bits)


@functools.partial(jax.jit, static_argnames=("a_bits", "w_bits", "out_dtype"))
def qmatmul_ref(
    x: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    smooth: jax.Array,
    a_scale: jax.Array,
    a_zero: jax.Array,
    bias: jax.Array | None = None,
    *,
    a_bits: int = 8,
    w_bits: int = 8,
    out_dtype: DTypeLike | None = None,
    colsum: jax.Array | None = None,
) -> jax.Array:
    """Plain-XLA integer linear (quantize -> s8 x s8 -> s32 dot -> dequant); the non-Pallas path.

    ``colsum`` = :func:`weight_colsum` (precompute it once per layer); computed here when not given.
    """
    w_q, w_bits = _check_args(x, w_q, smooth, a_scale, a_zero, w_scale, bias, a_bits, w_bits)
    codes = quantize_activations(x, smooth, a_scale, a_zero, a_bits=a_bits)
    acc = _codes_matmul_int32(codes, w_q, a_zero, a_bits, w_bits, colsum)
    return _dequantize(acc, a_scale, w_scale, bias).astype(out_dtype or x.dtype)


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
    """The int32 accumulator of :func:`_codes_matmul_int32`, from bf16 dots with f32 accumulation
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
    return acc + _zero_correction(a_zero, colsum.astype(jnp.int32), a_bits)


@functools.partial(jax.jit, static_argnames=("a_bits", "w_bits", "out_dtype"))
def qmatmul_bf16_dot(
    x: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    smooth: jax.Array,
    a_scale: jax.Array,
    a_zero: jax.Array,
    bias: jax.Array | None = None,
    *,
    a_bits: int = 8,
    w_bits: int = 8,
    out_dtype: DTypeLike | None = None,
    colsum: jax.Array | None = None,
) -> jax.Array:
    """:func:`qmatmul_ref`'s integer linear with the integer dot run as an XLA bf16 dot with f32
    accumulation, on any accelerator's bf16 units (Ampere and Hopper tensor cores, the TPU MXU).

    Its int32 accumulators equal :func:`qmatmul_ref`'s exactly (the codes and weights are exact
    in bf16, and :func:`bf16_dot_plan` keeps every f32 partial sum an exact integer), and so does
    its output, up to the epilogue's FMA contraction on a GPU. It exists for speed
    where an int8 kernel loses: the narrow layers (x_proj: N = 44..80; dt_proj: K = 12..48),
    where XLA can fuse the quantization and the dequantization into its own GEMM.
    """
    w_q, w_bits = _check_args(x, w_q, smooth, a_scale, a_zero, w_scale, bias, a_bits, w_bits)
    codes = quantize_activations(x, smooth, a_scale, a_zero, a_bits=a_bits)
    acc = _codes_matmul_bf16(codes, w_q, a_zero, a_bits, w_bits, colsum)
    return _dequantize(acc, a_scale, w_scale, bias).astype(out_dtype or x.dtype)


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

    def __post_init__(self):
        for name, least in (("block_m", 16), ("block_n", 16), ("block_k", 32)):
            v = getattr(self, name)
            if v < least or v & (v - 1):
                raise ValueError(f"GemmConfig.{name} must be a power of two >= {least}, got {v}")


def _pow2_at_least(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, math.ceil(math.log2(max(v, 1))))))


def default_gemm_config(m: int, k: int, n: int, w_bits: int = 8) -> GemmConfig:
    """Tiles for an (m, k) x (k, n) problem, from a sweep on an H200 (BENCHMARKS.md).

    128 x 128 x 64 tiles with 4 warps ran the int8 GEMM of Vim-S in_proj at batch 256 in 393 us
    and Vim-B's in 1348 us, against 1164 / 4464 us for the earlier 64 x 256 x 64 / 8 warps:
    wide N tiles were the slowest of the eight tried (256 x 128 / 8 warps was 12-19 % faster
    still, but was measured without the fused prologue's extra registers).
    """
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


def _load(ref, mask, other):
    return ref[...] if mask is None else plt.load(ref, mask=mask, other=other)


def _ptx(asm: str, *args: jax.Array) -> jax.Array:
    """Elementwise f32 PTX instruction (for operations Triton does not lower)."""
    args = jnp.broadcast_arrays(*args)
    constraints = ",".join(["=f"] + ["f"] * len(args))
    (out,) = plt.elementwise_inline_asm(
        asm,
        args=args,
        constraints=constraints,
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.float32)],
    )
    return out


def _quantize_tile(x, inv_smooth, inv_scale, zero_f, a_bits, exact_ptx):
    """Prologue: int8 codes of one (bm, bk) tile, bit-identical to :func:`quantize_activations`.

    Triton has no ``round`` lowering; on the GPU the kernel emits PTX ``cvt.rni.f32.f32``
    (round half to even, one instruction), in interpret mode ``jnp.round`` (same IEEE rule).
    """
    v = (x.astype(jnp.float32) * inv_smooth) * inv_scale
    r = _ptx("cvt.rni.f32.f32 $0, $1;", v) if exact_ptx else jnp.round(v)
    q = jnp.clip(r + zero_f, 0.0, float(2**a_bits - 1))
    return (q.astype(jnp.int32) - 2 ** (a_bits - 1)).astype(jnp.int8)


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
        x = _load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], xm, jnp.zeros((), x_ref.dtype))
        if not fused:
            return x
        inv_smooth = _load(sm_ref.at[pl.ds(k0, bk)], k_ok, jnp.float32(1.0))[None, :]
        return _quantize_tile(x, inv_smooth, inv_scale_col, zero_col, a_bits, exact_ptx)

    def body(step, acc):
        k0 = step * bk
        k_ok = None if kq % bk == 0 else (k0 + lax.broadcasted_iota(jnp.int32, (bk,), 0)) < kq
        w = _load(w_ref.at[pl.ds(k0, bk), pl.ds(col0, bn)], _mask2(k_ok, cols_ok), jnp.int8(0))
        if not packed:
            return acc + jnp.dot(codes_at(k0, k_ok), w, preferred_element_type=jnp.int32)
        w_low, w_high = _nibbles(w)
        acc = acc + jnp.dot(codes_at(k0, k_ok), w_low, preferred_element_type=jnp.int32)
        return acc + jnp.dot(codes_at(kq + k0, k_ok), w_high, preferred_element_type=jnp.int32)

    acc = lax.fori_loop(0, pl.cdiv(kq, bk), body, jnp.zeros((bm, bn), jnp.int32))
    colsum = _load(cs_ref.at[pl.ds(col0, bn)], cols_ok, jnp.int32(0))
    acc = acc + (2 ** (a_bits - 1) - a_zero)[:, None] * colsum[None, :]
    if int_out:
        y = acc
    else:
        w_scale = _load(ws_ref.at[pl.ds(col0, bn)], cols_ok, jnp.float32(0.0))
        y = acc.astype(jnp.float32) * a_scale_col * w_scale[None, :]
        if b_ref is not None:
            y = y + _load(b_ref.at[pl.ds(col0, bn)], cols_ok, jnp.float32(0.0))[None, :]
    out = o_ref.at[pl.ds(row0, bm), pl.ds(col0, bn)]
    mask = _mask2(rows_ok, cols_ok)
    if mask is None:
        out[...] = y.astype(o_ref.dtype)
    else:
        plt.store(out, y.astype(o_ref.dtype), mask=mask)


def _gemm_call(x, smooth, w_q, w_scale, a_scale, a_zero, bias, colsum, *, a_bits, w_bits, out_dtype,
               int_out, interpret, config):
    """Flatten (B, L) into M rows and launch the (N tiles, M tiles) grid."""
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
        operands += [_reciprocal(smooth), _reciprocal(a_scale)]
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


_STATIC = ("a_bits", "w_bits", "out_dtype", "interpret", "config")


@functools.partial(jax.jit, static_argnames=_STATIC)
def qmatmul(
    x: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    smooth: jax.Array,
    a_scale: jax.Array,
    a_zero: jax.Array,
    bias: jax.Array | None = None,
    *,
    a_bits: int = 8,
    w_bits: int = 8,
    out_dtype: DTypeLike | None = None,
    interpret: bool = False,
    config: GemmConfig | None = None,
    colsum: jax.Array | None = None,
) -> jax.Array:
    """Fused quantize -> int8 GEMM (int32 acc) -> dequant + bias, as one Pallas kernel.

    ``x`` (B, L, K) f32/bf16; ``w_q`` (K, N) int8 or ``jnp.int4``, or (K/2, N) packed for
    ``w_bits <= 4``;
    ``w_scale`` (N,); ``smooth`` (K,); ``a_scale`` (L,); ``a_zero`` (L,) int; ``bias`` (N,).
    ``colsum`` (N,) int32 = :func:`weight_colsum`, computed here when not given.
    Output (B, L, N) in ``out_dtype`` (default ``x.dtype``). Matches :func:`qmatmul_ref`.
    """
    w_q, w_bits = _check_args(x, w_q, smooth, a_scale, a_zero, w_scale, bias, a_bits, w_bits)
    return _gemm_call(
        x, smooth, w_q, w_scale, a_scale, a_zero, bias, colsum, a_bits=a_bits, w_bits=w_bits,
        out_dtype=out_dtype or x.dtype, int_out=False, interpret=interpret, config=config,
    )


@functools.partial(jax.jit, static_argnames=("a_bits", "w_bits", "interpret", "config"))
def qmatmul_int32(
    x: jax.Array,
    w_q: jax.Array,
    smooth: jax.Array,
    a_scale: jax.Array,
    a_zero: jax.Array,
    *,
    a_bits: int = 8,
    w_bits: int = 8,
    interpret: bool = False,
    config: GemmConfig | None = None,
) -> jax.Array:
    """The kernel's exact int32 accumulator sum_k (q - z) w_q (B, L, N); compare to qmatmul_int32_ref."""
    w_q, w_bits = _check_args(x, w_q, smooth, a_scale, a_zero, None, None, a_bits, w_bits)
    return _gemm_call(
        x, smooth, w_q, None, a_scale, a_zero, None, None, a_bits=a_bits, w_bits=w_bits,
        out_dtype=None, int_out=True, interpret=interpret, config=config,
    )


@functools.partial(jax.jit, static_argnames=_STATIC)
def qmatmul_codes(
    codes: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    a_scale: jax.Array,
    a_zero: jax.Array,
    bias: jax.Array | None = None,
    *,
    a_bits: int = 8,
    w_bits: int = 8,
    out_dtype: DTypeLike = jnp.float32,
    interpret: bool = False,
    config: GemmConfig | None = None,
    colsum: jax.Array | None = None,
) -> jax.Array:
    """Same GEMM + epilogue on pre-quantized int8 codes from :func:`quantize_activations`.

    The two-pass alternative to :func:`qmatmul`: quantization fused into the producer by XLA,
    each activation quantized once instead of once per N tile. The benchmark decides which wins.
    """
    if codes.dtype != jnp.int8:
        raise ValueError(f"codes must be int8 from quantize_activations, got {codes.dtype}")
    w_q, w_bits = _check_args(codes, w_q, None, a_scale, a_zero, w_scale, bias, a_bits, w_bits)
    return _gemm_call(
        codes, None, w_q, w_scale, a_scale, a_zero, bias, colsum, a_bits=a_bits, w_bits=w_bits,
        out_dtype=out_dtype, int_out=False, interpret=interpret, config=config,
    )


# ----------------------------------------------------------------------------- quantize alone


def _quantize_kernel(x_ref, inv_smooth_ref, inv_scale_ref, zero_ref, o_ref, *, m, k, seq, bm, bk,
                     a_bits, exact_ptx):
    row0, col0 = pl.program_id(0) * bm, pl.program_id(1) * bk
    rows = row0 + lax.broadcasted_iota(jnp.int32, (bm,), 0)
    cols = col0 + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    rows_ok = None if m % bm == 0 else rows < m
    cols_ok = None if k % bk == 0 else cols < k
    tok = rows % seq
    x = _load(x_ref.at[pl.ds(row0, bm), pl.ds(col0, bk)], _mask2(rows_ok, cols_ok),
              jnp.zeros((), x_ref.dtype))
    inv_smooth = _load(inv_smooth_ref.at[pl.ds(col0, bk)], cols_ok, jnp.float32(1.0))[None, :]
    codes = _quantize_tile(x, inv_smooth, inv_scale_ref[tok][:, None],
                           zero_ref[tok].astype(jnp.float32)[:, None], a_bits, exact_ptx)
    out = o_ref.at[pl.ds(row0, bm), pl.ds(col0, bk)]
    mask = _mask2(rows_ok, cols_ok)
    if mask is None:
        out[...] = codes
    else:
        plt.store(out, codes, mask=mask)


@functools.partial(jax.jit, static_argnames=("a_bits", "interpret", "block"))
def quantize_activations_pallas(
    x: jax.Array,
    smooth: jax.Array,
    a_scale: jax.Array,
    a_zero: jax.Array,
    *,
    a_bits: int = 8,
    interpret: bool = False,
    block: tuple[int, int] = (64, 256),
) -> jax.Array:
    """:func:`quantize_activations` as one Triton kernel, bit for bit: for a standalone integer
    linear whose input arrives in HBM, where XLA's elementwise quantize pass ran at about half
    the HBM bandwidth on an H200 (58 µs for Vim-B in_proj's 116 MB at batch 256). Inside a
    model, XLA fuses :func:`quantize_activations` into the producing op instead."""
    check_bits(a_bits, 8)
    _check_activation_args(x, smooth, a_scale, a_zero)
    batch, seq, k = x.shape
    m = batch * seq
    if m * k >= 2**31:
        raise ValueError(f"quantize_activations_pallas: {m} x {k} elements overflow int32 offsets; "
                         "split the batch into chunks")
    bm, bk = block
    kernel = functools.partial(_quantize_kernel, m=m, k=k, seq=seq, bm=bm, bk=bk, a_bits=a_bits,
                               exact_ptx=not interpret)
    codes = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, k), jnp.int8),
        grid=(pl.cdiv(m, bm), pl.cdiv(k, bk)),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="ptq4vm_quantize",
    )(x.reshape(m, k), _reciprocal(smooth), _reciprocal(a_scale), a_zero.astype(jnp.int32))
    return codes.reshape(batch, seq, k)
