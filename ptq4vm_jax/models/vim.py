"""Vision Mamba (Vim, hustvl/Vim) in Flax Linen: the official eval forward, operation for
operation (golden logits within 1e-4 of the maximum, fp32, tests/models/test_vim_golden.py).

Official model: ``VisionMamba`` with bimamba v2, a middle class token, absolute position
embeddings, fused add + RMSNorm (residual in fp32) and ``if_divide_out=True``.
Images come in NHWC, already normalised. Every projection is a plain ``nn.Dense``: the
quantized modes are installed from outside by ``ptq4vm_jax.quant`` (method interception),
so this one definition serves float, fake-quant and integer inference.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ptq4vm_jax.models.blockwise import Blockwise, Stage
from ptq4vm_jax.models.inputs import check_images
from ptq4vm_jax.ops.mixer import MixerDirection, mixer_backend, vim_mixer
from ptq4vm_jax.ops.scan import causal_depthwise_conv1d, check_scan_backend, selective_scan


@dataclasses.dataclass(frozen=True)
class VimConfig:
    """Size arguments of the official ``VisionMamba`` constructor (same names)."""

    img_size: int = 224
    patch_size: int = 16
    stride: int = 16
    channels: int = 3
    embed_dim: int = 192
    depth: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    num_classes: int = 1000
    norm_epsilon: float = 1e-5
    dtype: Any = jnp.float32  # compute dtype of the projections; norms, residual and scan stay fp32
    # Runtime choices, not sizes (checkpoints do not store them): the selective scan's backend,
    # one of ``ptq4vm_jax.ops.scan.SCAN_BACKENDS`` ("auto": the fused mixer kernel on GPU, lax.scan
    # elsewhere; "pallas": a Pallas scan per direction; "fused": the fused mixer kernel; off the
    # GPU the Pallas kernels run in the interpreter).
    scan: str = "auto"

    def __post_init__(self) -> None:
        check_scan_backend(self.scan)
        sizes = ("img_size", "patch_size", "stride", "channels", "embed_dim", "depth", "d_state",
                 "d_conv", "expand", "num_classes")
        problems = [f"{name} must be a positive int, got {getattr(self, name)!r}" for name in sizes
                    if not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        if not problems and self.patch_size > self.img_size:
            problems.append(f"patch_size {self.patch_size} is larger than img_size {self.img_size}")
        if not self.norm_epsilon > 0:
            problems.append(f"norm_epsilon must be > 0, got {self.norm_epsilon!r}")
        if problems:
            raise ValueError("invalid Vim config: " + "; ".join(problems))

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
        return self.num_patches + 1

    @property
    def cls_position(self) -> int:
        return self.num_patches // 2


class RMSNorm(nn.Module):
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        rstd = lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return x32 * rstd * weight


class CausalConv1d(nn.Module):
    """Depthwise causal conv; ``kernel`` is (d_conv, channels)."""

    d_conv: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ch = x.shape[-1]
        bound = 1.0 / math.sqrt(self.d_conv)
        init = lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound)
        kernel = self.param("kernel", init, (self.d_conv, ch), jnp.float32)
        bias = self.param("bias", init, (ch,), jnp.float32)
        return causal_depthwise_conv1d(x, kernel.astype(x.dtype), bias.astype(x.dtype))


def _a_log_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.log(jnp.broadcast_to(jnp.arange(1, shape[1] + 1, dtype=dtype), shape))


class BiMambaMixer(nn.Module):
    """Bimamba v2: one shared in_proj, two S6 branches (forward, and flipped), one out_proj."""

    cfg: VimConfig

    def setup(self) -> None:
        c = self.cfg
        e, n, r = c.d_inner, c.d_state, c.dt_rank
        dense = lambda f, bias, name: nn.Dense(
            f, use_bias=bias, dtype=c.dtype, param_dtype=jnp.float32, name=name
        )
        self.in_proj = dense(2 * e, False, "in_proj")
        self.out_proj = dense(c.embed_dim, False, "out_proj")
        self.conv1d = CausalConv1d(c.d_conv, name="conv1d")
        self.conv1d_b = CausalConv1d(c.d_conv, name="conv1d_b")
        self.x_proj = dense(r + 2 * n, False, "x_proj")
        self.x_proj_b = dense(r + 2 * n, False, "x_proj_b")
        self.dt_proj = dense(e, True, "dt_proj")
        self.dt_proj_b = dense(e, True, "dt_proj_b")
        self.A_log = self.param("A_log", _a_log_init, (e, n))
        self.A_b_log = self.param("A_b_log", _a_log_init, (e, n))
        self.D = self.param("D", nn.initializers.ones, (e,))
        self.D_b = self.param("D_b", nn.initializers.ones, (e,))

    def _branch(self, x, z, conv, x_proj, dt_proj, a_log, d):
        c = self.cfg
        x = nn.silu(conv(x))
        x_dbl = x_proj(x)
        dt, b, cc = jnp.split(x_dbl, [c.dt_rank, c.dt_rank + c.d_state], axis=-1)
        dt = dt_proj(dt)
        a = -jnp.exp(a_log.astype(jnp.float32))
        return selective_scan(x, dt, a, b, cc, D=d, z=z, delta_softplus=True, backend=c.scan)

    def _fused(self, x, z):
        """The same function with conv + scans + gate + average in one kernel (``ops.mixer``);
        x_proj and dt_proj stay the model's Dense calls (quantized by interception as above)."""
        c = self.cfg
        directions = []
        for xd, conv, x_proj, dt_proj, a_log, d in (
            (x, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D),
            (jnp.flip(x, axis=1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b),
        ):
            dt, b, cc = jnp.split(x_proj(nn.silu(conv(xd))), [c.dt_rank, c.dt_rank + c.d_state], axis=-1)
            w = conv.variables["params"]
            directions.append(MixerDirection(w["kernel"], w["bias"], dt_proj(dt), b, cc,
                                             -jnp.exp(a_log.astype(jnp.float32)), d))
        return vim_mixer(x, z, *directions, backend=c.scan)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        xz = self.in_proj(hidden.astype(self.cfg.dtype))
        x, z = jnp.split(xz, 2, axis=-1)
        if mixer_backend(self.cfg.scan) == "fused":
            return self.out_proj(self._fused(x, z))
        y_f = self._branch(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        flip = lambda t: jnp.flip(t, axis=1)
        y_b = self._branch(
            flip(x), flip(z), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b
        )
        y = (y_f.astype(jnp.float32) + flip(y_b).astype(jnp.float32)) / 2
        return self.out_proj(y.astype(self.cfg.dtype))


class VimBlock(nn.Module):
    """Fused residual-add + RMSNorm, then the mixer. Returns (mixer output, residual)."""

    cfg: VimConfig

    @nn.compact
    def __call__(self, hidden: jax.Array, residual: jax.Array) -> tuple[jax.Array, jax.Array]:
        # Block 0 gets residual = 0, which equals the official ``residual=None`` branch exactly.
        residual = residual.astype(jnp.float32) + hidden.astype(jnp.float32)
        normed = RMSNorm(self.cfg.norm_epsilon, name="norm")(residual)
        return BiMambaMixer(self.cfg, name="mixer")(normed), residual


class PatchEmbed(nn.Module):
    cfg: VimConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.cfg
        p = c.patch_size
        x = nn.Conv(
            c.embed_dim, (p, p), strides=(c.stride, c.stride), padding="VALID",
            dtype=c.dtype, param_dtype=jnp.float32, name="proj",
        )(images.astype(c.dtype))
        return x.reshape(x.shape[0], -1, c.embed_dim)  # row-major over the patch grid


class VisionMamba(nn.Module):
    """``apply({"params": p}, nhwc) -> logits``; ``embed``/``layers``/``classify`` for block-wise use."""

    cfg: VimConfig

    def setup(self) -> None:
        c = self.cfg
        self.patch_embed = PatchEmbed(c)
        self.cls_token = self.param(
            "cls_token", nn.initializers.truncated_normal(0.02), (1, 1, c.embed_dim)
        )
        self.pos_embed = self.param(
            "pos_embed", nn.initializers.truncated_normal(0.02), (1, c.seq_len, c.embed_dim)
        )
        self.layers = [VimBlock(c, name=f"layers_{i}") for i in range(c.depth)]
        self.norm_f = RMSNorm(c.norm_epsilon)
        self.head = nn.Dense(c.num_classes, dtype=jnp.float32, param_dtype=jnp.float32)

    def check_images(self, images: jax.Array) -> None:
        c = self.cfg
        check_images(images, (c.img_size, c.img_size, c.channels), "Vim")

    def embed(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Patch embed, middle class token, position embedding -> (hidden, zero residual)."""
        self.check_images(images)
        x = self.patch_embed(images).astype(jnp.float32)
        b = x.shape[0]
        pos = self.cfg.cls_position
        cls = jnp.broadcast_to(self.cls_token, (b, 1, self.cfg.embed_dim))
        x = jnp.concatenate([x[:, :pos], cls, x[:, pos:]], axis=1) + self.pos_embed
        return x, jnp.zeros_like(x)

    def classify(self, hidden: jax.Array, residual: jax.Array) -> jax.Array:
        """Final add + RMSNorm, class token into the head."""
        h = self.norm_f(residual + hidden.astype(jnp.float32))
        return self.head(h[:, self.cfg.cls_position])

    def __call__(self, images: jax.Array) -> jax.Array:
        hidden, residual = self.embed(images)
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return self.classify(hidden, residual)


def mixer_output(carry: tuple[jax.Array, jax.Array]) -> jax.Array:
    return carry[0]


def vim_blockwise(model: VisionMamba) -> Blockwise:
    """Vim as stem -> ``depth`` x (hidden, residual) blocks -> head; JLSS compares the mixer output."""
    cfg = model.cfg
    stages = tuple(
        Stage(path=(f"layers_{i}",), module=VimBlock(cfg), output=mixer_output)
        for i in range(cfg.depth)
    )
    return Blockwise(
        embed=lambda params, images: model.apply({"params": params}, images, method="embed"),
        stages=stages,
        classify=lambda params, carry: model.apply({"params": params}, *carry, method="classify"),
    )
