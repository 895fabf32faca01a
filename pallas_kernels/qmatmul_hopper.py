"""Hopper (sm_90a) int8 GEMM for PTQ4VM linears: Mosaic GPU ``wgmma`` s8 x s8 -> s32 + fused epilogue.

Same arithmetic as :func:`pallas_kernels.qmatmul.qmatmul_codes` (read its module doc): int8
codes ``q - c`` (``c = 2^(a_bits-1)``) from :func:`~pallas_kernels.qmatmul.quantize_activations`
times the int8 weight, summed exactly in int32, the zero point restored with the weight column
sums, then ``(f32(acc) * a_scale[l]) * w_scale[n] + bias[n]`` with ``l = row mod L``.

Why a second kernel: the Triton backend cannot issue Hopper's asynchronous warpgroup MMA, so
it cannot approach the int8 peak there. This one feeds ``wgmma`` from shared
memory filled by TMA through a multi-stage ``plgpu.emit_pipeline`` over K.

Two schedules hide the epilogue (dequantization in registers, TMA store) behind MMA work. By
default one CTA computes one output tile and two CTAs share an SM, so one's epilogue runs while
the other's K loop keeps the tensor cores busy. ``WgmmaConfig(persistent=True)`` launches one or
two CTAs per SM that loop over the output tiles with the output tile double-buffered in shared
memory: a tile's TMA store drains during the next tile's K loop. The tile sweep
(``WGMMA_SWEEP``, ``experiments/bench_gemm.py --sections sweep-wgmma``) times both.

Layout contract. int8 ``wgmma`` only reads K-major operands (PTX supports transposed operands
for 16-bit types only), so the weight is passed transposed, ``w_t`` (N, K) int8, K contiguous:
:func:`prepare_weight_wgmma` builds it once per layer (unpacking 4-bit storage; Hopper has no
int4 MMA rate anyway, so W4 saves storage, not MMA time).

Edges. M (= batch x 197) needs no multiple of the tile: TMA zero-fills the rows of the last M
tile that lie beyond M and drops them on the store. The kernel takes K and N multiples of 64
(every Vim in_proj/out_proj size, most VMamba ones); :func:`qmatmul_wgmma`, the entry point with
``qmatmul``'s contract, zero-pads the others (Vim-S x_proj N = 56, dt_proj K = 24; VMamba-T/S
stage 1, dim 96).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.typing import DTypeLike

from pallas_kernels.qlinear import QuantizedLinear, dense_weight, zero_shift
from pallas_kernels.qmatmul import _check_args, _check_codes, quantize_activations

__all__ = [
    "WGMMA_SWEEP",
    "WgmmaConfig",
    "default_wgmma_config",
    "persistent_ctas",
    "prepare_weight_wgmma",
    "qmatmul_codes_wgmma",
    "qmatmul_wgmma",
    "qmatmul_wgmma_codes",
    "smem_bytes",
    "supports_qmatmul_wgmma",
    "supports_wgmma",
]

_ALIGN = 64  # K and N granularity: 64-byte swizzle of int8 K rows, 64-column N tiles
_SMEM_BYTES = 232448  # an sm_90 CTA's shared memory limit (227 KB), as Mosaic GPU checks it
_SM_SMEM_BYTES = 233472  # an sm_90 SM's shared memory (228 KB), shared by its resident CTAs
_INTERPRET_SMS = 1  # SMs the interpreter pretends to have: at test shapes each CTA runs several tiles
# plgpu.load's ``idx``: a required positional argument in jax 0.10, deprecated (optional) in 0.11.
_LOAD_IDX_OPTIONAL = inspect.signature(plgpu.load).parameters["idx"].default is not inspect.Parameter.empty
_MAX_ACC_REGS = 128  # int32 accumulator registers per thread of the one compute warpgroup


@dataclasses.dataclass(frozen=True)
class WgmmaConfig:
    """Tile sizes of one CTA (one compute warpgroup) and the depth of the TMA pipeline over K.

    ``tile_m`` is a multiple of 64 (the wgmma M), ``tile_n`` a multiple of 64 up to 256 (wgmma
    N limit), ``tile_k`` a multiple of 64 (the 64-byte swizzle; 128-byte when ``tile_k % 128 ==
    0``). The accumulator lives in registers: ``tile_m * tile_n / 128 <= 128`` int32 per thread.
    SMEM per CTA ~ ``stages * (tile_m + tile_n) * tile_k`` bytes plus the output tile; below
    ~110 KB two CTAs share an SM, so one CTA's epilogue overlaps the other's main loop.
    ``m_fastest`` launches consecutive CTAs along M instead of N (N fastest reuses an activation
    tile from L2 across the N tiles; the weight is at most a few MB and stays in L2 either way).
    ``warpgroup`` picks Mosaic GPU's warpgroup lowering, the default from jax 0.11 on; the
    default here is the lane lowering, the one checked on the CPU (jax 0.10.2's default), so the
    GPU builds what the tests lowered whatever the jax version.
    ``persistent`` launches as many CTAs as fit on the card at once (one or two per SM, by shared
    memory) and each loops over output tiles. The output tile and the epilogue vectors are double
    buffered, so one tile's TMA store and the next tile's vector loads run under the next tile's
    K loop instead of ending a CTA; no tail wave of short-lived CTAs.
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 4
    m_fastest: bool = False
    warpgroup: bool = False
    persistent: bool = False

    def __post_init__(self) -> None:
        for name in ("tile_m", "tile_n", "tile_k"):
            v = getattr(self, name)
            if v < 64 or v % 64:
                raise ValueError(f"WgmmaConfig.{name} must be a positive multiple of 64, got {v}")
        if self.tile_n > 256:
            raise ValueError(f"WgmmaConfig.tile_n must be <= 256 (wgmma N limit), got {self.tile_n}")
        if self.tile_m * self.tile_n // 128 > _MAX_ACC_REGS:
            raise ValueError(
                f"WgmmaConfig tile_m x tile_n = {self.tile_m} x {self.tile_n} needs "
                f"{self.tile_m * self.tile_n // 128} accumulator registers per thread (> "
                f"{_MAX_ACC_REGS}); use 128 x 128 or 64 x 256"
            )
        if self.stages < 2:
            raise ValueError(f"WgmmaConfig.stages must be >= 2 (a wgmma stays in flight), got {self.stages}")


def _largest_tile(dim: int, candidates: tuple[int, ...]) -> int:
    return next(t for t in candidates if dim % t == 0)


def default_wgmma_config(m: int, k: int, n: int) -> WgmmaConfig:
    """128 x 128 tiles, K tiles of 64 bytes, 4 stages (96 KB of SMEM: two CTAs per SM): ``WGMMA_SWEEP``'s
    choice (BENCHMARKS.md); 64-column N tiles where N requires them."""
    _check_shape(m, k, n)
    del m
    tile_n = _largest_tile(n, (128, 64))
    return WgmmaConfig(tile_m=128, tile_n=tile_n, tile_k=64, stages=4)


#: Configurations of the tile sweep on Hopper (all fit 227 KB of SMEM with any output
#: dtype, see ``smem_bytes``), and the default in the warpgroup lowering.
WGMMA_SWEEP: tuple[WgmmaConfig, ...] = (
    WgmmaConfig(128, 128, 64, 4),  # default: 96 KB, two CTAs per SM
    WgmmaConfig(128, 128, 128, 4),  # 128 KB SMEM, one CTA per SM
    WgmmaConfig(128, 128, 128, 2),  # 96 KB: two CTAs per SM
    WgmmaConfig(64, 256, 128, 3),  # 120 KB + out: wide N, A tile reused by 256 columns
    WgmmaConfig(64, 256, 64, 3),  # 64 KB + out: two CTAs per SM
    WgmmaConfig(128, 128, 64, 4, m_fastest=True),
    WgmmaConfig(128, 128, 64, 4, warpgroup=True),
    # persistent (bf16 output, two output tiles):
    WgmmaConfig(128, 128, 64, 4, persistent=True),  # 135 KB: one CTA per SM
    WgmmaConfig(128, 128, 64, 5, persistent=True),  # 151 KB: one CTA per SM, deeper pipeline
    WgmmaConfig(128, 128, 128, 2, persistent=True),  # 135 KB: one CTA per SM, half the K steps
    WgmmaConfig(128, 128, 64, 2, persistent=True),  # 103 KB: two CTAs per SM
)


def smem_bytes(cfg: WgmmaConfig, out_itemsize: int) -> int:
    """Shared memory of one CTA: pipeline buffers, output tile(s), epilogue vectors and Mosaic's
    reserve; a slight over-estimate of Mosaic GPU's own count, so a config it passes fits."""
    pipeline = cfg.stages * (cfg.tile_m + cfg.tile_n) * cfg.tile_k
    vectors = 4 * (2 * cfg.tile_m + 3 * cfg.tile_n)
    return pipeline + _buffers(cfg) * (cfg.tile_m * cfg.tile_n * out_itemsize + vectors) + 2048


def _buffers(cfg: WgmmaConfig) -> int:
    """Copies of the output tile and epilogue vectors: two when a CTA runs several tiles."""
    return 2 if cfg.persistent else 1


def persistent_ctas(cfg: WgmmaConfig, out_itemsize: int, tiles: int, sms: int) -> int:
    """CTAs of a persistent launch: as many as ``sms`` SMs hold at once (two per SM where two fit
    the SM's shared memory), at most one per output tile."""
    per_sm = 2 if 2 * smem_bytes(cfg, out_itemsize) <= _SM_SMEM_BYTES else 1
    return max(1, min(tiles, per_sm * sms))


def _check_shape(m: int, k: int, n: int) -> None:
    if not supports_wgmma(m, k, n):
        raise ValueError(
            f"qmatmul_codes_wgmma needs K and N to be multiples of {_ALIGN} and M >= 1 (got M={m}, "
            f"K={k}, N={n}); use the Triton pallas_kernels.qmatmul / qmatmul_codes for this layer"
        )


def supports_wgmma(m: int, k: int, n: int) -> bool:
    """Whether the wgmma kernel takes an (m, k) x (k, n) problem (any M; K, N multiples of 64)."""
    return (
        m >= 1 and k >= _ALIGN and n >= _ALIGN and k % _ALIGN == 0 and n % _ALIGN == 0
        and m * max(k, n) < 2**31
    )


def _padded(dim: int) -> int:
    return -(-dim // _ALIGN) * _ALIGN


def supports_qmatmul_wgmma(m: int, k: int, n: int) -> bool:
    """Whether :func:`qmatmul_wgmma` takes the problem: any K and N (padded to 64), M within the
    kernel's int32 offsets."""
    return supports_wgmma(m, _padded(k), _padded(n))


def prepare_weight_wgmma(layer: QuantizedLinear) -> jax.Array:
    """(N, K) int8, K contiguous, from the layer's weight (int8, packed 4-bit or ``jnp.int4``);
    once per layer."""
    if not isinstance(layer, QuantizedLinear):
        raise TypeError(f"layer must be a pallas_kernels.QuantizedLinear, got {type(layer).__name__}")
    w_q = layer.w_int
    if w_q.ndim != 2 or w_q.dtype not in (jnp.int8, jnp.int4):
        raise ValueError(f"w_int must be a 2-D int8 (or jnp.int4) array, got {w_q.dtype}{list(w_q.shape)}")
    if w_q.dtype == jnp.int4 and layer.w_bits > 4:
        raise ValueError(f"a jnp.int4 weight holds 4-bit codes, but w_bits={layer.w_bits}")
    k = layer.in_features
    unpacked = w_q.dtype == jnp.int4 or w_q.shape[0] == k
    w = w_q.astype(jnp.int8) if unpacked else dense_weight(w_q, layer.w_bits)
    return w[:k].T  # XLA materialises the transpose: a row-major (N, K) array


def _smem_transforms(minor_bytes: int, itemsize: int) -> tuple:
    """(8, swizzle) tiling + the largest swizzle that divides a row of ``minor_bytes``."""
    swizzle = next(s for s in (128, 64, 32) if minor_bytes % s == 0)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _load(ref, layout, interpret: bool) -> jax.Array:
    """An SMEM ref into registers with ``layout`` (the interpreter evaluates ``plgpu.load`` on
    values, not refs, in jax 0.10.2: there ``ref[...]``)."""
    if interpret:
        return ref[...]
    return plgpu.load(ref, layout=layout) if _LOAD_IDX_OPTIONAL else plgpu.load(ref, (), layout=layout)


def _broadcast(ref, axis: int, shape: tuple[int, int], interpret: bool) -> jax.Array:
    """A row (axis 0) or column (axis 1) vector from SMEM, broadcast to ``shape`` in the wgmma
    accumulator's register layout."""
    vec = _load(ref, plgpu.Layout.WGMMA.reduce(1 - axis), interpret)
    return lax.broadcast_in_dim(vec, shape, [axis])


def _epilogue(acc, shift_smem, rscale_smem, colsum_smem, wscale_smem, bias_smem, out_dtype,
              interpret: bool) -> jax.Array:
    """int32 accumulator of one (tile_m, tile_n) tile -> the dequantized output, in registers."""
    shape = acc.shape
    rows = lambda ref: _broadcast(ref, 0, shape, interpret)
    cols = lambda ref: _broadcast(ref, 1, shape, interpret)
    acc = acc + rows(shift_smem) * cols(colsum_smem)  # exact zero-point restore, int32
    if out_dtype == jnp.int32:  # the exact accumulator sum_k (q - z) w, for tests
        return acc
    y = acc.astype(jnp.float32) * rows(rscale_smem) * cols(wscale_smem)
    if bias_smem is not None:
        y = y + cols(bias_smem)
    return y.astype(out_dtype)


def _kernel(codes_gmem, w_gmem, shift_gmem, rscale_gmem, colsum_gmem, wscale_gmem, *refs,
            cfg: WgmmaConfig, k_steps: int, tiles: tuple[int, int], has_bias: bool, interpret: bool):
    """Output tiles of (tile_m, tile_n): per tile a TMA-pipelined K loop of wgmma, then the
    epilogue. One tile per CTA, at the CTA's grid position; with ``cfg.persistent`` the CTAs
    share out the ``tiles`` (M tiles, N tiles) grid, each in turn, N fastest (M with
    ``cfg.m_fastest``).

    ``interpret`` changes two things, because jax 0.10.2's Mosaic GPU interpreter cannot apply
    ``transpose_ref`` to a wgmma operand nor run ``plgpu.load``: the weight comes as (K, N) and
    wgmma reads its tile directly, and the epilogue vectors are read with ``ref[...]``.
    """
    bias_gmem = refs[0] if has_bias else None
    out_gmem, shift_smem, rscale_smem, colsum_smem, wscale_smem, bias_smem, out_smem, vec_bar = (
        refs[1:] if has_bias else refs
    )
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    in_flight = 1 if k_steps > 1 else 0  # wgmmas left running while the next tile loads
    a_tf = _smem_transforms(tk, 1)
    specs = [
        plgpu.BlockSpec((tm, tk), lambda k: (0, k), transforms=a_tf, delay_release=in_flight),
        plgpu.BlockSpec((tk, tn), lambda k: (k, 0), transforms=_smem_transforms(tn, 1),
                        delay_release=in_flight)
        if interpret else
        plgpu.BlockSpec((tn, tk), lambda k: (0, k), transforms=a_tf, delay_release=in_flight),
    ]

    def tile(m_idx, n_idx, slot):
        """One output tile; ``slot`` picks the copy of the output tile and epilogue vectors (the
        persistent schedule's scratch has two; the other's has one, without the leading axis)."""
        m_sl, n_sl = pl.ds(m_idx * tm, tm), pl.ds(n_idx * tn, tn)
        at_slot = (lambda ref: ref.at[slot]) if cfg.persistent else (lambda ref: ref)
        vec = [shift_smem, rscale_smem, colsum_smem, wscale_smem] + ([bias_smem] if has_bias else [])
        vec = [at_slot(ref) for ref in vec]
        # Epilogue vectors first: their copies overlap the main loop. Row vectors are padded to
        # the tile grid by the wrapper, so these copies never leave their arrays.
        srcs = [shift_gmem.at[m_sl], rscale_gmem.at[m_sl], colsum_gmem.at[n_sl], wscale_gmem.at[n_sl]]
        if has_bias:
            srcs.append(bias_gmem.at[n_sl])
        for src, dst in zip(srcs, vec, strict=True):
            plgpu.copy_gmem_to_smem(src, dst, vec_bar.at[slot])

        def main_loop(acc_ref):
            def step(_, a_smem, b_smem):
                b = b_smem if interpret else b_smem.transpose((1, 0))
                plgpu.wgmma(acc_ref, a_smem, b)
                plgpu.wgmma_wait(in_flight)

            plgpu.emit_pipeline(
                step, grid=(k_steps,), in_specs=specs,
                max_concurrent_steps=min(cfg.stages, k_steps) if k_steps > 1 else 1,
            )(codes_gmem.at[m_sl], w_gmem.at[:, n_sl] if interpret else w_gmem.at[n_sl])
            return acc_ref[...]

        acc = pl.run_scoped(main_loop, plgpu.ACC((tm, tn), jnp.int32))
        plgpu.barrier_wait(vec_bar.at[slot])
        y = _epilogue(acc, *vec[:4], vec[4] if has_bias else None, out_smem.dtype, interpret)
        if cfg.persistent:  # this slot's store, two tiles back, has finished reading it
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        at_slot(out_smem)[...] = y
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(at_slot(out_smem), out_gmem.at[m_sl, n_sl])

    if cfg.persistent:
        grid = tiles[::-1] if cfg.m_fastest else tiles

        @plgpu.nd_loop(grid, collective_axes="cta")
        def _(info):
            m_idx, n_idx = info.index[::-1] if cfg.m_fastest else info.index
            tile(m_idx, n_idx, info.local_index % 2)
    else:
        tile(lax.axis_index("m"), lax.axis_index("n"), 0)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _sm_count() -> int:
    """SMs of the default GPU (132 on an H100 or H200 SXM when the device does not say)."""
    return int(getattr(jax.devices()[0], "core_count", None) or 132)


def _interpret_params():
    """Mosaic GPU interpreter (private in jax 0.10/0.11) with TMA's zero fill beyond the array."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams(out_of_bounds_reads="uninitialized", uninitialized_memory="zero")


def qmatmul_codes_wgmma(
    codes: jax.Array,
    layer: QuantizedLinear,
    *,
    w_t: jax.Array | None = None,
    out_dtype: DTypeLike = jnp.bfloat16,
    colsum: jax.Array | None = None,
    config: WgmmaConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """:func:`~pallas_kernels.qmatmul.qmatmul_codes` on Hopper ``wgmma``; same result (but
    ``out_dtype`` defaults to bf16 here, float32 there).

    ``codes`` (B, L, K) int8 from ``quantize_activations``; K and N multiples of 64. ``w_t``
    (N, K) int8 = :func:`prepare_weight_wgmma` of the layer (given, the layer's ``w_int`` is not
    read), made here when not given; ``colsum`` (N,) int32 = ``weight_colsum`` of the same weight
    (computed here when not given). Output (B, L, N) ``out_dtype``; ``out_dtype=jnp.int32``
    returns the exact accumulator ``sum_k (q - z) w`` instead (no scales, no bias), for tests.
    ``interpret=True`` runs jax's Mosaic GPU interpreter on the CPU (slow; small shapes only) with
    the deviations listed in :func:`_kernel` and a whole-tile output cut after the kernel.
    """
    if w_t is None:
        w_t = prepare_weight_wgmma(layer)
    out = _qmatmul_codes_wgmma(codes, w_t, layer, out_dtype=out_dtype, colsum=colsum, config=config,
                               interpret=interpret)
    if interpret and not isinstance(out, jax.core.Tracer):
        # The interpreter runs jax ops from a callback thread; an eager caller that dispatches
        # more work before it finishes can deadlock the CPU runtime.
        out.block_until_ready()
    return out


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def _qmatmul_codes_wgmma(codes, w_t, layer, *, out_dtype, colsum, config, interpret):
    a_scale, a_zero, w_scale, bias, a_bits = (layer.a_scale, layer.a_zero, layer.w_scale, layer.bias,
                                              layer.a_bits)
    if codes.ndim != 3 or codes.dtype != jnp.int8:
        raise ValueError(f"codes must be (B, L, K) int8 from quantize_activations, got "
                         f"{codes.dtype}{list(codes.shape)}")
    batch, seq, k = codes.shape
    if w_t.ndim != 2 or w_t.dtype != jnp.int8 or w_t.shape[1] != k:
        raise ValueError(f"w_t must be (N, K) = (N, {k}) int8 from prepare_weight_wgmma (the "
                         f"transposed weight), got {w_t.dtype}{list(w_t.shape)}")
    n = w_t.shape[0]
    for name, v, size in (("a_scale", a_scale, seq), ("a_zero", a_zero, seq), ("w_scale", w_scale, n),
                          ("bias", bias, n), ("colsum", colsum, n)):
        if v is not None and v.shape != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {v.shape}")
    if not jnp.issubdtype(a_zero.dtype, jnp.integer):
        raise ValueError(f"a_zero must be an integer array, got {a_zero.dtype}")
    m = batch * seq
    _check_shape(m, k, n)
    cfg = config or default_wgmma_config(m, k, n)
    if k % cfg.tile_k or n % cfg.tile_n:
        raise ValueError(f"K={k} and N={n} must be multiples of the config's tile_k={cfg.tile_k} "
                         f"and tile_n={cfg.tile_n}; see default_wgmma_config")
    smem = smem_bytes(cfg, jnp.dtype(out_dtype).itemsize)
    if smem > _SMEM_BYTES:
        raise ValueError(f"{cfg} with {jnp.dtype(out_dtype).name} output needs {smem} bytes of shared "
                         f"memory (> {_SMEM_BYTES}); use fewer stages or smaller tiles")

    if colsum is None:
        colsum = jnp.sum(w_t.astype(jnp.int32), axis=1)
    m_tiles = pl.cdiv(m, cfg.tile_m)
    tok = jnp.arange(m_tiles * cfg.tile_m, dtype=jnp.int32) % seq  # token of each (padded) row
    shift = zero_shift(a_zero, a_bits)[tok]
    row_scale = a_scale.astype(jnp.float32)[tok]
    w_op = w_t.T if interpret else w_t
    # TMA needs the row count of a tiled global array to be a multiple of 8: an odd batch
    # (M = batch * 197) gets up to 7 zero rows, cut from the output below.
    m8 = -(-m // 8) * 8
    rows = codes.reshape(m, k)
    if m8 != m:
        rows = jnp.pad(rows, ((0, m8 - m), (0, 0)))
    operands = [rows, w_op, shift, row_scale, colsum.astype(jnp.int32), w_scale.astype(jnp.float32)]
    if bias is not None:
        operands.append(bias.astype(jnp.float32))

    # On the GPU the last tile's TMA store drops rows >= M. The interpreter drops a partially
    # out-of-bounds store entirely, so there the output has whole tiles and is cut after.
    out_type = jax.ShapeDtypeStruct((m_tiles * cfg.tile_m if interpret else m8, n), out_dtype)
    common = dict(interpret=_interpret_params() if interpret else None, kernel_name="ptq4vm_qmatmul_wgmma")
    tm, tn = cfg.tile_m, cfg.tile_n
    out_itemsize = jnp.dtype(out_dtype).itemsize
    tiles = (m_tiles, n // tn)
    if cfg.persistent:
        ctas = persistent_ctas(cfg, out_itemsize, m_tiles * tiles[1],
                               _INTERPRET_SMS if interpret else _sm_count())
        grid, names = (ctas,), ("cta",)
    else:
        grid, names = tiles, ("m", "n")
        if cfg.m_fastest:
            grid, names = grid[::-1], names[::-1]
    kernel = functools.partial(_kernel, cfg=cfg, k_steps=k // cfg.tile_k, tiles=tiles,
                               has_bias=bias is not None, interpret=interpret)
    slots = (_buffers(cfg),) if cfg.persistent else ()
    out = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=[
            plgpu.SMEM((*slots, tm), jnp.int32),
            plgpu.SMEM((*slots, tm), jnp.float32),
            plgpu.SMEM((*slots, tn), jnp.int32),
            plgpu.SMEM((*slots, tn), jnp.float32),
            plgpu.SMEM((*slots, tn), jnp.float32),
            plgpu.SMEM((*slots, tm, tn), out_dtype,
                       transforms=_smem_transforms(tn * out_itemsize, out_itemsize)),
            # (slots,) barriers: (1,) for one in jax 0.10 and 0.11 alike
            plgpu.Barrier(num_arrivals=5 if bias is not None else 4, num_barriers=_buffers(cfg)),
        ],
        grid=grid,
        grid_names=names,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup
                                             if cfg.warpgroup else plgpu.LoweringSemantics.Lane),
        **common,
    )(*operands)
    return out[:m].reshape(batch, seq, n)


def qmatmul_wgmma(
    x: jax.Array,
    layer: QuantizedLinear,
    *,
    out_dtype: DTypeLike | None = None,
    config: WgmmaConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """:func:`~pallas_kernels.qmatmul.qmatmul`'s contract and result on Hopper, any K and N:
    ``quantize_activations`` (an XLA op that fuses into x's producer), then
    :func:`qmatmul_wgmma_codes`."""
    _check_args(x, layer)
    return qmatmul_wgmma_codes(quantize_activations(x, layer), layer, out_dtype=out_dtype or x.dtype,
                               config=config, interpret=interpret)


def qmatmul_wgmma_codes(
    codes: jax.Array,
    layer: QuantizedLinear,
    *,
    out_dtype: DTypeLike = jnp.bfloat16,
    config: WgmmaConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``qmatmul_codes_wgmma`` for any K and N, on int8 codes a producer quantized with the layer's
    input quantizer: the weight dense, transposed and zero-padded to multiples of 64 in K and N.
    Zero weight rows add nothing to the sums (whatever the padded codes hold) nor to the column
    sums; padded output columns are cut. The weight preparation is part of the traced graph,
    small beside the activations."""
    w_q, w_bits = _check_codes(codes, layer)
    k, n = codes.shape[-1], layer.out_features
    kp, np_ = _padded(k), _padded(n)
    w = dense_weight(w_q, w_bits)[:k]
    if kp != k:
        codes = jnp.pad(codes, ((0, 0), (0, 0), (0, kp - k)))
    w_t = jnp.pad(w, ((0, kp - k), (0, np_ - n))).T
    padded = layer
    if np_ != n:
        bias = None if layer.bias is None else jnp.pad(layer.bias, (0, np_ - n))
        padded = dataclasses.replace(layer, w_scale=jnp.pad(layer.w_scale, (0, np_ - n)), bias=bias)
    y = qmatmul_codes_wgmma(codes, padded, w_t=w_t, out_dtype=out_dtype, config=config,
                            interpret=interpret)
    return y[..., :n]
