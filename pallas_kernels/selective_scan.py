"""Mamba S6 selective scan as a Pallas (Triton backend) kernel.

One program per (batch element, tile of ``block_e`` channels) holds its fp32 state in
registers and walks the tokens sequentially with a ``fori_loop``, reading one row of
u / delta / z / B / C per step through refs and writing one row of y. The state never touches
HBM and no (B, L, E, N) tensor exists. Two state layouts (``ScanConfig.channel_major``): a
(block_e, N) tile, or channel-major, each thread owning whole channels' N states;
``default_scan_config`` picks by N and batch x E (BENCHMARKS.md has the sweeps behind it).
``reverse=True`` walks from the last token to the first without flipped copies. Semantics are
those of ``ptq4vm_jax.ops.scan.selective_scan_ref`` (the reference and the non-GPU path).

``selective_scan`` carries a ``custom_vjp`` for calibration, which differentiates through the
scan (``lax.scan`` on GPU is launch-bound, one step per token). Only the recurrence
y_t = <h_t, C_t> runs in kernels; the elementwise parts (softplus, D·u, the SiLU(z) gate) are
differentiated by hand in jnp, where XLA fuses them. By default the forward takes the
forward's default layout and the backward the tile layout (a ``config`` sets both).
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

from pallas_kernels.token_loop import (
    LOG2_E,
    channel_tile,
    masked_load,
    masked_store,
    next_pow2,
    token_loop,
)

__all__ = ["ScanConfig", "TokenLoopConfig", "default_scan_config", "selective_scan"]


@dataclasses.dataclass(frozen=True)
class TokenLoopConfig:
    """What every kernel here that walks tokens with its state in registers is tuned by: channels
    per program (a power of two; E is masked to it), Triton's launch parameters, and two ways to
    hide memory latency in the latency-bound token loop, whose loads do not depend on the state:
    ``unroll`` tokens per loop trip with their loads issued together, and ``prefetch`` (software
    pipelining: the next trip's loads are issued before this trip's updates and carried through
    the loop). The defaults (4, on) are the scan sweep's choice (BENCHMARKS.md)."""

    block_e: int = 32
    num_warps: int = 2
    num_stages: int = 2
    unroll: int = 4
    prefetch: bool = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.block_e < 1 or self.block_e & (self.block_e - 1):
            raise ValueError(f"{name}.block_e must be a power of two, got {self.block_e}")
        if self.unroll < 1:
            raise ValueError(f"{name}.unroll must be >= 1, got {self.unroll}")

    def trainable_scan(self) -> ScanConfig:
        """The config of the per-direction trainable scans a fused kernel's VJP runs: the same
        tiles and loop, the channel-major layout, exp2 decays."""
        return ScanConfig(self.block_e, self.num_warps, self.num_stages, unroll=self.unroll,
                          prefetch=self.prefetch, exp2=True, channel_major=True)


@dataclasses.dataclass(frozen=True)
class ScanConfig(TokenLoopConfig):
    """The selective scan's ``TokenLoopConfig`` and its state layout.

    ``exp2`` computes the decay exp(Δ·A) as exp2(Δ·(A·log2 e)), A scaled once per program:
    libdevice's ``exp2f`` is the ``ex2.approx`` instruction alone where ``expf`` adds a range
    reduction, and at N = 16 per-state instructions bound the loop more than memory does. On in
    ``default_scan_config`` for N > 1.

    ``channel_major`` (the forward; the trainable backward too when a given config asks for it)
    holds the state as N separate (block_e,) vectors instead of one (block_e, N) tile: every
    thread owns whole channels, B_t and C_t are read as scalars, the sum over N is N in-thread
    adds and every value of the loop shares the layout of the loaded rows, so Triton inserts no
    shuffles or shared-memory layout conversions into the token loop. It wins with many
    channels and N > 1, loses at N = 1 and with few channels (``default_scan_config`` picks by
    N and batch x E)."""

    exp2: bool = False
    channel_major: bool = False


MIN_PROGRAMS = 512  # ~4 programs per SM on a 132-SM H100: the token loop is latency-bound
CHANNEL_MAJOR_MIN_CHANNELS = 65536  # batch x E from which the channel-major layout wins (N > 1)


