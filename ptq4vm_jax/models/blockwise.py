"""A model seen as stem -> stages -> head, the unit of block-wise calibration (JLSS)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from ptq4vm_jax.trees import get_path

Carry = Any  # a pytree of (batch, ...) arrays passed from stage to stage


@dataclasses.dataclass(frozen=True)
class Stage:
    """``module.apply({"params": params[path]}, *carry) -> carry``; ``output(carry)`` is compared."""

    path: tuple[str, ...]
    module: nn.Module
    output: Callable[[Carry], jax.Array]

    def apply(self, params: Any, carry: Carry) -> Carry:
        args = carry if isinstance(carry, tuple) else (carry,)
        return self.module.apply({"params": get_path(params, self.path)}, *args)


@dataclasses.dataclass(frozen=True)
class Blockwise:
    embed: Callable[[Any, jax.Array], Carry]
    stages: tuple[Stage, ...]
    classify: Callable[[Any, Carry], jax.Array]
