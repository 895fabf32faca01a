"""VMamba v2 (MzeroMiko/VMamba ``VSSM``) in Flax Linen, the official eval forward.

Covers the configs PTQ4VM quantizes (``vmambav2v_*``) and ``vmambav2_*``: patch embed v2,
VSS blocks with the ``v05_noz`` SS2D (no z gate), downsample v3, ``ln2d`` norms. The
official model is channel-first; this port is NHWC throughout (same function).

Every quantizable projection is an ``nn.Dense`` applied token-major to (B, L, C):
``in_proj``, ``x_proj_{k}``/``dt_proj_{k}`` (one per scan direction, each fed its own
direction's sequence in that direction's scan order), ``out_proj``, ``mlp/fc1``, ``mlp/fc2``.
The official stacked ``x_proj_weight``/``dt_projs_*`` are split by ``convert.vmamba``.
Blocks (``layers_{s}/blocks_{j}``) and downsamples (``layers_{s}/downsample``) are
standalone modules, so block-wise calibration can apply them alone.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptq4vm_jax.models.blockwise import Blockwise, Stage
from ptq4vm_jax.models.inputs import check_images
from ptq4vm_jax.ops.scan import check_scan_backend, selective_scan

NUM_DIRECTIONS = 4  # cross-scan: row-major, column-major, and both reversed
LN_EPS = 1e-5  # torch nn.LayerNorm default, used by every norm of the official model


@dataclasses.dataclass(frozen=True)
class VMambaConfig:
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
    # of ``ptq4vm_jax.ops.scan.SCAN_BACKENDS`` (as ``VimConfig.scan``).
    scan: str = "auto"

    def __post_init__(self) -> None:
        check_scan_backend(self.scan)
        # Lists from yaml/CLI overrides become tuples so the config stays hashable.
        for name in ("depths", "dims"):
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                object.__setattr__(self, name, tuple(int(v) if _is_int(v) else v for v in value))
        sizes = ("img_size", "patch_size", "in_chans", "num_classes", "ssm_d_state", "ssm_conv")
        problems = [f"{name} must be a positive int, got {getattr(self, name)!r}" for name in sizes
                    if not _positive_int(getattr(self, name))]
        if not (isinstance(self.depths, tuple) and self.depths and all(map(_positive_int, self.depths))):
            problems.append(f"depths must be positive ints, one per stage, got {self.depths!r}")
        per_stage = isinstance(self.dims, tuple) and all(map(_positive_int, self.dims))
        if not (_positive_int(self.dims) or per_stage):
            problems.append(f"dims must be a positive int or one per stage, got {self.dims!r}")
        problems += [f"{name} must be a number > 0, got {getattr(self, name)!r}"
                     for name in ("ssm_ratio", "mlp_ratio") if not _positive_number(getattr(self, name))]
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
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        if isinstance(self.dims, int):
            return tuple(self.dims * 2**s for s in range(self.num_stages))
        return self.dims

    @property
    def channels(self) -> int:
        """``in_chans`` under the name the other families' configs use."""
        return self.in_chans

    @property
    def stage_hw(self) -> tuple[tuple[int, int], ...]:
        """Token grid (H, W) of each stage; L = H * W is what per-token scales index."""
        k = self.patch_size // 2
        sides = [_conv_out(_conv_out(self.img_size, k + 1, k, 1), k + 1, k, 1)]
        for _ in range(self.num_stages - 1):
            sides.append(_conv_out(sides[-1], 3, 2, 1))
        return tuple((n, n) for n in sides)

    def d_inner(self, dim: int) -> int:
        return int(self.ssm_ratio * dim)

    def dt_rank(self, dim: int) -> int:
        return math.ceil(dim / 16) if self.ssm_dt_rank == "auto" else int(self.ssm_dt_rank)

    def mlp_hidden(self, dim: int) -> int:
        return int(dim * self.mlp_ratio)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(value: object) -> bool:
    return _is_int(value) and value > 0


def _positive_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < math.inf


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


