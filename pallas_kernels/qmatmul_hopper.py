"""Hopper (sm_90a) int8 GEMM for PTQ4VM linears: Mosaic GPU ``wgmma`` s8 x s8 -> s32 + fused epilogue.

Same arithmetic as :func:`pallas_kernels.qmatmul.qmatmul_codes` (read its module doc): int8
codes ``q - c`` (``c = 2^(a_bits-1)``) from :func:`~pallas_kernels.qmatmul.quantize_activations`
times the int8 weight, summed exactly in int32, the zero point restored with the weight column
sums, then ``(f32(acc) * a_scale[l]) * w_scale[n] + bias[n]`` with ``l = row mod L``.

Why a second kernel: the Triton backend cannot issue Hopper's asynchronous warpgroup MMA, and
reached 10 % of the int8 peak on an H200 (BENCHMARKS.md). This one feeds ``wgmma`` from shared
memory filled by TMA through a multi-stage ``plgpu.emit_pipeline`` over K.

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

from pallas_kernels.qmatmul import (
    _check_args,
    check_bits,
    dense_weight,
    quantize_activations,
    quantize_activations_pallas,
)

__all__ = [
    "FUSED_SWEEP",
    "FusedWgmmaConfig",
    "WgmmaConfig",
    "default_fused_config",
    "default_wgmma_config",
    "fused_smem_bytes",
    "prepare_weight_wgmma",
    "qmatmul_codes_wgmma",
    "qmatmul_wgmma",
    "qmatmul_wgmma_fused",
    "smem_bytes",
    "supports_qmatmul_wgmma",
    "supports_wgmma",
    "WGMMA_SWEEP",
]

_ALIGN = 64  # K and N granularity: 64-byte swizzle of int8 K rows, 64-column N tiles
_SMEM_BYTES = 232448  # an sm_90 CTA's shared memory limit (227 KB), as Mosaic GPU checks it
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

    ``warp_specialized`` runs a different schedule (see :func:`_ws_kernel`): one persistent CTA
    per SM with a TMA producer warpgroup and two compute warpgroups, each owning a
    ``tile_m x tile_n`` accumulator of a ``2 tile_m x tile_n`` CTA tile, so one warpgroup's
    epilogue overlaps the other's wgmmas and the producer keeps loading across tiles. The
    warpgroup lowering is implied; ``m_fastest`` does not apply (N is the fast tile index).
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 4
    m_fastest: bool = False
    warpgroup: bool = False
    warp_specialized: bool = False

    def __post_init__(self):
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
        if self.warp_specialized and self.m_fastest:
            raise ValueError("WgmmaConfig.m_fastest does not apply to the warp-specialized schedule")
        if self.warp_specialized and self.tile_m != self.tile_n:
            raise ValueError(
                f"the warp-specialized schedule takes square warpgroup tiles only (tile_m == tile_n, "
                f"got {self.tile_m} x {self.tile_n}): jax's Mosaic GPU interpreter deadlocks on "
                "non-square ones (its TMA producer never issues a copy; cause not found), so they "
                "are unverified; use 128 x 128 or 64 x 64")

    @property
    def cta_rows(self) -> int:
        """Rows of one CTA's output tile (two compute warpgroups when warp-specialized)."""
        return self.tile_m * (2 if self.warp_specialized else 1)


def _largest_tile(dim: int, candidates: tuple[int, ...]) -> int:
    return next(t for t in candidates if dim % t == 0)


def default_wgmma_config(m: int, k: int, n: int, *, warp_specialized: bool = False) -> WgmmaConfig:
    """128 x 128 tiles, K tiles of 64 bytes, 4 stages (96 KB of SMEM: two CTAs per SM): the
    fastest of ``WGMMA_SWEEP`` on an H200 (Vim-B in_proj at batch 256: 293 us vs 333 us for
    K tiles of 128, 2026-11-27, BENCHMARKS.md); 64-column N tiles where N requires them.
    ``warp_specialized``: 128 x 128 tiles per compute warpgroup in that schedule (64 x 64 where
    N requires 64-column tiles: its tiles are square), 3 stages (its ring holds two warpgroups'
    rows), so that any output dtype fits; not timed on a GPU yet."""
    _check_shape(m, k, n)
    del m
    tile_n = _largest_tile(n, (128, 64))
    if warp_specialized:
        return WgmmaConfig(tile_m=tile_n, tile_n=tile_n, tile_k=64, stages=3, warp_specialized=True)
    return WgmmaConfig(tile_m=128, tile_n=tile_n, tile_k=64, stages=4)


