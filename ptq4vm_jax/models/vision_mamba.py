"""The official ``VisionMamba`` skeleton that Vim and LocalVim share, parameterised by each family's block.

``patch_embed`` -> (middle ``cls_token`` where the model has one) + ``pos_embed`` -> ``layers_{i}``
(each maps (hidden, residual) to (mixer output, residual), the residual stream in fp32) ->
final add + ``norm_f`` (RMSNorm) -> ``head`` on the class token or the mean over tokens: the
official checkpoints' layout. Blocks are standalone modules, so block-wise calibration
(``vision_mamba_blockwise``) applies each alone. Also here: the sizes both configs derive.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptq4vm_jax.models.blockwise import Blockwise, Stage, model_blockwise
from ptq4vm_jax.models.inputs import check_images
from ptq4vm_jax.models.layers import RMSNorm


class VisionMambaSizes:
    """Sizes both configs derive the same way from the official constructor's arguments."""

    img_size: int
    patch_size: int
    stride: int
    embed_dim: int
    expand: int
    cls_token: bool

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.embed_dim / 16)

    @property
    def grid_size(self) -> tuple[int, int]:
        g = (self.img_size - self.patch_size) // self.stride + 1
        return (g, g)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def seq_len(self) -> int:
        return self.num_patches + int(self.cls_token)

    @property
    def cls_position(self) -> int:
        return self.num_patches // 2


class PatchEmbed(nn.Module):
    cfg: Any

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.cfg
        p = c.patch_size
        x = nn.Conv(
            c.embed_dim, (p, p), strides=(c.stride, c.stride), padding="VALID",
            dtype=c.dtype, param_dtype=jnp.float32, name="proj",
        )(images.astype(c.dtype))
        return x.reshape(x.shape[0], -1, c.embed_dim)  # row-major over the patch grid


@dataclasses.dataclass(frozen=True)
class VisionMambaParts:
    """How a family builds its modules from its config."""

    arch: str  # the family's name in error messages
    block: Callable[[Any, int], nn.Module]  # (cfg, layer) -> (hidden, residual) -> (hidden, residual)


class VisionMambaBase(nn.Module):
    """``apply({"params": p}, nhwc) -> logits``; ``embed``/``classify`` and the blocks serve
    block-wise use. A family subclasses it and sets ``parts``."""

    cfg: Any
    parts: ClassVar[VisionMambaParts]

    def setup(self) -> None:
        c = self.cfg
        self.patch_embed = PatchEmbed(c)
        if c.cls_token:
            self.cls_token = self.param(
                "cls_token", nn.initializers.truncated_normal(0.02), (1, 1, c.embed_dim)
            )
        self.pos_embed = self.param(
            "pos_embed", nn.initializers.truncated_normal(0.02), (1, c.seq_len, c.embed_dim)
        )
        self.layers = [self.parts.block(c, i) for i in range(c.depth)]
        self.norm_f = RMSNorm(c.norm_epsilon)
        self.head = nn.Dense(c.num_classes, dtype=jnp.float32, param_dtype=jnp.float32)

    def check_images(self, images: jax.Array) -> None:
        c = self.cfg
        check_images(images, (c.img_size, c.img_size, c.channels), self.parts.arch)

    def embed(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Patch embed, middle class token (if any), position embedding -> (hidden, zero residual)."""
        self.check_images(images)
        c = self.cfg
        x = self.patch_embed(images).astype(jnp.float32)
        if c.cls_token:
            pos = c.cls_position
            cls = jnp.broadcast_to(self.cls_token, (x.shape[0], 1, c.embed_dim))
            x = jnp.concatenate([x[:, :pos], cls, x[:, pos:]], axis=1)
        x = x + self.pos_embed
        return x, jnp.zeros_like(x)

    def classify(self, hidden: jax.Array, residual: jax.Array) -> jax.Array:
        """Final add + RMSNorm; the class token, or the mean over tokens, into the head."""
        h = self.norm_f(residual + hidden.astype(jnp.float32))
        pooled = h[:, self.cfg.cls_position] if self.cfg.cls_token else jnp.mean(h, axis=1)
        return self.head(pooled)

    def __call__(self, images: jax.Array) -> jax.Array:
        hidden, residual = self.embed(images)
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return self.classify(hidden, residual)


def mixer_output(carry: tuple[jax.Array, jax.Array]) -> jax.Array:
    return carry[0]


def vision_mamba_blockwise(model: VisionMambaBase) -> Blockwise:
    """Stem -> ``depth`` x (hidden, residual) blocks -> head; JLSS compares each block's mixer output."""
    cfg = model.cfg
    return model_blockwise(model, tuple(
        Stage(path=(f"layers_{i}",), module=model.parts.block(cfg, i), output=mixer_output)
        for i in range(cfg.depth)
    ))
