"""Quantization math (pure functions), configuration and the quantized linear: ``quantizers``,
``init`` (the PTS / SmoothQuant initialisation), ``config`` (``QuantConfig``, ``QuantRule``; no
jax, so the command line reads its choices without loading it), ``integer`` (the integer GEMMs),
``layer`` (the quantized linear and the interception that applies it) and ``params``
(``QuantizedParams``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ptq4vm_jax.lazy import lazy_attributes

if TYPE_CHECKING:
    from pallas_kernels.qlinear import QuantizedLinear
    from ptq4vm_jax.quant.config import DEFAULT_RULES, QuantConfig, QuantRule
    from ptq4vm_jax.quant.layer import TrainLinear
    from ptq4vm_jax.quant.params import QuantizedParams

_EXPORTS = {"QuantizedLinear": "pallas_kernels.qlinear", "DEFAULT_RULES": "ptq4vm_jax.quant.config",
            "QuantConfig": "ptq4vm_jax.quant.config", "QuantRule": "ptq4vm_jax.quant.config",
            "TrainLinear": "ptq4vm_jax.quant.layer", "QuantizedParams": "ptq4vm_jax.quant.params"}
__all__ = ["DEFAULT_RULES", "QuantConfig", "QuantRule", "QuantizedLinear", "QuantizedParams", "TrainLinear"]
__getattr__, __dir__ = lazy_attributes(__name__, __path__, _EXPORTS, globals())
