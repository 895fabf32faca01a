"""Integer inference of a quantized linear: which integer GEMM runs it.

The GEMM is an explicit argument (``gemm=``), passed from ``quantized_apply`` down to
:func:`int_linear`, so a jitted function runs what it was asked for, never what a context held
when it was traced. The weight layout is ``pallas_kernels.qlinear``'s.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.qlinear import QuantizedActivation, QuantizedLinear, is_packed
from pallas_kernels.qmatmul import qmatmul, qmatmul_codes, qmatmul_codes_ref, qmatmul_ref
from pallas_kernels.qmatmul_bf16 import qmatmul_bf16_dot, qmatmul_codes_bf16_dot
from pallas_kernels.qmatmul_hopper import qmatmul_wgmma, qmatmul_wgmma_codes, supports_qmatmul_wgmma
from ptq4vm_jax import gpu
from ptq4vm_jax.choices import GEMM_BACKENDS, HOPPER_ONLY, PALLAS_GEMMS
from ptq4vm_jax.errors import ArgumentError

#: A layer with K or N below this is "narrow" for ``gemm="mixed"``.
NARROW = 128


def check_gemm(gemm: str) -> None:
    if gemm not in GEMM_BACKENDS:
        raise ValueError(f"gemm must be one of {GEMM_BACKENDS}, got {gemm!r}")


def default_gemm() -> str:
    """What ``gemm="auto"`` means on this platform: "wgmma" on Hopper, "xla" elsewhere."""
    return "wgmma" if gpu.is_hopper() else "xla"


def gemm_backend_for(m: int, k: int, n: int, backend: str) -> str:
    """The implementation one (M, K) x (K, N) integer linear runs on."""
    check_gemm(backend)
    if backend == "auto":
        backend = default_gemm()
    if backend in HOPPER_ONLY:
        if gpu.on_gpu() and not gpu.is_hopper():
            raise ArgumentError(f"gemm={backend!r} needs a Hopper GPU (sm_90: H100/H200), not "
                                f"{jax.devices()[0].device_kind}; use gemm='pallas', 'xla-bf16' or 'xla'",
                                argument="gemm")
        if backend == "mixed":
            backend = "xla-bf16" if min(k, n) < NARROW else "wgmma"
    if backend == "wgmma" and not supports_qmatmul_wgmma(m, k, n):
        return "pallas"
    return backend


def int_linear(x: jax.Array | QuantizedActivation, layer: QuantizedLinear, gemm: str = "auto") -> jax.Array:
    """Integer-arithmetic linear of a (B, L, K) input on the GEMM ``gemm`` (one of
    ``GEMM_BACKENDS``); every GEMM gives the same int32 accumulators and the same float epilogue.
    ``x`` may come quantized already (a ``QuantizedActivation`` from a fused producer): the GEMM
    then runs on its codes, with the output in its dtype."""
    codes = x.codes if isinstance(x, QuantizedActivation) else None
    dtype = x.dtype
    if is_packed(layer.w_bits) and layer.in_features % 2:
        # The packed weight carries one zero row: a zero input column (any code) adds nothing.
        pad = [(0, 0)] * (len(x.shape) - 1) + [(0, 1)]
        if codes is None:
            x = jnp.pad(x, pad)
        else:
            codes = jnp.pad(codes, pad)
        layer = dataclasses.replace(layer, smooth=jnp.pad(layer.smooth, (0, 1), constant_values=1.0))
    backend = gemm_backend_for(x.shape[0] * x.shape[1], layer.in_features, layer.out_features, gemm)
    on_floats, on_codes = _entry_points(backend)
    kw = {"interpret": gpu.interpret_kernels()} if backend in PALLAS_GEMMS else {}
    if codes is not None:
        return on_codes(codes, layer, out_dtype=dtype, **kw)
    return on_floats(x, layer, out_dtype=dtype, **kw)


def _entry_points(backend: str) -> tuple:
    """(the GEMM on float activations, the same on a producer's codes) of a resolved backend."""
    return {
        "xla": (qmatmul_ref, qmatmul_codes_ref),
        "xla-bf16": (qmatmul_bf16_dot, qmatmul_codes_bf16_dot),
        "pallas": (qmatmul, qmatmul_codes),
        "wgmma": (qmatmul_wgmma, qmatmul_wgmma_codes),
    }[backend]