#: Configurations of the tile sweep on an H100/H200 (all fit 227 KB of SMEM with any output
#: dtype, see ``smem_bytes``), and the default in the warpgroup lowering.
WGMMA_SWEEP: tuple[WgmmaConfig, ...] = (
    WgmmaConfig(128, 128, 64, 4),  # default: 96 KB, two CTAs per SM
    WgmmaConfig(128, 128, 128, 4),  # 128 KB SMEM, one CTA per SM
    WgmmaConfig(128, 128, 128, 2),  # 96 KB: two CTAs per SM
    WgmmaConfig(64, 256, 128, 3),  # 120 KB + out: wide N, A tile reused by 256 columns
    WgmmaConfig(64, 256, 64, 3),  # 64 KB + out: two CTAs per SM
    WgmmaConfig(128, 128, 64, 4, m_fastest=True),
    WgmmaConfig(128, 128, 64, 4, warpgroup=True),
    # warp-specialized, persistent: the pipeline ring holds (2 tile_m + tile_n) x tile_k per stage
    WgmmaConfig(128, 128, 64, 3, warp_specialized=True),  # 72 KB ring + two output tiles
    WgmmaConfig(128, 128, 64, 2, warp_specialized=True),
)


def smem_bytes(cfg: WgmmaConfig, out_itemsize: int) -> int:
    """Shared memory of one CTA: pipeline buffers, output tile, epilogue vectors and Mosaic's
    reserve; a slight over-estimate (235 008 bytes where Mosaic GPU's own check counted 234 536
    for ``WgmmaConfig(64, 256, 128, 4)`` with f32 output)."""
    tiles = 2 if cfg.warp_specialized else 1  # output tiles (one per compute warpgroup)
    pipeline = cfg.stages * (cfg.cta_rows + cfg.tile_n) * cfg.tile_k
    vectors = tiles * 4 * (2 * cfg.tile_m + 3 * cfg.tile_n)
    return pipeline + tiles * cfg.tile_m * cfg.tile_n * out_itemsize + vectors + 2048


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


