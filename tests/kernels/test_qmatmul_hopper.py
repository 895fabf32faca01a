"""qmatmul_codes_wgmma (Mosaic GPU, Hopper wgmma) vs the XLA integer reference of qmatmul_codes.

On a GPU the correctness cases run the compiled kernel (needs sm_90: H100/H200). Elsewhere they
run jax's Mosaic GPU interpreter, which differs from the GPU build in three documented places
(weight tile read as (K, N), epilogue vectors read with ``ref[...]``, whole-tile output cut after
the kernel): the K-major weight view and the partial TMA store of the last M tile are therefore
verified only on a GPU. The CUDA lowering tests check the int8 wgmma instruction on the CPU, and
in the kernel's own Mosaic module the persistent schedule's tile loop and store waits (the
interpreter performs TMA copies synchronously, so it cannot see a missing wait).
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.qlinear import QuantizedLinear, dequantize, pack_int4, weight_colsum
from pallas_kernels.qmatmul import _codes_matmul_int32, qmatmul_ref
from pallas_kernels.qmatmul_hopper import (
    WGMMA_SWEEP,
    WgmmaConfig,
    default_wgmma_config,
    persistent_ctas,
    prepare_weight_wgmma,
    qmatmul_codes_wgmma,
    qmatmul_wgmma,
    smem_bytes,
    supports_qmatmul_wgmma,
    supports_wgmma,
)

pytestmark = pytest.mark.slow  # Mosaic GPU interpreter and CUDA lowering: compile-heavy
SEQ = 197
INTERPRET = jax.default_backend() != "gpu"


def make_layer(seed, batch, k, n, a_bits=8, seq=SEQ):
    """Random codes over the full int8 range of ``a_bits``, every zero point, int8 weights. numpy
    draws them: eager jax.random calls would compile one program per shape."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)
    half = 2 ** (a_bits - 1)
    return dict(codes=jnp.asarray(rng.integers(-half, half, (batch, seq, k)), jnp.int8),
                w=jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8),
                a_scale=jnp.asarray(np.exp(0.3 * normal(seq)) * np.float32(12.0 / 2**a_bits)),
                a_zero=jnp.asarray(rng.integers(0, 2**a_bits, seq), jnp.int32),
                w_scale=jnp.asarray(0.02 * np.exp(normal(n))), bias=jnp.asarray(normal(n)))


@functools.partial(jax.jit, static_argnames=("a_bits", "out_dtype"))
def reference(lay, a_bits, bias, out_dtype):
    """qmatmul_codes' XLA path: int32 accumulator and its dequantization (jitted, as in qmatmul_ref)."""
    acc = _codes_matmul_int32(lay["codes"], lay["w"], lay["a_zero"], a_bits, 8)
    if out_dtype == jnp.int32:
        return acc
    return dequantize(acc, qlayer(lay, a_bits, bias)).astype(out_dtype)


def qlayer(lay, a_bits=8, bias=None, **fields):
    """The random layer as a QuantizedLinear (``fields``: replaced arrays)."""
    arrays = dict(w_int=lay["w"], w_scale=lay["w_scale"], smooth=jnp.ones(lay["w"].shape[0]),
                  a_scale=lay["a_scale"], a_zero=lay["a_zero"], bias=bias)
    return QuantizedLinear(**{**arrays, **fields}, a_bits=a_bits)


def run(lay, a_bits, bias, out_dtype, config):
    return qmatmul_codes_wgmma(lay["codes"], qlayer(lay, a_bits, bias), out_dtype=out_dtype,
                               config=config, interpret=INTERPRET)


def abstract_args(batch, k, n):
    """(codes, w_t, layer) as shapes, for lowering ``qmatmul_codes_wgmma(codes, layer, w_t=w_t)``."""
    s = jax.ShapeDtypeStruct
    layer = QuantizedLinear(s((k, n), jnp.int8), s((n,), jnp.float32), s((k,), jnp.float32),
                            s((SEQ,), jnp.float32), s((SEQ,), jnp.int32), s((n,), jnp.float32))
    return s((batch, SEQ, k), jnp.int8), s((n, k), jnp.int8), layer


