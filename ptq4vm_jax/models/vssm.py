"""The official ``VSSM`` skeleton that VMamba and LocalVMamba share, parameterised by each family's parts.

``patch_embed`` -> stages ``layers_{s}`` (blocks ``blocks_{j}``, then, except in the last stage,
``downsample``) -> ``norm`` -> mean over H, W -> ``head``, on NHWC tokens: the official
checkpoints' layout. Blocks and downsamples are standalone modules, so block-wise calibration
(``vssm_blockwise``) applies each alone. Also here: the size checks and derived sizes both
families' configs make, and the SS2D parameters and scans both families share.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptq4vm_jax.models.blockwise import Blockwise, Stage, model_blockwise
from ptq4vm_jax.models.inputs import check_images
from ptq4vm_jax.models.layers import a_log_init, conv, dense, dt_bias_init, layer_norm, operand_dense
from ptq4vm_jax.ops.scan import selective_scan

# ----------------------------------------------------------------------------- configs


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value: object) -> bool:
    return is_int(value) and value > 0


def positive_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < math.inf


def stage_lists_to_tuples(cfg: Any) -> None:
    """``depths``/``dims`` lists (yaml/CLI overrides) become tuples: the frozen config stays hashable."""
    for name in ("depths", "dims"):
        value = getattr(cfg, name)
        if isinstance(value, Sequence) and not isinstance(value, str):
            object.__setattr__(cfg, name, tuple(int(v) if is_int(v) else v for v in value))


def size_problems(cfg: Any, ratios: Sequence[str]) -> list[str]:
    """The type checks both configs make first: positive int sizes, one positive depth per stage,
    ``dims`` an int or one width per stage, and positive ``ratios``."""
    sizes = ("img_size", "patch_size", "in_chans", "num_classes", "ssm_d_state", "ssm_conv")
    problems = [f"{name} must be a positive int, got {getattr(cfg, name)!r}" for name in sizes
                if not positive_int(getattr(cfg, name))]
    if not (isinstance(cfg.depths, tuple) and cfg.depths and all(map(positive_int, cfg.depths))):
        problems.append(f"depths must be positive ints, one per stage, got {cfg.depths!r}")
    per_stage = isinstance(cfg.dims, tuple) and all(map(positive_int, cfg.dims))
    if not (positive_int(cfg.dims) or per_stage):
        problems.append(f"dims must be a positive int or one per stage, got {cfg.dims!r}")
    return problems + [f"{name} must be a number > 0, got {getattr(cfg, name)!r}"
                       for name in ratios if not positive_number(getattr(cfg, name))]


class VSSMSizes:
    """Sizes both configs derive the same way from the official constructor's arguments."""

    depths: tuple[int, ...]
    in_chans: int
    ssm_ratio: float
    ssm_dt_rank: int | str

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def channels(self) -> int:
        """``in_chans`` under the name the other families' configs use."""
        return self.in_chans

    def d_inner(self, dim: int) -> int:
        return int(self.ssm_ratio * dim)

    def dt_rank(self, dim: int) -> int:
        return math.ceil(dim / 16) if self.ssm_dt_rank == "auto" else int(self.ssm_dt_rank)


# ----------------------------------------------------------------------------- SS2D


class SS2DBase(nn.Module):
    """What both SS2Ds hold and run: ``in_proj`` (``in_streams`` x d_inner outputs), the depthwise
    ``conv2d``, per scan direction i ``x_proj_{i}``/``dt_proj_{i}`` (Mamba's dt init; the bias is
    the official ``delta_bias``), ``A_logs``/``Ds`` (K, E, ...), ``out_norm``, ``out_proj``. A
    family subclasses it, sets ``in_streams`` and ``num_directions``, and writes ``__call__``."""

    cfg: Any
    dim: int
    in_streams: ClassVar[int]  # 1: in_proj gives x; 2: x and the gate z
    num_directions: ClassVar[int]  # scan directions, each with its own x_proj/dt_proj (or a property)

    def setup(self) -> None:
        c = self.cfg
        e, r, n, k = c.d_inner(self.dim), c.dt_rank(self.dim), c.ssm_d_state, self.num_directions
        self.in_proj = dense(c.dtype, self.in_streams * e, False, "in_proj")
        self.conv2d = conv(c.dtype, e, c.ssm_conv, 1, (c.ssm_conv - 1) // 2, c.ssm_conv_bias, groups=e,
                           name="conv2d")
        self.x_proj = [dense(c.dtype, r + 2 * n, False, f"x_proj_{i}") for i in range(k)]
        bound = r**-0.5
        dt_kernel_init = lambda key, s, d: jax.random.uniform(key, s, d, -bound, bound)
        dt_dense = operand_dense if self.dt_on_chip() else dense
        self.dt_proj = [dt_dense(c.dtype, e, True, f"dt_proj_{i}", kernel_init=dt_kernel_init,
                                 bias_init=dt_bias_init) for i in range(k)]
        self.A_logs = self.param("A_logs", a_log_init, (k, e, n))
        self.Ds = self.param("Ds", nn.initializers.ones, (k, e))
        self.out_norm = layer_norm("out_norm")
        self.out_proj = dense(c.dtype, self.dim, False, "out_proj")

    def dt_on_chip(self) -> bool:
        """Whether the scan kernel multiplies dt_proj itself (its Dense then hands over its
        operands, ``OperandDense``): a family's fused path may; by default not."""
        return False

    def direction_inputs(self, seqs: Sequence[jax.Array]) -> tuple[Any, ...]:
        """K (B, L, E) sequences, each in its own scan order through its own projections -> the
        K dt_proj results (Δ, or its operands where ``dt_on_chip``) and the scans' stacked float32
        inputs: A (K, E, N), B and C (K, B, L, N), D (K, E)."""
        c = self.cfg
        r, n = c.dt_rank(self.dim), c.ssm_d_state
        dts, bs, cs = [], [], []
        for k, seq in enumerate(seqs):
            dt, b_k, c_k = jnp.split(self.x_proj[k](seq), [r, r + n], axis=-1)
            dts.append(self.dt_proj[k](dt))
            bs.append(b_k)
            cs.append(c_k)
        f32 = lambda ts: jnp.stack(ts).astype(jnp.float32)
        a = -jnp.exp(self.A_logs.astype(jnp.float32))
        return dts, a, f32(bs), f32(cs), self.Ds.astype(jnp.float32)

    def scan_directions(self, seqs: Sequence[jax.Array]) -> jax.Array:
        """The K selective scans of ``direction_inputs`` as one vmapped float32 scan on the
        config's backend -> (K, B, L, E), each in its own order."""
        dts, a, bs, cs, ds = self.direction_inputs(seqs)
        backend = self.cfg.scan
        scan = lambda u, dt, a_k, b_k, c_k, d_k: selective_scan(u, dt, a_k, b_k, c_k, D=d_k, backend=backend)
        return jax.vmap(scan)(jnp.stack(seqs).astype(jnp.float32), jnp.stack(dts).astype(jnp.float32), a, bs,
                              cs, ds)


