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
