"""ptq4vm-jax: PTQ4VM post-training quantization for Visual Mamba in JAX.

    params = ptq4vm_jax.load_torch_checkpoint("vim_t_midclstok_76p1acc.pth", "vim_tiny")
    qparams = ptq4vm_jax.quantize_params(params, calib_images, model="vim_tiny",
                                         config=ptq4vm_jax.QuantConfig(w_bits=4, a_bits=8))
    logits = ptq4vm_jax.quantized_apply(None, qparams, images, mode="fake")
    ptq4vm_jax.save_quantized("/abs/path/vim_t_w4a8", qparams)

The public names load with their modules on first use (``__getattr__``), and so do submodules
reached as attributes (``ptq4vm_jax.api``): importing the package loads neither jax nor flax, so
the ``ptq4vm`` command takes charge of Ctrl-C before they load (``cli.entry``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ptq4vm_jax.lazy import lazy_attributes

if TYPE_CHECKING:
    from ptq4vm_jax.api import QuantizedParams, quantize_params, quantized_apply
    from ptq4vm_jax.calibrate.report import CalibrationError
    from ptq4vm_jax.checkpoint import (
        load_params,
        load_quantized,
        load_torch_checkpoint,
        save_params,
        save_quantized,
    )
    from ptq4vm_jax.errors import CheckpointError
    from ptq4vm_jax.models import create_model, list_models
    from ptq4vm_jax.quant.config import DEFAULT_RULES, QuantConfig, QuantRule

#: Each public name and the module that defines it.
_EXPORTS = {
    "QuantizedParams": "ptq4vm_jax.api",
    "quantize_params": "ptq4vm_jax.api",
    "quantized_apply": "ptq4vm_jax.api",
    "CalibrationError": "ptq4vm_jax.calibrate.report",
    "load_params": "ptq4vm_jax.checkpoint",
    "load_quantized": "ptq4vm_jax.checkpoint",
    "load_torch_checkpoint": "ptq4vm_jax.checkpoint",
    "save_params": "ptq4vm_jax.checkpoint",
    "save_quantized": "ptq4vm_jax.checkpoint",
    "CheckpointError": "ptq4vm_jax.errors",
    "create_model": "ptq4vm_jax.models",
    "list_models": "ptq4vm_jax.models",
    "DEFAULT_RULES": "ptq4vm_jax.quant.config",
    "QuantConfig": "ptq4vm_jax.quant.config",
    "QuantRule": "ptq4vm_jax.quant.config",
}

__all__ = [
    "DEFAULT_RULES",
    "CalibrationError",
    "CheckpointError",
    "QuantConfig",
    "QuantRule",
    "QuantizedParams",
    "create_model",
    "list_models",
    "load_params",
    "load_quantized",
    "load_torch_checkpoint",
    "quantize_params",
    "quantized_apply",
    "save_params",
    "save_quantized",
]
__version__ = "0.1.0"


__getattr__, __dir__ = lazy_attributes(__name__, __path__, _EXPORTS, globals())
