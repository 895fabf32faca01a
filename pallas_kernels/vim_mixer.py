"""Vim's bidirectional mixer core as one Pallas (Triton backend) kernel.

Between in_proj and out_proj, a bimamba-v2 block runs, per direction, a causal depthwise conv1d +
SiLU, x_proj, dt_proj and the S6 scan, then gates with SiLU(z) and averages the two directions
(``if_divide_out``). Unfused, that is two convs, two flipped copies, the Δ round trips, two scans
and the gate / average passes, each through HBM. Here one program per (batch element, tile of
``block_e`` channels) reads x (and z) once per direction, recomputes the conv + SiLU from a
sliding window of the last ``d_conv`` rows of x kept in registers, computes Δ on chip (softplus
of Δ + bias, or of dt_proj itself from x_proj's Δ-rank columns: ``MixerDirection.dt_weight``),
and runs both recurrences with the fp32 state in registers, in the channel-major layout of
``selective_scan`` (N (block_e,) vectors, B_t and C_t read as scalars) with exp2 decays (A scaled
by log2 e once per program). The backward direction is walked from the last token to the first
by index, reading x and z in token order: no flipped copy exists. Its pass stores its ungated
partial output (in the output's dtype, as the unfused path rounds each direction's output); the
forward pass adds its own, gates, halves and writes
``SiLU(z) · (y_f + y_b) / 2``, every element read back by the thread that wrote it.

What stays outside: x_proj (its input is the conv + SiLU output, which the caller computes for
it anyway; only the kernel's own copy of it is recomputed), so Δ-rank, B and C come in per
direction. The backward direction's token-indexed inputs (Δ, B, C, the Δ-rank scale) are in its
own order, token L-1-t at index t, which is how Vim's backward branch (which runs on the flipped
sequence) produces them; its conv taps are those of ``conv1d_b`` applied to the flipped sequence.

The semantics are ``ptq4vm_jax.ops.mixer.vim_mixer_ref`` (plain jnp: the model's unfused path).
``vim_mixer`` carries a ``custom_vjp`` whose backward recomputes the conv and Δ in jnp and
differentiates through the Pallas scan (``selective_scan``, with its own VJP) per direction.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.qlinear import LinearOperands, QuantizedLinear, epilogue_quantizer, quantize_tile
from pallas_kernels.selective_scan import CHANNEL_MAJOR_MIN_CHANNELS, TokenLoopConfig, selective_scan
from pallas_kernels.token_loop import (
    LOG2_E,
    channel_tile,
    low_rank_product,
    masked_load,
    masked_store,
    token_loop,
)

__all__ = ["MIXER_SWEEP", "MixerConfig", "MixerDirection", "default_mixer_config", "vim_mixer"]


@dataclasses.dataclass(frozen=True)
class MixerConfig(TokenLoopConfig):
    """The fused mixer's ``TokenLoopConfig`` (64 channels per one-warp program by default), and
    for a direction given dt_proj's operands (``MixerDirection.dt_weight``): ``dt_on_chip``,
    multiply them in the kernel (else XLA computes Δ in x.dtype first, one (B, L, E) round trip
    through memory per direction); ``preload_dt_weight``: hold the (R, block_e) weight in
    registers (else it is reread from cache every token, which saves registers at R = 48)."""

    block_e: int = 64
    num_warps: int = 1
    preload_dt_weight: bool = True
    dt_on_chip: bool = True


#: Configurations of the fused mixer's sweep on a GPU (``experiments/bench_mixer.py --sections
#: sweep``): channels per program, warps, and the token loop around the default.
MIXER_SWEEP: tuple[MixerConfig, ...] = (
    MixerConfig(64, 1, 2),  # the default at many channels
    MixerConfig(32, 1, 2),  # the default at few: one channel per thread
    MixerConfig(128, 2, 2),
    MixerConfig(128, 4, 2),
    MixerConfig(64, 2, 2),
    MixerConfig(64, 1, 2, unroll=2),
    MixerConfig(64, 1, 2, unroll=8),
    MixerConfig(64, 1, 2, prefetch=False),
    MixerConfig(64, 1, 2, preload_dt_weight=False),
    MixerConfig(64, 1, 2, dt_on_chip=False),
)


def default_mixer_config(batch: int, e: int) -> MixerConfig:
    """The scan forward's channel-major tiles (64 channels per one-warp program, unroll 4 +
    prefetch), halved to 32 channels below CHANNEL_MAJOR_MIN_CHANNELS batch x E channels so that
    small batches still start enough programs."""
    return MixerConfig(64 if batch * e >= CHANNEL_MAJOR_MIN_CHANNELS else 32, 1, 2)


@dataclasses.dataclass(frozen=True)
class MixerDirection:
    """One direction's parameters and x_proj outputs.

    ``conv_weight`` (d_conv, E) with tap d_conv-1 on the current token (of the branch's own
    order), ``conv_bias`` (E,); ``B, C`` (B, L, N); ``A`` (E, N), negative; ``D`` (E,) or None;
    ``delta_bias`` (E,) or None. ``delta``: the pre-softplus step (B, L, E), or with
    ``dt_weight`` (R, E) x_proj's Δ-rank columns (B, L, R), multiplied on chip:
    Δ = (delta @ dt_weight) [· dt_row_scale[l] · dt_col_scale[e]] + delta_bias, then softplus.

    The scales carry an integer dt_proj exactly: with ``delta`` the centered activation codes
    q - z (as floats), ``dt_weight`` the weight codes, ``dt_row_scale`` the per-token static step
    (L,) and ``dt_col_scale`` the per-channel weight step (E,), the integer sum is exact in fp32
    (|Σ| < 2^24 for any R below 514 at 8 bits) and scaled in the order of ``simulate_int_linear``
    (``(acc · s_a[l]) · s_w[e] + bias``), so Δ is the quantized layer's to the last bit.
    Token-indexed arrays of the backward direction are in its own (flipped) order."""

    conv_weight: jax.Array
    conv_bias: jax.Array
    delta: jax.Array
    B: jax.Array
    C: jax.Array
    A: jax.Array
    D: jax.Array | None = None
    delta_bias: jax.Array | None = None
    dt_weight: jax.Array | None = None
    dt_row_scale: jax.Array | None = None
    dt_col_scale: jax.Array | None = None

    def full_delta(self) -> jax.Array:
        """Δ before bias and softplus, (B, L, E) fp32, in the branch's order: ``delta`` itself, or
        the Δ-rank columns times ``dt_weight`` with the optional row and column scales."""
        if self.dt_weight is None:
            return self.delta.astype(jnp.float32)
        return LinearOperands(self.delta, self.dt_weight, self.dt_row_scale, self.dt_col_scale).output()

    def with_full_delta(self, dtype: jnp.dtype) -> MixerDirection:
        """The same direction with Δ computed here (``full_delta``, in ``dtype``) instead of on chip."""
        if self.dt_weight is None:
            return self
        return dataclasses.replace(self, delta=self.full_delta().astype(dtype), dt_weight=None,
                                   dt_row_scale=None, dt_col_scale=None)


jax.tree_util.register_dataclass(
    MixerDirection,
    data_fields=[f.name for f in dataclasses.fields(MixerDirection)],
    meta_fields=[],
)

_OPTIONAL = ("D", "delta_bias", "dt_weight", "dt_row_scale", "dt_col_scale")


def _channels(x: jax.Array, packed: bool) -> int:
    """E: x's channels, or half of them when x holds x and the gate side by side."""
    return x.shape[2] // 2 if packed else x.shape[2]


