"""Residual add + RMSNorm in one Triton kernel, optionally emitting the next linear's int8 codes.

A Vim block starts with mamba_ssm's fused add + norm (residual kept in fp32):

    residual' = residual + hidden                                   (fp32)
    out       = (residual' · rsqrt(mean_k residual'^2 + eps) · weight).astype(out_dtype)

and in_proj quantizes ``out`` per token (``quantize_activations``). With ``quant`` (in_proj's
``QuantizedLinear``) the kernel writes those int8 codes instead of ``out``: the normalised row is
quantized in registers, so integer inference reads the activation once instead of writing it
and reading it back for a separate quantize pass. The codes are ``quantize_activations`` of the
float output bit for bit (the same IEEE reciprocals and products, round half to even by PTX
``cvt.rni`` on the GPU), so one kernel serves fake-quant (float output) and integer inference
(codes) with equal codes.

One program normalises ``block_rows`` rows of the (B·L, D) matrix; a row is one tile of the next
power of two of D (masked), so D ≤ 8192. The reference is :func:`add_rmsnorm_ref`; calibration
differentiates the kernel through it (``jax.custom_vjp``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from jax.typing import DTypeLike

from pallas_kernels.qlinear import QuantizedLinear, epilogue_quantizer, quantize_tile
from pallas_kernels.qmatmul import quantize_activations

__all__ = ["NORM_SWEEP", "NormConfig", "add_rmsnorm", "add_rmsnorm_codes_ref", "add_rmsnorm_ref",
           "default_norm_config", "rms_norm_ref"]

_MAX_WIDTH = 8192  # one row per tile: registers bound the width


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """Rows per program and Triton's warps per program."""

    block_rows: int = 4
    num_warps: int = 4

    def __post_init__(self) -> None:
        if self.block_rows < 1 or self.block_rows & (self.block_rows - 1):
            raise ValueError(f"NormConfig.block_rows must be a power of two, got {self.block_rows}")


#: Configurations of the add + norm's sweep on a GPU (``experiments/bench_mixer.py --sections
#: sweep``): rows per program and warps.
NORM_SWEEP: tuple[NormConfig, ...] = tuple(NormConfig(rows, warps) for rows, warps in
                                           ((1, 4), (2, 4), (4, 4), (8, 4), (16, 4), (4, 8), (8, 8), (2, 2)))


