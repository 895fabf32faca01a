"""ptq4vm-jax: PTQ4VM post-training quantization for Visual Mamba in JAX."""

from ptq4vm_jax.models import create_model, list_models

__all__ = ["create_model", "list_models"]
__version__ = "0.1.0"
