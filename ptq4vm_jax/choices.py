"""The names of what a run chooses at run time: the library checks them and the command line
offers them without loading jax (``ptq4vm --help`` needs none). The backends and modes are
implemented in ``ops`` (scans), ``quant.integer`` (GEMMs) and ``quant.layer`` (modes); the
runtime model arguments are read by ``models``, ``api`` and the command line.
"""

from __future__ import annotations

#: Selective-scan backends (``ops.scan``): "ref" is ``lax.scan``, "pallas" a Pallas scan per
#: direction, "auto" the Pallas scan on GPU and "ref" elsewhere; "fused" is "pallas" plus, in a
#: model that has them, the fused kernels around the scans (Vim's mixer and add + norm,
#: ``ops.mixer`` / ``ops.norm``; VMamba's cross-scan and merge, ``ops.cross_scan``); opt-in:
#: "auto" keeps the per-direction scans.
SCAN_BACKENDS = ("auto", "ref", "pallas", "fused")

#: Integer GEMM implementations of ``mode="int"`` (all give the same integer accumulators):
#:   auto      ``quant.integer.default_gemm``: "wgmma" on Hopper, "xla" on other GPUs and elsewhere
#:             (the Triton GEMM runs slower than XLA's dot off Hopper: BENCHMARKS.md)
#:   xla       quantize, ``dot_general(s8, s8 -> s32)``, dequantize as XLA ops (``qmatmul_ref``)
#:   xla-bf16  the same with the integer dot as a bf16 dot with f32 accumulation
#:             (``qmatmul_bf16_dot``: exact, see ``bf16_dot_plan``), on any GPU's or TPU's bf16 units
#:   pallas    the fused Triton kernel ``qmatmul`` (any GPU; interpret mode off the GPU)
#:   wgmma     Hopper only: ``qmatmul_wgmma`` (XLA quantize + the Mosaic GPU wgmma GEMM), K and N
#:             zero-padded to multiples of 64, which adds no term to any sum (interpret mode off
#:             the GPU)
#:   mixed     Hopper only: "wgmma" for the wide layers (in_proj, out_proj), "xla-bf16" for those
#:             with K or N below ``quant.integer.NARROW`` (x_proj, dt_proj), too narrow to keep int8 tensor
#:             cores busy (the padded wgmma runs them slower than XLA's bf16 dot: BENCHMARKS.md)
GEMM_BACKENDS = ("auto", "xla", "xla-bf16", "pallas", "wgmma", "mixed")
HOPPER_ONLY = ("wgmma", "mixed")
#: Backends that run a Pallas kernel (in the interpreter off the GPU: the same integers, slowly).
PALLAS_GEMMS = ("pallas", *HOPPER_ONLY)

#: Quantized forwards: fake quantization in fp32, or integer arithmetic.
MODES = ("fake", "int")

#: Model arguments that choose how a model computes, not what it is: checkpoints never store them.
RUNTIME_CHOICES = ("dtype", "scan")
