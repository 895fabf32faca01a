"""Mamba S6 selective scan as a Pallas (Triton backend) kernel.

One program per (batch element, tile of ``block_e`` channels) holds its (block_e, N) fp32
state in registers and walks the tokens sequentially with a ``fori_loop``, reading one row
of u / delta / z / B / C per step through refs and writing one row of y. The state never
touches HBM and no (B, L, E, N) tensor exists. ``reverse=True`` walks from the last token to
the first (Vim's backward branch) without flipped copies. Semantics are those of
``ptq4vm_jax.ops.scan.selective_scan_ref`` (the reference and the non-GPU path).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

__all__ = ["ScanConfig", "default_scan_config", "selective_scan"]


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """Channel tile (a power of two; E is masked to it) and Triton launch parameters."""

    block_e: int = 32
    num_warps: int = 2
    num_stages: int = 2

    def __post_init__(self):
        if self.block_e < 1 or self.block_e & (self.block_e - 1):
            raise ValueError(f"ScanConfig.block_e must be a power of two, got {self.block_e}")


def _next_pow2(v: int) -> int:
    return 1 << (max(v, 1) - 1).bit_length()


MIN_PROGRAMS = 512  # ~4 programs per SM on a 132-SM H100: the token loop is latency-bound


def default_scan_config(batch: int, e: int, n_state: int) -> ScanConfig:
    """Up to 512 state elements per program (32 channels x 16 states, 128 x 1), halved down to
    16 channels while fewer than MIN_PROGRAMS programs would run (long VMamba scans, small E)."""
    block_e = max(1, min(_next_pow2(e), 512 // _next_pow2(n_state)))
    while block_e > 16 and batch * -(-e // block_e) < MIN_PROGRAMS:
        block_e //= 2
    num_warps = max(1, min(4, block_e * _next_pow2(n_state) // 256))
    return ScanConfig(block_e, num_warps, 2)


def _load(ref, mask, other):
    return ref[...] if mask is None else plt.load(ref, mask=mask, other=other)


def _scan_kernel(*refs, seq, e, n_state, cfg, reverse, softplus, has_d, has_z, has_bias):
    refs = list(refs)
    u_ref, dt_ref, a_ref, b_ref, c_ref = refs[:5]
    refs = refs[5:]
    d_ref = refs.pop(0) if has_d else None
    z_ref = refs.pop(0) if has_z else None
    bias_ref = refs.pop(0) if has_bias else None
    (o_ref,) = refs

    be, npow = cfg.block_e, _next_pow2(n_state)
    batch = pl.program_id(0)
    e0 = pl.program_id(1) * be
    e_ok = None if e % be == 0 else e0 + lax.broadcasted_iota(jnp.int32, (be,), 0) < e
    n_ok = None if n_state == npow else lax.broadcasted_iota(jnp.int32, (npow,), 0) < n_state
    if e_ok is None and n_ok is None:
        a_mask = None
    elif n_ok is None:
        a_mask = e_ok[:, None]
    elif e_ok is None:
        a_mask = n_ok[None, :]
    else:
        a_mask = e_ok[:, None] & n_ok[None, :]
    f32 = jnp.float32
    zero = f32(0.0)
    # Padded channels/states get A = 0, B = C = 0, u = 0: their state stays 0 and is never stored.
    a = _load(a_ref.at[pl.ds(e0, be), pl.ds(0, npow)], a_mask, zero).astype(f32)
    d = _load(d_ref.at[pl.ds(e0, be)], e_ok, zero).astype(f32) if has_d else None
    bias = _load(bias_ref.at[pl.ds(e0, be)], e_ok, zero).astype(f32) if has_bias else None

    def row(ref, t):
        return _load(ref.at[batch, t, pl.ds(e0, be)], e_ok, jnp.zeros((), ref.dtype)).astype(f32)

    def state_row(ref, t):
        return _load(ref.at[batch, t, pl.ds(0, npow)], n_ok, jnp.zeros((), ref.dtype)).astype(f32)

    def step(i, h):
        t = seq - 1 - i if reverse else i
        u = row(u_ref, t)
        dt = row(dt_ref, t)
        if has_bias:
            dt = dt + bias
        if softplus:
            dt = jax.nn.softplus(dt)
        h = jnp.exp(dt[:, None] * a) * h + (dt * u)[:, None] * state_row(b_ref, t)[None, :]
        y = jnp.sum(h * state_row(c_ref, t)[None, :], axis=1)
        if has_d:
            y = y + u * d
        if has_z:
            y = y * jax.nn.silu(row(z_ref, t))
        out = o_ref.at[batch, t, pl.ds(e0, be)]
        if e_ok is None:
            out[...] = y.astype(o_ref.dtype)
        else:
            plt.store(out, y.astype(o_ref.dtype), mask=e_ok)
        return h

    lax.fori_loop(0, seq, step, jnp.zeros((be, npow), f32))


def _check(u, delta, A, B, C, D, z, delta_bias):
    if u.ndim != 3:
        raise ValueError(f"u must be (B, L, E), got shape {u.shape}")
    batch, seq, e = u.shape
    if A.ndim != 2 or A.shape[0] != e:
        raise ValueError(f"A must be (E, N) with E={e}, got {A.shape}")
    n_state = A.shape[1]
    if delta.shape != u.shape or (z is not None and z.shape != u.shape):
        raise ValueError(f"delta and z must match u's shape {u.shape}")
    for name, arr in (("B", B), ("C", C)):
        if arr.shape != (batch, seq, n_state):
            raise ValueError(f"{name} must be (B, L, N) = {(batch, seq, n_state)}, got {arr.shape}")
    for name, arr in (("D", D), ("delta_bias", delta_bias)):
        if arr is not None and arr.shape != (e,):
            raise ValueError(f"{name} must be (E,) = ({e},), got {arr.shape}")
    if batch * seq * e >= 2**31:
        raise ValueError(
            f"selective_scan: B*L*E = {batch * seq * e} elements overflow the kernel's int32 offsets; "
            "split the batch into chunks"
        )


@functools.partial(jax.jit, static_argnames=("delta_softplus", "reverse", "interpret", "config"))
def selective_scan(
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
    *,
    interpret: bool = False,
    config: ScanConfig | None = None,
) -> jax.Array:
    """S6 forward y (B, L, E) in u.dtype; same arguments and semantics as ``selective_scan_ref``.

    ``u, delta, z`` (B, L, E); ``A`` (E, N); ``B, C`` (B, L, N); ``D, delta_bias`` (E,).
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    batch, seq, e = u.shape
    n_state = A.shape[1]
    cfg = config or default_scan_config(batch, e, n_state)
    optional = [arr for arr in (D, z, delta_bias) if arr is not None]
    kernel = functools.partial(
        _scan_kernel, seq=seq, e=e, n_state=n_state, cfg=cfg, reverse=reverse,
        softplus=delta_softplus, has_d=D is not None, has_z=z is not None,
        has_bias=delta_bias is not None,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(u.shape, u.dtype),
        grid=(batch, pl.cdiv(e, cfg.block_e)),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="ptq4vm_selective_scan",
    )(u, delta, A.astype(jnp.float32), B, C, *optional)