CASES = [
    # batch, k, n, a_bits, bias, out_dtype, config
    (1, 128, 128, 8, True, jnp.float32, WgmmaConfig(64, 64, 64, 2)),  # 4 x 2 tiles, last M tile 5 rows
    (1, 128, 128, 8, False, jnp.int32, WgmmaConfig(64, 64, 64, 2, m_fastest=True)),
    (1, 192, 64, 4, False, jnp.bfloat16, None),  # K = 192: three 64-wide K steps; A4 codes
    (2, 384, 256, 8, True, jnp.float32, None),  # Vim-T-like in_proj K, M = 394: ragged 128-row tiles
    # persistent: the interpreter's one "SM" holds two of these CTAs, which loop over 8 tiles (4
    # each), so both output and vector slots are reused and each barrier waited on in two phases
    (1, 128, 128, 8, True, jnp.float32, WgmmaConfig(64, 64, 64, 2, persistent=True)),
    (1, 128, 128, 8, False, jnp.int32, WgmmaConfig(64, 64, 64, 2, m_fastest=True, persistent=True)),
    (2, 192, 128, 4, True, jnp.bfloat16, WgmmaConfig(128, 64, 64, 3, persistent=True)),  # 4 x 2 tiles
]


@pytest.mark.parametrize("batch,k,n,a_bits,use_bias,out_dtype,config", CASES)
def test_kernel_matches_reference(batch, k, n, a_bits, use_bias, out_dtype, config):
    lay = make_layer(batch + k + n + a_bits, batch, k, n, a_bits)
    bias = lay["bias"] if use_bias else None
    y = run(lay, a_bits, bias, out_dtype, config)
    ref = reference(lay, a_bits, bias, out_dtype)
    assert y.shape == (batch, SEQ, n) and y.dtype == out_dtype
    r = np.asarray(ref, np.float32)
    assert np.abs(r).max() > 0
    if out_dtype == jnp.int32 or INTERPRET:
        # The interpreter's epilogue is the same f32 operations in the same order, compiled by
        # XLA on the CPU like the jitted reference (an eager op-by-op evaluation of the
        # reference is not bit-identical to either, so the reference is jitted).
        np.testing.assert_array_equal(np.asarray(y, np.float32), r)
    elif out_dtype == jnp.float32:  # the GPU build may contract (acc*s)*w + b into an FMA
        np.testing.assert_allclose(np.asarray(y), r, rtol=2e-6, atol=2e-6 * np.abs(r).max())
    else:  # one bf16 ulp (< 2^-7) where the f32 values round differently
        np.testing.assert_allclose(np.asarray(y, np.float32), r, rtol=2**-7, atol=1e-5 * np.abs(r).max())


@pytest.mark.parametrize("k,n,a_bits,w_bits",
                         [(24, 128, 8, 8), (128, 56, 8, 8), (46, 72, 4, 4)],
                         ids=["dt_proj-like K", "x_proj-like N", "packed w4, both padded"])
def test_qmatmul_wgmma_pads_any_k_and_n_to_qmatmuls_result(k, n, a_bits, w_bits):
    """qmatmul's contract (float activations in, stored weight) on wgmma with K, N zero-padded."""
    rng = np.random.default_rng(k + n)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)
    x = jnp.asarray(3.0 * normal(2, SEQ, k))
    qmax = 2 ** (w_bits - 1) - 1
    codes = jnp.asarray(rng.integers(-qmax, qmax + 1, (k, n)), jnp.int8)
    w_q = pack_int4(codes) if w_bits == 4 else codes
    layer = QuantizedLinear(w_q, jnp.asarray(0.02 * np.exp(normal(n))), jnp.asarray(np.exp(0.3 * normal(k))),
                            jnp.asarray(np.exp(0.3 * normal(SEQ)) * np.float32(8.0 / 2**a_bits)),
                            jnp.asarray(rng.integers(0, 2**a_bits, SEQ), jnp.int32),
                            jnp.asarray(normal(n)), w_bits=w_bits, a_bits=a_bits)
    y = qmatmul_wgmma(x, layer, config=WgmmaConfig(64, 64, 64, 2), interpret=INTERPRET)
    ref = np.asarray(qmatmul_ref(x, layer))
    assert y.shape == (2, SEQ, n) and y.dtype == x.dtype and np.abs(ref).max() > 0
    if INTERPRET:
        np.testing.assert_array_equal(np.asarray(y), ref)
    else:  # the GPU build may contract the epilogue into an FMA
        np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())
    if w_bits == 4:  # the same weight unpacked, as jnp.int4 codes: the same result
        int4 = dataclasses.replace(layer, w_int=codes.astype(jnp.int4))
        y4 = qmatmul_wgmma(x, int4, config=WgmmaConfig(64, 64, 64, 2), interpret=INTERPRET)
        np.testing.assert_array_equal(np.asarray(y4), np.asarray(y))
    wrong_k = r"w_int must be \(K, N\) with K=" if w_bits == 8 else r"\(K/2, N\) \(K even\)"
    with pytest.raises(ValueError, match=wrong_k):
        qmatmul_wgmma(x[..., :-1], layer, interpret=INTERPRET)


