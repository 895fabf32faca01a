"""The residual add + RMSNorm that opens a Vim block: the Pallas kernel
``pallas_kernels.add_norm`` or its XLA reference, by the model's scan backend (an explicit
argument), and, for integer inference, the next linear's codes instead of the float output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from pallas_kernels.add_norm import NormConfig, add_rmsnorm_ref
from pallas_kernels.add_norm import add_rmsnorm as add_rmsnorm_pallas
from pallas_kernels.qlinear import QuantizedActivation, QuantizedLinear
from pallas_kernels.qmatmul import quantize_activations
from ptq4vm_jax import gpu
from ptq4vm_jax.ops.mixer import mixer_backend

#: The kernel's tiles in the Pallas interpreter (off the GPU): many rows per step, since each
#: interpreted grid step costs far more than its arithmetic.
INTERPRETER_CONFIG = NormConfig(block_rows=128, num_warps=4)


def add_rmsnorm(hidden: jax.Array, residual: jax.Array, weight: jax.Array, *, eps: float,
                out_dtype: DTypeLike, backend: str = "auto",
                quant: QuantizedLinear | None = None) -> tuple[jax.Array | QuantizedActivation, jax.Array]:
    """``(RMSNorm(residual + hidden) in out_dtype, residual + hidden in fp32)``.

    The kernel runs where the model's mixer is the fused kernel (``mixer_backend(backend) ==
    "fused"``), so that fake-quant and integer inference read one kernel's output; elsewhere the
    XLA reference. ``quant`` (the consuming linear, integer inference): the output comes as its
    ``QuantizedActivation`` (the codes ``quantize_activations`` would give, computed in the
    kernel's epilogue on the fused backend)."""
    dtype = jnp.dtype(out_dtype)
    if mixer_backend(backend) == "fused":
        interpret = gpu.interpret_kernels()
        config = INTERPRETER_CONFIG if interpret else None
        out, res = add_rmsnorm_pallas(hidden, residual, weight, eps=eps, out_dtype=dtype, quant=quant,
                                      interpret=interpret, config=config)
        return (out if quant is None else QuantizedActivation(out, dtype)), res
    out, res = add_rmsnorm_ref(hidden, residual, weight, eps=eps, out_dtype=dtype)
    return (out if quant is None else QuantizedActivation(quantize_activations(out, quant), dtype)), res
