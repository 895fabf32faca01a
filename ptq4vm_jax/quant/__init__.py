"""Quantization math (pure functions), configuration and the quantized linear."""

from ptq4vm_jax.quant.config import DEFAULT_RULES, QuantConfig, QuantRule

__all__ = ["DEFAULT_RULES", "QuantConfig", "QuantRule"]