def test_accumulator_is_exact_and_colsum_is_reused():
    lay = make_layer(3, 1, 128, 64)
    colsum = weight_colsum(lay["w"], 8)
    acc = qmatmul_codes_wgmma(lay["codes"], qlayer(lay), w_t=prepare_weight_wgmma(qlayer(lay)),
                              out_dtype=jnp.int32, colsum=colsum, config=WgmmaConfig(64, 64, 64, 2),
                              interpret=INTERPRET)
    q_minus_z = (np.asarray(lay["codes"], np.int64) + 128 - np.asarray(lay["a_zero"])[:, None])
    naive = np.einsum("blk,kn->bln", q_minus_z, np.asarray(lay["w"], np.int64))
    np.testing.assert_array_equal(np.asarray(acc), naive)


@pytest.mark.parametrize("out_dtype", [jnp.int32, jnp.float32])
def test_persistent_ctas_each_run_both_slots(out_dtype):
    """More output tiles than resident CTAs, so every CTA writes both output slots and reuses
    them: on a GPU, where the store hazards are real, 592 tiles over at most 264 CTAs; in the
    interpreter 7 tiles over 2 CTAs (4 and 3)."""
    from pallas_kernels import qmatmul_hopper

    batch, k, n, cfg = ((2, 128, 64, WgmmaConfig(64, 64, 64, 2, persistent=True)) if INTERPRET
                        else (24, 128, 2048, WgmmaConfig(128, 128, 64, 2, persistent=True)))
    tiles = -(-batch * SEQ // cfg.tile_m) * (n // cfg.tile_n)
    sms = qmatmul_hopper._INTERPRET_SMS if INTERPRET else qmatmul_hopper._sm_count()
    assert tiles > 2 * persistent_ctas(cfg, jnp.dtype(out_dtype).itemsize, tiles, sms)
    lay = make_layer(11, batch, k, n)
    y = run(lay, 8, lay["bias"], out_dtype, cfg)
    ref = reference(lay, 8, lay["bias"], out_dtype)
    if out_dtype == jnp.int32 or INTERPRET:
        np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
    else:  # the GPU build may contract the epilogue into an FMA
        r = np.asarray(ref)
        np.testing.assert_allclose(np.asarray(y), r, rtol=2e-6, atol=2e-6 * np.abs(r).max())


def test_persistent_launch_fills_the_card_once():
    """One CTA per SM, two where two fit an SM's 228 KB of shared memory, never more than tiles."""
    one, two = WgmmaConfig(128, 128, 64, 4, persistent=True), WgmmaConfig(128, 128, 64, 2, persistent=True)
    assert 2 * smem_bytes(one, 2) > 233472 >= 2 * smem_bytes(two, 2)
    assert persistent_ctas(one, 2, tiles=394 * 24, sms=132) == 132
    assert persistent_ctas(two, 2, tiles=394 * 24, sms=132) == 264
    assert persistent_ctas(two, 4, tiles=394 * 24, sms=132) == 132  # int32 output: one per SM
    assert persistent_ctas(two, 2, tiles=5, sms=132) == 5
    # The output tile and the epilogue vectors are double-buffered; the pipeline is not.
    flat = WgmmaConfig(128, 128, 64, 2)
    tile_and_vectors = 128 * 128 * 2 + 4 * (2 * 128 + 3 * 128)
    assert smem_bytes(two, 2) - smem_bytes(flat, 2) == tile_and_vectors


def test_prepare_weight_transposes_and_unpacks_4bit():
    w = jnp.asarray(np.random.default_rng(1).integers(-8, 8, (128, 64)), jnp.int8)
    lay = dict(w=w, w_scale=jnp.ones(64), a_scale=jnp.ones(SEQ), a_zero=jnp.zeros(SEQ, jnp.int32))
    for stored, bits in ((w, 8), (pack_int4(w), 4), (w.astype(jnp.int4), 4), (w, 4)):
        w_t = prepare_weight_wgmma(dataclasses.replace(qlayer(lay, w_int=stored), w_bits=bits))
        assert w_t.shape == (64, 128) and w_t.dtype == jnp.int8
        np.testing.assert_array_equal(w_t, np.asarray(w).T)
    with pytest.raises(ValueError, match=r"2-D int8 \(or jnp.int4\)"):
        prepare_weight_wgmma(qlayer(lay, w_int=w.astype(jnp.int32)))
    with pytest.raises(ValueError, match="jnp.int4 weight holds 4-bit codes, but w_bits=8"):
        prepare_weight_wgmma(qlayer(lay, w_int=w.astype(jnp.int4)))


def test_supports_wgmma_covers_vim_in_and_out_proj_only():
    for k, n in [(192, 768), (384, 1536), (768, 3072), (1536, 768), (3072, 384), (768, 192)]:
        assert supports_wgmma(64 * SEQ, k, n), (k, n)
    for k, n in [(768, 56), (24, 768), (3, 96), (100, 128), (128, 32)]:  # x_proj, dt_proj, ragged
        assert not supports_wgmma(64 * SEQ, k, n), (k, n)
    assert not supports_wgmma(0, 128, 128)
    assert not supports_wgmma(2**22, 768, 1536)  # int32 offsets
    # qmatmul_wgmma pads K and N to 64: every Vim linear, within the int32 offsets
    for k, n in [(768, 56), (24, 768), (3, 96), (100, 128)]:
        assert supports_qmatmul_wgmma(64 * SEQ, k, n), (k, n)
    assert not supports_qmatmul_wgmma(2**22, 700, 1536)


def test_default_config_fits_every_target_shape():
    for k, n in [(192, 768), (384, 1536), (768, 3072), (1536, 768), (3072, 384), (768, 192)]:
        cfg = default_wgmma_config(256 * SEQ, k, n)
        assert k % cfg.tile_k == 0 and n % cfg.tile_n == 0
        assert cfg.tile_m * cfg.tile_n <= 128 * 128
    assert default_wgmma_config(SEQ, 192, 192) == WgmmaConfig(128, 64, 64, 4)
    # The sweep's fastest at Vim-B in_proj (BENCHMARKS.md), also WgmmaConfig's defaults.
    assert default_wgmma_config(256 * SEQ, 768, 3072) == WgmmaConfig(128, 128, 64, 4) == WgmmaConfig()


def test_bad_arguments_are_explained():
    lay = make_layer(5, 1, 128, 64)
    layer = qlayer(lay)
    w_t = prepare_weight_wgmma(layer)
    with pytest.raises(ValueError, match="use the Triton"):
        qmatmul_codes_wgmma(lay["codes"][..., :24], layer, w_t=w_t[:, :24])
    with pytest.raises(ValueError, match=r"w_t must be \(N, K\)"):
        qmatmul_codes_wgmma(lay["codes"], layer, w_t=lay["w"])  # (K, N) instead of (N, K)
    with pytest.raises(ValueError, match="codes must be"):
        qmatmul_codes_wgmma(lay["codes"].astype(jnp.int32), layer, w_t=w_t)
    with pytest.raises(ValueError, match="a_zero must be an integer"):
        qmatmul_codes_wgmma(lay["codes"], qlayer(lay, a_zero=lay["a_scale"]), w_t=w_t)
    with pytest.raises(ValueError, match=r"a_scale must have shape \(197,\)"):
        qmatmul_codes_wgmma(lay["codes"], qlayer(lay, a_scale=lay["a_scale"][:-1]), w_t=w_t)
    with pytest.raises(ValueError, match="multiples of the config's tile_k=128"):
        qmatmul_codes_wgmma(lay["codes"][..., :64], layer, w_t=w_t[:, :64], config=WgmmaConfig(tile_k=128))
    with pytest.raises(ValueError, match="multiple of 64"):
        WgmmaConfig(tile_k=32)
    with pytest.raises(ValueError, match="accumulator registers"):
        WgmmaConfig(tile_m=256, tile_n=128)
    with pytest.raises(ValueError, match="wgmma N limit"):
        WgmmaConfig(tile_m=64, tile_n=320)


VIM_SHAPES = [  # (batch, K, N): Vim-S in_proj, Vim-B in_proj, Vim-B out_proj, odd batch
    (64, 384, 1536),
    (256, 768, 3072),
    (256, 1536, 768),
    (3, 768, 3072),  # M = 591 is no multiple of 8, which TMA needs: rows are padded
    (256, 1536, 64),  # Vim-B x_proj, N = 56 padded to 64 by integer inference
    (256, 64, 1536),  # Vim-B dt_proj, K = 48 padded to 64: one K step, nothing left in flight
]


@pytest.mark.parametrize("batch,k,n", VIM_SHAPES)
def test_lowers_for_cuda_to_int8_wgmma(batch, k, n):
    fn = jax.jit(lambda codes, w_t, layer: qmatmul_codes_wgmma(codes, layer, w_t=w_t))
    text = fn.trace(*abstract_args(batch, k, n)).lower(lowering_platforms=("cuda",)).as_text()
    assert "custom_call @mosaic_gpu" in text  # Mosaic GPU, not the Triton custom call
    assert "ptq4vm_qmatmul_wgmma" in text
    cfg = default_wgmma_config(batch * SEQ, k, n)
    # s8 x s8 -> s32 warpgroup MMA, 64 x tile_n x 32 per instruction, fed by TMA tensor copies
    assert f"wgmma.mma_async.sync.aligned.m64n{cfg.tile_n}k32.s32.s8.s8" in text
    assert "cp.async.bulk.tensor" in text
    assert not re.search(r"__gpu\$xla\.gpu\.triton", text)


def test_sweep_configs_lower_within_shared_memory():
    args = abstract_args(256, 768, 3072)
    for cfg in WGMMA_SWEEP:  # Mosaic checks the SMEM budget while lowering; int32 is the widest output
        for out_dtype in (jnp.bfloat16, jnp.int32):
            fn = jax.jit(lambda c, w, lay, cfg=cfg, o=out_dtype: qmatmul_codes_wgmma(
                c, lay, w_t=w, config=cfg, out_dtype=o))
            text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            assert "wgmma.mma_async" in text, (cfg, out_dtype)
            assert smem_bytes(cfg, jnp.dtype(out_dtype).itemsize) <= 232448


def mosaic_module(lowered: str) -> str:
    """The Mosaic GPU kernel's own module, printed, from a lowering's text: the custom call holds
    it as MLIR bytecode in an escaped string attribute (``\\XX`` hex bytes)."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    raw = re.search(r'custom_call @mosaic_gpu\w*\(.*?module = "(.*?)", ', lowered, re.S).group(1)
    data = re.sub(rb"\\([0-9A-Fa-f]{2})|\\(.)", lambda m: bytes.fromhex(m[1].decode()) if m[1] else m[2],
                  raw.encode("latin1"))
    ctx = mlir.make_ir_context()
    ctx.allow_unregistered_dialects = True  # the serialized ops' "stable_mosaic_gpu." names
    with ctx:
        return ir.Module.parse(data).operation.get_asm(enable_debug_info=False)


@pytest.mark.parametrize("persistent", [False, True], ids=["tile per CTA", "persistent"])
def test_persistent_schedule_loops_over_tiles_and_waits_for_each_store(persistent):
    """What the interpreter cannot check (its TMA copies are synchronous): the persistent kernel
    loops over tiles around its K loop, and before it rewrites an output slot it waits until at
    most one store (the other slot's) is still reading shared memory; the last wait drains all."""
    args = abstract_args(256, 768, 3072)
    cfg = WgmmaConfig(persistent=persistent)
    fn = jax.jit(lambda c, w, lay: qmatmul_codes_wgmma(c, lay, w_t=w, config=cfg))
    module = mosaic_module(fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text(debug_info=False))
    waits = re.findall(r'"[\w.]*cp\.async\.bulk\.wait_group"\(\) \{group = (\d+) : i32, read\}', module)
    loops = re.findall(r'"[\w.]*scf\.for"', module)
    assert waits == (["1", "0"] if persistent else ["0"]), waits
    assert len(loops) == (2 if persistent else 1), loops
    # barriers initialised once, at the kernel's start: one per pipeline stage, one per vector slot
    assert len(re.findall(r'"[\w.]*nvvm\.mbarrier\.init"', module)) == cfg.stages + (2 if persistent else 1)


@pytest.mark.parametrize("warpgroup", [False, True], ids=["lane", "warpgroup"])
def test_both_mosaic_lowerings_emit_int8_wgmma(warpgroup):
    """jax 0.11 lowers through the warpgroup path by default; the kernel pins its choice."""
    args = abstract_args(2, 384, 1536)
    cfg = WgmmaConfig(warpgroup=warpgroup)
    fn = jax.jit(lambda c, w, lay: qmatmul_codes_wgmma(c, lay, w_t=w, config=cfg, out_dtype=jnp.float32))
    assert "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8" in fn.trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()


def test_shared_memory_overflow_is_explained():
    lay = make_layer(9, 1, 256, 256)
    with pytest.raises(ValueError, match=r"needs \d+ bytes of shared memory \(> 232448\); use fewer stages"):
        qmatmul_codes_wgmma(lay["codes"], qlayer(lay), out_dtype=jnp.float32,
                            config=WgmmaConfig(64, 256, 128, 4), interpret=INTERPRET)
