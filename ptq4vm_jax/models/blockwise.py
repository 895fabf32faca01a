"""A model seen as stem -> stages -> head, the unit of block-wise calibration (JLSS)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from ptq4vm_jax.trees import get_path

Carry = Any  # a pytree of (batch, ...) arrays passed from stage to stage


def carry_args(carry: Carry) -> tuple:
    """A tuple carry is spread over a method's arguments; any other carry is its one argument."""
    return carry if isinstance(carry, tuple) else (carry,)


@dataclasses.dataclass(frozen=True)
class Stage:
    """``module.apply({"params": params[path]}, *carry) -> carry``; ``output(carry)`` is compared."""

    path: tuple[str, ...]
    module: nn.Module
    output: Callable[[Carry], jax.Array]

    def apply(self, params: Any, carry: Carry) -> Carry:
        return self.module.apply({"params": get_path(params, self.path)}, *carry_args(carry))


@dataclasses.dataclass(frozen=True)
class Blockwise:
    embed: Callable[[Any, jax.Array], Carry]
    stages: tuple[Stage, ...]
    classify: Callable[[Any, Carry], jax.Array]


def model_blockwise(model: nn.Module, stages: tuple[Stage, ...]) -> Blockwise:
    """``stages`` between the model's own ``embed`` and ``classify`` methods."""
    return Blockwise(
        embed=lambda params, images: model.apply({"params": params}, images, method="embed"),
        stages=stages,
        classify=lambda params, carry: model.apply({"params": params}, *carry_args(carry), method="classify"),
    )
