"""Pallas GPU kernels for PTQ4VM: the W2..8 A2..8 integer linear and the S6 scan (forward for
inference, forward + backward for calibration).

Both use the Pallas Triton backend (see README.md here for why) and run on the CPU in
``interpret=True`` mode. ``qmatmul_codes_wgmma`` / ``qmatmul_wgmma`` (exact and timed on an
H200; a warp-specialized schedule not yet run on a GPU) and ``qmatmul_wgmma_fused``
(quantization inside; exact on an H200 but 1.7x slower than the 2-pass kernel) are Hopper-only
Mosaic GPU GEMMs. The plain-XLA references are ``qmatmul_ref`` and
``ptq4vm_jax.ops.scan.selective_scan_ref``; ``qmatmul_bf16_dot`` is the same integer linear with
its integer dot on bf16 units (exact, pure XLA) for the layers too narrow for int8 kernels.
"""

from pallas_kernels.qmatmul import (
    GemmConfig,
    bf16_dot_plan,
    check_bits,
    default_gemm_config,
    dense_weight,
    is_packed,
    pack_int4,
    qmatmul,
    qmatmul_bf16_dot,
    qmatmul_codes,
    qmatmul_int32,
    qmatmul_int32_ref,
    qmatmul_ref,
    quantize_activations,
    quantize_activations_pallas,
    unpack_int4,
    weight_colsum,
)
from pallas_kernels.qmatmul_hopper import (
    FusedWgmmaConfig,
    WgmmaConfig,
    default_fused_config,
    prepare_weight_wgmma,
    qmatmul_codes_wgmma,
    qmatmul_wgmma,
    qmatmul_wgmma_fused,
    supports_wgmma,
)
from pallas_kernels.selective_scan import (
    ScanConfig,
    default_scan_config,
    selective_scan,
    selective_scan_trainable,
)

__all__ = [
    "FusedWgmmaConfig",
    "GemmConfig",
    "ScanConfig",
    "WgmmaConfig",
    "bf16_dot_plan",
    "check_bits",
    "default_fused_config",
    "default_gemm_config",
    "dense_weight",
    "default_scan_config",
    "is_packed",
    "pack_int4",
    "prepare_weight_wgmma",
    "qmatmul",
    "qmatmul_bf16_dot",
    "qmatmul_codes",
    "qmatmul_codes_wgmma",
    "qmatmul_int32",
    "qmatmul_int32_ref",
    "qmatmul_ref",
    "qmatmul_wgmma",
    "qmatmul_wgmma_fused",
    "quantize_activations",
    "quantize_activations_pallas",
    "selective_scan",
    "selective_scan_trainable",
    "supports_wgmma",
    "unpack_int4",
    "weight_colsum",
]
