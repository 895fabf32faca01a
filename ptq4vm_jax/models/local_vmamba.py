"""LocalVMamba (hunto/LocalMamba ``local_vmamba.py`` ``VSSM``) in Flax Linen, the official eval forward.

A VMamba-v1-style network (patch embed conv + LN, blocks ``x + SS2D(LN(x))`` without an MLP,
patch-merging downsamples) whose SS2D scans the grid in the directions searched for each block
(``h``, ``v``, ``wK`` windows, each optionally ``_flip``ped), one ``x_proj_{k}``/``dt_proj_{k}``
per direction. Each direction's output is put back in row-major order, gated by the SS2D's one
channel gate (``attn``, weights shared, the gate computed from that direction's own output),
and the directions are summed, normed by ``out_norm`` and gated by SiLU(z). NHWC throughout.

Windowed scans on grids the window does not divide pad the grid with zero cells that stay in
the sequence (they decay the state; their outputs are dropped), and every direction's sequence
is padded at the end to the longest one, as the official code does, so the directions share
one length and run as one vmapped scan. Per-token activation scales of ``x_proj_{k}`` and
``dt_proj_{k}`` therefore index positions of direction k's own padded scan order.

Every projection is a plain ``nn.Dense`` applied token-major to (B, L, C), so ``intercept_dense``
can quantize any of them by module path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptq4vm_jax.models.layers import ChannelGate, check_compute_dtype, conv, dense, layer_norm
from ptq4vm_jax.models.local_scan import parse_direction, reverse_order, scan_order
from ptq4vm_jax.models.vssm import (
    SS2DBase,
    VSSMBase,
    VSSMParts,
    VSSMSizes,
    positive_int,
    size_problems,
    stage_lists_to_tuples,
    vssm_blockwise,
)
from ptq4vm_jax.ops.scan import check_scan_backend

# The searched directions of the official builders, one entry per block in stage order.
TINY_DIRECTIONS: tuple[tuple[str, ...], ...] = (
    ("h", "h_flip", "w7", "w7_flip"), ("h_flip", "v_flip", "w2", "w2_flip"),
    ("h_flip", "v_flip", "w2_flip", "w7"), ("h_flip", "v", "v_flip", "w2"),
    ("h", "h_flip", "v_flip", "w2_flip"), ("h_flip", "v_flip", "w2", "w2_flip"),
    ("h", "w2_flip", "w7", "w7_flip"), ("h", "h_flip", "v", "v_flip"),
    ("h", "v_flip", "w7", "w7_flip"), ("h_flip", "v", "w2", "w7_flip"),
    ("v", "v_flip", "w2", "w7_flip"), ("h", "h_flip", "v_flip", "w2_flip"),
    ("v_flip", "w2_flip", "w7", "w7_flip"), ("h_flip", "v_flip", "w2_flip", "w7_flip"),
    ("h_flip", "v", "w7", "w7_flip"),
)
SMALL_DIRECTIONS: tuple[tuple[str, ...], ...] = (
    ("h", "v", "v_flip", "w7_flip"), ("h", "h_flip", "v", "w7"),
    ("h_flip", "v", "v_flip", "w7"), ("h_flip", "v", "w2_flip", "w7"),
    ("h_flip", "v", "w2_flip", "w7"), ("h_flip", "v_flip", "w2", "w7_flip"),
    ("h_flip", "v", "v_flip", "w7"), ("h", "v", "v_flip", "w7"),
    ("h", "v", "v_flip", "w7"), ("h", "v", "v_flip", "w7_flip"),
    ("h", "h_flip", "v", "v_flip"), ("h", "v", "v_flip", "w2"),
    ("v", "v_flip", "w2_flip", "w7"), ("h", "h_flip", "v", "w2"),
    ("h_flip", "v", "v_flip", "w7_flip"), ("h", "h_flip", "v", "v_flip"),
    ("h", "v", "v_flip", "w7_flip"), ("h", "v", "v_flip", "w7_flip"),
    ("h", "h_flip", "v_flip", "w7"), ("h_flip", "v_flip", "w2_flip", "w7"),
    ("h_flip", "v", "v_flip", "w7_flip"), ("v", "v_flip", "w7", "w7_flip"),
    ("h", "v", "v_flip", "w7_flip"), ("h_flip", "v", "v_flip", "w2"),
    ("h", "v", "v_flip", "w2_flip"), ("h", "h_flip", "v", "w7"),
    ("h", "h_flip", "w7", "w7_flip"), ("h", "v_flip", "w2", "w2_flip"),
    ("h", "v_flip", "w2", "w7"), ("h", "v", "v_flip", "w7_flip"),
    ("h_flip", "v", "w2_flip", "w7"), ("h_flip", "v_flip", "w7", "w7_flip"),
    ("h", "v", "w7", "w7_flip"),
)



@dataclasses.dataclass(frozen=True)
class LocalVMambaConfig(VSSMSizes):
    """Arguments of the official ``VSSM`` constructor (same names), plus ``img_size``.

    Defaults are ``local_vssm_tiny``. ``dims`` is one width per stage (an int given is doubled
    per stage, as the official constructor does, and stored as the tuple); ``directions`` holds
    one tuple of scan names per block, in stage order (``h``, ``v``, ``w<K>``, each optionally
    with ``_flip``).
    """

    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    depths: tuple[int, ...] = (2, 2, 9, 2)
    dims: int | tuple[int, ...] = (96, 192, 384, 768)
    ssm_d_state: int = 16
    ssm_ratio: float = 2.0
    ssm_dt_rank: int | str = "auto"
    ssm_conv: int = 3
    ssm_conv_bias: bool = True
    directions: tuple[tuple[str, ...], ...] = TINY_DIRECTIONS
    dtype: Any = jnp.float32  # compute dtype of projections and convs; norms and scan stay fp32
    # Runtime choice, not a size: the selective scan's backend (as ``VMambaConfig.scan``).
    scan: str = "auto"

    def __post_init__(self) -> None:
        check_scan_backend(self.scan)
        check_compute_dtype(self.dtype)
        stage_lists_to_tuples(self)
        dirs = self.directions
        if isinstance(dirs, Sequence) and not isinstance(dirs, str):
            object.__setattr__(self, "directions", tuple(
                tuple(d) if isinstance(d, Sequence) and not isinstance(d, str) else d for d in dirs))
        problems = size_problems(self, ("ssm_ratio",))
        if not (self.ssm_dt_rank == "auto" or positive_int(self.ssm_dt_rank)):
            problems.append(f"ssm_dt_rank must be 'auto' or a positive int, got {self.ssm_dt_rank!r}")
        if not isinstance(self.ssm_conv_bias, bool):
            problems.append(f"ssm_conv_bias must be True or False, got {self.ssm_conv_bias!r}")
        problems += _direction_problems(self.directions)
        if problems:
            raise ValueError("invalid LocalVMamba config: " + "; ".join(problems))
        if positive_int(self.dims):  # the official VSSM doubles an int width per stage
            object.__setattr__(self, "dims", tuple(self.dims * 2**s for s in range(len(self.depths))))
        if len(self.dims) != len(self.depths):
            problems.append(f"dims {self.dims} needs one width per stage of depths {self.depths}")
        if len(self.directions) != sum(self.depths):
            problems.append(f"directions has {len(self.directions)} entries but depths {self.depths} "
                            f"has {sum(self.depths)} blocks: pass directions=, one tuple of scan names "
                            "per block, e.g. (('h', 'v_flip', 'w2', 'w7_flip'), ...)")
        if self.ssm_conv % 2 == 0:
            problems.append(f"ssm_conv must be an odd kernel size, got {self.ssm_conv}")
        if self.img_size < self.patch_size:
            problems.append(f"img_size {self.img_size} is smaller than patch_size {self.patch_size}")
        if problems:
            raise ValueError("invalid LocalVMamba config: " + "; ".join(problems))

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return self.dims

    @property
    def stage_hw(self) -> tuple[tuple[int, int], ...]:
        """Token grid (H, W) of each stage: patch embed, then patch merging (odd sides padded)."""
        sides = [self.img_size // self.patch_size]
        for _ in range(self.num_stages - 1):
            sides.append(-(-sides[-1] // 2))
        return tuple((n, n) for n in sides)

    def block_directions(self, stage: int, block: int) -> tuple[str, ...]:
        return self.directions[sum(self.depths[:stage]) + block]


def _direction_problems(directions: object) -> list[str]:
    if not (isinstance(directions, tuple) and directions):
        return [f"directions must be one tuple of scan names per block, got {directions!r}"]
    if any(not isinstance(block, tuple) or not block for block in directions):
        return ["directions must hold a non-empty tuple of scan names for every block"]
    for block in directions:
        for name in block:
            try:
                parse_direction(name)
            except ValueError as e:
                return [str(e)]
    return []


# ----------------------------------------------------------------------------- scan orders


def block_orders(directions: Sequence[str], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """One block's gathers: (K, Lp) scan orders and (K, h*w) reverses.

    ``orders[k, t]`` is the row-major token at position t of direction k's sequence, ``h * w``
    for a padded cell (a zero token); each order is padded at its end with ``h * w`` to the
    longest, as the official code pads the directions to one length. ``reverses[k]`` gathers
    direction k's output back into row-major order (the official ``MultiScan.reverse``).
    """
    orders = [scan_order(d, h, w, pad_index=h * w) for d in directions]
    length = max(len(o) for o in orders)
    padded = np.stack([np.pad(o, (0, length - len(o)), constant_values=h * w) for o in orders])
    return padded, np.stack([reverse_order(d, h, w) for d in directions])


# ----------------------------------------------------------------------------- layers


class SS2D(SS2DBase):
    """The official local ``SS2D`` (d_conv > 1, no low rank): (B, H, W, C) -> (B, H, W, C)."""

    cfg: LocalVMambaConfig
    directions: tuple[str, ...]
    in_streams = 2  # x and the gate z

    @property
    def num_directions(self) -> int:
        return len(self.directions)

    def setup(self) -> None:
        super().setup()
        self.attn = ChannelGate(self.cfg.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        b, h, w, _ = x.shape
        tokens = h * w
        xz = self.in_proj(x.reshape(b, tokens, -1).astype(c.dtype))
        x, z = jnp.split(xz, 2, axis=-1)
        x = nn.silu(self.conv2d(x.reshape(b, h, w, -1)))
        orders, reverses = block_orders(self.directions, h, w)
        # Cell h*w is the padding: a zero token appended to the row-major sequence.
        cells = jnp.concatenate([x.reshape(b, tokens, -1), jnp.zeros_like(x[:, :1, 0])], axis=1)
        ys = self.scan_directions([cells[:, order] for order in orders])
        # Back to row-major (padded positions dropped), each direction gated on its own (one
        # call, the directions stacked on the batch axis), summed.
        k = len(self.directions)
        y = jnp.stack([ys[i][:, reverses[i]] for i in range(k)]).reshape(k * b, tokens, -1)
        y = self.attn(y).reshape(k, b, tokens, -1).sum(axis=0)
        y = self.out_norm(y) * nn.silu(z.astype(jnp.float32))
        return self.out_proj(y.astype(c.dtype)).reshape(b, h, w, self.dim)


class VSSBlock(nn.Module):
    """``x + SS2D(LN(x))`` on (B, H, W, dim); residual stream in fp32."""

    cfg: LocalVMambaConfig
    dim: int
    directions: tuple[str, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        op = SS2D(self.cfg, self.dim, self.directions, name="op")
        return x + op(layer_norm("norm")(x)).astype(jnp.float32)


class PatchMerging(nn.Module):
    """``PatchMerging2D``: odd sides padded, 2x2 neighbours concatenated (x00, x10, x01, x11) -> LN
    -> linear; (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out)."""

    cfg: LocalVMambaConfig
    out_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        x = layer_norm("norm")(x)
        hh, ww = x.shape[1:3]
        reduction = dense(self.cfg.dtype, self.out_dim, False, "reduction")
        x = reduction(x.reshape(b, hh * ww, -1).astype(self.cfg.dtype))
        return x.reshape(b, hh, ww, self.out_dim)


class PatchEmbed(nn.Module):
    """Conv patch_size x patch_size, stride patch_size (bias) -> LN."""

    cfg: LocalVMambaConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.cfg
        proj = conv(c.dtype, c.stage_dims[0], c.patch_size, c.patch_size, 0, True, name="proj")
        x = proj(images.astype(c.dtype))
        return layer_norm("norm")(x)


class LocalVMamba(VSSMBase):
    """The official LocalVMamba ``VSSM``: ``apply({"params": p}, nhwc) -> logits``;
    ``embed``/``classify`` and the per-stage modules serve block-wise use."""

    cfg: LocalVMambaConfig
    parts = VSSMParts(
        arch="LocalVMamba",
        stem=PatchEmbed,
        block=lambda cfg, s, j: VSSBlock(cfg, cfg.stage_dims[s], cfg.block_directions(s, j)),
        downsample=lambda cfg, s: PatchMerging(cfg, cfg.stage_dims[s + 1]),
    )


local_vmamba_blockwise = vssm_blockwise  # stem -> per stage: VSS blocks, then the patch merging -> head