def prepare_weight_wgmma(w_q: jax.Array, w_bits: int) -> jax.Array:
    """(N, K) int8, K contiguous, from a (K, N) int8 weight, a (K/2, N) packed 4-bit one (int8
    with ``w_bits <= 4``: there is no x here to tell the forms apart) or (K, N) ``jnp.int4``
    codes; once per layer."""
    check_bits(8, w_bits)
    if w_q.ndim == 2 and w_q.dtype == jnp.int4:
        if w_bits > 4:
            raise ValueError(f"a jnp.int4 weight holds 4-bit codes, but w_bits={w_bits}")
        return w_q.astype(jnp.int8).T
    if w_q.ndim != 2 or w_q.dtype != jnp.int8:
        raise ValueError(f"w_q must be a 2-D int8 (or jnp.int4) array, got {w_q.dtype}{list(w_q.shape)}")
    return dense_weight(w_q, w_bits).T  # XLA materialises the transpose: a row-major (N, K) array


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
            cfg: WgmmaConfig, k_steps: int, has_bias: bool, interpret: bool):
    """One (tile_m, tile_n) output tile: TMA-pipelined K loop of wgmma, then the epilogue.

    ``interpret`` changes two things, because jax 0.10.2's Mosaic GPU interpreter cannot apply
    ``transpose_ref`` to a wgmma operand nor run ``plgpu.load``: the weight comes as (K, N) and
    wgmma reads its tile directly, and the epilogue vectors are read with ``ref[...]``.
    """
    bias_gmem = refs[0] if has_bias else None
    out_gmem, shift_smem, rscale_smem, colsum_smem, wscale_smem, bias_smem, out_smem, vec_bar = (
        refs[1:] if has_bias else refs
    )
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    m_sl = pl.ds(lax.axis_index("m") * tm, tm)
    n_sl = pl.ds(lax.axis_index("n") * tn, tn)

    # Epilogue vectors first: their copies overlap the main loop. Row vectors are padded to the
    # tile grid by the wrapper, so these copies never leave their arrays.
    vec_copies = [(shift_gmem.at[m_sl], shift_smem), (rscale_gmem.at[m_sl], rscale_smem),
                  (colsum_gmem.at[n_sl], colsum_smem), (wscale_gmem.at[n_sl], wscale_smem)]
    if has_bias:
        vec_copies.append((bias_gmem.at[n_sl], bias_smem))
    for src, dst in vec_copies:
        plgpu.copy_gmem_to_smem(src, dst, vec_bar.at[0])

    in_flight = 1 if k_steps > 1 else 0  # wgmmas left running while the next tile loads

    a_tf = _smem_transforms(tk, 1)
    specs = [
        plgpu.BlockSpec((tm, tk), lambda k: (0, k), transforms=a_tf, delay_release=in_flight),
        plgpu.BlockSpec((tk, tn), lambda k: (k, 0), transforms=_smem_transforms(tn, 1),
                        delay_release=in_flight)
        if interpret else
        plgpu.BlockSpec((tn, tk), lambda k: (0, k), transforms=a_tf, delay_release=in_flight),
    ]
    w_tile = w_gmem.at[:, n_sl] if interpret else w_gmem.at[n_sl]

    def main_loop(acc_ref):
        def step(_, a_smem, b_smem):
            b = b_smem if interpret else b_smem.transpose((1, 0))
            plgpu.wgmma(acc_ref, a_smem, b)
            plgpu.wgmma_wait(in_flight)

        plgpu.emit_pipeline(
            step, grid=(k_steps,), in_specs=specs,
            max_concurrent_steps=min(cfg.stages, k_steps) if k_steps > 1 else 1,
        )(codes_gmem.at[m_sl], w_tile)
        return acc_ref[...]

    acc = pl.run_scoped(main_loop, plgpu.ACC((tm, tn), jnp.int32))

    plgpu.barrier_wait(vec_bar.at[0])

    out_smem[...] = _epilogue(acc, shift_smem, rscale_smem, colsum_smem, wscale_smem,
                              bias_smem if has_bias else None, out_smem.dtype, interpret)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[m_sl, n_sl])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _ws_kernel(codes_gmem, w_gmem, shift_gmem, rscale_gmem, colsum_gmem, wscale_gmem, *refs,
               cfg: WgmmaConfig, grid: tuple[int, int], k_steps: int, has_bias: bool,
               interpret: bool):
    """Persistent, warp-specialized schedule: each CTA walks output tiles (N fastest, so an
    activation row block is reused from L2 across the N tiles) with three warpgroups. The
    producer streams (2 tile_m, tile_k) code tiles and (tile_n, tile_k) weight tiles through a
    ``stages``-deep ring across tile boundaries; each compute warpgroup multiplies its half of
    the rows into its own accumulator, then runs the epilogue while the ring refills. Each
    warpgroup's epilogue vectors arrive by TMA during its main loop, and its output tile leaves
    by an asynchronous TMA store that the next tile's epilogue waits for."""
    bias_gmem = refs[0] if has_bias else None
    out_gmem = refs[1] if has_bias else refs[0]
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    in_flight = 1 if k_steps > 1 else 0
    a_tf = _smem_transforms(tk, 1)
    smem = plgpu.SMEM
    specs = [
        plgpu.BlockSpec((2 * tm, tk), lambda k: (0, k), transforms=a_tf, memory_space=smem,
                        delay_release=in_flight),
        plgpu.BlockSpec((tk, tn), lambda k: (k, 0), transforms=_smem_transforms(tn, 1),
                        memory_space=smem, delay_release=in_flight)
        if interpret else
        plgpu.BlockSpec((tn, tk), lambda k: (0, k), transforms=a_tf, memory_space=smem,
                        delay_release=in_flight),
    ]

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_steps,), in_specs=specs, memory_registers=40, wg_axis="wg",
            num_compute_wgs=2, max_concurrent_steps=min(cfg.stages, k_steps), compute_context=context,
        )

    out_dtype = out_gmem.dtype
    out_tf = _smem_transforms(tn * jnp.dtype(out_dtype).itemsize, jnp.dtype(out_dtype).itemsize)
    unused = lambda *_, **__: None  # allocations do not depend on the bodies
    scratch = dict(
        ring=pipeline(unused, unused).get_allocations(codes_gmem, w_gmem),
        out_smem=plgpu.SMEM((2, tm, tn), out_dtype, transforms=out_tf),
        shift_smem=plgpu.SMEM((2, tm), jnp.int32),
        rscale_smem=plgpu.SMEM((2, tm), jnp.float32),
        colsum_smem=plgpu.SMEM((2, tn), jnp.int32),
        wscale_smem=plgpu.SMEM((2, tn), jnp.float32),
        bias_smem=plgpu.SMEM((2, tn), jnp.float32) if has_bias else None,
        vec_bar=plgpu.Barrier(num_arrivals=5 if has_bias else 4, num_barriers=2),
    )

    def scoped(ring, out_smem, shift_smem, rscale_smem, colsum_smem, wscale_smem, bias_smem, vec_bar):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop(grid, collective_axes="ctas")
        def _tile(info):
            mi, ni = info.index
            cta_rows = pl.ds(mi * 2 * tm, 2 * tm)
            rows = pl.ds(mi * 2 * tm + wg * tm, tm)
            cols = pl.ds(ni * tn, tn)
            vecs = [(shift_gmem.at[rows], shift_smem.at[wg]), (rscale_gmem.at[rows], rscale_smem.at[wg]),
                    (colsum_gmem.at[cols], colsum_smem.at[wg]), (wscale_gmem.at[cols], wscale_smem.at[wg])]
            if has_bias:
                vecs.append((bias_gmem.at[cols], bias_smem.at[wg]))

            def context(run):
                for src, dst in vecs:  # land during the main loop
                    plgpu.copy_gmem_to_smem(src, dst, vec_bar.at[wg])

                def accumulate(acc_ref):
                    run(acc_ref)
                    return acc_ref[...]

                acc = pl.run_scoped(accumulate, plgpu.ACC((tm, tn), jnp.int32))
                plgpu.barrier_wait(vec_bar.at[wg])
                y = _epilogue(acc, shift_smem.at[wg], rscale_smem.at[wg], colsum_smem.at[wg],
                              wscale_smem.at[wg], bias_smem.at[wg] if has_bias else None, out_dtype,
                              interpret)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read it
                out_smem[wg] = y
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[rows, cols])

            def mma(_, a_smem, b_smem, acc_ref):
                b = b_smem if interpret else b_smem.transpose((1, 0))
                plgpu.wgmma(acc_ref, a_smem.at[pl.ds(wg * tm, tm)], b)
                plgpu.wgmma_wait(in_flight)
                return acc_ref

            w_tile = w_gmem.at[:, cols] if interpret else w_gmem.at[cols]
            pipeline(mma, context)(codes_gmem.at[cta_rows], w_tile, allocations=ring)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.run_scoped(scoped, collective_axes="wg", **scratch)