def default_norm_config(d: int) -> NormConfig:
    """About 4096 elements per four-warp program (32 per thread): 16 rows at D = 192, 4 at 768."""
    return NormConfig(max(1, 4096 // pl.next_power_of_2(d)), 4)


def rms_norm_ref(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """mamba_ssm's RMSNorm over the last axis in fp32, as XLA ops: ``x · rsqrt(mean x² + eps) · w``."""
    x = x.astype(jnp.float32)
    rstd = lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return x * rstd * weight.astype(jnp.float32)


def add_rmsnorm_ref(hidden: jax.Array, residual: jax.Array, weight: jax.Array, *, eps: float,
                    out_dtype: DTypeLike | None = None) -> tuple[jax.Array, jax.Array]:
    """(normalised output in ``out_dtype`` (default hidden's), new residual in fp32), as XLA ops."""
    res = residual.astype(jnp.float32) + hidden.astype(jnp.float32)
    return rms_norm_ref(res, weight, eps).astype(out_dtype or hidden.dtype), res


def _norm_kernel(*refs, m, seq, d, eps, out_dtype, a_bits, cfg, exact_ptx):
    h_ref, r_ref, w_ref, *refs = refs
    if a_bits is not None:
        sm_ref, sc_ref, z_ref, *refs = refs  # 1/smooth, 1/a_scale, zero point (f32)
    o_ref, ro_ref = refs
    bm, bd = cfg.block_rows, pl.next_power_of_2(d)
    row0 = pl.program_id(0) * bm
    rows = row0 + lax.broadcasted_iota(jnp.int32, (bm,), 0)
    cols = lax.broadcasted_iota(jnp.int32, (bd,), 0)
    mask = (rows < m)[:, None] & (cols < d)[None, :]
    tile = (pl.ds(row0, bm), pl.ds(0, bd))
    f32 = jnp.float32
    res = (plt.load(r_ref.at[tile], mask=mask, other=0).astype(f32)
           + plt.load(h_ref.at[tile], mask=mask, other=0).astype(f32))
    plt.store(ro_ref.at[tile], res, mask=mask)
    rstd = lax.rsqrt(jnp.sum(res * res, axis=1) / f32(d) + f32(eps))
    weight = plt.load(w_ref.at[pl.ds(0, bd)], mask=cols < d, other=0).astype(f32)
    out = res * rstd[:, None] * weight[None, :]
    if a_bits is None:
        plt.store(o_ref.at[tile], out.astype(o_ref.dtype), mask=mask)
        return
    tok = jnp.minimum(rows, m - 1) % seq  # rows past M are masked; keep their gathers in bounds
    inv_smooth = plt.load(sm_ref.at[pl.ds(0, bd)], mask=cols < d, other=1.0)
    out = out.astype(out_dtype).astype(f32)  # the value in the dtype the linear receives
    codes = quantize_tile(out, inv_smooth[None, :], sc_ref[tok][:, None], z_ref[tok][:, None], a_bits,
                          exact_ptx)
    plt.store(o_ref.at[tile], codes, mask=mask)


def _forward(hidden, residual, weight, eps, out_dtype, quant, interpret, cfg):
    batch, seq, d = hidden.shape
    m = batch * seq
    operands = [hidden.reshape(m, d), residual.reshape(m, d), weight.astype(jnp.float32)]
    out_type = jax.ShapeDtypeStruct((m, d), out_dtype)
    if quant is not None:
        operands += epilogue_quantizer("add_rmsnorm", hidden.shape, quant)
        out_type = jax.ShapeDtypeStruct((m, d), jnp.int8)
    kernel = functools.partial(_norm_kernel, m=m, seq=seq, d=d, eps=eps, out_dtype=out_dtype,
                               a_bits=None if quant is None else quant.a_bits, cfg=cfg,
                               exact_ptx=not interpret)
    out, res = pl.pallas_call(
        kernel,
        out_shape=(out_type, jax.ShapeDtypeStruct((m, d), jnp.float32)),
        grid=(pl.cdiv(m, cfg.block_rows),),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=interpret,
        name="ptq4vm_add_rmsnorm",
    )(*operands)
    return out.reshape(hidden.shape), res.reshape(hidden.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _trainable(eps, out_dtype, interpret, cfg, hidden, residual, weight):
    return _forward(hidden, residual, weight, eps, out_dtype, None, interpret, cfg)


def _trainable_fwd(eps, out_dtype, interpret, cfg, hidden, residual, weight):
    return _trainable(eps, out_dtype, interpret, cfg, hidden, residual, weight), (hidden, residual, weight)


def _trainable_bwd(eps, out_dtype, interpret, cfg, saved, grads):
    _, vjp = jax.vjp(functools.partial(add_rmsnorm_ref, eps=eps, out_dtype=out_dtype), *saved)
    return vjp(grads)


_trainable.defvjp(_trainable_fwd, _trainable_bwd)


def _check(hidden, residual, weight):
    if hidden.ndim != 3:
        raise ValueError(f"add_rmsnorm: hidden must be (B, L, D), got shape {hidden.shape}")
    batch, seq, d = hidden.shape
    if residual.shape != hidden.shape:
        raise ValueError(f"add_rmsnorm: residual must match hidden's shape {hidden.shape}, "
                         f"got {residual.shape}")
    if weight.shape != (d,):
        raise ValueError(f"add_rmsnorm: weight must be (D,) = ({d},), got {weight.shape}")
    if d > _MAX_WIDTH:
        raise ValueError(f"add_rmsnorm: D = {d} is wider than one tile holds ({_MAX_WIDTH}); "
                         "use add_rmsnorm_ref")
    if batch * seq * d >= 2**31:
        raise ValueError(f"add_rmsnorm: B*L*D = {batch * seq * d} elements overflow the kernel's int32 "
                         "offsets; split the batch into chunks")


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "interpret", "config"))
def add_rmsnorm(
    hidden: jax.Array,
    residual: jax.Array,
    weight: jax.Array,
    *,
    eps: float,
    out_dtype: DTypeLike | None = None,
    quant: QuantizedLinear | None = None,
    interpret: bool = False,
    config: NormConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(out, residual + hidden)``: ``add_rmsnorm_ref``'s function in one kernel, the residual in
    fp32 and ``out`` in ``out_dtype`` (default hidden's); hidden and residual (B, L, D), weight
    (D,). With ``quant`` (the consuming linear), ``out`` is its int8 codes
    ``quantize_activations(out, quant)`` instead (inference only). Differentiable without it."""
    _check(hidden, residual, weight)
    out_dtype = jnp.dtype(out_dtype or hidden.dtype)
    cfg = config or default_norm_config(hidden.shape[-1])
    if quant is None:
        return _trainable(eps, out_dtype, interpret, cfg, hidden, residual, weight)
    return _forward(hidden, residual, weight, eps, out_dtype, quant, interpret, cfg)


def add_rmsnorm_codes_ref(hidden: jax.Array, residual: jax.Array, weight: jax.Array, quant: QuantizedLinear,
                          *, eps: float, out_dtype: DTypeLike | None = None) -> tuple[jax.Array, jax.Array]:
    """The reference of ``add_rmsnorm(..., quant=quant)``: the float output's codes."""
    out, res = add_rmsnorm_ref(hidden, residual, weight, eps=eps, out_dtype=out_dtype)
    return quantize_activations(out, quant), res
