"""The models, one module per family (``vim``, ``vmamba``, ``local_vim``, ``local_vmamba``, on the
shared pieces in ``layers``, ``vision_mamba``, ``vssm`` and ``local_scan``), built by name through
``registry``; ``blockwise`` views each as stem -> blocks -> head for calibration."""

from ptq4vm_jax.choices import RUNTIME_CHOICES
from ptq4vm_jax.models.registry import (
    blockwise,
    canonical_name,
    create_model,
    image_shape,
    list_models,
    model_family,
    model_label,
    param_shapes,
)
from ptq4vm_jax.models.vim import VimConfig, VisionMamba

__all__ = ["RUNTIME_CHOICES", "VimConfig", "VisionMamba", "blockwise", "canonical_name", "create_model",
           "image_shape", "list_models", "model_family", "model_label", "param_shapes"]