def default_scan_config(batch: int, e: int, n_state: int, *, channel_major: bool | None = None) -> ScanConfig:
    """The fastest configuration of the sweeps recorded in BENCHMARKS.md for a (batch, E, N) scan.

    Several states per channel (Vim, N = 16) and at least CHANNEL_MAJOR_MIN_CHANNELS batch x E
    channels: the channel-major layout, 64 channels per one-warp program (two per thread),
    unroll 4 + prefetch, exp2 decays. With fewer channels its one-warp programs leave the GPU
    half idle and the tile layout (with exp2) wins. One state (VMamba, N = 1): the tile layout,
    up to 512 state elements per program (32 channels x 16 states, 512 x 1), halved down to 16
    channels while fewer than MIN_PROGRAMS programs would run; exp2 stays off there (the
    sweep's choice at N = 1). ``channel_major`` forces a layout (None: by N and size as above)."""
    if channel_major is None:
        channel_major = n_state > 1 and batch * e >= CHANNEL_MAJOR_MIN_CHANNELS
    if channel_major:
        return ScanConfig(64, 1, 2, exp2=True, channel_major=True)
    block_e = max(1, min(next_pow2(e), 512 // next_pow2(n_state)))
    while block_e > 16 and batch * -(-e // block_e) < MIN_PROGRAMS:
        block_e //= 2
    num_warps = max(1, min(4, block_e * next_pow2(n_state) // 256))
    return ScanConfig(block_e, num_warps, 2, exp2=n_state > 1)  # unroll 4 + prefetch: defaults


def _tile(a_ref, e, n_state, cfg):
    """This program's batch element, channel offset and mask, its A tile, and row loaders.

    Padded channels/states get A = 0 and u = Δ = B = C = 0 (masked loads): their state and
    every gradient through them stay 0, and they are never stored to (B, L, E) outputs.
    """
    be, npow = cfg.block_e, next_pow2(n_state)
    batch, e0, _, e_ok = channel_tile(e, be)
    n_ok = None if n_state == npow else lax.broadcasted_iota(jnp.int32, (npow,), 0) < n_state
    if e_ok is None and n_ok is None:
        a_mask = None
    elif n_ok is None:
        a_mask = e_ok[:, None]
    elif e_ok is None:
        a_mask = n_ok[None, :]
    else:
        a_mask = e_ok[:, None] & n_ok[None, :]
    a = masked_load(a_ref.at[pl.ds(e0, be), pl.ds(0, npow)], a_mask, jnp.float32(0.0)).astype(jnp.float32)

    def row(ref, t):
        block = masked_load(ref.at[batch, t, pl.ds(e0, be)], e_ok, jnp.zeros((), ref.dtype))
        return block.astype(jnp.float32)

    def state_row(ref, t):
        block = masked_load(ref.at[batch, t, pl.ds(0, npow)], n_ok, jnp.zeros((), ref.dtype))
        return block.astype(jnp.float32)

    return batch, e0, be, e_ok, a, row, state_row


def _forward_refs(refs, has_d, has_z, has_bias, states):
    """The forward kernels' refs by name (None for an absent optional input or state buffer)."""
    refs = list(refs)
    optional = [refs.pop(5) if present else None for present in (has_d, has_z, has_bias)]
    outputs = refs[5:] if states else [refs[5], None]
    return (*refs[:5], *optional, *outputs)


def _scan_kernel(*refs, seq, e, n_state, cfg, reverse, softplus, has_d, has_z, has_bias,
                 states=False):
    u_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, z_ref, bias_ref, o_ref, h_ref = _forward_refs(
        refs, has_d, has_z, has_bias, states)

    batch, e0, be, e_ok, a, row, state_row = _tile(a_ref, e, n_state, cfg)
    f32 = jnp.float32
    zero = f32(0.0)
    if cfg.exp2:
        a = a * f32(LOG2_E)
    decay_of = jnp.exp2 if cfg.exp2 else jnp.exp
    d = masked_load(d_ref.at[pl.ds(e0, be)], e_ok, zero).astype(f32) if has_d else None
    bias = masked_load(bias_ref.at[pl.ds(e0, be)], e_ok, zero).astype(f32) if has_bias else None

    def load(i):
        """Everything token i needs that does not depend on the state."""
        t = seq - 1 - i if reverse else i
        dt = row(dt_ref, t)
        if has_bias:
            dt = dt + bias
        if softplus:
            dt = jax.nn.softplus(dt)
        z = row(z_ref, t) if has_z else None
        return t, row(u_ref, t), dt, state_row(b_ref, t), state_row(c_ref, t), z

    def update(h, inputs):
        t, u, dt, b, c, z = inputs
        h = decay_of(dt[:, None] * a) * h + (dt * u)[:, None] * b[None, :]
        y = jnp.sum(h * c[None, :], axis=1)
        if has_d:
            y = y + u * d
        if has_z:
            y = y * jax.nn.silu(z)
        masked_store(o_ref.at[batch, t, pl.ds(e0, be)], y, e_ok)
        if states:  # padded (E_pad, N_pad) rows: no mask
            h_ref.at[batch, t, pl.ds(e0, be)][...] = h
        return h

    token_loop(seq, cfg, load, update, jnp.zeros((be, next_pow2(n_state)), f32))


def _scan_kernel_channels(*refs, seq, e, n_state, cfg, reverse, softplus, has_d, has_z, has_bias,
                          states=False):
    """The forward with the state as ``n_state`` (block_e,) vectors (``ScanConfig.channel_major``).

    ``a_ref`` holds A transposed, (N, E), so each state's decay rates are one contiguous row.
    ``states=True`` (the backward's pass 1) also writes every h_t to a (B, L, N, E) buffer.
    """
    u_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, z_ref, bias_ref, o_ref, h_ref = _forward_refs(
        refs, has_d, has_z, has_bias, states)

    f32 = jnp.float32
    be = cfg.block_e
    batch, e0, _, e_ok = channel_tile(e, be)

    def vec(ref):  # a (block_e,) slice of an (E,)-indexed ref, zero beyond E
        return masked_load(ref, e_ok, jnp.zeros((), ref.dtype)).astype(f32)

    scale = f32(LOG2_E) if cfg.exp2 else None
    a = [vec(a_ref.at[jnp.int32(n), pl.ds(e0, be)]) for n in range(n_state)]
    if scale is not None:
        a = [a_n * scale for a_n in a]
    decay_of = jnp.exp2 if cfg.exp2 else jnp.exp
    d = vec(d_ref.at[pl.ds(e0, be)]) if has_d else None
    bias = vec(bias_ref.at[pl.ds(e0, be)]) if has_bias else None

    def load(i):
        """The token's (block_e,) rows; B_t and C_t scalars are read in ``update``."""
        t = seq - 1 - i if reverse else i
        dt = vec(dt_ref.at[batch, t, pl.ds(e0, be)])
        if has_bias:
            dt = dt + bias
        if softplus:
            dt = jax.nn.softplus(dt)
        z = vec(z_ref.at[batch, t, pl.ds(e0, be)]) if has_z else None
        return t, vec(u_ref.at[batch, t, pl.ds(e0, be)]), dt, z

    def update(h, inputs):
        t, u, dt, z = inputs
        dtu = dt * u
        new_h, y = [], None
        for n in range(n_state):
            b_n = b_ref[batch, t, jnp.int32(n)].astype(f32)
            c_n = c_ref[batch, t, jnp.int32(n)].astype(f32)
            h_n = decay_of(dt * a[n]) * h[n] + dtu * b_n
            y = h_n * c_n if y is None else y + h_n * c_n
            new_h.append(h_n)
            if states:
                masked_store(h_ref.at[batch, t, jnp.int32(n), pl.ds(e0, be)], h_n, e_ok)
        if has_d:
            y = y + u * d
        if has_z:
            y = y * jax.nn.silu(z)
        masked_store(o_ref.at[batch, t, pl.ds(e0, be)], y, e_ok)
        return tuple(new_h)

    token_loop(seq, cfg, load, update, tuple(jnp.zeros((be,), f32) for _ in range(n_state)))


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


def _launch(cfg, interpret, name):
    return dict(compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                interpret=interpret, name=name)


def _forward(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, interpret, cfg):
    """The forward kernel: y (B, L, E) in u.dtype."""
    batch, seq, e = u.shape
    optional = [arr for arr in (D, z, delta_bias) if arr is not None]
    kernel = functools.partial(
        _scan_kernel_channels if cfg.channel_major else _scan_kernel, seq=seq, e=e,
        n_state=A.shape[1], cfg=cfg, reverse=reverse, softplus=softplus, has_d=D is not None,
        has_z=z is not None, has_bias=delta_bias is not None,
    )
    a = A.astype(jnp.float32)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(u.shape, u.dtype),
        grid=(batch, pl.cdiv(e, cfg.block_e)),
        **_launch(cfg, interpret, "ptq4vm_selective_scan"),
    )(u, delta, a.T if cfg.channel_major else a, B, C, *optional)


# ----------------------------------------------------------------------------- training (VJP)


def _scan_bwd_kernel(u_ref, dt_ref, a_ref, b_ref, c_ref, dy_ref, h_ref,
                     du_ref, ddt_ref, da_ref, db_ref, dc_ref, *, seq, e, n_state, cfg, reverse):
    """Reverse-time pass of the core scan y_t = <h_t, C_t> for one (batch, E tile) program.

    Carries g = exp(Δ_{t+1} A) ∂h_{t+1} (the gradient reaching h_t from later steps), h_t (read
    from the recomputed states; the load of h_{t-1} made in step t is reused as h_t by the next
    one) and this program's ∂A. Per step, with ∂h_t = g + ∂y_t C_t and a_t h_{t-1}:
    ∂u_t = Δ_t Σ_n ∂h_t B_t; ∂Δ_t = Σ_n ∂h_t A a_t h_{t-1} + u_t Σ_n ∂h_t B_t;
    ∂A += ∂h_t Δ_t a_t h_{t-1}; ∂B_t, ∂C_t partial sums over this tile's channels.
    """
    batch, e0, be, e_ok, a, row, state_row = _tile(a_ref, e, n_state, cfg)
    tile = pl.program_id(1)
    f32 = jnp.float32

    def time_of(k):  # the k-th step of the forward scan
        return seq - 1 - k if reverse else k

    def states(t):
        return h_ref.at[batch, t, pl.ds(e0, be)][...]

    def step(i, carry):
        g, h_t, da = carry
        k = seq - 1 - i
        t = time_of(k)
        h_prev = jnp.where(k > 0, states(time_of(jnp.maximum(k - 1, 0))), f32(0.0))
        u, dt, dy = row(u_ref, t), row(dt_ref, t), row(dy_ref, t)
        b_t, c_t = state_row(b_ref, t)[None, :], state_row(c_ref, t)[None, :]
        dh = g + dy[:, None] * c_t
        decay = jnp.exp(dt[:, None] * a)
        dh_ah = dh * (decay * h_prev)
        s = jnp.sum(dh * b_t, axis=1)
        masked_store(du_ref.at[batch, t, pl.ds(e0, be)], dt * s, e_ok)
        masked_store(ddt_ref.at[batch, t, pl.ds(e0, be)], jnp.sum(dh_ah * a, axis=1) + u * s, e_ok)
        db_ref.at[batch, t, tile][...] = jnp.sum(dh * (dt * u)[:, None], axis=0)
        dc_ref.at[batch, t, tile][...] = jnp.sum(dy[:, None] * h_t, axis=0)
        return decay * dh, h_prev, da + dh_ah * dt[:, None]

    zeros = jnp.zeros((be, next_pow2(n_state)), f32)
    _, _, da = lax.fori_loop(0, seq, step, (zeros, states(time_of(seq - 1)), zeros))
    da_ref.at[batch, pl.ds(e0, be)][...] = da


def _scan_bwd_kernel_channels(u_ref, dt_ref, a_ref, b_ref, c_ref, dy_ref, h_ref,
                              du_ref, ddt_ref, da_ref, db_ref, dc_ref, *, seq, e, n_state, cfg, reverse):
    """``_scan_bwd_kernel``'s arithmetic with the state as N (block_e,) vectors: A as (N, E), the
    states as (B, L, N, E), ∂A written as (B, N, E); the sums over N run in-thread, and the
    per-tile ∂B_t, ∂C_t are N scalar reductions each."""
    f32 = jnp.float32
    be = cfg.block_e
    batch, tile = pl.program_id(0), pl.program_id(1)
    e0 = tile * be
    e_ok = None if e % be == 0 else e0 + lax.broadcasted_iota(jnp.int32, (be,), 0) < e

    def vec(ref):  # zero beyond E: padded channels carry zero state and gradients
        return masked_load(ref, e_ok, jnp.zeros((), ref.dtype)).astype(f32)

    idx = jnp.int32  # static indices as int32 arrays: a Python int fails to discharge in interpret mode
    a = [vec(a_ref.at[idx(n), pl.ds(e0, be)]) for n in range(n_state)]

    def time_of(k):  # the k-th step of the forward scan
        return seq - 1 - k if reverse else k

    def states(t):
        return tuple(vec(h_ref.at[batch, idx(t), idx(n), pl.ds(e0, be)]) for n in range(n_state))

    def row(ref, t):
        return vec(ref.at[batch, t, pl.ds(e0, be)])

    def step(i, carry):
        g, h_t, da = carry
        k = seq - 1 - i
        t = time_of(k)
        h_prev = tuple(jnp.where(k > 0, h, f32(0.0)) for h in states(time_of(jnp.maximum(k - 1, 0))))
        u, dt, dy = row(u_ref, t), row(dt_ref, t), row(dy_ref, t)
        dtu = dt * u
        s = dadt = None
        new_g, new_da = [], []
        for n in range(n_state):
            b_n = b_ref[batch, t, idx(n)].astype(f32)
            c_n = c_ref[batch, t, idx(n)].astype(f32)
            dh = g[n] + dy * c_n
            decay = jnp.exp(dt * a[n])
            dh_ah = dh * (decay * h_prev[n])
            s = dh * b_n if s is None else s + dh * b_n
            dadt = dh_ah * a[n] if dadt is None else dadt + dh_ah * a[n]
            db_ref[batch, t, tile, idx(n)] = jnp.sum(dh * dtu)
            dc_ref[batch, t, tile, idx(n)] = jnp.sum(dy * h_t[n])
            new_g.append(decay * dh)
            new_da.append(da[n] + dh_ah * dt)
        masked_store(du_ref.at[batch, t, pl.ds(e0, be)], dt * s, e_ok)
        masked_store(ddt_ref.at[batch, t, pl.ds(e0, be)], dadt + u * s, e_ok)
        return tuple(new_g), h_prev, tuple(new_da)

    zeros = tuple(jnp.zeros((be,), f32) for _ in range(n_state))
    _, _, da = lax.fori_loop(0, seq, step, (zeros, states(time_of(seq - 1)), zeros))
    for n, da_n in enumerate(da):
        masked_store(da_ref.at[batch, idx(n), pl.ds(e0, be)], da_n, e_ok)


def _states_shape(batch, seq, e, n_state, cfg):
    """The backward's state buffer: (B, L, E_pad, N_pad) in the tile layout, (B, L, N, E) channel-major."""
    if cfg.channel_major:
        return batch, seq, n_state, e
    return batch, seq, pl.cdiv(e, cfg.block_e) * cfg.block_e, next_pow2(n_state)


def _core_states(u, dt, A, B, C, reverse, interpret, cfg):
    """Pass 1: the core outputs <h_t, C_t> (B, L, E) and every state h_t (``_states_shape``), fp32."""
    batch, seq, e = u.shape
    n_state = A.shape[1]
    kernel = functools.partial(
        _scan_kernel_channels if cfg.channel_major else _scan_kernel, seq=seq, e=e,
        n_state=n_state, cfg=cfg, reverse=reverse, softplus=False, has_d=False, has_z=False,
        has_bias=False, states=True,
    )
    f32 = jnp.float32
    a = A.astype(f32)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(u.shape, f32),
                   jax.ShapeDtypeStruct(_states_shape(batch, seq, e, n_state, cfg), f32)),
        grid=(batch, pl.cdiv(e, cfg.block_e)),
        **_launch(cfg, interpret, "ptq4vm_selective_scan_states"),
    )(u, dt, a.T if cfg.channel_major else a, B, C)


def _core_bwd(u, dt, A, B, C, dy, h, reverse, interpret, cfg):
    """Pass 2: ∂u, ∂Δ (B, L, E), ∂A (E, N), ∂B, ∂C (B, L, N) of the core scan, fp32."""
    batch, seq, e = u.shape
    n_state = A.shape[1]
    cm = cfg.channel_major
    tiles, npow = pl.cdiv(e, cfg.block_e), n_state if cm else next_pow2(n_state)
    kernel = functools.partial(_scan_bwd_kernel_channels if cm else _scan_bwd_kernel, seq=seq, e=e,
                               n_state=n_state, cfg=cfg, reverse=reverse)
    f32 = jnp.float32
    sds = jax.ShapeDtypeStruct
    a = A.astype(f32)
    du, ddt, da, db, dc = pl.pallas_call(
        kernel,
        out_shape=(sds(u.shape, f32), sds(u.shape, f32),
                   sds((batch, n_state, e) if cm else (batch, tiles * cfg.block_e, npow), f32),
                   sds((batch, seq, tiles, npow), f32), sds((batch, seq, tiles, npow), f32)),
        grid=(batch, tiles),
        **_launch(cfg, interpret, "ptq4vm_selective_scan_bwd"),
    )(u, dt, a.T if cm else a, B, C, dy, h)
    # Cross-program reductions (over batch for ∂A, over E tiles for ∂B, ∂C) in XLA: no atomics.
    da = jnp.sum(da, axis=0)
    return (du, ddt, da.T if cm else da[:e, :n_state],
            jnp.sum(db, axis=2)[..., :n_state], jnp.sum(dc, axis=2)[..., :n_state])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _trainable(softplus, reverse, interpret, cfgs, u, delta, A, B, C, D, z, delta_bias):
    """``cfgs``: (the forward's config, the backward's config); see ``selective_scan``."""
    return _forward(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, interpret, cfgs[0])


def _trainable_fwd(softplus, reverse, interpret, cfgs, *args):
    u, A = args[0], args[2]
    batch, seq, e = u.shape
    states = math.prod(_states_shape(batch, seq, e, A.shape[1], cfgs[1]))
    if states >= 2**31:  # checked when differentiating: the forward alone needs no state buffer
        raise ValueError(
            f"selective_scan: the backward's (B, L, E, N) state buffer has {states} elements, "
            "which overflows the kernel's int32 offsets; split the batch into chunks"
        )
    return _trainable(softplus, reverse, interpret, cfgs, *args), args


def _trainable_bwd(softplus, reverse, interpret, cfgs, res, g):
    """The elementwise parts (softplus, D·u, SiLU(z) gate) by hand in jnp around the two kernels."""
    cfg = cfgs[1]
    u, delta, A, B, C, D, z, delta_bias = res
    f32 = jnp.float32
    u32, g32 = u.astype(f32), g.astype(f32)
    dt_raw = delta.astype(f32) if delta_bias is None else delta.astype(f32) + delta_bias.astype(f32)
    dt = jax.nn.softplus(dt_raw) if softplus else dt_raw
    core, h = _core_states(u, dt, A, B, C, reverse, interpret, cfg)
    dz = None
    if z is not None:
        z32 = z.astype(f32)
        sig = jax.nn.sigmoid(z32)
        pre_gate = core if D is None else core + u32 * D.astype(f32)
        dz = (g32 * pre_gate * sig * (1.0 + z32 * (1.0 - sig))).astype(z.dtype)
        g32 = g32 * (z32 * sig)
    du, ddt, dA, dB, dC = _core_bwd(u, dt, A, B, C, g32, h, reverse, interpret, cfg)
    dD = None
    if D is not None:
        du = du + g32 * D.astype(f32)
        dD = jnp.sum(g32 * u32, axis=(0, 1)).astype(D.dtype)
    ddelta = ddt * jax.nn.sigmoid(dt_raw) if softplus else ddt
    dbias = None if delta_bias is None else jnp.sum(ddelta, axis=(0, 1)).astype(delta_bias.dtype)
    return (du.astype(u.dtype), ddelta.astype(delta.dtype), dA.astype(A.dtype), dB.astype(B.dtype),
            dC.astype(C.dtype), dD, dz, dbias)


_trainable.defvjp(_trainable_fwd, _trainable_bwd)


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
    """S6 forward y (B, L, E) in u.dtype, with a Pallas VJP: gradients for u, delta, A, B, C, D, z,
    delta_bias. Same arguments and semantics as ``ptq4vm_jax.ops.scan.selective_scan_ref``.

    ``u, delta, z`` (B, L, E); ``A`` (E, N); ``B, C`` (B, L, N); ``D, delta_bias`` (E,). One entry
    point serves inference (undifferentiated, only the forward kernel runs) and calibration.
    ``config`` runs both passes in its layout; by default the forward takes
    ``default_scan_config`` and the backward the tile layout.

    Nothing but the inputs is saved. The backward recomputes the states with the forward kernel,
    storing them as an fp32 (B, L, E, N) buffer (pass 1; (B, L, N, E) channel-major), then walks
    time backwards (pass 2). Keeping the states instead of recomputing them in-register from
    checkpoints trades memory for simplicity: Triton cannot index registers by a loop counter,
    and one program cannot reread its own global stores without a barrier, hence two calls.
    Differentiating raises a ValueError when that buffer overflows int32 offsets.
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    batch, _, e = u.shape
    n_state = A.shape[1]
    fwd_cfg = config or default_scan_config(batch, e, n_state)
    cfg = config or default_scan_config(batch, e, n_state, channel_major=False)
    return _trainable(delta_softplus, reverse, interpret, (fwd_cfg, cfg), u, delta, A, B, C, D, z,
                      delta_bias)