def _num_ctas(interpret: bool) -> int:
    """Persistent CTAs: one per SM of the GPU (two in the interpreter, so CTAs share tiles)."""
    if interpret:
        return 2
    return getattr(jax.devices()[0], "core_count", None) or 132


def _interpret_params():
    """Mosaic GPU interpreter (private in jax 0.10/0.11) with TMA's zero fill beyond the array."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams(out_of_bounds_reads="uninitialized", uninitialized_memory="zero")


def qmatmul_codes_wgmma(
    codes: jax.Array,
    w_t: jax.Array,
    w_scale: jax.Array,
    a_scale: jax.Array,
    a_zero: jax.Array,
    bias: jax.Array | None = None,
    *,
    a_bits: int = 8,
    out_dtype: DTypeLike = jnp.bfloat16,
    colsum: jax.Array | None = None,
    config: WgmmaConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """:func:`~pallas_kernels.qmatmul.qmatmul_codes` on Hopper ``wgmma``; same result (but
    ``out_dtype`` defaults to bf16 here, float32 there).

    ``codes`` (B, L, K) int8 from ``quantize_activations``; ``w_t`` (N, K) int8 from
    :func:`prepare_weight_wgmma`; ``w_scale`` (N,); ``a_scale``, ``a_zero`` (L,); ``bias`` (N,);
    ``colsum`` (N,) int32 = ``weight_colsum`` of the same weight (computed here when not given).
    Output (B, L, N) ``out_dtype``; ``out_dtype=jnp.int32`` returns the exact accumulator
    ``sum_k (q - z) w`` instead (no scales, no bias), for tests. ``interpret=True`` runs jax's
    Mosaic GPU interpreter on the CPU (slow; small shapes only) with the deviations listed in
    :func:`_kernel` and a whole-tile output cut after the kernel.
    """
    out = _qmatmul_codes_wgmma(codes, w_t, w_scale, a_scale, a_zero, bias, a_bits=a_bits,
                               out_dtype=out_dtype, colsum=colsum, config=config,
                               interpret=interpret)
    if interpret and not isinstance(out, jax.core.Tracer):
        # The interpreter runs jax ops from a callback thread; an eager caller that dispatches
        # more work before it finishes can deadlock the CPU runtime (seen in jax 0.10.2).
        out.block_until_ready()
    return out


@functools.partial(jax.jit, static_argnames=("a_bits", "out_dtype", "config", "interpret"))
def _qmatmul_codes_wgmma(codes, w_t, w_scale, a_scale, a_zero, bias, *, a_bits, out_dtype, colsum,
                         config, interpret):
    check_bits(a_bits, 8)
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
    m_tiles = pl.cdiv(m, cfg.cta_rows)
    tok = jnp.arange(m_tiles * cfg.cta_rows, dtype=jnp.int32) % seq  # token of each (padded) row
    shift = (2 ** (a_bits - 1) - a_zero.astype(jnp.int32))[tok]
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
    out_type = jax.ShapeDtypeStruct((m_tiles * cfg.cta_rows if interpret else m8, n), out_dtype)
    common = dict(interpret=_interpret_params() if interpret else None, kernel_name="ptq4vm_qmatmul_wgmma")
    if cfg.warp_specialized:
        tiles = (m_tiles, n // cfg.tile_n)
        kernel = functools.partial(_ws_kernel, cfg=cfg, grid=tiles, k_steps=k // cfg.tile_k,
                                   has_bias=bias is not None, interpret=interpret)
        out = plgpu.kernel(
            kernel, out_type=out_type, grid=(min(tiles[0] * tiles[1], _num_ctas(interpret)),),
            grid_names=("ctas",), num_threads=3, thread_name="wg",
            compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
            **common,
        )(*operands)
        return out[:m].reshape(batch, seq, n)

    tm, tn = cfg.tile_m, cfg.tile_n
    out_itemsize = jnp.dtype(out_dtype).itemsize
    grid, names = ((m_tiles, n // tn), ("m", "n"))
    if cfg.m_fastest:
        grid, names = grid[::-1], names[::-1]
    kernel = functools.partial(_kernel, cfg=cfg, k_steps=k // cfg.tile_k, has_bias=bias is not None,
                               interpret=interpret)
    out = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=[
            plgpu.SMEM((tm,), jnp.int32),
            plgpu.SMEM((tm,), jnp.float32),
            plgpu.SMEM((tn,), jnp.int32),
            plgpu.SMEM((tn,), jnp.float32),
            plgpu.SMEM((tn,), jnp.float32),
            plgpu.SMEM((tm, tn), out_dtype, transforms=_smem_transforms(tn * out_itemsize, out_itemsize)),
            plgpu.Barrier(num_arrivals=5 if bias is not None else 4, num_barriers=1),  # (1,) in 0.10 and 0.11
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
    w_q: jax.Array,
    w_scale: jax.Array,
    smooth: jax.Array,
    a_scale: jax.Array,
    a_zero: jax.Array,
    bias: jax.Array | None = None,
    *,
    a_bits: int = 8,
    w_bits: int = 8,
    out_dtype: DTypeLike | None = None,
    config: WgmmaConfig | None = None,
    interpret: bool = False,
    pallas_quantize: bool = False,
) -> jax.Array:
    """:func:`~pallas_kernels.qmatmul.qmatmul`'s contract and result on Hopper, any K and N.

    ``quantize_activations`` (an XLA op that fuses into x's producer; with ``pallas_quantize``
    the Triton kernel ``quantize_activations_pallas``, for an input that sits in HBM, not yet
    timed) + ``qmatmul_codes_wgmma``
    on the weight from ``w_q`` (K, N) int8 or packed 4-bit, dense, transposed and zero-padded to
    multiples of 64 in K and N. Zero weight rows add nothing to the sums (whatever the padded
    codes hold) nor to the column sums; padded output columns are cut. The weight preparation is
    part of the traced graph: a few MB per layer, against the activations' tens of MB.
    """
    w_q, w_bits = _check_args(x, w_q, smooth, a_scale, a_zero, w_scale, bias, a_bits, w_bits)
    k, n = x.shape[-1], w_scale.shape[0]
    kp, np_ = _padded(k), _padded(n)
    if pallas_quantize:
        codes = quantize_activations_pallas(x, smooth, a_scale, a_zero, a_bits=a_bits, interpret=interpret)
    else:
        codes = quantize_activations(x, smooth, a_scale, a_zero, a_bits=a_bits)
    w = dense_weight(w_q, w_bits)[:k]
    if kp != k:
        codes = jnp.pad(codes, ((0, 0), (0, 0), (0, kp - k)))
    w = jnp.pad(w, ((0, kp - k), (0, np_ - n)))
    if np_ != n:
        w_scale = jnp.pad(w_scale, (0, np_ - n))
        bias = None if bias is None else jnp.pad(bias, (0, np_ - n))
    y = qmatmul_codes_wgmma(codes, prepare_weight_wgmma(w, 8), w_scale, a_scale, a_zero, bias,
                            a_bits=a_bits, out_dtype=out_dtype or x.dtype, config=config,
                            interpret=interpret)
    return y[..., :n]


# ----------------------------------------------------------------------------- quantize fused


@dataclasses.dataclass(frozen=True)
class FusedWgmmaConfig:
    """Tiles of :func:`qmatmul_wgmma_fused`: one CTA per ``tile_m`` rows keeps their int8 codes
    for the whole K in shared memory (``tile_m * K`` bytes) and walks every ``tile_n``-wide
    output tile, streaming ``tile_n x 64`` weight tiles through a ``stages``-deep TMA pipeline
    that runs on across output tiles."""

    tile_m: int = 128
    tile_n: int = 128
    stages: int = 4

    def __post_init__(self):
        if self.tile_m not in (64, 128) or self.tile_n not in (64, 128):
            raise ValueError(f"FusedWgmmaConfig tiles must be 64 or 128, got {self.tile_m} x {self.tile_n}")
        if self.stages < 2:
            raise ValueError(f"FusedWgmmaConfig.stages must be >= 2, got {self.stages}")


#: Configurations of the 1-pass kernel's sweep at Vim-B in_proj (K = 768, N = 3072, bf16).
FUSED_SWEEP: tuple[FusedWgmmaConfig, ...] = (
    FusedWgmmaConfig(128, 128, 4),  # the default there: 96 KB of codes, 223 KB in all
    FusedWgmmaConfig(128, 128, 3),
    FusedWgmmaConfig(128, 128, 2),
    FusedWgmmaConfig(64, 128, 4),  # twice the CTAs, each weight tile read twice as often
    FusedWgmmaConfig(128, 64, 4),
)


def fused_smem_bytes(cfg: FusedWgmmaConfig, k: int, n: int, x_itemsize: int, out_itemsize: int,
                     has_bias: bool = False) -> int:
    """Shared memory of one CTA: resident codes, the x and weight pipelines, the output tile,
    the epilogue vectors and Mosaic's reserve (an estimate)."""
    tm, tn = cfg.tile_m, cfg.tile_n
    vectors = 4 * (k + 4 * tm + (3 if has_bias else 2) * n)
    return (tm * k + 2 * tm * _ALIGN * x_itemsize + cfg.stages * tn * _ALIGN + tm * tn * out_itemsize
            + vectors + 2048)


