"""Plain-jnp references for the Mamba S6 selective scan and the causal depthwise conv.

These are the ground truth that the Pallas kernels in ``pallas_kernels/`` are tested
against, and the path every non-GPU backend runs by default. ``selective_scan`` dispatches
between the reference and the kernel by an explicit backend name.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.selective_scan import ScanConfig
from pallas_kernels.selective_scan import selective_scan as selective_scan_pallas
from ptq4vm_jax import gpu
from ptq4vm_jax.choices import SCAN_BACKENDS


def selective_scan_ref(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                       D: jax.Array | None = None, z: jax.Array | None = None,
                       delta_bias: jax.Array | None = None, delta_softplus: bool = True,
                       reverse: bool = False) -> jax.Array:
    """S6 forward: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = <h_t, C_t> + D u_t.

    Shapes: ``u, delta, z`` (B, L, E); ``A`` (E, N); ``B, C`` (B, L, N); ``D, delta_bias`` (E,).
    The state (B, E, N) is carried in fp32 by ``lax.scan``; the forward builds no (B, L, E, N)
    tensor (its gradient keeps every state, for a reverse scan written out by hand: jax's own
    transpose of the loop is slower on a CPU). ``reverse=True`` runs from the last
    token to the first (outputs stay at their own positions) without flipped copies. (Vim's
    backward branch flips its input instead: its conv and per-token activation scales live in
    flipped order.)
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

    xs = tuple(jnp.swapaxes(t, 0, 1) for t in (dt, u32, Bt, Ct))  # time-major
    ys = _recurrence(*xs, A32, reverse)
    y = jnp.swapaxes(ys, 0, 1)
    if D is not None:
        y = y + u32 * D.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(out_dtype)


def _step(carry, inp):
    """One token: the new state and its output. ``A`` rides in the carry and the step is a
    module-level function, so an eager call reuses the compiled scan instead of tracing a new
    closure (and compiling it again) at every layer and call."""
    h, A = carry
    dt_t, u_t, b_t, c_t = inp  # (B, E), (B, E), (B, N), (B, N)
    decay = jnp.exp(dt_t[:, :, None] * A[None])
    h = decay * h + (dt_t * u_t)[:, :, None] * b_t[:, None, :]
    return (h, A), (jnp.einsum("ben,bn->be", h, c_t, precision=lax.Precision.HIGHEST), h)


def _step_output(carry, inp):
    carry, (y_t, _) = _step(carry, inp)
    return carry, y_t


