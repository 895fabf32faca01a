"""ptq4vm-jax: PTQ4VM post-training quantization for Visual Mamba in JAX.

    params = ptq4vm_jax.load_torch_checkpoint("vim_t_midclstok_76p1acc.pth", "vim_tiny")
    qparams = ptq4vm_jax.quantize_params(params, calib_images, model="vim_tiny",
                                         config=ptq4vm_jax.QuantConfig(w_bits=4, a_bits=8))
    logits = ptq4vm_jax.quantized_apply(None, qparams, images, mode="fake")
    ptq4vm_jax.save_quantized("/abs/path/vim_t_w4a8", qparams)
"""

from ptq4vm_jax.api import QuantizedParams, quantize_params, quantized_apply
from ptq4vm_jax.calibrate.jlss import CalibrationError
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

