"""Plain-jnp references for the Mamba S6 selective scan and the causal depthwise conv.

These are the ground truth that the Pallas kernels in ``pallas_kernels/`` are tested
against, and the path every non-GPU backend runs.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def selective_scan_ref(
    u: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    delta_bias: jax.Array | None = None,
    delta_softplus: bool = True,
    reverse: bool = False,
) -> jax.Array:
    """S6 forward: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = <h_t, C_t> + D u_t.

    Shapes: ``u, delta, z`` (B, L, E); ``A`` (E, N); ``B, C`` (B, L, N); ``D, delta_bias`` (E,).
    The state (B, E, N) is carried in fp32 by ``lax.scan``; no (B, L, E, N) tensor is
    ever built. ``reverse=True`` runs from the last token to the first (outputs stay at
    their own positions) without flipped copies. (Vim's backward branch flips its input instead:
    its conv and per-token activation scales live in flipped order.)
    """
    out_dtype = u.dtype
    u32 = u.astype(jnp.float32)
    dt = delta.astype(jnp.float32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(jnp.float32)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    A32 = A.astype(jnp.float32)
    Bt = B.astype(jnp.float32)
    Ct = C.astype(jnp.float32)

    batch, _, e = u.shape
    n = A.shape[-1]

    def step(h, inp):
        dt_t, u_t, b_t, c_t = inp  # (B, E), (B, E), (B, N), (B, N)
        decay = jnp.exp(dt_t[:, :, None] * A32[None])
        h = decay * h + (dt_t * u_t)[:, :, None] * b_t[:, None, :]
        y_t = jnp.einsum("ben,bn->be", h, c_t, precision=lax.Precision.HIGHEST)
        return h, y_t

    xs = tuple(jnp.swapaxes(t, 0, 1) for t in (dt, u32, Bt, Ct))  # time-major
    h0 = jnp.zeros((batch, e, n), jnp.float32)
    _, ys = lax.scan(step, h0, xs, reverse=reverse)
    y = jnp.swapaxes(ys, 0, 1)
    if D is not None:
        y = y + u32 * D.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(out_dtype)


_KERNEL_MODE = contextvars.ContextVar("ptq4vm_scan_kernel", default=None)  # None, "forward", "trainable"


@contextlib.contextmanager
def scan_kernel(enabled: bool = True, *, trainable: bool = False) -> Iterator[None]:
    """Within this context (at trace time), ``selective_scan`` runs a Pallas kernel on GPU.

    ``trainable=False`` (inference: ``quantized_apply``, benchmarks): the forward kernel, which
    has no VJP. ``trainable=True`` (calibration, which differentiates through the scan):
    ``selective_scan_trainable``, the same forward plus a Pallas backward. Off by default; other
    backends always run the reference.
    """
    token = _KERNEL_MODE.set(("trainable" if trainable else "forward") if enabled else None)
    try:
        yield
    finally:
        _KERNEL_MODE.reset(token)


_TILES = contextvars.ContextVar("ptq4vm_scan_tiles", default=None)


@contextlib.contextmanager
def scan_tiles(config_for: Callable[[int, int, int], Any] | None) -> Iterator[None]:
    """Within this context (at trace time) the Pallas scan takes its ``ScanConfig`` from
    ``config_for(batch, E, N)`` instead of ``default_scan_config``: for tuning and benchmarks.
    Independent of ``scan_kernel``, so it also reaches the scans of ``quantized_apply``. A
    function jitted under one setting keeps its trace: give it a static argument per setting."""
    token = _TILES.set(config_for)
    try:
        yield
    finally:
        _TILES.reset(token)


def selective_scan(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                   D: jax.Array | None = None, z: jax.Array | None = None,
                   delta_bias: jax.Array | None = None, delta_softplus: bool = True,
                   reverse: bool = False) -> jax.Array:
    """The scan every model calls: a Pallas kernel on GPU inside ``scan_kernel()``, else the reference."""
    mode = _KERNEL_MODE.get()
    if mode is not None and jax.default_backend() == "gpu":
        from pallas_kernels.selective_scan import selective_scan as forward
        from pallas_kernels.selective_scan import selective_scan_trainable

        kernel = selective_scan_trainable if mode == "trainable" else forward
        config_for = _TILES.get()
        config = None if config_for is None else config_for(u.shape[0], u.shape[2], A.shape[1])
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, config=config)
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


def causal_depthwise_conv1d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """Causal depthwise conv over tokens: y_t = sum_k kernel[k] * x_{t-K+1+k} + bias.

    ``x`` (B, L, E); ``kernel`` (K, E) with tap K-1 on the current token, as in
    ``torch.nn.Conv1d(groups=E, padding=K-1)[..., :L]``.
    """
    k = kernel.shape[0]
    seq = x.shape[1]
    xp = jnp.pad(x, ((0, 0), (k - 1, 0), (0, 0)))
    y = sum(xp[:, i : i + seq, :] * kernel[i] for i in range(k))
    if bias is not None:
        y = y + bias
    return y