def default_fused_config(
    k: int, n: int, x_itemsize: int = 2, out_itemsize: int = 2, has_bias: bool = False
) -> FusedWgmmaConfig | None:
    """The largest row block whose codes fit in shared memory with the rest: 128 rows with 4,
    then 3 weight stages, else 64 rows; None when K, N are not multiples of 64 or nothing fits
    (K beyond about 2300). Vim-B in_proj (K = 768, N = 3072, bf16): 128 rows, 4 stages."""
    if k % _ALIGN or n % _ALIGN or k < _ALIGN:
        return None
    tn = _largest_tile(n, (128, 64))
    for tm, stages in ((128, 4), (128, 3), (64, 4)):
        cfg = FusedWgmmaConfig(tile_m=tm, tile_n=tn, stages=stages)
        if fused_smem_bytes(cfg, k, n, x_itemsize, out_itemsize, has_bias) <= _SMEM_BYTES:
            return cfg
    return None


def _fused_kernel(x_gmem, w_gmem, rsmooth_gmem, rrow_gmem, zero_gmem, shift_gmem, ascale_gmem,
                  colsum_gmem, wscale_gmem, *refs, cfg: FusedWgmmaConfig, k_steps: int, n_tiles: int,
                  a_bits: int, has_bias: bool, interpret: bool):
    """One CTA, ``tile_m`` rows: quantize them once into resident int8 codes (phase 1), then
    every N tile's wgmma K loop and epilogue (phase 2).

    Phase 1 quantizes (tile_m, 64) x tiles from a TMA pipeline in registers, with
    ``quantize_activations``' exact arithmetic, into ``a_smem[k]``. Phase 2 pipelines the weight
    over (N tile, K step) so the next tile's weights load during this tile's epilogue, resetting
    the accumulator after each epilogue. The interpreter cannot store to a wgmma accumulator, so
    there phase 2 runs one accumulator and one K pipeline per N tile (and reads the weight as
    (K, N) and the vectors with ``ref[...]``, as in :func:`_kernel`).
    """
    bias_gmem = refs[0] if has_bias else None
    refs = refs[1:] if has_bias else refs
    (out_gmem, a_smem, rsmooth_smem, rrow_smem, zero_smem, shift_smem, ascale_smem, colsum_smem,
     wscale_smem, bias_smem, out_smem, vec_bar) = refs
    tm, tn, tk = cfg.tile_m, cfg.tile_n, _ALIGN
    m_sl = pl.ds(lax.axis_index("m") * tm, tm)
    copies = [(rsmooth_gmem, rsmooth_smem), (rrow_gmem.at[m_sl], rrow_smem), (zero_gmem.at[m_sl], zero_smem),
              (shift_gmem.at[m_sl], shift_smem), (ascale_gmem.at[m_sl], ascale_smem),
              (colsum_gmem, colsum_smem), (wscale_gmem, wscale_smem)]
    if has_bias:
        copies.append((bias_gmem, bias_smem))
    for src, dst in copies:
        plgpu.copy_gmem_to_smem(src, dst, vec_bar.at[0])
    plgpu.barrier_wait(vec_bar.at[0])

    rows = lambda ref, width: _broadcast(ref, 0, (tm, width), interpret)
    cols = lambda ref, width: _broadcast(ref, 1, (tm, width), interpret)

    qmax, center = float(2**a_bits - 1), float(2 ** (a_bits - 1))

    def quantize(idx, x_smem):
        (k,) = idx
        x = _load(x_smem, plgpu.Layout.WGMMA, interpret).astype(jnp.float32)
        v = (x * cols(rsmooth_smem.at[k], tk)) * rows(rrow_smem, tk)
        q = jnp.clip(jnp.round(v) + rows(zero_smem, tk), 0.0, qmax) - center
        a_smem.at[k][...] = q.astype(jnp.int8)

    x_isz = jnp.dtype(x_gmem.dtype).itemsize
    x_spec = plgpu.BlockSpec((tm, tk), lambda k: (0, k), transforms=_smem_transforms(tk * x_isz, x_isz))
    plgpu.emit_pipeline(quantize, grid=(k_steps,), in_specs=[x_spec],
                        max_concurrent_steps=min(2, k_steps))(x_gmem.at[m_sl])
    plgpu.commit_smem()  # the codes, written by threads, are read by wgmma (the async proxy)

    def epilogue(acc, n):
        acc = acc + rows(shift_smem, tn) * cols(colsum_smem.at[n], tn)  # exact zero-point restore
        if out_smem.dtype == jnp.int32:
            y = acc
        else:
            y = acc.astype(jnp.float32) * rows(ascale_smem, tn) * cols(wscale_smem.at[n], tn)
            if has_bias:
                y = y + cols(bias_smem.at[n], tn)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read out_smem
        out_smem[...] = y.astype(out_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[m_sl, pl.ds(n * tn, tn)])

    if interpret:
        def tile(n, carry):
            def body(acc_ref):
                def mma(idx, b_smem):
                    (k,) = idx
                    plgpu.wgmma(acc_ref, a_smem.at[k], b_smem)
                    plgpu.wgmma_wait(0)

                spec = plgpu.BlockSpec((tk, tn), lambda k: (k, 0), transforms=_smem_transforms(tn, 1))
                plgpu.emit_pipeline(mma, grid=(k_steps,), in_specs=[spec])(w_gmem.at[:, pl.ds(n * tn, tn)])
                return acc_ref[...]

            epilogue(pl.run_scoped(body, plgpu.ACC((tm, tn), jnp.int32)), n)
            return carry

        lax.fori_loop(0, n_tiles, tile, 0)
    else:
        def body(acc_ref):
            def mma(idx, b_smem):
                n, k = idx
                plgpu.wgmma(acc_ref, a_smem.at[k], b_smem.transpose((1, 0)))
                plgpu.wgmma_wait(1)

                @pl.when(k == k_steps - 1)
                def _last_k():
                    epilogue(acc_ref[...], n)
                    acc_ref[...] = plgpu.layout_cast(jnp.zeros((tm, tn), jnp.int32), plgpu.Layout.WGMMA)

            spec = plgpu.BlockSpec((tn, tk), lambda n, k: (n, k), transforms=_smem_transforms(tk, 1),
                                   delay_release=1)
            plgpu.emit_pipeline(mma, grid=(n_tiles, k_steps), in_specs=[spec],
                                max_concurrent_steps=cfg.stages)(w_gmem)

        pl.run_scoped(body, plgpu.ACC((tm, tn), jnp.int32))
    plgpu.wait_smem_to_gmem(0)


