"""Vision Mamba (Vim, hustvl/Vim) in Flax Linen: the official eval forward, operation for
operation (golden logits within 1e-4 of the maximum, fp32, tests/models/test_vim_golden.py).

Official model: ``VisionMamba`` with bimamba v2, a middle class token, absolute position
embeddings, fused add + RMSNorm (residual in fp32) and ``if_divide_out=True``.
Images come in NHWC, already normalised. Every projection is a plain ``nn.Dense``: the
quantized modes are installed from outside by ``ptq4vm_jax.quant`` (method interception),
so this one definition serves float, fake-quant and integer inference. The skeleton around
the blocks is ``models.vision_mamba``'s, shared with LocalVim.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptq4vm_jax.models.layers import (
    AddRMSNorm,
    CausalConv1d,
    a_log_init,
    check_compute_dtype,
    dense,
    mamba_direction,
    operand_dense,
)
from ptq4vm_jax.models.vision_mamba import (
    VisionMambaBase,
    VisionMambaParts,
    VisionMambaSizes,
    vision_mamba_blockwise,
)
from ptq4vm_jax.ops.mixer import MixerDirection, mixer_backend, mixer_direction, vim_mixer
from ptq4vm_jax.ops.scan import check_scan_backend


@dataclasses.dataclass(frozen=True)
class VimConfig(VisionMambaSizes):
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
    # one of ``ptq4vm_jax.choices.SCAN_BACKENDS`` ("auto": a Pallas scan per direction on GPU,
    # lax.scan elsewhere; "pallas": a Pallas scan per direction; "fused": the fused mixer kernel and
    # the add + norm kernel; off the GPU the Pallas kernels run in the interpreter).
    scan: str = "auto"

    def __post_init__(self) -> None:
        check_scan_backend(self.scan)
        check_compute_dtype(self.dtype)
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
    def cls_token(self) -> bool:
        """Vim always has its middle class token (LocalVim's is a switch)."""
        return True


class MixerCore(nn.Module):
    """The fused mixer core as a module of its own (no parameters) so that its output has a
    consumer to name: ``feeds`` is out_proj's path from the parent mixer (see ``AddRMSNorm``)."""

    cfg: VimConfig
    feeds: tuple[str, ...] = ("out_proj",)

    def __call__(self, xz: jax.Array, fwd: MixerDirection, bwd: MixerDirection, quant: Any = None) -> Any:
        """``xz``: in_proj's output, x and the gate z side by side (read in place by the kernel)."""
        return vim_mixer(xz, None, fwd, bwd, backend=self.cfg.scan, quant=quant, packed=True)


class BiMambaMixer(nn.Module):
    """Bimamba v2: one shared in_proj, two S6 branches (forward, and flipped), one out_proj."""

    cfg: VimConfig

    def setup(self) -> None:
        c = self.cfg
        e, n, r = c.d_inner, c.d_state, c.dt_rank
        self.in_proj = dense(c.dtype, 2 * e, False, "in_proj")
        self.out_proj = dense(c.dtype, c.embed_dim, False, "out_proj")
        self.conv1d = CausalConv1d(c.d_conv, name="conv1d")
        self.conv1d_b = CausalConv1d(c.d_conv, name="conv1d_b")
        self.x_proj = dense(c.dtype, r + 2 * n, False, "x_proj")
        self.x_proj_b = dense(c.dtype, r + 2 * n, False, "x_proj_b")
        # The fused kernel multiplies dt_proj on chip: there it hands over its operands.
        dt_dense = operand_dense if mixer_backend(c.scan) == "fused" else dense
        self.dt_proj = dt_dense(c.dtype, e, True, "dt_proj")
        self.dt_proj_b = dt_dense(c.dtype, e, True, "dt_proj_b")
        self.A_log = self.param("A_log", a_log_init, (e, n))
        self.A_b_log = self.param("A_b_log", a_log_init, (e, n))
        self.D = self.param("D", nn.initializers.ones, (e,))
        self.D_b = self.param("D_b", nn.initializers.ones, (e,))
        self.core = MixerCore(c, name="core")

    def _fused(self, xz):
        """The same function with conv + scans + gate + average in one kernel (``ops.mixer``),
        which also multiplies dt_proj (its operands, quantized by interception when it is);
        x_proj stays a Dense call."""
        c = self.cfg
        x = xz[..., :c.d_inner]
        directions = []
        for xd, conv, x_proj, dt_proj, a_log, d in (
            (x, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D),
            (jnp.flip(x, axis=1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b),
        ):
            dt, b, cc = jnp.split(x_proj(nn.silu(conv(xd))), [c.dt_rank, c.dt_rank + c.d_state], axis=-1)
            w = conv.variables["params"]
            directions.append(mixer_direction(w["kernel"], w["bias"], dt_proj(dt), b, cc,
                                              -jnp.exp(a_log.astype(jnp.float32)), d))
        return self.core(xz, *directions)

    def __call__(self, hidden: Any) -> jax.Array:
        """``hidden``: the normed block input in the compute dtype (or, in integer inference, its
        in_proj codes from the norm)."""
        c = self.cfg
        xz = self.in_proj(hidden)
        if mixer_backend(c.scan) == "fused":
            return self.out_proj(self._fused(xz))
        x, z = jnp.split(xz, 2, axis=-1)
        y_f = mamba_direction(c, x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        flip = lambda t: jnp.flip(t, axis=1)
        y_b = mamba_direction(
            c, flip(x), flip(z), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b
        )
        y = (y_f.astype(jnp.float32) + flip(y_b).astype(jnp.float32)) / 2
        return self.out_proj(y.astype(c.dtype))


class VimBlock(nn.Module):
    """Fused residual-add + RMSNorm, then the mixer. Returns (mixer output, residual)."""

    cfg: VimConfig

    @nn.compact
    def __call__(self, hidden: jax.Array, residual: jax.Array) -> tuple[jax.Array, jax.Array]:
        # Block 0 gets residual = 0, which equals the official ``residual=None`` branch exactly.
        c = self.cfg
        normed, residual = AddRMSNorm(c.norm_epsilon, c.dtype, c.scan, feeds=("mixer", "in_proj"),
                                      name="norm")(hidden, residual)
        return BiMambaMixer(c, name="mixer")(normed), residual


class VisionMamba(VisionMambaBase):
    """``apply({"params": p}, nhwc) -> logits``; ``embed``/``layers``/``classify`` for block-wise use."""

    cfg: VimConfig
    parts = VisionMambaParts(arch="Vim", block=lambda cfg, i: VimBlock(cfg))


vim_blockwise = vision_mamba_blockwise  # Vim's stem -> ``depth`` blocks -> head
