"""Quantization math (pure functions), configuration and the quantized linear."""

from pallas_kernels.qlinear import QuantizedLinear
from ptq4vm_jax.quant.config import DEFAULT_RULES, QuantConfig, QuantRule
from ptq4vm_jax.quant.layer import TrainLinear
from ptq4vm_jax.quant.params import QuantizedParams

__all__ = ["DEFAULT_RULES", "QuantConfig", "QuantRule", "QuantizedLinear", "QuantizedParams", "TrainLinear"]
