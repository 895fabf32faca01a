"""Parameter-tree shapes and Orbax checkpoints of model params."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ptq4vm_jax.models import create_model


def abstract_params(model_name: str, **overrides: Any) -> dict[str, Any]:
    """``ShapeDtypeStruct`` tree of ``create_model(model_name, **overrides)``'s params (no compute)."""
    model = create_model(model_name, **overrides)
    cfg = model.cfg
    images = jax.ShapeDtypeStruct((1, cfg.img_size, cfg.img_size, cfg.channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]
