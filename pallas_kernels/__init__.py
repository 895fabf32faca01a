"""Pallas GPU kernels for PTQ4VM: the W2..8 A2..8 integer linear, the S6 scan (forward for
inference, forward + backward for calibration), Vim's fused bidirectional mixer core and the
residual add + RMSNorm (both able to emit the next linear's int8 codes), and VMamba's four scan
directions with their merge.

A quantized linear's parameters are one pytree, :class:`QuantizedLinear` (``qlinear.py``), and
every integer GEMM takes ``(x, layer, *, out_dtype=..., ...)``. ``qmatmul`` and the scan use the
Pallas Triton backend (see README.md here for why) and run on the CPU in ``interpret=True``
mode; ``qmatmul_wgmma`` / ``qmatmul_codes_wgmma`` are the Hopper-only Mosaic GPU GEMM. The
plain-XLA references are ``qmatmul_ref`` and ``ptq4vm_jax.ops.scan.selective_scan_ref``;
``qmatmul_bf16_dot`` (``qmatmul_bf16.py``) is the same integer linear with its integer dot on bf16
units (exact, pure XLA) for the layers too narrow for int8 kernels.
"""

from pallas_kernels.add_norm import (
    NormConfig,
    add_rmsnorm,
    add_rmsnorm_codes_ref,
    add_rmsnorm_ref,
    default_norm_config,
)
from pallas_kernels.cross_scan import (
    CrossScanConfig,
    cross_scan_merge,
    cross_scan_merge_ref,
    default_cross_scan_config,
)
from pallas_kernels.qlinear import (
    LinearOperands,
    QuantizedActivation,
    QuantizedLinear,
    check_bits,
    dense_weight,
    is_packed,
    pack_int4,
    pack_weight,
    unpack_int4,
    unpack_weight,
    weight_colsum,
)
from pallas_kernels.qmatmul import (
    GemmConfig,
    default_gemm_config,
    qmatmul,
    qmatmul_codes,
    qmatmul_codes_ref,
    qmatmul_int32,
    qmatmul_int32_ref,
    qmatmul_ref,
    quantize_activations,
)
from pallas_kernels.qmatmul_bf16 import bf16_dot_plan, qmatmul_bf16_dot, qmatmul_codes_bf16_dot
from pallas_kernels.qmatmul_hopper import (
    WgmmaConfig,
    prepare_weight_wgmma,
    qmatmul_codes_wgmma,
    qmatmul_wgmma,
    qmatmul_wgmma_codes,
    supports_wgmma,
)
from pallas_kernels.selective_scan import (
    ScanConfig,
    TokenLoopConfig,
    default_scan_config,
    selective_scan,
)
from pallas_kernels.vim_mixer import (
    MixerConfig,
    MixerDirection,
    default_mixer_config,
    vim_mixer,
)

__all__ = [
    "CrossScanConfig",
    "GemmConfig",
    "LinearOperands",
    "MixerConfig",
    "MixerDirection",
    "NormConfig",
    "QuantizedActivation",
    "QuantizedLinear",
    "ScanConfig",
    "TokenLoopConfig",
    "WgmmaConfig",
    "add_rmsnorm",
    "add_rmsnorm_codes_ref",
    "add_rmsnorm_ref",
    "bf16_dot_plan",
    "check_bits",
    "cross_scan_merge",
    "cross_scan_merge_ref",
    "default_cross_scan_config",
    "default_gemm_config",
    "default_mixer_config",
    "default_norm_config",
    "dense_weight",
    "default_scan_config",
    "is_packed",
    "pack_int4",
    "pack_weight",
    "prepare_weight_wgmma",
    "qmatmul",
    "qmatmul_bf16_dot",
    "qmatmul_codes",
    "qmatmul_codes_bf16_dot",
    "qmatmul_codes_ref",
    "qmatmul_codes_wgmma",
    "qmatmul_int32",
    "qmatmul_int32_ref",
    "qmatmul_ref",
    "qmatmul_wgmma",
    "qmatmul_wgmma_codes",
    "quantize_activations",
    "selective_scan",
    "supports_wgmma",
    "unpack_int4",
    "unpack_weight",
    "vim_mixer",
    "weight_colsum",
]
