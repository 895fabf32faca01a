"""Layers, layer constructors and initialisers that several model families share.

Every layer keeps its parameters in float32 and computes in the config's ``dtype`` (norms in
float32), so one parameter tree serves every compute dtype; norms, initialisers and the channel
gate follow the official torch modules.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.add_norm import rms_norm_ref
from pallas_kernels.qlinear import LinearOperands
from ptq4vm_jax.ops.norm import add_rmsnorm
from ptq4vm_jax.ops.scan import causal_depthwise_conv1d, selective_scan

LN_EPS = 1e-5  # torch nn.LayerNorm's default, which every official LayerNorm here keeps
GATE_RATIO = 0.125  # the channel gate's bottleneck width, ``int(channels * 0.125)`` officially


def check_compute_dtype(dtype: Any) -> None:
    """A model's ``dtype`` (its projections' compute dtype) must be a floating-point dtype: an
    integer one does not select integer inference, which is ``quantized_apply(..., mode="int")``."""
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"dtype must be a floating-point dtype, the projections' compute dtype (e.g. "
                         f"jnp.float32 or jnp.bfloat16), got {dtype!r}; integer inference is "
                         "quantized_apply(..., mode='int')")


def layer_norm(name: str | None = None) -> nn.LayerNorm:
    """torch's LayerNorm in float32: two-pass variance, as the one-pass default differs by rounding
    on large means."""
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=jnp.float32,
                        param_dtype=jnp.float32, name=name)


def dense(dtype: Any, features: int, bias: bool, name: str | None = None, **kw: Any) -> nn.Dense:
    """A projection computing in ``dtype`` (its input is what quantization intercepts)."""
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, name=name, **kw)


class OperandDense(nn.Dense):
    """An ``nn.Dense`` (the same parameters, the same path) whose call returns its operands,
    ``LinearOperands(inputs, kernel, bias=bias)`` in the compute dtype, for a consumer whose
    kernel multiplies them on chip. Quantization intercepts it like any Dense and hands the
    quantized layer's operands instead (``ptq4vm_jax.quant.layer.intercept_dense``); observers
    of Dense calls still see its input."""

    emits_operands: ClassVar[bool] = True

    @nn.compact
    def __call__(self, inputs: jax.Array) -> LinearOperands:
        # nn.Dense's parameters: the same names, shapes, initialisers and random streams.
        kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype)
        dtype = self.dtype or inputs.dtype
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype)
        return LinearOperands(inputs.astype(dtype), kernel.astype(dtype), bias=bias)


def operand_dense(dtype: Any, features: int, bias: bool, name: str | None = None, **kw: Any) -> OperandDense:
    """``dense``'s projection as an ``OperandDense``."""
    return OperandDense(features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, name=name, **kw)


def conv(dtype: Any, features: int, kernel: int, stride: int, pad: int, bias: bool,
         groups: int = 1, name: str | None = None) -> nn.Conv:
    """A square 2-D conv with torch's symmetric ``padding=pad`` (XLA's "SAME" is asymmetric at stride 2)."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   feature_group_count=groups, use_bias=bias, dtype=dtype,
                   param_dtype=jnp.float32, name=name)


def a_log_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Mamba's S4D-real init: log(1..N) along the last (state) axis, so A = -(1..N)."""
    del key
    return jnp.log(jnp.broadcast_to(jnp.arange(1, shape[-1] + 1, dtype=dtype), shape))


def dt_bias_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32, dt_min: float = 1e-3,
                 dt_max: float = 0.1, floor: float = 1e-4) -> jax.Array:
    """softplus(bias) log-uniform in [dt_min, dt_max], as in Mamba's dt init."""
    u = jax.random.uniform(key, shape, dtype)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
    return dt + jnp.log(-jnp.expm1(-dt))


class RMSNorm(nn.Module):
    """mamba_ssm's RMSNorm (a weight, no bias), computed in float32 whatever the input dtype."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return rms_norm_ref(x, weight, self.eps)


class AddRMSNorm(nn.Module):
    """mamba_ssm's fused residual add + RMSNorm with the residual in fp32 (its parameter is the
    ``RMSNorm``'s ``weight``): ``(hidden, residual) -> (norm(residual + hidden) in dtype, residual
    + hidden)``, on the Pallas kernel when ``backend`` is the fused Vim mixer's (``ops.norm``).

    ``feeds``: the path, from this module's parent, of the linear that consumes the output. A
    quantization transform that runs that linear in integers may pass it as ``quant=``; the
    output is then that linear's ``QuantizedActivation`` (its input codes, quantized here)."""

    eps: float
    dtype: Any
    backend: str
    feeds: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, hidden: jax.Array, residual: jax.Array, quant: Any = None) -> tuple[Any, jax.Array]:
        weight = self.param("weight", nn.initializers.ones, (hidden.shape[-1],), jnp.float32)
        return add_rmsnorm(hidden, residual, weight, eps=self.eps, out_dtype=self.dtype,
                           backend=self.backend, quant=quant)


class CausalConv1d(nn.Module):
    """Depthwise causal conv; ``kernel`` is (d_conv, channels)."""

    d_conv: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ch = x.shape[-1]
        bound = 1.0 / math.sqrt(self.d_conv)
        init = lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound)
        kernel = self.param("kernel", init, (self.d_conv, ch), jnp.float32)
        bias = self.param("bias", init, (ch,), jnp.float32)
        return causal_depthwise_conv1d(x, kernel.astype(x.dtype), bias.astype(x.dtype))


def mamba_direction(cfg: Any, x: jax.Array, z: jax.Array, conv1d: CausalConv1d, x_proj: nn.Dense,
                    dt_proj: nn.Dense, a_log: jax.Array, d: jax.Array) -> jax.Array:
    """One scan direction of a Mamba mixer on (B, L, E) in its scan order: SiLU(causal conv) ->
    x_proj -> (dt, B, C), dt_proj, then the selective scan (softplus dt, gated by SiLU(z)) on the
    backend ``cfg.scan``; ``cfg`` (a Vim-family config) also gives dt_rank and d_state."""
    x = nn.silu(conv1d(x))
    dt, b, cc = jnp.split(x_proj(x), [cfg.dt_rank, cfg.dt_rank + cfg.d_state], axis=-1)
    dt = dt_proj(dt)
    a = -jnp.exp(a_log.astype(jnp.float32))
    return selective_scan(x, dt, a, b, cc, D=d, z=z, delta_softplus=True, backend=cfg.scan)


class ChannelGate(nn.Module):
    """LocalMamba's ``BiAttn``: x * sigmoid(select(GELU(reduce(mean over tokens of LN(x))))) on (B, L, C).

    ``dtype`` is the projections' compute dtype (LocalVMamba: its config's; LocalVim: float32).
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        t = jnp.mean(layer_norm("norm")(x.astype(jnp.float32)), axis=1, keepdims=True)
        t = jax.nn.gelu(dense(self.dtype, int(c * GATE_RATIO), True, "global_reduce")(t.astype(self.dtype)),
                        approximate=False)
        return x * jax.nn.sigmoid(dense(self.dtype, c, True, "channel_select")(t).astype(jnp.float32))