def _layer_norm(name: str | None = None) -> nn.LayerNorm:
    # Two-pass variance like torch; the one-pass default differs by rounding on large means.
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=jnp.float32,
                        param_dtype=jnp.float32, name=name)


def _dense(cfg: VMambaConfig, features: int, bias: bool, name: str | None = None, **kw: Any) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=cfg.dtype, param_dtype=jnp.float32, name=name, **kw)


def _conv(cfg: VMambaConfig, features: int, kernel: int, stride: int, pad: int, bias: bool,
          groups: int = 1, name: str | None = None) -> nn.Conv:
    # Explicit symmetric padding: torch's padding=p, not XLA "SAME" (asymmetric for stride 2).
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   feature_group_count=groups, use_bias=bias, dtype=cfg.dtype,
                   param_dtype=jnp.float32, name=name)


def _a_logs_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.log(jnp.broadcast_to(jnp.arange(1, shape[-1] + 1, dtype=dtype), shape))


def _dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=0.1, floor=1e-4):
    """softplus(bias) log-uniform in [dt_min, dt_max], as in Mamba's dt init."""
    u = jax.random.uniform(key, shape, dtype)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
    return dt + jnp.log(-jnp.expm1(-dt))


class SS2D(nn.Module):
    """``SS2Dv2`` with ``forward_type="v05_noz"``: (B, H, W, C) -> (B, H, W, C)."""

    cfg: VMambaConfig
    dim: int

    def setup(self) -> None:
        c = self.cfg
        e, r, n = c.d_inner(self.dim), c.dt_rank(self.dim), c.ssm_d_state
        self.in_proj = _dense(c, e, False, "in_proj")
        self.conv2d = _conv(c, e, c.ssm_conv, 1, (c.ssm_conv - 1) // 2, c.ssm_conv_bias, groups=e,
                            name="conv2d")
        self.x_proj = [_dense(c, r + 2 * n, False, f"x_proj_{k}") for k in range(NUM_DIRECTIONS)]
        bound = r**-0.5
        dt_kernel_init = lambda key, s, d: jax.random.uniform(key, s, d, -bound, bound)
        self.dt_proj = [
            _dense(c, e, True, f"dt_proj_{k}", kernel_init=dt_kernel_init, bias_init=_dt_bias_init)
            for k in range(NUM_DIRECTIONS)
        ]
        self.A_logs = self.param("A_logs", _a_logs_init, (NUM_DIRECTIONS, e, n))
        self.Ds = self.param("Ds", nn.initializers.ones, (NUM_DIRECTIONS, e))
        self.out_norm = _layer_norm("out_norm")
        self.out_proj = _dense(c, self.dim, False, "out_proj")

    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        b, h, w, _ = x.shape
        r, n = c.dt_rank(self.dim), c.ssm_d_state
        x = self.in_proj(x.reshape(b, h * w, -1).astype(c.dtype))
        x = nn.silu(self.conv2d(x.reshape(b, h, w, -1)))
        us, dts, bs, cs = [], [], [], []
        for k, seq in enumerate(cross_scan(x)):
            dt, b_k, c_k = jnp.split(self.x_proj[k](seq), [r, r + n], axis=-1)
            us.append(seq)
            dts.append(self.dt_proj[k](dt))  # the official delta_bias is this Dense's bias
            bs.append(b_k)
            cs.append(c_k)
        a = -jnp.exp(self.A_logs.astype(jnp.float32))
        # The four directions run as one vmapped fp32 scan on the config's backend.
        f32 = lambda ts: jnp.stack(ts).astype(jnp.float32)
        scan = lambda u, dt, a_k, b_k, c_k, d_k: selective_scan(u, dt, a_k, b_k, c_k, D=d_k,
                                                                backend=c.scan)
        ys = jax.vmap(scan)(f32(us), f32(dts), a, f32(bs), f32(cs), self.Ds.astype(jnp.float32))
        y = self.out_norm(cross_merge(list(ys), h, w))
        return self.out_proj(y.astype(c.dtype)).reshape(b, h, w, self.dim)


