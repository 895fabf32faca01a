"""Plain-jnp references for the Mamba S6 selective scan and the causal depthwise conv.

These are the ground truth that the Pallas kernels in ``pallas_kernels/`` are tested
against, and the path every non-GPU backend runs by default. ``selective_scan`` dispatches
between the reference and the kernel by an explicit backend name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.selective_scan import ScanConfig
from pallas_kernels.selective_scan import selective_scan as selective_scan_pallas


def selective_scan_ref(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                       D: jax.Array | None = None, z: jax.Array | None = None,
                       delta_bias: jax.Array | None = None, delta_softplus: bool = True,
                       reverse: bool = False) -> jax.Array:
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


#: "fused" is "pallas" plus, in a model that has one (Vim), the fused mixer kernel
#: (``ptq4vm_jax.ops.mixer``); opt-in: "auto" keeps the per-direction scans.
SCAN_BACKENDS = ("auto", "ref", "pallas", "fused")


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
        return "pallas" if jax.default_backend() == "gpu" else "ref"
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
                                     interpret=jax.default_backend() != "gpu", config=config)
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
