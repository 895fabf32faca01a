"""Integer inference of a quantized linear, and the stored integer weight layout.

``w_int`` holds the smoothed, rounded weight codes. For ``w_bits <= 4`` they are packed two per
byte as ``pallas_kernels.pack_int4`` defines (rows i and i + K/2 share a byte; an odd K gets a
zero row appended first), so memory and checkpoints hold 4-bit weights at half the int8 size.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp

from pallas_kernels.qmatmul import (
    dense_weight,
    is_packed,
    pack_int4,
    qmatmul,
    qmatmul_bf16_dot,
    qmatmul_ref,
)
from pallas_kernels.qmatmul_hopper import (
    default_fused_config,
    qmatmul_wgmma,
    qmatmul_wgmma_fused,
    supports_qmatmul_wgmma,
)
from ptq4vm_jax.quant.config import QuantConfig

#: Integer GEMM implementations of ``mode="int"`` (all give the same integer accumulators):
#:   auto    "wgmma" on Hopper (the fastest end to end on an H200: BENCHMARKS.md), "pallas" on
#:           other GPUs, "xla" elsewhere
#:   xla     quantize, ``dot_general(s8, s8 -> s32)``, dequantize as XLA ops (``qmatmul_ref``)
#:   xla-bf16  the same with the integer dot as a bf16 dot with f32 accumulation
#:           (``qmatmul_bf16_dot``: exact, see ``bf16_dot_plan``), on any GPU's or TPU's bf16 units
#:   pallas  the fused Triton kernel ``qmatmul`` (any GPU; interpret mode off the GPU)
#:   wgmma   Hopper only: ``qmatmul_wgmma`` (XLA quantize + the Mosaic GPU wgmma GEMM), K and N
#:           zero-padded to multiples of 64 (x_proj's N = 56, dt_proj's K = 24), which adds no
#:           term to any sum (interpret mode off the GPU)
#:   wgmma-1pass  Hopper only: ``qmatmul_wgmma_fused`` (the quantization inside the wgmma kernel)
#:           where K and N are multiples of 64 and a row block's codes fit in shared memory,
#:           "wgmma" for the other layers; exact on an H200 but 1.7x slower than "wgmma"
#:           (BENCHMARKS.md), kept for tuning
#:   mixed   Hopper only: "wgmma" for the wide layers (in_proj, out_proj), "xla-bf16" for those
#:           with K or N below ``NARROW`` (x_proj, dt_proj), too narrow to keep int8 tensor cores
#:           busy (on an H200 the padded wgmma ran them 1.4-3.2x slower than XLA's bf16 dot)
GEMM_BACKENDS: tuple[str, ...] = ("auto", "xla", "xla-bf16", "pallas", "wgmma", "wgmma-1pass", "mixed")
HOPPER_ONLY = ("wgmma", "wgmma-1pass", "mixed")
#: A layer with K or N below this is "narrow" for ``gemm="mixed"``.
NARROW = 128
_GEMM = contextvars.ContextVar("ptq4vm_int_gemm", default="auto")


def store_weight(w_codes: jax.Array, w_bits: int) -> jax.Array:
    """(K, N) int8 codes -> the stored ``w_int``."""
    if not is_packed(w_bits):
        return w_codes.astype(jnp.int8)
    if w_codes.shape[0] % 2:
        w_codes = jnp.pad(w_codes, ((0, 1), (0, 0)))
    return pack_int4(w_codes)


def weight_codes(w_int: jax.Array, w_bits: int, k: int) -> jax.Array:
    """The stored ``w_int`` -> (K, N) int8 codes."""
    return dense_weight(w_int, w_bits)[:k]


@contextlib.contextmanager
def int_gemm(backend: str) -> Iterator[None]:
    """Within this context, ``mode="int"`` linears use ``backend`` (one of ``GEMM_BACKENDS``)."""
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"gemm must be one of {GEMM_BACKENDS}, got {backend!r}")
    token = _GEMM.set(backend)
    try:
        yield
    finally:
        _GEMM.reset(token)


def is_hopper() -> bool:
    """Whether the default device is an sm_90 GPU (H100/H200), the one wgmma runs on."""
    return getattr(jax.devices()[0], "compute_capability", None) == "9.0"


def gemm_backend_for(m: int, k: int, n: int, backend: str | None = None, *, itemsize: int = 2,
                     has_bias: bool = False) -> str:
    """The implementation one (M, K) x (K, N) integer linear runs on; ``itemsize`` (of the input
    and output) and ``has_bias`` decide whether the 1-pass kernel's shared memory holds a row
    block."""
    backend = backend or _GEMM.get()
    on_gpu = jax.default_backend() == "gpu"
    if backend == "auto":
        backend = "xla" if not on_gpu else "wgmma" if is_hopper() else "pallas"
    if backend in HOPPER_ONLY:
        if on_gpu and not is_hopper():
            raise ValueError(f"gemm={backend!r} needs a Hopper GPU (sm_90: H100/H200), not "
                             f"{jax.devices()[0].device_kind}; use gemm='pallas', 'xla-bf16' or 'xla'")
        if backend == "mixed":
            backend = "xla-bf16" if min(k, n) < NARROW else "wgmma"
    if backend in ("wgmma", "wgmma-1pass"):
        if not supports_qmatmul_wgmma(m, k, n):
            return "pallas"
        if backend == "wgmma-1pass" and default_fused_config(k, n, itemsize, itemsize,
                                                              has_bias) is None:
            return "wgmma"
    return backend


def int_linear(x: jax.Array, layer: Mapping[str, jax.Array], cfg: QuantConfig) -> jax.Array:
    """Integer-arithmetic linear of a (B, L, K) input on the backend chosen by :func:`int_gemm`;
    every backend gives the same int32 accumulators and the same float epilogue."""
    smooth = layer["smooth"]
    if is_packed(cfg.w_bits) and smooth.shape[0] % 2:
        # The packed weight carries one zero row: a zero input column quantizes to the zero point
        # and adds nothing.
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, 1)])
        smooth = jnp.pad(smooth, (0, 1), constant_values=1.0)
    k, n = smooth.shape[0], layer["w_scale"].shape[0]
    bias = layer.get("bias")
    backend = gemm_backend_for(x.shape[0] * x.shape[1], k, n,
                               itemsize=jnp.dtype(x.dtype).itemsize, has_bias=bias is not None)
    interpret = jax.default_backend() != "gpu"
    args = (layer["w_scale"], smooth, layer["a_scale"], layer["a_zero"], bias)
    if backend == "xla":
        return qmatmul_ref(x, layer["w_int"], *args, a_bits=cfg.a_bits, w_bits=cfg.w_bits,
                           out_dtype=x.dtype)
    if backend == "xla-bf16":
        return qmatmul_bf16_dot(x, layer["w_int"], *args, a_bits=cfg.a_bits, w_bits=cfg.w_bits,
                                out_dtype=x.dtype)
    if backend == "pallas":
        return qmatmul(x, layer["w_int"], *args, a_bits=cfg.a_bits, w_bits=cfg.w_bits,
                       out_dtype=x.dtype, interpret=interpret)
    if backend == "wgmma-1pass":
        return qmatmul_wgmma_fused(x, layer["w_int"], *args, a_bits=cfg.a_bits, w_bits=cfg.w_bits,
                                   out_dtype=x.dtype, interpret=interpret)
    return qmatmul_wgmma(x, layer["w_int"], *args, a_bits=cfg.a_bits, w_bits=cfg.w_bits,
                         out_dtype=x.dtype, interpret=interpret)