def _check(x: jax.Array, z: jax.Array | None, fwd: MixerDirection, bwd: MixerDirection, packed: bool) -> None:
    if x.ndim != 3:
        raise ValueError(f"vim_mixer: x must be (B, L, {'2E' if packed else 'E'}), got shape {x.shape}")
    if packed and (z is not None or x.shape[2] % 2):
        raise ValueError(f"vim_mixer: packed=True takes in_proj's whole output (B, L, 2E) as x and z=None, "
                         f"got x {x.shape} and z {None if z is None else z.shape}")
    batch, seq, e = x.shape[0], x.shape[1], _channels(x, packed)
    if z is not None and z.shape != x.shape:
        raise ValueError(f"vim_mixer: z must match x's shape {x.shape}, got {z.shape}")
    if x.size >= 2**31:
        raise ValueError(f"vim_mixer: x's {x.size} elements overflow the kernel's int32 offsets; split the "
                         "batch into chunks")
    for name, d in (("fwd", fwd), ("bwd", bwd)):
        if not isinstance(d, MixerDirection):
            raise TypeError(f"vim_mixer: {name} must be a MixerDirection, got {type(d).__name__}")
        n = d.A.shape[-1]
        want = {"conv_weight": (d.conv_weight.shape[0], e), "conv_bias": (e,), "A": (e, n),
                "B": (batch, seq, n), "C": (batch, seq, n), "D": (e,), "delta_bias": (e,),
                "dt_col_scale": (e,), "dt_row_scale": (seq,)}
        if d.dt_weight is None:
            want["delta"] = (batch, seq, e)
            if d.dt_row_scale is not None or d.dt_col_scale is not None:
                raise ValueError(f"vim_mixer: {name}.dt_row_scale / dt_col_scale scale an on-chip "
                                 "dt_proj; give dt_weight too, or fold them into delta")
        else:
            want["dt_weight"] = (d.delta.shape[-1], e)
            want["delta"] = (batch, seq, d.dt_weight.shape[0])
        if d.conv_weight.ndim != 2 or d.conv_weight.shape[0] < 1:
            raise ValueError(f"vim_mixer: {name}.conv_weight must be (d_conv, E), got {d.conv_weight.shape}")
        for field, shape in want.items():
            arr = getattr(d, field)
            if arr is not None and arr.shape != shape:
                raise ValueError(f"vim_mixer: {name}.{field} must have shape {shape}, got {arr.shape}")
        if d.A.shape[0] != e:
            raise ValueError(f"vim_mixer: {name}.A must be (E, N) with E={e}, got {d.A.shape}")


