"""Vim's bidirectional mixer core (conv + SiLU, S6 scan per direction, gate, average): the
plain-jnp reference of the fused kernel ``pallas_kernels.vim_mixer`` and the dispatch between
them by the model's scan backend (``ptq4vm_jax.choices.SCAN_BACKENDS``), an explicit argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.qlinear import LinearOperands, QuantizedActivation, QuantizedLinear
from pallas_kernels.qmatmul import quantize_activations
from pallas_kernels.vim_mixer import MixerConfig, MixerDirection
from pallas_kernels.vim_mixer import vim_mixer as vim_mixer_pallas
from ptq4vm_jax import gpu
from ptq4vm_jax.ops.scan import (
    causal_depthwise_conv1d,
    check_scan_backend,
    resolve_scan_backend,
    selective_scan,
)

#: The kernel's token loop in the Pallas interpreter (off the GPU): one token per trip, no
#: prefetch. Unrolling and prefetching hide a GPU's load latency; in the interpreter they only
#: multiply the compiled program (the kernel tests run them).
INTERPRETER_CONFIG = MixerConfig(64, 1, 2, unroll=1, prefetch=False)


def mixer_backend(scan: str) -> str:
    """What Vim's mixer core runs for the model's scan backend: "fused" (the kernel) only when
    asked for by name ("auto" keeps the per-direction scans; BENCHMARKS.md compares the two);
    else the scan backend the per-direction ops use."""
    if check_scan_backend(scan) == "fused":
        return "fused"
    return resolve_scan_backend(scan)


def mixer_direction(conv_weight: jax.Array, conv_bias: jax.Array, dt: jax.Array | LinearOperands,
                    B: jax.Array, C: jax.Array, A: jax.Array, D: jax.Array | None) -> MixerDirection:
    """One direction for the kernel. ``dt``: dt_proj's output (Δ before softplus, bias included),
    or its ``LinearOperands`` (x_proj's Δ-rank columns and dt_proj's weight, or their integer
    codes and steps) for the kernel to multiply on chip."""
    if isinstance(dt, LinearOperands):
        return MixerDirection(conv_weight, conv_bias, dt.x, B, C, A, D, delta_bias=dt.bias, dt_weight=dt.w,
                              dt_row_scale=dt.row_scale, dt_col_scale=dt.col_scale)
    return MixerDirection(conv_weight, conv_bias, dt, B, C, A, D)


def vim_mixer_ref(x: jax.Array, z: jax.Array | None, fwd: MixerDirection, bwd: MixerDirection, *,
                  divide_out: bool = True, scan: str = "ref", packed: bool = False) -> jax.Array:
    """The model's unfused mixer core, op for op: per direction SiLU(conv1d) (the backward one on
    the flipped sequence), the selective scan (on the backend ``scan``; "ref": ``lax.scan``) with
    the gate SiLU(z) (flipped for the backward branch), the backward output flipped back, then
    (y_f + y_b) / 2 in fp32, in x.dtype.

    ``z=None``: no gate; ``divide_out=False``: the sum. Arguments as ``vim_mixer``'s (``packed``:
    x is in_proj's output (B, L, 2E), x and z side by side); the backward direction's
    token-indexed inputs are in its own (flipped) order."""
    if packed:
        x, z = jnp.split(x, 2, axis=-1)
    flip = lambda t: jnp.flip(t, axis=1)
    ys = []
    for d, order in ((fwd, lambda t: t), (bwd, flip)):
        conv = causal_depthwise_conv1d(order(x), d.conv_weight.astype(x.dtype), d.conv_bias.astype(x.dtype))
        u = jax.nn.silu(conv)
        y = selective_scan(u, d.full_delta().astype(x.dtype), d.A, d.B, d.C, d.D,
                           None if z is None else order(z), d.delta_bias, delta_softplus=True, backend=scan)
        ys.append(order(y).astype(jnp.float32))
    y = ys[0] + ys[1]
    if divide_out:
        y = y / 2
    return y.astype(x.dtype)


def vim_mixer(x: jax.Array, z: jax.Array | None, fwd: MixerDirection, bwd: MixerDirection, *,
              divide_out: bool = True, backend: str = "auto", config: MixerConfig | None = None,
              quant: QuantizedLinear | None = None, packed: bool = False) -> jax.Array | QuantizedActivation:
    """The mixer core for the scan backend named (static, one of ``SCAN_BACKENDS``; see
    ``mixer_backend``): the fused Pallas kernel (``pallas_kernels.vim_mixer``, which serves inference
    and calibration; the interpreter off the GPU, by default with ``INTERPRETER_CONFIG``), or
    ``vim_mixer_ref`` on that scan backend. ``config``: the kernel's tiles (None: its default).
    ``quant`` (the consuming out_proj, integer inference): the value comes as its
    ``QuantizedActivation`` (on the fused backend, codes from the kernel's epilogue). ``packed``:
    x is in_proj's whole output (B, L, 2E) and z None (the kernel reads both halves in place)."""
    resolved = mixer_backend(backend)
    if resolved == "fused":
        interpret = gpu.interpret_kernels()
        if config is None and interpret:
            config = INTERPRETER_CONFIG
        y = vim_mixer_pallas(x, z, fwd, bwd, divide_out=divide_out, interpret=interpret, config=config,
                             quant=quant, packed=packed)
        return y if quant is None else QuantizedActivation(y, jnp.dtype(x.dtype))
    y = vim_mixer_ref(x, z, fwd, bwd, divide_out=divide_out, scan=resolved, packed=packed)
    return y if quant is None else QuantizedActivation(quantize_activations(y, quant), jnp.dtype(x.dtype))
