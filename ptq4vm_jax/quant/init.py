"""Initial σ and step sizes of PTQ4VM (docs/method.md §4.2, §5), plus the min-max baselines.

The grid searches loop over candidates with ``lax.fori_loop`` under ``jit`` so that only
the smoothed input is held in memory, never one copy per candidate. Ties keep the earlier
candidate (the official strict ``<``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ptq4vm_jax.quant.config import ACT_GRIDS
from ptq4vm_jax.quant.quantizers import (
    EPS,
    Bits,
    act_qmax,
    asym_scale_zero,
    check_act_shapes,
    check_weight_shapes,
    div_exact,
    weight_qmax,
)


def smoothing_scale(act_absmax: jax.Array, kernel: jax.Array, alpha: float | jax.Array) -> jax.Array:
    """SmoothQuant σ_j = max(max(a_j, 1e-3)^α / max(max_k |W_jk|, 1e-5)^(1−α), 1e-5).

    ``act_absmax`` (in,) is the calibration max |x_j| per input channel; the weight max runs
    over the out axis of the Flax (in, out) kernel.
    """
    act_absmax = jnp.asarray(act_absmax, jnp.float32)
    kernel = jnp.asarray(kernel, jnp.float32)
    check_weight_shapes(kernel, act_absmax, None)
    if not isinstance(alpha, jax.core.Tracer) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (0.5 for Vim, 0.65 for VMamba), got {alpha}")
    act = jnp.maximum(act_absmax, 1e-3) ** alpha
    w = jnp.maximum(jnp.abs(kernel).max(axis=1), 1e-5) ** (1.0 - alpha)
    return jnp.maximum(act / w, 1e-5)


def _abs_pow(e: jax.Array, p: jax.Array) -> jax.Array:
    """|e|^p for p > 0 as exp(p·log|e|) (0 at e = 0): XLA's CPU ``pow`` is slower than ``exp``
    and ``log`` together, and the grid searches evaluate it once per element and
    candidate. The two differ by float32 ulps."""
    return jnp.exp(p * jnp.log(jnp.abs(e)))


def _check_p(p: float | jax.Array) -> None:
    if not isinstance(p, jax.core.Tracer) and not p > 0:
        raise ValueError(f"p (the exponent of the L_p score) must be > 0, got {p!r}")


def _check_grid(n_grid: int) -> None:
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive int, got {n_grid!r}")


@functools.partial(jax.jit, static_argnames=("n_grid",))
def _weight_grid(w: jax.Array, qmax: jax.Array, p: jax.Array, n_grid: int) -> jax.Array:
    r = jnp.maximum(jnp.abs(w.min(axis=0)), w.max(axis=0))  # (out,)

    def body(i, carry):
        best_score, best_m = carry
        m = div_exact(r, float(n_grid)) * i.astype(jnp.float32)
        s = jnp.maximum(div_exact(m, qmax), EPS)
        w_hat = s * jnp.clip(jnp.round(div_exact(w, s)), -qmax, qmax)
        score = jnp.mean(_abs_pow(w - w_hat, p), axis=0)
        better = score < best_score
        return jnp.where(better, score, best_score), jnp.where(better, m, best_m)

    # +inf, not the official 1e10: they differ only if every candidate scores above 1e10
    init = (jnp.full_like(r, jnp.inf), r)
    _, best_m = lax.fori_loop(1, n_grid + 1, body, init)
    return jnp.maximum(div_exact(jnp.maximum(best_m, 0.0), qmax), EPS)


def init_weight_scale(
    kernel: jax.Array, smooth: jax.Array, bits: Bits, *, p: float | jax.Array = 2.4, n_grid: int = 100
) -> jax.Array:
    """Per-output-channel step s_w (out,) from an L_p grid search on W̃ = kernel·σ (docs/method.md §5.2).

    Candidates m = r·i/n_grid, i = 1..n_grid, r = max(|min|, max) of the channel, so the full
    range is included; s_w = max(m*/qmax, 1e-8). The released code's step, bit for bit, unless
    two candidates score within float32 ulps (the score is exp·log here, ``pow`` in torch).
    """
    qmax = weight_qmax(bits)
    _check_grid(n_grid)
    _check_p(p)
    kernel = jnp.asarray(kernel, jnp.float32)
    smooth = jnp.asarray(smooth, jnp.float32)
    check_weight_shapes(kernel, smooth, None)
    return _weight_grid(kernel * smooth[:, None], jnp.asarray(qmax, jnp.float32), jnp.float32(p), n_grid)


def _act_alphas(grid: str, n_grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Shrink fractions a and 1 − a, each rounded once to float32 as torch does with Python floats."""
    if grid == "official":
        i = np.arange(1, n_grid + 1)  # a = 0.01..1.00: never the full range, a >= 0.5 degenerate
    elif grid == "fixed":
        i = np.arange(0, (n_grid + 1) // 2)  # a = 0, 0.01, ..., 0.49: full range, no degenerate
    else:
        raise ValueError(f"grid must be one of {ACT_GRIDS}, got {grid!r}")
    a = i / n_grid
    return a.astype(np.float32), (1.0 - a).astype(np.float32)


@jax.jit
def _act_grid(
    xt: jax.Array, alpha: jax.Array, one_minus: jax.Array, qmax: jax.Array, p: jax.Array
) -> tuple[jax.Array, jax.Array]:
    tok = xt.ndim - 2
    axes = tuple(a for a in range(xt.ndim) if a != tok)
    xmin, xmax = xt.min(axis=axes), xt.max(axis=axes)  # (L,)
    expand = (slice(None), None)  # (L,) -> (L, 1), broadcasts against (..., L, C)

    def body(k, carry):
        best_score, best_lo, best_hi = carry
        a, b = alpha[k], one_minus[k]
        lo = xmin * b + xmax * a
        hi = xmin * a + xmax * b
        s = jnp.maximum((hi - lo) / qmax, EPS)
        zero = jnp.round(-lo / s)
        sx, zx = s[expand], zero[expand]
        x_hat = sx * (jnp.clip(jnp.round(xt / sx) + zx, 0, qmax) - zx)
        score = jnp.mean(_abs_pow(xt - x_hat, p), axis=axes)
        better = score < best_score
        return (
            jnp.where(better, score, best_score),
            jnp.where(better, lo, best_lo),
            jnp.where(better, hi, best_hi),
        )

    init = (jnp.full_like(xmin, jnp.inf), xmin, xmax)
    _, lo, hi = lax.fori_loop(0, alpha.shape[0], body, init)
    return asym_scale_zero(lo, hi, qmax)


def init_act_scale(
    x: jax.Array,
    smooth: jax.Array,
    bits: Bits,
    *,
    grid: str = "fixed",
    p: float | jax.Array = 2.4,
    n_grid: int = 100,
) -> tuple[jax.Array, jax.Array]:
    """PTS init: per token position, an L_p grid search on x/σ pooled over batch and channels.

    x is (N, L, C) (any leading axes). Each candidate shrinks [min, max] by a·(max − min)
    from both ends. ``grid="official"`` uses a = i/n_grid, i = 1..n_grid as the released code
    (full range never tried; a >= 0.5 gives degenerate steps of 1e-8); ``"fixed"`` uses
    a = 0, 1/n_grid, ... < 0.5. The winner is then widened to contain 0 (docs/method.md §5.1).
    Matches the released code to float32 rounding (XLA's division, exp·log for ``pow`` and
    mean differ by ulps).
    Returns ``a_scale`` (L,) float32 and ``a_zero`` (L,) int32.
    """
    qmax = act_qmax(bits)
    _check_grid(n_grid)
    _check_p(p)
    alpha, one_minus = _act_alphas(grid, n_grid)
    x = jnp.asarray(x, jnp.float32)
    smooth = jnp.asarray(smooth, jnp.float32)
    check_act_shapes(x, smooth)
    return _act_grid(x / smooth, jnp.asarray(alpha), jnp.asarray(one_minus), jnp.asarray(qmax, jnp.float32),
                     jnp.float32(p))


def minmax_weight_scale(kernel: jax.Array, smooth: jax.Array, bits: Bits) -> jax.Array:
    """RTN baseline: s_w = max|kernel·σ| / qmax per output channel (floored at 1e-8)."""
    qmax = weight_qmax(bits)
    kernel = jnp.asarray(kernel, jnp.float32)
    smooth = jnp.asarray(smooth, jnp.float32)
    check_weight_shapes(kernel, smooth, None)
    return jnp.maximum(jnp.abs(kernel * smooth[:, None]).max(axis=0) / qmax, EPS)


def minmax_act_scale_per_tensor(x: jax.Array, smooth: jax.Array, bits: Bits) -> tuple[jax.Array, jax.Array]:
    """Baseline: ONE static min-max range (containing 0) over the whole tensor, repeated per token.

    Repeating it over L lets the per-tensor baseline share the (L,) state layout of PTS.
    """
    qmax = act_qmax(bits)
    x = jnp.asarray(x, jnp.float32)
    smooth = jnp.asarray(smooth, jnp.float32)
    check_act_shapes(x, smooth)
    xt = x / smooth
    s, z = asym_scale_zero(xt.min(), xt.max(), qmax)
    length = x.shape[-2]
    return jnp.full((length,), s, jnp.float32), jnp.full((length,), z, jnp.int32)