def _inputs(x, z, fwd, bwd):
    """The kernel's operands as (name, array) pairs, absent optional ones left out; A transposed
    to (N, E) so each state's decay rates are one contiguous row."""
    named = [("x", x)] + ([("z", z)] if z is not None else [])
    for p, d in (("f_", fwd), ("b_", bwd)):
        named += [(p + "conv_weight", d.conv_weight.astype(jnp.float32)),
                  (p + "conv_bias", d.conv_bias.astype(jnp.float32)), (p + "delta", d.delta),
                  (p + "B", d.B), (p + "C", d.C), (p + "A", d.A.astype(jnp.float32).T)]
        named += [(p + k, getattr(d, k)) for k in _OPTIONAL if getattr(d, k) is not None]
    return named


def _mixer_kernel(*refs, names, seq, e, dims, gate, packed, divide_out, cfg, a_bits, exact_ptx):
    """``dims``: per direction prefix, (d_conv, N, R or None). ``packed``: the gate z is channels
    E..2E of x. ``a_bits`` None: one output, the mixer's value (its first pass holds the backward
    direction's partial sum); else two, that partial and the value's int8 codes under out_proj's
    input quantizer (operands ``q_*``)."""
    r = dict(zip(names, refs, strict=False))
    o_ref = refs[len(names)]
    codes_ref = refs[len(names) + 1] if a_bits is not None else None
    f32 = jnp.float32
    be = cfg.block_e
    batch, e0, cols, e_ok = channel_tile(e, be)
    z_ref, z_cols = (r["x"], pl.ds(e + e0, be)) if packed else (r.get("z"), cols)
    idx = jnp.int32  # static indices as int32 arrays: a Python int fails to discharge in interpret mode
    inv_smooth = None if codes_ref is None else masked_load(r["q_inv_smooth"].at[cols], e_ok, f32(1.0))

    def vec(ref):  # a (block_e,) slice of an (E,)-indexed ref, zero beyond E
        return masked_load(ref, e_ok, jnp.zeros((), ref.dtype)).astype(f32)

    def direction(p, reverse, final):
        """One direction's walk. The i-th step handles token t (t = i forwards, L-1-i backwards)
        and reads the branch-ordered inputs (Δ, B, C) at index i."""
        d_conv, n_state, rank = dims[p]
        taps = [vec(r[p + "conv_weight"].at[idx(k), cols]) for k in range(d_conv)]
        conv_bias = vec(r[p + "conv_bias"].at[cols])
        a = [vec(r[p + "A"].at[idx(n), cols]) * f32(LOG2_E) for n in range(n_state)]
        d = vec(r[p + "D"].at[cols]) if p + "D" in r else None
        bias = vec(r[p + "delta_bias"].at[cols]) if p + "delta_bias" in r else None
        col_scale = vec(r[p + "dt_col_scale"].at[cols]) if p + "dt_col_scale" in r else None
        w_rows = None
        if rank is not None and cfg.preload_dt_weight:
            w_rows = [vec(r[p + "dt_weight"].at[idx(k), cols]) for k in range(rank)]

        def delta(i):
            if rank is None:
                dt = vec(r[p + "delta"].at[batch, i, cols])
            else:
                weight_row = (w_rows.__getitem__ if w_rows is not None
                              else lambda k: vec(r[p + "dt_weight"].at[idx(k), cols]))
                row = r[p + "dt_row_scale"][i].astype(f32) if p + "dt_row_scale" in r else None
                column = lambda k: r[p + "delta"][batch, i, idx(k)].astype(f32)
                dt = low_rank_product(column, weight_row, rank, row, col_scale)
            if bias is not None:
                dt = dt + bias
            return jax.nn.softplus(dt)

        def load(i):
            """Everything step i needs that does not depend on the carry."""
            t = seq - 1 - i if reverse else i
            x_t = vec(r["x"].at[batch, t, cols])
            z_t = vec(z_ref.at[batch, t, z_cols]) if final and gate else None
            other = vec(o_ref.at[batch, t, cols]) if final else None  # the first pass's partial
            return i, t, x_t, delta(i), z_t, other

        def update(carry, inputs):
            h, window = carry  # window: the previous d_conv-1 rows of x in walk order, oldest first
            i, t, x_t, dt, z_t, other = inputs
            rows = (*window, x_t)
            conv = taps[0] * rows[0]
            for k in range(1, d_conv):
                conv = conv + taps[k] * rows[k]
            u = jax.nn.silu(conv + conv_bias)
            dtu = dt * u
            new_h, y = [], None
            for n in range(n_state):
                b_n = r[p + "B"][batch, i, idx(n)].astype(f32)
                c_n = r[p + "C"][batch, i, idx(n)].astype(f32)
                h_n = jnp.exp2(dt * a[n]) * h[n] + dtu * b_n
                y = h_n * c_n if y is None else y + h_n * c_n
                new_h.append(h_n)
            if d is not None:
                y = y + u * d
            if final:
                y = y + other
                if gate:
                    y = y * jax.nn.silu(z_t)
                if divide_out:
                    y = y * f32(0.5)
            if final and codes_ref is not None:
                # The codes of the value as the float path would hand it to out_proj (in x.dtype).
                y = y.astype(o_ref.dtype).astype(f32)
                codes = quantize_tile(y, inv_smooth, r["q_inv_scale"][t], r["q_zero"][t], a_bits, exact_ptx)
                masked_store(codes_ref.at[batch, t, cols], codes, e_ok)
            else:
                masked_store(o_ref.at[batch, t, cols], y, e_ok)
            return tuple(new_h), rows[1:]

        zeros = jnp.zeros((be,), f32)
        carry = (tuple(zeros for _ in range(n_state)), tuple(zeros for _ in range(d_conv - 1)))
        token_loop(seq, cfg, load, update, carry)

    direction("b_", reverse=True, final=False)
    direction("f_", reverse=False, final=True)


