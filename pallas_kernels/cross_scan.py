"""VMamba's cross-scan, K selective scans and cross-merge in one Triton kernel.

VMamba's SS2D scans one (B, L, E) activation in K token orders (row-major, column-major and
both reversed) and sums the K outputs back in row-major order. Unfused, that is K reordered
copies of the activation, K scan outputs and a merge that reorders and adds them. Here each
program (batch element, ``block_e`` channels) walks the K orders in turn: direction k's step i
reads the activation's row ``orders[k, i]`` in place (the row-major layout stays the only copy),
its own Δ, B, C at step i (x_proj / dt_proj ran on its ordered sequence; or Δ from dt_proj
multiplied on chip, as in ``vim_mixer``), runs the recurrence with the fp32 state in registers
and adds its output into row ``orders[k, i]`` of one fp32
(B, L, E) result (the first direction writes, the others read, add and write back; each thread
rereads only what it stored). The reference is :func:`cross_scan_merge_ref`; calibration
differentiates through it with the per-direction Pallas scans (``jax.custom_vjp``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.qlinear import LinearOperands
from pallas_kernels.selective_scan import CHANNEL_MAJOR_MIN_CHANNELS, TokenLoopConfig
from pallas_kernels.selective_scan import selective_scan as selective_scan_pallas
from pallas_kernels.token_loop import (
    LOG2_E,
    channel_tile,
    low_rank_product,
    masked_load,
    masked_store,
    token_loop,
)

__all__ = ["CROSS_SCAN_SWEEP", "CrossScanConfig", "cross_scan_merge", "cross_scan_merge_ref",
           "default_cross_scan_config", "full_delta"]


@dataclasses.dataclass(frozen=True)
class CrossScanConfig(TokenLoopConfig):
    """The cross-scan's ``TokenLoopConfig`` (one-warp programs by default), and ``dt_on_chip``:
    given dt_proj's operands (``dt_weight``), multiply them in the kernel (else XLA computes Δ in
    fp32 first, one (K, B, L, E) round trip through memory)."""

    num_warps: int = 1
    dt_on_chip: bool = True


#: Configurations of the cross-scan's sweep on a GPU (``experiments/bench_mixer.py --sections
#: sweep``): channels per program, warps, and the token loop.
CROSS_SCAN_SWEEP: tuple[CrossScanConfig, ...] = (
    CrossScanConfig(32, 1, 2),  # the default at few channels
    CrossScanConfig(64, 1, 2),  # the default at many
    CrossScanConfig(16, 1, 2),
    CrossScanConfig(128, 4, 2),
    CrossScanConfig(32, 1, 2, unroll=8),
    CrossScanConfig(32, 1, 2, prefetch=False),
    CrossScanConfig(32, 1, 2, dt_on_chip=False),
)


def default_cross_scan_config(batch: int, e: int) -> CrossScanConfig:
    """32 channels per one-warp program (one per thread), 64 from CHANNEL_MAJOR_MIN_CHANNELS
    batch x E channels on: VMamba's stages have few channels and many tokens, so more programs
    rather than wider ones."""
    return CrossScanConfig(64 if batch * e >= CHANNEL_MAJOR_MIN_CHANNELS else 32, 1, 2)


def _inverse(order: jax.Array) -> jax.Array:
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def full_delta(delta: jax.Array, dt_weight: jax.Array | None = None, dt_row_scale: jax.Array | None = None,
               dt_col_scale: jax.Array | None = None) -> jax.Array:
    """Δ before bias and softplus, (K, B, L, E) fp32: ``delta`` itself, or each direction's Δ-rank
    columns (K, B, L, R) times its dt_proj weight (K, R, E), then times the per-token (K, L) and
    per-channel (K, E) steps when given (an integer dt_proj's codes: ``MixerDirection``'s rule)."""
    if dt_weight is None:
        return delta.astype(jnp.float32)
    return jax.vmap(lambda *a: LinearOperands(*a).output())(delta, dt_weight, dt_row_scale, dt_col_scale)


def cross_scan_merge_ref(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                         D: jax.Array | None, delta_bias: jax.Array | None, orders: jax.Array, *,
                         scan: Callable, dt_weight: jax.Array | None = None,
                         dt_row_scale: jax.Array | None = None,
                         dt_col_scale: jax.Array | None = None) -> jax.Array:
    """``Σ_k unorder_k(scan_k(u[:, orders[k]]))`` in fp32, (B, L, E), summed over k in order: the
    composition the kernel fuses, with the selective scan given (``scan(u, delta, A, B, C, D, z,
    delta_bias)`` with softplus on Δ: ``ptq4vm_jax.ops.scan.selective_scan_ref`` as the
    reference, the Pallas ``selective_scan`` in the kernel's VJP).

    ``u`` (B, L, E) in row-major token order; per direction k (leading axis K): ``delta`` (K, B, L,
    E) pre-softplus, ``B, C`` (K, B, L, N), ``A`` (K, E, N), ``D, delta_bias`` (K, E) or None, all
    in direction k's own order; ``orders`` (K, L) int32, step i of direction k reading row-major
    token ``orders[k, i]`` (a permutation of 0..L-1). With ``dt_weight`` (K, R, E), ``delta`` is
    (K, B, L, R), dt_proj's input, and Δ is :func:`full_delta`."""
    delta = full_delta(delta, dt_weight, dt_row_scale, dt_col_scale)
    y = None
    for k in range(orders.shape[0]):
        u_k = jnp.take(u, orders[k], axis=1)
        d_k = None if D is None else D[k]
        b_k = None if delta_bias is None else delta_bias[k]
        y_k = scan(u_k, delta[k], A[k], B[k], C[k], d_k, None, b_k).astype(jnp.float32)
        y_k = jnp.take(y_k, _inverse(orders[k]), axis=1)
        y = y_k if y is None else y + y_k
    return y


def _kernel(*refs, names, seq, e, k_dirs, n_state, rank, cfg):
    r = dict(zip(names, refs, strict=False))
    o_ref = refs[len(names)]
    f32 = jnp.float32
    be = cfg.block_e
    batch, e0, cols, e_ok = channel_tile(e, be)
    idx = jnp.int32  # static indices as int32 arrays: a Python int fails to discharge in interpret mode

    def vec(ref):
        return masked_load(ref, e_ok, jnp.zeros((), ref.dtype)).astype(f32)

    def direction(k):
        a = [vec(r["A"].at[idx(k), idx(n), cols]) * f32(LOG2_E) for n in range(n_state)]
        d = vec(r["D"].at[idx(k), cols]) if "D" in r else None
        bias = vec(r["delta_bias"].at[idx(k), cols]) if "delta_bias" in r else None
        w_rows, col_scale = [], None
        if rank is not None:  # dt_proj on chip: its (R, block_e) weight held in registers
            w_rows = [vec(r["dt_weight"].at[idx(k), idx(j), cols]) for j in range(rank)]
            col_scale = vec(r["dt_col_scale"].at[idx(k), cols]) if "dt_col_scale" in r else None

        def delta(i):
            if rank is None:
                return vec(r["delta"].at[idx(k), batch, i, cols])
            row = r["dt_row_scale"][idx(k), i].astype(f32) if "dt_row_scale" in r else None
            column = lambda j: r["delta"][idx(k), batch, i, idx(j)].astype(f32)
            return low_rank_product(column, w_rows.__getitem__, rank, row, col_scale)

        def load(i):
            t = r["orders"][idx(k), i]
            dt = delta(i)
            if bias is not None:
                dt = dt + bias
            other = vec(o_ref.at[batch, t, cols]) if k > 0 else None
            return i, t, vec(r["u"].at[batch, t, cols]), jax.nn.softplus(dt), other

        def update(h, inputs):
            i, t, u, dt, other = inputs
            dtu = dt * u
            new_h, y = [], None
            for n in range(n_state):
                b_n = r["B"][idx(k), batch, i, idx(n)].astype(f32)
                c_n = r["C"][idx(k), batch, i, idx(n)].astype(f32)
                h_n = jnp.exp2(dt * a[n]) * h[n] + dtu * b_n
                y = h_n * c_n if y is None else y + h_n * c_n
                new_h.append(h_n)
            if d is not None:
                y = y + u * d
            if other is not None:
                y = other + y
            masked_store(o_ref.at[batch, t, cols], y, e_ok)
            return tuple(new_h)

        token_loop(seq, cfg, load, update, tuple(jnp.zeros((be,), f32) for _ in range(n_state)))

    for k in range(k_dirs):
        direction(k)


#: The kernel's optional operands, in the order of ``_trainable``'s arguments after C.
_OPTIONAL = ("D", "delta_bias", "dt_weight", "dt_row_scale", "dt_col_scale")


def _forward(interpret, cfg, u, delta, A, B, C, *rest):
    *optional, orders = rest
    batch, seq, e = u.shape
    named = [("u", u), ("delta", delta), ("A", jnp.swapaxes(A.astype(jnp.float32), 1, 2)), ("B", B), ("C", C),
             ("orders", orders.astype(jnp.int32))]
    given = dict(zip(_OPTIONAL, optional, strict=True))
    named += [(name, arr.astype(jnp.float32)) for name, arr in given.items() if arr is not None]
    names, arrays = zip(*named, strict=True)
    rank = None if given["dt_weight"] is None else given["dt_weight"].shape[1]
    kernel = functools.partial(_kernel, names=names, seq=seq, e=e, k_dirs=orders.shape[0],
                               n_state=A.shape[-1], rank=rank, cfg=cfg)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(u.shape, jnp.float32),
        grid=(batch, pl.cdiv(e, cfg.block_e)),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="ptq4vm_cross_scan",
    )(*arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _trainable(interpret, cfg, *args):
    """(u, delta, A, B, C, the ``_OPTIONAL`` operands or None, orders) -> the kernel's output."""
    return _forward(interpret, cfg, *args)


def _trainable_fwd(interpret, cfg, *args):
    return _trainable(interpret, cfg, *args), args


def _trainable_bwd(interpret, cfg, saved, g):
    scan = functools.partial(selective_scan_pallas, interpret=interpret, config=cfg.trainable_scan())
    *arrays, orders = saved

    def composed(u, delta, A, B, C, D, delta_bias, dt_weight, dt_row_scale, dt_col_scale):
        return cross_scan_merge_ref(u, delta, A, B, C, D, delta_bias, orders, scan=scan, dt_weight=dt_weight,
                                    dt_row_scale=dt_row_scale, dt_col_scale=dt_col_scale)

    _, vjp = jax.vjp(composed, *arrays)
    return (*vjp(g), None)


_trainable.defvjp(_trainable_fwd, _trainable_bwd)


def _check(u, delta, A, B, C, D, delta_bias, orders, dt_weight, dt_row_scale, dt_col_scale):
    if u.ndim != 3:
        raise ValueError(f"cross_scan_merge: u must be (B, L, E), got shape {u.shape}")
    batch, seq, e = u.shape
    if orders.ndim != 2 or orders.shape[1] != seq:
        raise ValueError(f"cross_scan_merge: orders must be (K, L) with L={seq}, got {orders.shape}")
    k, n = orders.shape[0], A.shape[-1]
    if dt_weight is None and (dt_row_scale is not None or dt_col_scale is not None):
        raise ValueError("cross_scan_merge: dt_row_scale / dt_col_scale scale an on-chip dt_proj; give "
                         "dt_weight too, or fold them into delta")
    rank = None if dt_weight is None else delta.shape[-1]
    want = {"delta": (k, batch, seq, e if rank is None else rank), "A": (k, e, n), "B": (k, batch, seq, n),
            "C": (k, batch, seq, n), "D": (k, e), "delta_bias": (k, e), "dt_weight": (k, rank, e),
            "dt_row_scale": (k, seq), "dt_col_scale": (k, e)}
    given = (delta, A, B, C, D, delta_bias, dt_weight, dt_row_scale, dt_col_scale)
    for name, arr in zip(want, given, strict=True):
        if arr is not None and arr.shape != want[name]:
            raise ValueError(f"cross_scan_merge: {name} must have shape {want[name]} (K={k} directions), "
                             f"got {arr.shape}")
    if batch * seq * e >= 2**31 or k * batch * seq * e >= 2**31:
        raise ValueError(f"cross_scan_merge: K*B*L*E = {k * batch * seq * e} elements overflow the kernel's "
                         "int32 offsets; split the batch into chunks")


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def cross_scan_merge(
    u: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None,
    delta_bias: jax.Array | None,
    orders: jax.Array,
    *,
    dt_weight: jax.Array | None = None,
    dt_row_scale: jax.Array | None = None,
    dt_col_scale: jax.Array | None = None,
    interpret: bool = False,
    config: CrossScanConfig | None = None,
) -> jax.Array:
    """:func:`cross_scan_merge_ref`'s function (B, L, E) fp32 in one kernel, differentiable in
    every array but ``orders`` (the backward recomputes through the per-direction Pallas scans'
    VJPs, gathers and scatters in jnp). ``orders`` must be permutations of 0..L-1 (not checked:
    they are traced). With ``dt_weight`` (and the optional steps, :func:`full_delta`) the kernel
    multiplies dt_proj on chip from ``delta`` (K, B, L, R), unless ``config.dt_on_chip`` is off."""
    _check(u, delta, A, B, C, D, delta_bias, orders, dt_weight, dt_row_scale, dt_col_scale)
    cfg = config or default_cross_scan_config(u.shape[0], u.shape[2])
    if dt_weight is not None and not cfg.dt_on_chip:
        delta, dt_weight = full_delta(delta, dt_weight, dt_row_scale, dt_col_scale), None
        dt_row_scale = dt_col_scale = None
    return _trainable(interpret, cfg, u, delta, A, B, C, D, delta_bias, dt_weight, dt_row_scale, dt_col_scale,
                      orders)
