"""LocalVim (hunto/LocalMamba ``classification/lib/models/local_vim.py``) in Flax Linen: the
official eval forward, operation for operation (golden logits within 1e-4 of the maximum, fp32,
tests/models/test_local_vim_golden.py).

Official model: Vim's ``VisionMamba`` skeleton (absolute position embedding, fused add +
RMSNorm with the residual in fp32) whose mixer is ``MultiMamba``: one in_proj, then per layer a
list of scan directions (``ptq4vm_jax.models.local_scan``), each with its own causal conv,
x_proj, dt_proj and D, the SiLU(z) gate inside each scan; each direction's output is put back
in row-major order, scaled by one channel gate shared by the directions (``attn``), and the
directions are summed before out_proj. Facts of the official code this port keeps:

* RoPE (``if_rope`` and ``if_rope_residual``) rotates the mixer output *and* the residual
  stream before every layer, so the rotations accumulate along depth. Its cos/sin tables are
  fixed by the grid; they are recomputed (``rope_tables``), and the converter checks the
  checkpoint's buffers against them.
* ``MultiMamba`` wraps one tensor in an ``nn.Parameter`` per direction, so the A_log_i share
  storage and ``load_state_dict`` leaves every direction with the last one loaded: one
  ``A_log`` per mixer here (the converter takes the last ``A_log_i``).
* Windowed directions on a grid the window does not divide scan a zero-padded grid, the padded
  tokens staying in the sequence.
* The middle-class-token variant (no RoPE) takes the class token out of ``xz`` before ordering
  the patches and puts it back at position ``num_patches // 2`` of every direction's sequence;
  the gate then averages over the class token too.

Images come in NHWC, already normalised. Every projection is a plain ``nn.Dense``, so the
quantized modes are installed from outside (``ptq4vm_jax.quant.layer.intercept_dense``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convert.local_vim import official_rope_tables
from ptq4vm_jax.models.layers import (
    GATE_RATIO,
    CausalConv1d,
    ChannelGate,
    RMSNorm,
    a_log_init,
    check_compute_dtype,
    dense,
    mamba_direction,
)
from ptq4vm_jax.models.local_scan import parse_direction, reverse_order, scan_order
from ptq4vm_jax.models.vision_mamba import (
    VisionMambaBase,
    VisionMambaParts,
    VisionMambaSizes,
    vision_mamba_blockwise,
)
from ptq4vm_jax.ops.scan import check_scan_backend

# The searched directions of the official ``local_vim_tiny`` (also ``..._middle_cls_token``).
TINY_DIRECTIONS: tuple[tuple[str, ...], ...] = (
    ("h", "v_flip", "w7", "w7_flip"),
    ("h_flip", "w2_flip", "w7", "w7_flip"),
    ("h", "h_flip", "v", "w7"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h_flip", "v", "v_flip", "w7"),
    ("h_flip", "v", "v_flip", "w2_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "v", "v_flip", "w2"),
    ("h", "v", "v_flip", "w2_flip"),
    ("h", "h_flip", "v_flip", "w7"),
    ("h_flip", "v", "v_flip", "w2"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "v", "w2", "w2_flip"),
    ("v", "v_flip", "w2", "w7"),
    ("h", "h_flip", "v", "w2"),
    ("h", "h_flip", "w2_flip", "w7"),
    ("v", "v_flip", "w2", "w2_flip"),
)
# ``local_vim_small`` is defined twice in the official file; timm registers the second one,
# whose directions are these, the same in every layer.
SMALL_DIRECTIONS: tuple[tuple[str, ...], ...] = (("h", "h_flip", "w2", "w2_flip"),) * 20


@dataclasses.dataclass(frozen=True)
class LocalVimConfig(VisionMambaSizes):
    """Size arguments of the official ``VisionMamba`` of local_vim.py (same names), plus the
    per-layer ``directions`` and the two variants' switches (``rope``: RoPE on both streams
    and mean pooling; ``cls_token``: a middle class token, pooled by itself)."""

    img_size: int = 224
    patch_size: int = 16
    channels: int = 3
    embed_dim: int = 192
    depth: int = 20
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    num_classes: int = 1000
    norm_epsilon: float = 1e-5
    directions: tuple[tuple[str, ...], ...] = TINY_DIRECTIONS
    rope: bool = True
    cls_token: bool = False
    pt_hw_seq_len: int = 14  # RoPE's pretraining grid side (the official default)
    dtype: Any = jnp.float32  # compute dtype of the projections; norms, residual and scan stay fp32
    scan: str = "auto"  # the selective scan's backend (ptq4vm_jax.choices.SCAN_BACKENDS)

    def __post_init__(self) -> None:
        check_scan_backend(self.scan)
        check_compute_dtype(self.dtype)
        sizes = ("img_size", "patch_size", "channels", "embed_dim", "depth", "d_state", "d_conv",
                 "expand", "num_classes", "pt_hw_seq_len")
        problems = [f"{name} must be a positive int, got {getattr(self, name)!r}" for name in sizes
                    if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool)
                    or getattr(self, name) < 1]
        if not problems and self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size} "
                            "(the official position embedding covers whole patches only)")
        if not problems and self.rope and self.embed_dim % 4:
            problems.append(f"embed_dim {self.embed_dim} must be a multiple of 4 for RoPE")
        if not problems and int(self.d_inner * GATE_RATIO) < 1:
            problems.append(f"expand * embed_dim = {self.d_inner} leaves the channel gate no channels "
                            f"(it needs at least {int(1 / GATE_RATIO)})")
        if not self.norm_epsilon > 0:
            problems.append(f"norm_epsilon must be > 0, got {self.norm_epsilon!r}")
        for name in ("rope", "cls_token"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.rope is True and self.cls_token is True:
            problems.append("rope and cls_token exclude each other (the official RoPE has no row for a "
                            "class token): pick local_vim_tiny or local_vim_tiny_midcls")
        try:
            dirs = tuple(tuple(layer) for layer in self.directions)
        except TypeError:
            dirs = None
        if dirs is None or any(isinstance(layer, str) for layer in self.directions):
            problems.append("directions must be one sequence of direction names per layer, e.g. "
                            "(('h', 'h_flip', 'w2', 'w2_flip'),) * depth")
        else:
            object.__setattr__(self, "directions", dirs)
            if isinstance(self.depth, int) and len(dirs) != self.depth:
                problems.append(f"directions lists {len(dirs)} layers but depth is {self.depth}")
            if any(not layer for layer in dirs):
                problems.append("every layer needs at least one scan direction")
            for layer in dirs:
                for name in layer:
                    try:
                        parse_direction(name)
                    except ValueError as e:
                        problems.append(str(e))
        if problems:
            raise ValueError("invalid LocalVim config: " + "; ".join(problems))

    @property
    def stride(self) -> int:  # the official PatchEmbed's stride is its patch size
        return self.patch_size


#: ``VisionRotaryEmbeddingFast(dim=embed_dim // 2, pt_seq_len, ft_seq_len=grid)``'s
#: ``freqs_cos``/``freqs_sin``, (grid², embed_dim) float32, computed once per size: the formula
#: lives with the converter (a leaf), which checks a checkpoint's buffers against it.
rope_tables = functools.cache(official_rope_tables)


def apply_rope(x: jax.Array, cos: np.ndarray, sin: np.ndarray) -> jax.Array:
    """``t * cos + rotate_half(t) * sin`` with rotate_half (x0, x1) -> (-x1, x0) per channel pair."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos + rotated * sin


