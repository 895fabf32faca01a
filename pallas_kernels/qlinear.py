"""The quantized linear's parameters as one pytree type, the layout of its integer weight, and
the integer arithmetic every kernel and reference shares around the GEMM: the activation quantizer
(one rule for XLA and for a kernel's tile) and the zero-point correction.

A :class:`QuantizedLinear` is what calibration produces, the model's interceptor consumes, the
integer GEMMs take and quantized checkpoints store. Its arrays are pytree leaves; the bit widths
are static (they decide the program: code ranges and the weight's storage).

Activation codes. ``q = clip(round((x * (1/smooth)) * (1/a_scale)) + a_zero, 0, 2^a_bits - 1)``
with IEEE f32 reciprocals, written as products: XLA keeps true quotients on the GPU but rewrites
them into reciprocal products on the CPU, so only the explicit form gives one set of codes on
every backend. The GEMMs take them as int8 ``q - c``, ``c = 2^(a_bits-1)``, and restore the zero
point exactly with the weight column sums: ``sum_k (q - z) w = sum_k (q - c) w + (c - z) colsum(w)``.

Weight layout. ``w_int`` holds the smoothed, rounded weight codes, (K, N) int8. For
``w_bits <= 4`` they are stored two per byte, (ceil(K/2), N) int8 (:func:`pack_int4`): row i of
the first half of K in the low nibble and row i + K/2 in the high nibble; an odd K gets a zero
row first. Pairing rows K/2 apart (rather than neighbours) lets a kernel multiply each nibble
plane with a contiguous slice of the activations: no strided loads, no interleaving.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plt

__all__ = [
    "LinearOperands",
    "QuantizedActivation",
    "QuantizedLinear",
    "check_bits",
    "dense_weight",
    "dequantize",
    "epilogue_quantizer",
    "is_packed",
    "pack_int4",
    "pack_weight",
    "quantize_tile",
    "reciprocal",
    "unpack_int4",
    "unpack_weight",
    "weight_colsum",
    "zero_correction",
    "zero_shift",
]


def check_bits(a_bits: int, w_bits: int) -> None:
    """Both widths must be Python ints in 2..8 (int8 codes / int8 or packed int4 storage)."""
    for name, bits in (("a_bits", a_bits), ("w_bits", w_bits)):
        if not isinstance(bits, int) or isinstance(bits, bool):
            raise ValueError(f"{name} must be a Python int in 2..8, got {bits!r}")
    if not 2 <= a_bits <= 8:
        raise ValueError(f"a_bits must be in 2..8 (int8 codes), got {a_bits}")
    if not 2 <= w_bits <= 8:
        raise ValueError(f"w_bits must be in 2..8 (int8 or packed int4 storage), got {w_bits}")


@dataclasses.dataclass(frozen=True)
class QuantizedLinear:
    """One quantized linear ``y = a_scale[l] w_scale[n] sum_k (q[l,k] - a_zero[l]) w_int[k,n] + bias[n]``
    with ``q = clip(round(x / smooth / a_scale) + a_zero, 0, 2^a_bits - 1)``.

    ``w_int`` (K, N) int8 codes, or (ceil(K/2), N) packed when ``w_bits <= 4`` (module doc);
    ``w_scale`` (N,) per output channel; ``smooth`` (K,) the smoothing factors; ``a_scale`` (L,)
    and ``a_zero`` (L,) int32 per token position; ``bias`` (N,) or None.
    """

    w_int: jax.Array
    w_scale: jax.Array
    smooth: jax.Array
    a_scale: jax.Array
    a_zero: jax.Array
    bias: jax.Array | None = None
    w_bits: int = 8
    a_bits: int = 8

    def __post_init__(self) -> None:
        # Only the static fields are checked: jax rebuilds the type with placeholder leaves.
        check_bits(self.a_bits, self.w_bits)

    @property
    def in_features(self) -> int:
        return self.smooth.shape[0]

    @property
    def out_features(self) -> int:
        return self.w_scale.shape[0]


jax.tree_util.register_dataclass(
    QuantizedLinear,
    data_fields=["w_int", "w_scale", "smooth", "a_scale", "a_zero", "bias"],
    meta_fields=["w_bits", "a_bits"],
)


@dataclasses.dataclass(frozen=True)
class QuantizedActivation:
    """An activation its producer already quantized with the consuming linear's input quantizer:
    ``codes`` (B, L, K) int8, ``q - 2^(a_bits-1)`` as ``quantize_activations`` gives them, and
    ``dtype`` the float dtype the activation had (the linear's output dtype). A fused kernel
    returns it instead of floats so that no separate quantize pass reads the activation again."""

    codes: jax.Array
    dtype: jnp.dtype

    def __post_init__(self) -> None:
        if isinstance(self.codes, jax.Array | jax.ShapeDtypeStruct) and self.codes.dtype != jnp.int8:
            raise ValueError(f"QuantizedActivation.codes must be int8, got {self.codes.dtype}")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape


jax.tree_util.register_dataclass(QuantizedActivation, data_fields=["codes"], meta_fields=["dtype"])


@dataclasses.dataclass(frozen=True)
class LinearOperands:
    """A linear layer handed to a kernel that multiplies it on chip instead of its output:
    ``y = ((x @ w) · row_scale[l]) · col_scale + bias``, a None scale or bias left out.

    ``x`` (B, L, K) and ``w`` (K, N) are floats: the input and weight of a float layer, or, for an
    integer layer, the centred activation codes ``q - a_zero`` and the weight codes, with the
    per-token step ``row_scale`` (L,) and the per-channel step ``col_scale`` (N,). Integer sums
    are exact in fp32 while |Σ| < 2^24 (|q - z| <= 255 and |w| <= 128: any K below 514), so a
    kernel that scales in that order gives the integer layer's output to the last bit."""

    x: jax.Array
    w: jax.Array
    row_scale: jax.Array | None = None
    col_scale: jax.Array | None = None
    bias: jax.Array | None = None

    def output(self) -> jax.Array:
        """The layer's output in fp32, by XLA in the kernels' order (exact integer sums first)."""
        y = jnp.einsum("...lk,kn->...ln", self.x.astype(jnp.float32), self.w.astype(jnp.float32),
                       precision=lax.Precision.HIGHEST)
        if self.row_scale is not None:
            y = y * self.row_scale.astype(jnp.float32)[:, None]
        if self.col_scale is not None:
            y = y * self.col_scale.astype(jnp.float32)
        return y if self.bias is None else y + self.bias.astype(jnp.float32)


jax.tree_util.register_dataclass(
    LinearOperands, data_fields=["x", "w", "row_scale", "col_scale", "bias"], meta_fields=[]
)


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


def nibbles(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sign-extended low and high nibbles of an int8 array (arithmetic shifts)."""
    four = jnp.int8(4)
    low = lax.shift_right_arithmetic(lax.shift_left(packed, four), four)
    high = lax.shift_right_arithmetic(packed, four)
    return low, high


def unpack_int4(packed: jax.Array) -> jax.Array:
    """Inverse of :func:`pack_int4`: (K/2, N) int8 -> (K, N) int8."""
    low, high = nibbles(packed.astype(jnp.int8))
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


def pack_weight(w_codes: jax.Array, w_bits: int) -> jax.Array:
    """(K, N) integer codes -> the stored ``w_int`` (packed for ``w_bits <= 4``, odd K padded)."""
    if not is_packed(w_bits):
        return w_codes.astype(jnp.int8)
    if w_codes.shape[0] % 2:
        w_codes = jnp.pad(w_codes, ((0, 1), (0, 0)))
    return pack_int4(w_codes)


def unpack_weight(w_int: jax.Array, w_bits: int, k: int) -> jax.Array:
    """The stored ``w_int`` -> (K, N) int8 codes (the padding row of an odd K dropped)."""
    return dense_weight(w_int, w_bits)[:k]


def reciprocal(v: jax.Array) -> jax.Array:
    """IEEE f32 1/v, computed once per layer; the quantizer multiplies by it (module doc)."""
    return 1.0 / v.astype(jnp.float32)


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


def quantize_tile(x: jax.Array, inv_smooth: jax.Array, inv_scale: jax.Array, zero_f: jax.Array,
                  a_bits: int, exact_ptx: bool) -> jax.Array:
    """Int8 codes ``q - 2^(a_bits-1)`` of activations (module doc), from 1/smooth, 1/a_scale and the
    zero point as f32, each broadcast against ``x``: the one rule of ``quantize_activations``
    (XLA, the whole tensor) and of the kernels that quantize a tile in registers.

    Triton has no ``round`` lowering: inside a compiled Triton kernel (``exact_ptx``) it is PTX
    ``cvt.rni.f32.f32`` (round half to even, one instruction), elsewhere ``jnp.round`` (same rule).
    """
    v = (x.astype(jnp.float32) * inv_smooth) * inv_scale
    r = _ptx("cvt.rni.f32.f32 $0, $1;", v) if exact_ptx else jnp.round(v)
    q = jnp.clip(r + zero_f, 0.0, float(2**a_bits - 1))
    return (q.astype(jnp.int32) - 2 ** (a_bits - 1)).astype(jnp.int8)


def epilogue_quantizer(kernel: str, shape: tuple[int, ...], quant: QuantizedLinear) -> list[jax.Array]:
    """A kernel that writes the consumer's codes from its epilogue: checks that ``quant`` (the
    consuming linear) quantizes (B, L, K) = ``shape`` activations and returns the operands
    :func:`quantize_tile` takes, 1/smooth (K,), 1/a_scale (L,) and the zero point (L,) as f32."""
    if not isinstance(quant, QuantizedLinear):
        raise TypeError(f"{kernel}: quant must be the consuming QuantizedLinear, got {type(quant).__name__}")
    _, seq, k = shape
    if quant.smooth.shape != (k,) or quant.a_scale.shape != (seq,) or quant.a_zero.shape != (seq,):
        raise ValueError(f"{kernel}: quant must quantize (B, L, K) = {tuple(shape)} activations: smooth "
                         f"({k},), a_scale and a_zero ({seq},); got {quant.smooth.shape}, "
                         f"{quant.a_scale.shape}, {quant.a_zero.shape}")
    return [reciprocal(quant.smooth), reciprocal(quant.a_scale), quant.a_zero.astype(jnp.float32)]


def zero_shift(a_zero: jax.Array, a_bits: int) -> jax.Array:
    """``c - a_zero`` as int32, ``c = 2^(a_bits-1)``: what turns a code ``q - c`` into ``q - a_zero``."""
    return 2 ** (a_bits - 1) - a_zero.astype(jnp.int32)


def zero_correction(a_zero: jax.Array, colsum: jax.Array, a_bits: int) -> jax.Array:
    """(L, N) int32 term ``(c - a_zero[l]) colsum[n]`` that turns the accumulator sum_k (q - c) w
    into sum_k (q - a_zero) w (``colsum``: :func:`weight_colsum`)."""
    return zero_shift(a_zero, a_bits)[:, None] * colsum.astype(jnp.int32)[None, :]


def dequantize(acc: jax.Array, layer: QuantizedLinear) -> jax.Array:
    """The layer's f32 output from its int32 accumulator sum_k (q - a_zero) w (L, N):
    ``(acc * a_scale[l]) * w_scale[n] + bias[n]``, in the order the kernels' epilogues take."""
    f32 = jnp.float32
    y = acc.astype(f32) * layer.a_scale.astype(f32)[:, None] * layer.w_scale.astype(f32)
    return y if layer.bias is None else y + layer.bias.astype(jnp.float32)