def _dims(d: MixerDirection) -> tuple[int, int, int | None]:
    return d.conv_weight.shape[0], d.A.shape[1], None if d.dt_weight is None else d.dt_weight.shape[0]


def _forward(x, z, fwd, bwd, divide_out, interpret, cfg, packed, quant=None):
    """The fused kernel: ``SiLU(z) · (y_f + y_b) / 2`` (B, L, E) in x.dtype, or with ``quant`` (a
    QuantizedLinear) its int8 codes under that linear's input quantizer."""
    batch, seq, e = x.shape[0], x.shape[1], _channels(x, packed)
    named = _inputs(x, z, fwd, bwd)
    out_shape = jax.ShapeDtypeStruct((batch, seq, e), x.dtype)
    if quant is not None:
        named += list(zip(("q_inv_smooth", "q_inv_scale", "q_zero"),
                          epilogue_quantizer("vim_mixer", out_shape.shape, quant), strict=True))
        out_shape = (out_shape, jax.ShapeDtypeStruct(out_shape.shape, jnp.int8))
    names, arrays = zip(*named, strict=True)
    kernel = functools.partial(
        _mixer_kernel, names=names, seq=seq, e=e, dims={"f_": _dims(fwd), "b_": _dims(bwd)},
        gate=packed or z is not None, packed=packed, divide_out=divide_out, cfg=cfg,
        a_bits=None if quant is None else quant.a_bits, exact_ptx=not interpret,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(batch, pl.cdiv(e, cfg.block_e)),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="ptq4vm_vim_mixer",
    )(*arrays)
    return out if quant is None else out[1]