class MultiMambaMixer(nn.Module):
    """The official ``MultiMamba`` for the directions of one layer."""

    cfg: LocalVimConfig
    directions: tuple[str, ...]

    def setup(self) -> None:
        c = self.cfg
        e, n, r = c.d_inner, c.d_state, c.dt_rank
        self.in_proj = dense(c.dtype, 2 * e, False, "in_proj")
        self.out_proj = dense(c.dtype, c.embed_dim, False, "out_proj")
        k = range(len(self.directions))
        self.convs = [CausalConv1d(c.d_conv, name=f"conv1d_{i}") for i in k]
        self.x_projs = [dense(c.dtype, r + 2 * n, False, f"x_proj_{i}") for i in k]
        self.dt_projs = [dense(c.dtype, e, True, f"dt_proj_{i}") for i in k]
        self.Ds = [self.param(f"D_{i}", nn.initializers.ones, (e,)) for i in k]
        self.A_log = self.param("A_log", a_log_init, (e, n))  # shared: see the module doc
        # BiAttn's projections compute in float32 whatever the config's dtype.
        self.attn = ChannelGate(jnp.float32, name="attn")

    def _direction(self, xz: jax.Array, i: int) -> jax.Array:
        x, z = jnp.split(xz, 2, axis=-1)
        return mamba_direction(self.cfg, x, z, self.convs[i], self.x_projs[i], self.dt_projs[i], self.A_log,
                               self.Ds[i])

    def __call__(self, hidden: jax.Array) -> jax.Array:
        c = self.cfg
        h, w = c.grid_size
        pos = c.cls_position
        xz = self.in_proj(hidden.astype(c.dtype))
        if c.cls_token:
            cls = xz[:, pos : pos + 1]
            xz = jnp.concatenate([xz[:, :pos], xz[:, pos + 1 :]], axis=1)
        # one zero token at index h*w: what the padding cells of a windowed scan read
        padded = jnp.concatenate([xz, jnp.zeros_like(xz[:, :1])], axis=1)
        total = None
        for i, name in enumerate(self.directions):
            seq = jnp.take(padded, scan_order(name, h, w, pad_index=h * w), axis=1)
            if c.cls_token:
                seq = jnp.concatenate([seq[:, :pos], cls, seq[:, pos:]], axis=1)
            y = self._direction(seq, i)
            if c.cls_token:
                y_cls = y[:, pos : pos + 1]
                y = jnp.concatenate([y[:, :pos], y[:, pos + 1 :]], axis=1)
            y = jnp.take(y, reverse_order(name, h, w), axis=1)
            if c.cls_token:
                y = jnp.concatenate([y[:, :pos], y_cls, y[:, pos:]], axis=1)
            y = self.attn(y.astype(jnp.float32))
            total = y if total is None else total + y
        return self.out_proj(total.astype(c.dtype))