class Mlp(nn.Module):
    cfg: VMambaConfig
    dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        b, h, w, _ = x.shape
        t = _dense(c, c.mlp_hidden(self.dim), True, "fc1")(x.reshape(b, h * w, -1).astype(c.dtype))
        t = _dense(c, self.dim, True, "fc2")(jax.nn.gelu(t, approximate=False))
        return t.reshape(b, h, w, self.dim)


class VSSBlock(nn.Module):
    """``x + SS2D(LN(x))`` then ``x + MLP(LN(x))`` on (B, H, W, dim); residual stream in fp32."""

    cfg: VMambaConfig
    dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x + SS2D(self.cfg, self.dim, name="op")(_layer_norm("norm")(x)).astype(jnp.float32)
        return x + Mlp(self.cfg, self.dim, name="mlp")(_layer_norm("norm2")(x)).astype(jnp.float32)


class Downsample(nn.Module):
    """Downsample v3: conv 3x3 stride 2 (bias) -> LN; (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out)."""

    cfg: VMambaConfig
    out_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _conv(self.cfg, self.out_dim, 3, 2, 1, True, name="conv")(x.astype(self.cfg.dtype))
        return _layer_norm("norm")(x)


class PatchEmbed(nn.Module):
    """Patch embed v2: conv -> LN -> GELU -> conv -> LN, each conv stride patch_size//2."""

    cfg: VMambaConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.cfg
        s, d = c.patch_size // 2, c.stage_dims[0]
        x = _conv(c, d // 2, s + 1, s, 1, True, name="conv1")(images.astype(c.dtype))
        x = jax.nn.gelu(_layer_norm("norm1")(x), approximate=False)
        x = _conv(c, d, s + 1, s, 1, True, name="conv2")(x.astype(c.dtype))
        return _layer_norm("norm2")(x)


class VSSLayer(nn.Module):
    """One stage: ``blocks_{j}`` then (except the last stage) ``downsample``."""

    cfg: VMambaConfig
    stage: int

    def setup(self) -> None:
        c, s = self.cfg, self.stage
        dims = c.stage_dims
        self.blocks = [VSSBlock(c, dims[s]) for _ in range(c.depths[s])]
        self.downsample = Downsample(c, dims[s + 1]) if s + 1 < c.num_stages else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class VMamba(nn.Module):
    """The official ``VSSM``: ``apply({"params": p}, nhwc) -> logits``; ``embed``/``classify``
    and the per-stage modules serve block-wise use (``vmamba_blockwise``)."""

    cfg: VMambaConfig

    def setup(self) -> None:
        c = self.cfg
        self.patch_embed = PatchEmbed(c)
        self.layers = [VSSLayer(c, s, name=f"layers_{s}") for s in range(c.num_stages)]
        self.norm = _layer_norm()
        self.head = nn.Dense(c.num_classes, dtype=jnp.float32, param_dtype=jnp.float32)

    def check_images(self, images: jax.Array) -> None:
        c = self.cfg
        check_images(images, (c.img_size, c.img_size, c.in_chans), "VMamba")

    def embed(self, images: jax.Array) -> jax.Array:
        """Patch embed: NHWC images -> (B, H/4, W/4, dims[0]) fp32 tokens."""
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


def vmamba_blockwise(model: VMamba) -> Blockwise:
    """Stem -> per stage: VSS blocks, then the downsample -> head.

    JLSS compares each block's full output, residual included (docs/method.md §7.2); a downsample has
    nothing to quantize, so both chains just go through it.
    """
    cfg = model.cfg
    stages: list[Stage] = []
    for s, dim in enumerate(cfg.stage_dims):
        stages += [Stage((f"layers_{s}", f"blocks_{j}"), VSSBlock(cfg, dim), block_output)
                   for j in range(cfg.depths[s])]
        if s + 1 < cfg.num_stages:
            stages.append(Stage((f"layers_{s}", "downsample"), Downsample(cfg, cfg.stage_dims[s + 1]),
                                block_output))
    return Blockwise(
        embed=lambda params, images: model.apply({"params": params}, images, method="embed"),
        stages=tuple(stages),
        classify=lambda params, x: model.apply({"params": params}, x, method="classify"),
    )