# ----------------------------------------------------------------------------- training (VJP)


def _conv_silu(x: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
    """SiLU of the causal depthwise conv over tokens in fp32 (the kernel's prologue, in jnp)."""
    k, seq = weight.shape[0], x.shape[1]
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (k - 1, 0), (0, 0)))
    y = sum(xp[:, i:i + seq, :] * weight[i].astype(jnp.float32) for i in range(k))
    return jax.nn.silu(y + bias.astype(jnp.float32))


def _composed(x, z, fwd, bwd, divide_out, interpret, scan_cfg, packed):
    """The mixer as jnp around two Pallas trainable scans (what the VJP differentiates)."""
    if packed:
        x, z = jnp.split(x, 2, axis=-1)
    flip = lambda t: jnp.flip(t, axis=1)
    ys = []
    for d, order in ((fwd, lambda t: t), (bwd, flip)):
        u = _conv_silu(order(x), d.conv_weight, d.conv_bias)
        y = selective_scan(u, d.full_delta(), d.A, d.B, d.C, d.D, None, d.delta_bias,
                           interpret=interpret, config=scan_cfg)
        ys.append(order(y))
    y = ys[0] + ys[1]
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    if divide_out:
        y = y * 0.5
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _trainable(divide_out, interpret, cfg, packed, x, z, fwd, bwd):
    return _forward(x, z, fwd, bwd, divide_out, interpret, cfg, packed)


def _trainable_fwd(divide_out, interpret, cfg, packed, x, z, fwd, bwd):
    return _trainable(divide_out, interpret, cfg, packed, x, z, fwd, bwd), (x, z, fwd, bwd)


def _trainable_bwd(divide_out, interpret, cfg, packed, res, g):
    composed = functools.partial(_composed, divide_out=divide_out, interpret=interpret,
                                 scan_cfg=cfg.trainable_scan(), packed=packed)
    _, vjp = jax.vjp(composed, *res)
    return vjp(g)


_trainable.defvjp(_trainable_fwd, _trainable_bwd)


@functools.partial(jax.jit, static_argnames=("divide_out", "interpret", "config", "packed"))
def vim_mixer(
    x: jax.Array,
    z: jax.Array | None,
    fwd: MixerDirection,
    bwd: MixerDirection,
    *,
    divide_out: bool = True,
    interpret: bool = False,
    config: MixerConfig | None = None,
    quant: QuantizedLinear | None = None,
    packed: bool = False,
) -> jax.Array:
    """``SiLU(z) · (y_f + y_b) / 2`` (B, L, E) in x.dtype; ``z=None``: no gate; ``divide_out=False``:
    the sum. ``x, z`` (B, L, E) are the in_proj halves in token order; ``fwd``/``bwd`` the two
    directions (``MixerDirection``). Semantics: ``ptq4vm_jax.ops.mixer.vim_mixer_ref``.

    ``packed``: ``x`` is in_proj's whole output (B, L, 2E), x and the gate z side by side (Vim's
    ``xz.chunk(2)``), and ``z`` None. The kernel reads both halves in place, where separate
    halves would be copies (a slice of the minor axis is no view a kernel can take).

    ``quant``: the consuming linear (out_proj, a ``QuantizedLinear`` with K = E, per-token scales
    over L). The kernel then returns the int8 codes ``quantize_activations(value, quant)`` of the
    value in x.dtype, computed in its epilogue, instead of the value (inference only: not
    differentiable).

    Differentiable in every array input (x, z and both directions' fields); undifferentiated,
    only the fused kernel runs. The backward saves nothing but the inputs: it recomputes the
    convs and Δ in jnp (XLA fuses them) and runs the Pallas scan's VJP per direction (states
    recomputed by the forward kernel, then the reverse-time kernel), with the same tiles in the
    channel-major layout; the gate and average are differentiated by jax.
    """
    _check(x, z, fwd, bwd, packed)
    cfg = config or default_mixer_config(x.shape[0], _channels(x, packed))
    if not cfg.dt_on_chip:
        fwd, bwd = fwd.with_full_delta(x.dtype), bwd.with_full_delta(x.dtype)
    if quant is None:
        return _trainable(divide_out, interpret, cfg, packed, x, z, fwd, bwd)
    return _forward(x, z, fwd, bwd, divide_out, interpret, cfg, packed, quant)