class LocalVimBlock(nn.Module):
    """RoPE on both streams (if the model has it), fused residual-add + RMSNorm, then the mixer.

    Returns (mixer output, residual). Block 0 gets residual = 0, which equals the official
    ``residual=None`` branch exactly (a rotated zero is zero).
    """

    cfg: LocalVimConfig
    directions: tuple[str, ...]

    @nn.compact
    def __call__(self, hidden: jax.Array, residual: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = self.cfg
        hidden = hidden.astype(jnp.float32)
        residual = residual.astype(jnp.float32)
        if c.rope:
            cos, sin = rope_tables(c.grid_size[0], c.embed_dim, c.pt_hw_seq_len)
            hidden, residual = apply_rope(hidden, cos, sin), apply_rope(residual, cos, sin)
        residual = residual + hidden
        normed = RMSNorm(c.norm_epsilon, name="norm")(residual)
        return MultiMambaMixer(c, self.directions, name="mixer")(normed), residual


class LocalVisionMamba(VisionMambaBase):
    """``apply({"params": p}, nhwc) -> logits``; ``embed``/``classify`` for block-wise use."""

    cfg: LocalVimConfig
    parts = VisionMambaParts(arch="LocalVim", block=lambda cfg, i: LocalVimBlock(cfg, cfg.directions[i]))


# JLSS compares each block's mixer output (the RoPE of the next block is a fixed rotation of it).
local_vim_blockwise = vision_mamba_blockwise