# ----------------------------------------------------------------------------- skeleton


@dataclasses.dataclass(frozen=True)
class VSSMParts:
    """How a family builds its modules from its config."""

    arch: str  # the family's name in error messages
    stem: Callable[[Any], nn.Module]  # cfg -> patch embed: NHWC images -> (B, H, W, dims[0])
    block: Callable[[Any, int, int], nn.Module]  # (cfg, stage, index) -> block on (B, H, W, dims[stage])
    downsample: Callable[[Any, int], nn.Module]  # (cfg, stage) -> (B, H, W, dims[stage]) -> dims[stage + 1]


class VSSLayer(nn.Module):
    """One stage: ``blocks_{j}`` then (except the last stage) ``downsample``."""

    cfg: Any
    stage: int
    parts: VSSMParts

    def setup(self) -> None:
        c, s = self.cfg, self.stage
        self.blocks = [self.parts.block(c, s, j) for j in range(c.depths[s])]
        self.downsample = self.parts.downsample(c, s) if s + 1 < c.num_stages else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class VSSMBase(nn.Module):
    """``apply({"params": p}, nhwc) -> logits``; ``embed``/``classify`` and the per-stage modules
    serve block-wise use. A family subclasses it and sets ``parts``."""

    cfg: Any
    parts: ClassVar[VSSMParts]

    def setup(self) -> None:
        c = self.cfg
        self.patch_embed = self.parts.stem(c)
        self.layers = [VSSLayer(c, s, self.parts, name=f"layers_{s}") for s in range(c.num_stages)]
        self.norm = layer_norm()
        self.head = nn.Dense(c.num_classes, dtype=jnp.float32, param_dtype=jnp.float32)

    def check_images(self, images: jax.Array) -> None:
        c = self.cfg
        check_images(images, (c.img_size, c.img_size, c.in_chans), self.parts.arch)

    def embed(self, images: jax.Array) -> jax.Array:
        """Patch embed: NHWC images -> (B, H', W', dims[0]) fp32 tokens."""
        self.check_images(images)
        return self.patch_embed(images)

    def classify(self, x: jax.Array) -> jax.Array:
        """LN -> global average pool over H, W -> head."""
        x = self.norm(x.astype(jnp.float32))
        return self.head(jnp.mean(x, axis=(1, 2)))

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.embed(images)
        for layer in self.layers:
            x = layer(x)
        return self.classify(x)


def block_output(x: jax.Array) -> jax.Array:
    return x


def vssm_blockwise(model: VSSMBase) -> Blockwise:
    """Stem -> per stage: the blocks, then the downsample -> head.

    JLSS compares each block's full output, residual included (docs/method.md §7.2); a downsample
    has nothing to quantize, so both chains just go through it.
    """
    cfg, parts = model.cfg, model.parts
    stages: list[Stage] = []
    for s in range(cfg.num_stages):
        stages += [Stage((f"layers_{s}", f"blocks_{j}"), parts.block(cfg, s, j), block_output)
                   for j in range(cfg.depths[s])]
        if s + 1 < cfg.num_stages:
            stages.append(Stage((f"layers_{s}", "downsample"), parts.downsample(cfg, s), block_output))
    return model_blockwise(model, tuple(stages))