def _scan_steps(dt: jax.Array, u: jax.Array, b: jax.Array, c: jax.Array, A: jax.Array, reverse: bool,
                keep_states: bool) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The recurrence over time-major (L, B, ·) inputs: the outputs y (L, B, E), and with
    ``keep_states`` every state h_t (L, B, E, N) too, which the backward pass reads."""
    h0 = jnp.zeros((dt.shape[1], dt.shape[2], A.shape[1]), jnp.float32)
    return lax.scan(_step if keep_states else _step_output, (h0, A), (dt, u, b, c), reverse=reverse)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _recurrence(dt: jax.Array, u: jax.Array, b: jax.Array, c: jax.Array, A: jax.Array,
                reverse: bool) -> jax.Array:
    """y_t = <h_t, c_t>, h_t = exp(dt_t A) h_{t-1} + dt_t u_t b_t, over time-major fp32 inputs.

    Differentiated by a hand-written reverse scan (:func:`_recurrence_bwd`) instead of by
    transposing the forward loop: the same sums, faster on a CPU, where
    calibration spends most of each learning step in this backward pass.
    """
    return _scan_steps(dt, u, b, c, A, reverse, keep_states=False)


def _recurrence_fwd(dt, u, b, c, A, reverse):
    ys, hs = _scan_steps(dt, u, b, c, A, reverse, keep_states=True)
    return ys, (dt, u, b, c, A, hs)


def _step_back(carry, inp):
    """One token of :func:`_recurrence_bwd`, module-level for the reason of :func:`_step`."""
    g_h, g_A, A = carry
    gy_t, dt_t, u_t, b_t, c_t, h_t, hp_t = inp
    g_h = g_h + gy_t[:, :, None] * c_t[:, None, :]
    decay = jnp.exp(dt_t[:, :, None] * A[None])
    g_a = g_h * hp_t * decay
    g_A = g_A + jnp.einsum("ben,be->en", g_a, dt_t, precision=lax.Precision.HIGHEST)
    g_x = jnp.einsum("ben,bn->be", g_h, b_t, precision=lax.Precision.HIGHEST)
    g_b = jnp.einsum("ben,be->bn", g_h, dt_t * u_t, precision=lax.Precision.HIGHEST)
    g_c = jnp.einsum("ben,be->bn", h_t, gy_t, precision=lax.Precision.HIGHEST)
    g_dt = jnp.sum(g_a * A[None], axis=-1) + g_x * u_t
    return (g_h * decay, g_A, A), (g_dt, g_x * dt_t, g_b, g_c)


def _recurrence_bwd(reverse, res, gy):
    """Walks time against the forward's direction, carrying g_h = dL/dh_t:
    g_h <- g_h + gy_t c_t, then dL/dh_{t-1} = exp(dt_t A) g_h. From g_h at each step:
    dc_t = h_t^T gy_t, db_t = g_h^T (dt_t u_t), d(dt_t u_t) = g_h b_t, and through the decay
    g_a = g_h h_{t-1} exp(dt_t A): d dt_t = g_a A, dA = sum over batch and time of g_a dt_t."""
    dt, u, b, c, A, hs = res
    zero = jnp.zeros_like(hs[:1])
    h_prev = jnp.concatenate([hs[1:], zero]) if reverse else jnp.concatenate([zero, hs[:-1]])
    init = (jnp.zeros_like(hs[0]), jnp.zeros_like(A), A)
    (_, g_A, _), (g_dt, g_u, g_b, g_c) = lax.scan(_step_back, init, (gy, dt, u, b, c, hs, h_prev),
                                                 reverse=not reverse)
    return g_dt, g_u, g_b, g_c, g_A


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def check_scan_backend(scan: str) -> str:
    """``scan`` if it names a backend of ``SCAN_BACKENDS``, else a ValueError listing them."""
    if scan not in SCAN_BACKENDS:
        choices = ", ".join(map(repr, SCAN_BACKENDS))
        raise ValueError(f"unknown scan backend {scan!r}; choose one of {choices} "
                         "('auto': the Pallas kernels on GPU, the lax.scan reference elsewhere)")
    return scan


def resolve_scan_backend(scan: str) -> str:
    """The selective scan's own backend: "auto" -> "pallas" on GPU (the kernel), "ref" elsewhere;
    "fused" -> "pallas" (a scan outside a fused mixer); "ref" and "pallas" stay as they are."""
    if check_scan_backend(scan) == "auto":
        return "pallas" if gpu.on_gpu() else "ref"
    return "pallas" if scan == "fused" else scan


def selective_scan(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                   D: jax.Array | None = None, z: jax.Array | None = None,
                   delta_bias: jax.Array | None = None, delta_softplus: bool = True,
                   reverse: bool = False, *, backend: str = "auto",
                   config: ScanConfig | None = None) -> jax.Array:
    """The scan every model calls, on the backend its config names (static, chosen at trace time).

    "ref": ``selective_scan_ref``. "pallas": ``pallas_kernels.selective_scan``, whose
    undifferentiated call is the inference forward kernel and whose VJP is the Pallas backward,
    so one backend serves evaluation and calibration; off the GPU it runs in the Pallas
    interpreter (for tests and parity checks). "auto": "pallas" on GPU, "ref" elsewhere; "fused"
    (the fused mixer's setting) runs "pallas" for a scan outside the fused kernel.
    ``config`` (tiles and layout, for tuning) reaches the kernel; None takes its default.
    """
    if resolve_scan_backend(backend) == "pallas":
        return selective_scan_pallas(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse,
                                     interpret=gpu.interpret_kernels(), config=config)
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