def qmatmul_wgmma_fused(
    x: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    smooth: jax.Array,
    a_scale: jax.Array,
    a_zero: jax.Array,
    bias: jax.Array | None = None,
    *,
    a_bits: int = 8,
    w_bits: int = 8,
    out_dtype: DTypeLike | None = None,
    config: FusedWgmmaConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """:func:`~pallas_kernels.qmatmul.qmatmul`'s contract and result on Hopper in one kernel:
    the activation quantization runs inside it, once per element, into int8 codes resident in
    shared memory for the CTA's rows, so x is read once in its own dtype and no codes reach HBM.

    K and N must be multiples of 64 and the codes of a row block must fit in shared memory
    (:func:`default_fused_config`; Vim/VMamba in_proj and out_proj up to K = 1536).
    ``out_dtype=jnp.int32`` returns the exact accumulator ``sum_k (q - z) w`` (for tests).
    Exact against the integer reference in the interpreter and on an H200, where it was 1.7x
    slower than :func:`qmatmul_wgmma` at Vim-B in_proj and out_proj (BENCHMARKS.md).
    """
    out = _qmatmul_wgmma_fused(x, w_q, w_scale, smooth, a_scale, a_zero, bias, a_bits=a_bits,
                               w_bits=w_bits, out_dtype=out_dtype or x.dtype, config=config,
                               interpret=interpret)
    if interpret and not isinstance(out, jax.core.Tracer):
        out.block_until_ready()  # see qmatmul_codes_wgmma
    return out


@functools.partial(jax.jit, static_argnames=("a_bits", "w_bits", "out_dtype", "config", "interpret"))
def _qmatmul_wgmma_fused(x, w_q, w_scale, smooth, a_scale, a_zero, bias, *, a_bits, w_bits, out_dtype,
                         config, interpret):
    w_q, w_bits = _check_args(x, w_q, smooth, a_scale, a_zero, w_scale, bias, a_bits, w_bits)
    batch, seq, k = x.shape
    n, m = w_scale.shape[0], batch * seq
    x_isz, out_isz = jnp.dtype(x.dtype).itemsize, jnp.dtype(out_dtype).itemsize
    cfg = config or default_fused_config(k, n, x_isz, out_isz, bias is not None)
    if cfg is None or k % _ALIGN or n % cfg.tile_n or m * max(k, n) >= 2**31:
        raise ValueError(f"qmatmul_wgmma_fused takes K and N multiples of {_ALIGN} whose row-block codes fit "
                         f"in shared memory (got M={m}, K={k}, N={n}); use qmatmul_wgmma")
    smem = fused_smem_bytes(cfg, k, n, x_isz, out_isz, bias is not None)
    if smem > _SMEM_BYTES:
        raise ValueError(f"{cfg} at K={k}, N={n} needs {smem} bytes of shared memory (> {_SMEM_BYTES}); "
                         "use tile_m=64 or qmatmul_wgmma")
    f32, tm, tn = jnp.float32, cfg.tile_m, cfg.tile_n
    w = dense_weight(w_q, w_bits)
    colsum = jnp.sum(w.astype(jnp.int32), axis=0)
    m_tiles = pl.cdiv(m, tm)
    tok = jnp.arange(m_tiles * tm, dtype=jnp.int32) % seq  # token of each (padded) row
    a_scale32 = a_scale.astype(f32)
    vectors = [
        (1.0 / smooth.astype(f32)).reshape(k // _ALIGN, _ALIGN),  # TMA copies <= 256 per dimension
        (1.0 / a_scale32)[tok],
        a_zero.astype(f32)[tok],
        (2 ** (a_bits - 1) - a_zero.astype(jnp.int32))[tok],
        a_scale32[tok],
        colsum.reshape(n // tn, tn),
        w_scale.astype(f32).reshape(n // tn, tn),
    ]
    if bias is not None:
        vectors.append(bias.astype(f32).reshape(n // tn, tn))
    m8 = -(-m // 8) * 8  # TMA: a multiple of 8 rows (see qmatmul_codes_wgmma)
    rows = x.reshape(m, k)
    if m8 != m:
        rows = jnp.pad(rows, ((0, m8 - m), (0, 0)))
    kernel = functools.partial(_fused_kernel, cfg=cfg, k_steps=k // _ALIGN, n_tiles=n // tn, a_bits=a_bits,
                               has_bias=bias is not None, interpret=interpret)
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((m_tiles * tm if interpret else m8, n), out_dtype),
        scratch_types=[
            plgpu.SMEM((k // _ALIGN, tm, _ALIGN), jnp.int8, transforms=_smem_transforms(_ALIGN, 1)),
            plgpu.SMEM((k // _ALIGN, _ALIGN), f32),
            plgpu.SMEM((tm,), f32),
            plgpu.SMEM((tm,), f32),
            plgpu.SMEM((tm,), jnp.int32),
            plgpu.SMEM((tm,), f32),
            plgpu.SMEM((n // tn, tn), jnp.int32),
            plgpu.SMEM((n // tn, tn), f32),
            plgpu.SMEM((n // tn, tn) if bias is not None else (1,), f32),
            plgpu.SMEM((tm, tn), out_dtype, transforms=_smem_transforms(tn * out_isz, out_isz)),
            plgpu.Barrier(num_arrivals=len(vectors), num_barriers=1),
        ],
        grid=(m_tiles,),
        grid_names=("m",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=_interpret_params() if interpret else None,
        kernel_name="ptq4vm_qmatmul_wgmma_fused",
    )(rows, w if interpret else w.T, *vectors)
    return out[:m].reshape(batch, seq, n)
