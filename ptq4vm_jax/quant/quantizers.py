"""Pure fake-quantizers of PTQ4VM and the weights' integer form (docs/method.md §3, §11.2); the
activations' integer codes are ``pallas_kernels.qmatmul.quantize_activations``.

Layouts: ``kernel`` is Flax (in, out); ``smooth`` σ is (in,); ``w_scale`` is (out,);
activations are (..., L, C) with the token axis at -2, ``a_scale`` (L,) float32 and
``a_zero`` (L,) int32. All arithmetic is float32.

Gradients reproduce the official torch code, which clips the *unrounded* value with
``hardtanh`` and then rounds straight-through: the clip gradient is 1 strictly inside the
range and 0 on or beyond its ends. Values are computed as round-then-clip, which is equal
for integer clip bounds and makes the integer forms bit-identical to the fake ones.

Weight divisions are true IEEE divisions (``div_exact``), so weight steps and their
gradients match torch bit for bit. Activations are multiplied by the IEEE reciprocals 1/σ and
1/s, written out, as the integer kernels do: XLA keeps true quotients on the GPU but turns them
into reciprocal products on the CPU, so only the explicit form quantizes the same everywhere
(``pallas_kernels/README.md``). It is an ulp away from torch's quotients, which shows only at
exact rounding ties.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

EPS = 1e-8  # floor of every step size, as in the official code

#: A bit width: a Python int in 2..8, or, inside a compiled program, that int traced. The fake
#: quantizers and the grid searches take it as a value, so one program serves every width; the
#: integer forms take it static (it decides their codes' range and storage).
Bits = int | jax.Array

_jit_bits = functools.partial(jax.jit, static_argnames=("bits",))


def _check_bits(bits: Bits) -> None:
    if isinstance(bits, jax.core.Tracer):  # checked where it was still a Python int
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be a Python int in 2..8, got {bits!r}")


def _jit_traced_bits(fn: Callable) -> Callable:
    """``jax.jit(fn)`` with its ``bits`` argument traced, checked first where it is a Python value."""
    jitted, signature = jax.jit(fn), inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        _check_bits(signature.bind(*args, **kwargs).arguments["bits"])
        return jitted(*args, **kwargs)

    return call


def weight_qmax(bits: Bits) -> int | jax.Array:
    """Symmetric signed grid [-qmax, qmax]; -2^(b-1) is never used (official ``n_lv//2 - 1``).
    An int, or for traced ``bits`` the same value as a float32 array."""
    _check_bits(bits)
    if isinstance(bits, jax.core.Tracer):
        return (jnp.left_shift(1, bits - 1) - 1).astype(jnp.float32)
    return 2 ** (bits - 1) - 1


def act_qmax(bits: Bits) -> int | jax.Array:
    """Unsigned asymmetric grid [0, qmax]: an int, or a float32 array for traced ``bits``."""
    _check_bits(bits)
    if isinstance(bits, jax.core.Tracer):
        return (jnp.left_shift(1, bits) - 1).astype(jnp.float32)
    return 2**bits - 1


def round_ste(x: jax.Array) -> jax.Array:
    """Round half to even with an identity gradient (official ``RoundQuant``)."""
    return x + lax.stop_gradient(jnp.round(x) - x)


def _clipped_round_ste(v: jax.Array, lo: jax.Array | float, hi: jax.Array | float) -> jax.Array:
    """clip(round(v), lo, hi) for integer-valued lo <= hi; gradient 1 only where lo < v < hi.

    This is torch's ``RoundQuant(hardtanh(v, lo, hi))``: clipping before or after the round
    gives the same value when the bounds are integers, but the gradient must follow the
    unrounded v, so a v in (hi, hi + 0.5) counts as clipped.
    """
    inside = (v > lo) & (v < hi)
    clipped = lax.stop_gradient(jnp.clip(jnp.round(v), lo, hi))
    return jnp.where(inside, round_ste(v), clipped)


def div_exact(a: jax.Array, b: jax.Array | float) -> jax.Array:
    """a / b with a true IEEE division, as torch computes it.

    XLA rewrites ``a / broadcast(b)`` into ``a * broadcast(1/b)``, which can be an ulp off.
    That matters for weights: once the grid search picks the full range, the channel's
    largest weight lands exactly on ±qmax in torch (clipped: d/ds_w = ±qmax), but an ulp
    inside with the reciprocal (d/ds_w ≈ 0). Materialising the divisor behind a barrier
    keeps the division; use it only where ``a`` is small (weights, per-token vectors).
    """
    a = jnp.asarray(a)
    return a / lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape))


def _as_f32(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def check_weight_shapes(kernel: jax.Array, smooth: jax.Array, w_scale: jax.Array | None) -> None:
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be a Flax (in, out) matrix, got shape {kernel.shape}")
    if smooth.shape != (kernel.shape[0],):
        raise ValueError(
            f"smooth must have shape (in,) = ({kernel.shape[0]},) for kernel {kernel.shape}, "
            f"got {smooth.shape}"
        )
    if w_scale is not None and w_scale.shape != (kernel.shape[1],):
        raise ValueError(
            f"w_scale must have shape (out,) = ({kernel.shape[1]},) for kernel {kernel.shape}, "
            f"got {w_scale.shape}"
        )


def check_act_shapes(
    x: jax.Array, smooth: jax.Array, a_scale: jax.Array | None = None, a_zero: jax.Array | None = None
) -> None:
    if x.ndim < 2:
        raise ValueError(f"activations must be (..., L, C) with tokens on axis -2, got shape {x.shape}")
    if smooth.shape != (x.shape[-1],):
        raise ValueError(
            f"smooth must have shape (C,) = ({x.shape[-1]},) for x {x.shape}, got {smooth.shape}"
        )
    if a_scale is None:
        return
    if a_scale.ndim != 1 or a_zero is None or a_zero.shape != a_scale.shape:
        raise ValueError(
            f"a_scale and a_zero must both be (L,), got {a_scale.shape} and "
            f"{None if a_zero is None else a_zero.shape}"
        )
    if x.shape[-2] != a_scale.shape[0]:
        raise ValueError(
            f"per-token activation scales were calibrated for {a_scale.shape[0]} tokens but the input "
            f"has {x.shape[-2]} tokens (axis -2 of shape {x.shape}). Per-token static scales are "
            "indexed by token position: run at the calibration image size, or recalibrate."
        )


@_jit_traced_bits
def fake_quant_weight(kernel: jax.Array, smooth: jax.Array, w_scale: jax.Array, bits: Bits) -> jax.Array:
    """Ŵ = s_w · clip(round(kernel·σ / s_w), ±qmax): smoothed, per output channel, symmetric.

    d/ds_w is round(v) - v inside the range and ±qmax when clipped (LSQ without its gradient
    scale, as the official code never applies ``GradientScale``).
    """
    qmax = weight_qmax(bits)
    kernel, smooth, w_scale = _as_f32(kernel, smooth, w_scale)
    check_weight_shapes(kernel, smooth, w_scale)
    v = div_exact(kernel * smooth[:, None], w_scale)
    return w_scale * _clipped_round_ste(v, -qmax, qmax)


@_jit_bits
def quantize_weight_int(kernel: jax.Array, smooth: jax.Array, w_scale: jax.Array, bits: int) -> jax.Array:
    """int8 codes with ``w_scale * codes == fake_quant_weight(...)`` bit for bit."""
    qmax = weight_qmax(bits)
    kernel, smooth, w_scale = _as_f32(kernel, smooth, w_scale)
    check_weight_shapes(kernel, smooth, w_scale)
    v = div_exact(kernel * smooth[:, None], w_scale)
    return jnp.clip(jnp.round(v), -qmax, qmax).astype(jnp.int8)


def _fake_quant_asym(xt: jax.Array, s: jax.Array, z: jax.Array, qmax: int | jax.Array) -> jax.Array:
    """s · (clip(round(xt/s) + z, 0, qmax) − z), written in shifted form clip(round(v), −z, qmax−z)."""
    return s * _clipped_round_ste(xt * (1.0 / s), -z, qmax - z)


@_jit_traced_bits
def fake_quant_act(
    x: jax.Array, smooth: jax.Array, a_scale: jax.Array, a_zero: jax.Array, bits: Bits
) -> jax.Array:
    """PTS: x̂ = s·(clip(round(x/σ/s) + z, 0, qmax) − z) with (s, z) per token position (axis -2).

    The divisions are written as products with the reciprocals 1/σ and 1/s, bit for bit what
    the integer kernels compute, so fake-quant and integer inference pick the same codes.

    Gradients as the official torch code: wrt s, round(v) − v inside, qmax − z above, −z below;
    wrt x, 1/σ strictly inside the range and 0 outside. z is a constant.
    """
    qmax = act_qmax(bits)
    x, smooth, a_scale = _as_f32(x, smooth, a_scale)
    a_zero = jnp.asarray(a_zero)
    check_act_shapes(x, smooth, a_scale, a_zero)
    s = a_scale[:, None]
    z = lax.stop_gradient(a_zero.astype(jnp.float32))[:, None]
    return _fake_quant_asym(x * (1.0 / smooth), s, z, qmax)


def asym_scale_zero(lo: jax.Array, hi: jax.Array, qmax: int | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Step and zero point of a range forced to contain 0, so z is a valid code (official final step)."""
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    s = jnp.maximum((hi - lo) / qmax, EPS)
    z = jnp.clip(-jnp.round(lo / s), 0, qmax)
    return s, z.astype(jnp.int32)


@_jit_traced_bits
def fake_quant_act_dynamic(x: jax.Array, smooth: jax.Array, bits: Bits) -> jax.Array:
    """Baseline: asymmetric min-max per (batch, token) row, measured at run time.

    The statistics are treated as constants (no gradient through min/max), so x gets the
    straight-through gradient 1/σ inside the range.
    """
    qmax = act_qmax(bits)
    x, smooth = _as_f32(x, smooth)
    check_act_shapes(x, smooth)
    xt = x * (1.0 / smooth)
    stats = lax.stop_gradient(xt)
    s, z = asym_scale_zero(stats.min(axis=-1, keepdims=True), stats.max(axis=-1, keepdims=True), qmax)
    return _fake_quant_asym(xt, s, z.astype(jnp.float32), qmax)
