"""VMamba v2 (MzeroMiko/VMamba ``VSSM``) in Flax Linen, the official eval forward.

Covers the configs PTQ4VM quantizes (``vmambav2v_*``) and ``vmambav2_*``: patch embed v2,
VSS blocks with the ``v05_noz`` SS2D (no z gate), downsample v3, ``ln2d`` norms. The
official model is channel-first; this port is NHWC throughout (same function).

Every quantizable projection is an ``nn.Dense`` applied token-major to (B, L, C):
``in_proj``, ``x_proj_{k}``/``dt_proj_{k}`` (one per scan direction, each fed its own
direction's sequence in that direction's scan order), ``out_proj``, ``mlp/fc1``, ``mlp/fc2``.
The official stacked ``x_proj_weight``/``dt_projs_*`` are split by ``convert.vmamba``.
The stages, top module and block-wise view are the shared skeleton of ``models.vssm``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptq4vm_jax.models.layers import check_compute_dtype, conv, dense, layer_norm
from ptq4vm_jax.models.vssm import (
    SS2DBase,
    VSSMBase,
    VSSMParts,
    VSSMSizes,
    size_problems,
    stage_lists_to_tuples,
    vssm_blockwise,
)
from ptq4vm_jax.ops.cross_scan import cross_scan_merge, grid_orders, stack_dt
from ptq4vm_jax.ops.scan import check_scan_backend

NUM_DIRECTIONS = 4  # cross-scan: row-major, column-major, and both reversed


@dataclasses.dataclass(frozen=True)
class VMambaConfig(VSSMSizes):
    """Size arguments of the official ``VSSM`` constructor (same names; ``imgsize`` -> ``img_size``).

    Defaults are ``vmambav2v_tiny_224``. ``dims`` is an int (doubled per stage, as in the
    official builder) or one width per stage. Images are square, as for every family here
    (the blocks themselves take any H, W).
    """

    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    depths: tuple[int, ...] = (2, 2, 8, 2)
    dims: int | tuple[int, ...] = 96
    ssm_d_state: int = 1
    ssm_ratio: float = 1.0
    ssm_dt_rank: int | str = "auto"
    ssm_conv: int = 3
    ssm_conv_bias: bool = False
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32  # compute dtype of projections and convs; norms and scan stay fp32
    # Runtime choice, not a size (checkpoints do not store it): the selective scan's backend, one
    # of ``ptq4vm_jax.choices.SCAN_BACKENDS`` (as ``VimConfig.scan``; "fused": the four scans
    # and their merge in one kernel, ``ptq4vm_jax.ops.cross_scan``).
    scan: str = "auto"

    def __post_init__(self) -> None:
        check_scan_backend(self.scan)
        check_compute_dtype(self.dtype)
        stage_lists_to_tuples(self)
        problems = size_problems(self, ("ssm_ratio", "mlp_ratio"))
        if problems:
            raise ValueError("invalid VMamba config: " + "; ".join(problems))
        if isinstance(self.dims, tuple) and len(self.dims) != len(self.depths):
            problems.append(f"dims {self.dims} needs one width per stage of depths {self.depths}")
        if self.ssm_conv < 3 or self.ssm_conv % 2 == 0:
            problems.append(f"ssm_conv must be an odd kernel size >= 3, got {self.ssm_conv}")
        if self.patch_size < 2 or self.patch_size % 2:
            problems.append(f"patch_size must be even (patch embed v2 uses stride patch_size//2), "
                            f"got {self.patch_size}")
        if not (self.ssm_dt_rank == "auto" or (isinstance(self.ssm_dt_rank, int) and self.ssm_dt_rank > 0)):
            problems.append(f"ssm_dt_rank must be 'auto' or a positive int, got {self.ssm_dt_rank!r}")
        if problems:
            raise ValueError("invalid VMamba config: " + "; ".join(problems))

    @property
    def stage_dims(self) -> tuple[int, ...]:
        if isinstance(self.dims, int):
            return tuple(self.dims * 2**s for s in range(self.num_stages))
        return self.dims

    @property
    def stage_hw(self) -> tuple[tuple[int, int], ...]:
        """Token grid (H, W) of each stage; L = H * W is what per-token scales index."""
        k = self.patch_size // 2
        sides = [_conv_out(_conv_out(self.img_size, k + 1, k, 1), k + 1, k, 1)]
        for _ in range(self.num_stages - 1):
            sides.append(_conv_out(sides[-1], 3, 2, 1))
        return tuple((n, n) for n in sides)

    def mlp_hidden(self, dim: int) -> int:
        return int(dim * self.mlp_ratio)


def _conv_out(n: int, kernel: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - kernel) // stride + 1


# ----------------------------------------------------------------------------- cross scan


def cross_scan(x: jax.Array) -> list[jax.Array]:
    """(B, H, W, C) -> four (B, L, C) sequences, each in its own scan order.

    0: row-major, 1: column-major, 2: reversed row-major, 3: reversed column-major
    (official ``cross_scan_fwd``, scans=0).
    """
    b, h, w, c = x.shape
    rows = x.reshape(b, h * w, c)
    cols = jnp.swapaxes(x, 1, 2).reshape(b, h * w, c)
    return [rows, cols, jnp.flip(rows, axis=1), jnp.flip(cols, axis=1)]


def cross_merge(ys: Sequence[jax.Array], h: int, w: int) -> jax.Array:
    """Inverse of ``cross_scan`` summed: four scan-order (B, L, C) outputs -> row-major (B, L, C)."""
    y_rows = ys[0] + jnp.flip(ys[2], axis=1)
    y_cols = ys[1] + jnp.flip(ys[3], axis=1)
    b, _, c = y_cols.shape
    y_cols = jnp.swapaxes(y_cols.reshape(b, w, h, c), 1, 2).reshape(b, h * w, c)
    return y_rows + y_cols


# ----------------------------------------------------------------------------- layers


class SS2D(SS2DBase):
    """``SS2Dv2`` with ``forward_type="v05_noz"``: (B, H, W, C) -> (B, H, W, C)."""

    cfg: VMambaConfig
    in_streams = 1  # no z gate
    num_directions = NUM_DIRECTIONS

    def dt_on_chip(self) -> bool:
        """The fused kernel multiplies dt_proj on chip (its operands; quantized by interception)."""
        return self.cfg.scan == "fused"

    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        b, h, w, _ = x.shape
        x = self.in_proj(x.reshape(b, h * w, -1).astype(c.dtype))
        x = nn.silu(self.conv2d(x.reshape(b, h, w, -1)))
        seqs = cross_scan(x)
        if c.scan == "fused":  # the K scans and the merge in one kernel, reading x in place
            dts, a, bs, cs, ds = self.direction_inputs(seqs)
            y = cross_scan_merge(x.reshape(b, h * w, -1).astype(jnp.float32), stack_dt(dts), a, bs, cs, ds,
                                 None, jnp.asarray(grid_orders(h, w)), backend=c.scan)
        else:
            y = cross_merge(list(self.scan_directions(seqs)), h, w)
        return self.out_proj(self.out_norm(y).astype(c.dtype)).reshape(b, h, w, self.dim)


class Mlp(nn.Module):
    cfg: VMambaConfig
    dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        b, h, w, _ = x.shape
        t = dense(c.dtype, c.mlp_hidden(self.dim), True, "fc1")(x.reshape(b, h * w, -1).astype(c.dtype))
        t = dense(c.dtype, self.dim, True, "fc2")(jax.nn.gelu(t, approximate=False))
        return t.reshape(b, h, w, self.dim)


class VSSBlock(nn.Module):
    """``x + SS2D(LN(x))`` then ``x + MLP(LN(x))`` on (B, H, W, dim); residual stream in fp32."""

    cfg: VMambaConfig
    dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x + SS2D(self.cfg, self.dim, name="op")(layer_norm("norm")(x)).astype(jnp.float32)
        return x + Mlp(self.cfg, self.dim, name="mlp")(layer_norm("norm2")(x)).astype(jnp.float32)


class Downsample(nn.Module):
    """Downsample v3: conv 3x3 stride 2 (bias) -> LN; (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out)."""

    cfg: VMambaConfig
    out_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = conv(self.cfg.dtype, self.out_dim, 3, 2, 1, True, name="conv")(x.astype(self.cfg.dtype))
        return layer_norm("norm")(x)


class PatchEmbed(nn.Module):
    """Patch embed v2: conv -> LN -> GELU -> conv -> LN, each conv stride patch_size//2."""

    cfg: VMambaConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.cfg
        s, d = c.patch_size // 2, c.stage_dims[0]
        x = conv(c.dtype, d // 2, s + 1, s, 1, True, name="conv1")(images.astype(c.dtype))
        x = jax.nn.gelu(layer_norm("norm1")(x), approximate=False)
        x = conv(c.dtype, d, s + 1, s, 1, True, name="conv2")(x.astype(c.dtype))
        return layer_norm("norm2")(x)


class VMamba(VSSMBase):
    """The official ``VSSM``: ``apply({"params": p}, nhwc) -> logits``; ``embed``/``classify``
    and the per-stage modules serve block-wise use (``vmamba_blockwise``)."""

    cfg: VMambaConfig
    parts = VSSMParts(
        arch="VMamba",
        stem=PatchEmbed,
        block=lambda cfg, s, j: VSSBlock(cfg, cfg.stage_dims[s]),
        downsample=lambda cfg, s: Downsample(cfg, cfg.stage_dims[s + 1]),
    )


vmamba_blockwise = vssm_blockwise  # a VMamba's stem -> stages -> head (blocks and downsamples)
