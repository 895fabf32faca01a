"""qmatmul: Pallas kernel (compiled on GPU, interpret mode elsewhere) vs the integer-exact
references, and CUDA lowering; the bf16-dot integer linear (qmatmul_bf16) vs the same references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.qlinear import (
    QuantizedLinear,
    pack_int4,
    pack_weight,
    unpack_int4,
    unpack_weight,
    weight_colsum,
)
from pallas_kernels.qmatmul import (
    GemmConfig,
    qmatmul,
    qmatmul_codes,
    qmatmul_codes_ref,
    qmatmul_int32,
    qmatmul_int32_ref,
    qmatmul_ref,
    quantize_activations,
)
from pallas_kernels.qmatmul_bf16 import (
    _codes_matmul_bf16,
    bf16_dot_plan,
    qmatmul_bf16_dot,
    qmatmul_codes_bf16_dot,
)

pytestmark = pytest.mark.slow  # Pallas kernels in the interpreter: compile-heavy
SEQ = 197  # Vim token count at 224 px: not a power of two
# On a GPU the same cases run the compiled kernels; elsewhere Pallas interpret mode.
INTERPRET = jax.default_backend() != "gpu"


def make_inputs(seed, batch, k, n, a_bits, w_bits, dtype=jnp.float32, seq=SEQ):
    """Random layer: activations around the quantization grid, some clipped, every zero point used.
    numpy draws them: eager jax.random calls would compile one program per shape."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)
    wmax = 2 ** (w_bits - 1) - 1
    w = jnp.asarray(rng.integers(-wmax, wmax + 1, (k, n)), jnp.int8)
    return dict(x=jnp.asarray(normal(batch, seq, k) * 3.0, dtype), w=w,
                w_q=pack_int4(w) if w_bits <= 4 else w, w_scale=jnp.asarray(0.02 * np.exp(normal(n))),
                smooth=jnp.asarray(np.exp(0.4 * normal(k))),
                a_scale=jnp.asarray(np.exp(0.3 * normal(seq)) * np.float32(12.0 / 2**a_bits)),
                a_zero=jnp.asarray(rng.integers(0, 2**a_bits, seq), jnp.int32), bias=jnp.asarray(normal(n)))


def layer_of(inp, a_bits=8, w_bits=8, *, w=None, bias=True, **fields):
    """The inputs' quantized linear (``w``: another form of the weight; ``fields``: replaced arrays)."""
    arrays = dict(w_int=inp["w_q"] if w is None else w, w_scale=inp["w_scale"], smooth=inp["smooth"],
                  a_scale=inp["a_scale"], a_zero=inp["a_zero"], bias=inp["bias"] if bias else None)
    return QuantizedLinear(**{**arrays, **fields}, w_bits=w_bits, a_bits=a_bits)


def naive_int32(inp, a_bits):
    """Independent numpy int64 sum_k (q - z) w: f32 reciprocals, np.round (half to even)."""
    x = np.asarray(inp["x"], np.float32)
    one = np.float32(1.0)
    inv_smooth = one / np.asarray(inp["smooth"], np.float32)
    inv_scale = one / np.asarray(inp["a_scale"], np.float32)
    v = (x * inv_smooth) * inv_scale[:, None]
    z = np.asarray(inp["a_zero"], np.int64)[:, None]
    q = np.clip(np.round(v) + z, 0, 2**a_bits - 1).astype(np.int64)
    return np.einsum("blk,kn->bln", q - z, np.asarray(inp["w"], np.int64))


def test_pack_int4_round_trip_halves_memory():
    w = jnp.asarray(np.random.default_rng(0).integers(-8, 8, (24, 40)), jnp.int8)
    packed = pack_int4(w)
    assert packed.shape == (12, 40) and packed.dtype == jnp.int8
    # The stored layout (checkpoints depend on it), built independently: row i of the first half
    # of K in the low nibble, row i + K/2 in the high nibble, two's complement.
    nibbles = np.asarray(w).astype(np.uint8) & 0x0F
    np.testing.assert_array_equal(np.asarray(packed).view(np.uint8), nibbles[:12] | (nibbles[12:] << 4))
    assert packed.nbytes * 2 == w.nbytes
    np.testing.assert_array_equal(unpack_int4(packed), w)
    np.testing.assert_array_equal(weight_colsum(packed, 4), np.asarray(w, np.int64).sum(0))


def test_pack_int4_rejects_bad_weights():
    with pytest.raises(ValueError, match="even K"):
        pack_int4(jnp.ones((5, 4), jnp.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(jnp.full((4, 4), 9, jnp.int8))


@pytest.mark.parametrize("a_bits,w_bits", [(8, 8), (4, 4), (6, 4)])
def test_reference_accumulator_equals_naive_numpy(a_bits, w_bits):
    inp = make_inputs(10 + a_bits + w_bits, 2, 96, 40, a_bits, w_bits)
    acc = qmatmul_int32_ref(inp["x"], layer_of(inp, a_bits, w_bits))
    assert acc.dtype == jnp.int32
    np.testing.assert_array_equal(acc, naive_int32(inp, a_bits))


def test_reference_accumulator_is_exact_for_tiny_k():
    inp = make_inputs(21, 2, 3, 96, 8, 8)  # vim_micro's dt_proj: K = dt_rank = 3
    acc = qmatmul_int32_ref(inp["x"], layer_of(inp))
    np.testing.assert_array_equal(acc, naive_int32(inp, 8))


def _reciprocal_ties(a: np.float32, count: int) -> np.ndarray:
    """Inputs x where x * (1/a) is exactly k + 0.5 but the IEEE quotient x / a is not a tie."""
    r = np.float32(1) / a
    out = []
    for k in range(-120, 120):
        target = np.float32(k + 0.5)
        x0 = np.float32(target / r)
        steps = np.arange(-64, 65, dtype=np.int32)
        cands = (np.asarray(x0).view(np.int32) + steps).view(np.float32)  # x0 +- 64 ulps
        hit = (cands * r == target) & (cands / a != target)
        out.extend(cands[hit][:2])
        if len(out) >= count:
            break
    return np.asarray(out[:count], np.float32)


def test_fake_quant_codes_use_reciprocal_products_on_every_backend():
    # The kernels quantize x * (1/smooth) * (1/a_scale). The fake-quant path must compute the
    # same products on CPU and GPU alike (XLA must not turn them back into IEEE quotients), or
    # fake and integer mode disagree on codes at rounding ties. These inputs are ties under the
    # reciprocal definition and not under the quotient one.
    from ptq4vm_jax.quant.quantizers import fake_quant_act

    a = np.float32(0.0371)
    ties = _reciprocal_ties(a, 64)
    assert ties.size == 64
    x = jnp.asarray(np.tile(ties, (SEQ, 1))[None])  # (1, L, 64)
    smooth, a_scale, a_zero = jnp.ones(64), jnp.full(SEQ, a), jnp.full(SEQ, 128, jnp.int32)
    fake = np.asarray(fake_quant_act(x, smooth, a_scale, a_zero, 8))
    host = np.clip(np.round(np.asarray(x) * (np.float32(1) / a)) + 128, 0, 255)
    ieee = np.clip(np.round(np.asarray(x) / a) + 128, 0, 255)
    assert (host != ieee).mean() > 0.2  # the definitions really differ on these inputs
    # fake-quant's value s * (q - z) is one f32 product of exact factors: equal iff the codes are
    np.testing.assert_array_equal(fake, a * (host - 128).astype(np.float32))
    w = jnp.asarray(np.random.default_rng(8).integers(-127, 128, (64, 32)), jnp.int8)
    layer = QuantizedLinear(w, jnp.ones(32), smooth, a_scale, a_zero)
    kernel_codes = np.asarray(quantize_activations(x, layer), np.int64) + 128
    np.testing.assert_array_equal(kernel_codes, host)
    # The fused kernel's prologue too (a kernel dividing by smooth and a_scale passes every other case).
    acc = qmatmul_int32(x, layer, interpret=INTERPRET)
    naive = naive_int32(dict(x=x, w=w, smooth=smooth, a_scale=a_scale, a_zero=a_zero), 8)
    np.testing.assert_array_equal(acc, naive)


def test_reference_and_kernel_round_ties_to_even():
    # Random inputs almost never hit a tie, so the kernel's prologue rounding is checked here:
    # half-up rounding (a plausible jnp.floor(v + 0.5)) passes every random-input case.
    inp = make_inputs(3, 1, 64, 32, 8, 8)
    # Power-of-two scales and half-integer inputs: every x / smooth / a_scale is an exact tie.
    ties = (np.random.default_rng(4).integers(-40, 40, (1, SEQ, 64)) + 0.5) * 0.25
    inp.update(x=jnp.asarray(ties, jnp.float32), smooth=jnp.ones(64), a_scale=jnp.full(SEQ, 0.25),
               a_zero=jnp.full(SEQ, 100, jnp.int32))
    layer = layer_of(inp)
    codes = quantize_activations(inp["x"], layer)
    v = np.asarray(ties) / 0.25
    np.testing.assert_array_equal(np.asarray(codes, np.int64) + 128 - 100, np.round(v))
    assert not np.array_equal(np.round(v), np.floor(v + 0.5))  # the input really has ties
    naive = naive_int32(inp, 8)
    np.testing.assert_array_equal(qmatmul_int32_ref(inp["x"], layer), naive)
    np.testing.assert_array_equal(qmatmul_int32(inp["x"], layer, interpret=INTERPRET), naive)


# (batch, K, N, a_bits, w_bits, dtype, bias): Vim in_proj/out_proj/x_proj/dt_proj-like K, N.
KERNEL_CASES = [
    (2, 192, 56, 8, 8, jnp.float32, True),  # Vim-T x_proj-like N (R + 2N), masked N tile
    (1, 384, 192, 8, 8, jnp.bfloat16, False),  # bf16 input and output
    (1, 768, 80, 4, 4, jnp.float32, True),  # W4A4, packed weights
    (1, 24, 384, 8, 4, jnp.float32, True),  # dt_proj-like K = R = 24 (masked K chunk), W4A8
    (2, 3, 96, 8, 8, jnp.float32, True),  # vim_micro dt_proj, K = 3 (see _codes_matmul_int32)
]


@pytest.mark.parametrize("batch,k,n,a_bits,w_bits,dtype,use_bias", KERNEL_CASES)
def test_kernel_matches_reference(batch, k, n, a_bits, w_bits, dtype, use_bias):
    inp = make_inputs(k + n + a_bits, batch, k, n, a_bits, w_bits, dtype)
    layer = layer_of(inp, a_bits, w_bits, bias=use_bias)
    acc = qmatmul_int32(inp["x"], layer, interpret=INTERPRET)
    ref_acc = qmatmul_int32_ref(inp["x"], layer)
    np.testing.assert_array_equal(acc, ref_acc)
    assert np.abs(np.asarray(ref_acc)).max() > 0

    y = qmatmul(inp["x"], layer, interpret=INTERPRET)
    y_ref = qmatmul_ref(inp["x"], layer)
    assert y.dtype == dtype and y.shape == (batch, SEQ, n)
    y32, r32 = np.asarray(y, np.float32), np.asarray(y_ref, np.float32)
    if INTERPRET:  # the same f32 operations in the same order, compiled by XLA on the CPU
        np.testing.assert_array_equal(y32, r32)
    elif dtype == jnp.float32:  # the GPU build may contract (acc*s)*w + b into an FMA
        np.testing.assert_allclose(y32, r32, rtol=2e-6, atol=2e-6 * np.abs(r32).max())
    else:  # f32 values a few ulps apart may round to neighbouring bf16 values: one ulp (< 2^-7)
        np.testing.assert_allclose(y32, r32, rtol=2**-7, atol=1e-5 * np.abs(r32).max())


@pytest.mark.xla_optimized  # bit equality in the interpreter, under the compiler users run
def test_two_pass_codes_path_matches_reference():
    inp = make_inputs(7, 1, 192, 64, 8, 8, jnp.bfloat16)
    layer = layer_of(inp)
    codes = quantize_activations(inp["x"], layer)
    y = qmatmul_codes(codes, layer, interpret=INTERPRET)
    y_ref = qmatmul_ref(inp["x"], layer, out_dtype=jnp.float32, colsum=weight_colsum(inp["w_q"], 8))
    r = np.asarray(y_ref)
    # The XLA paths on codes (what a fused producer hands over) are the float entry points' second half.
    np.testing.assert_array_equal(np.asarray(qmatmul_codes_ref(codes, layer)), r)
    np.testing.assert_array_equal(np.asarray(qmatmul_codes_bf16_dot(codes, layer)), r)
    with pytest.raises(ValueError, match="codes must be int8"):
        qmatmul_codes_ref(inp["x"], layer)
    if INTERPRET:
        np.testing.assert_array_equal(np.asarray(y), r)
    else:
        np.testing.assert_allclose(np.asarray(y), r, rtol=2e-6, atol=2e-6 * np.abs(r).max())


def test_bf16_dot_plan_keeps_every_partial_sum_exact_in_f32():
    # W8A8: unsplit up to K = 1024 (1024 * 128 * 128 = 2^24), split planes up to 8738.
    assert bf16_dot_plan(1024, 8, 8) == (False, 1024)
    assert bf16_dot_plan(1025, 8, 8) == (True, 8738)
    assert bf16_dot_plan(20000, 4, 4) == (False, 2**24 // (8 * 8))
    for k, a_bits, w_bits in [(1536, 8, 8), (3000, 8, 6), (50000, 8, 8), (20000, 8, 4)]:
        split, chunk = bf16_dot_plan(k, a_bits, w_bits)
        wmax = 15 if split else 2 ** (w_bits - 1)
        assert min(k, chunk) * 2 ** (a_bits - 1) * wmax <= 2**24


@pytest.mark.parametrize("k,n,a_bits,w_bits", [
    (768, 56, 8, 8),  # Vim-S x_proj: one unsplit dot
    (1536, 80, 8, 8),  # Vim-B x_proj: split weight planes
    (24, 384, 8, 8),  # Vim-T dt_proj
    (96, 64, 4, 4),  # packed 4-bit weights
    (200, 40, 6, 6),
])
def test_bf16_dot_path_equals_the_integer_reference(k, n, a_bits, w_bits):
    inp = make_inputs(3 * k + n, 2, k, n, a_bits, w_bits, seq=13)
    layer = layer_of(inp, a_bits, w_bits)
    codes = quantize_activations(inp["x"], layer)
    acc = _codes_matmul_bf16(codes, inp["w_q"], inp["a_zero"], a_bits, w_bits)
    np.testing.assert_array_equal(acc, naive_int32(inp, a_bits))
    y, r = (np.asarray(f(inp["x"], layer)) for f in (qmatmul_bf16_dot, qmatmul_ref))
    if INTERPRET:
        np.testing.assert_array_equal(y, r)
    else:  # the GPU build may contract the epilogue into an FMA
        np.testing.assert_allclose(y, r, rtol=2e-6, atol=2e-6 * np.abs(r).max())


def test_bf16_dot_path_is_exact_where_one_f32_dot_is_not():
    """A sum of 1100 products 128 * 128 and one of -127 is odd and above 2^24: no f32 sum holds it,
    so only the split weight planes (K = 1536 > 1024) give the exact accumulator."""
    k, n = 1536, 8
    x = np.full((1, 1, k), -1000.0, np.float32)  # q = 0: code -128 ...
    x[..., 1100] = -254.0  # ... but q = 1 (code -127) here
    w = np.zeros((k, n), np.int8)
    w[:1100] = -128
    w[1100] = 1
    layer = QuantizedLinear(jnp.asarray(w), jnp.ones(n), jnp.ones(k), jnp.ones(1),
                            jnp.full(1, 255, jnp.int32))
    codes = quantize_activations(x, layer)
    raw = 1100 * 128 * 128 - 127
    assert raw > 2**24 and float(np.float32(raw)) != raw  # one f32 dot would round it
    naive = np.einsum("blk,kn->bln", np.asarray(codes, np.int64), w.astype(np.int64))
    assert naive[0, 0, 0] == raw
    want = qmatmul_int32_ref(x, layer)
    np.testing.assert_array_equal(_codes_matmul_bf16(codes, w, layer.a_zero, 8, 8), want)


@pytest.mark.parametrize("a_bits,w_bits", [(8, 4), (8, 3)])
def test_4bit_weight_may_come_packed_unpacked_or_as_int4(a_bits, w_bits):
    """The packed (K/2, N) form, (K, N) int8 codes and a (K, N) jnp.int4 array give one result on
    every entry point (what the shape or dtype says the storage is; the sums do not depend on it).
    The weight's form is read the same way whatever the activation bits (W4A4 runs in
    ``test_kernel_matches_reference``)."""
    inp = make_inputs(23, 1, 48, 40, a_bits, w_bits)
    forms = (inp["w_q"], inp["w"], inp["w"].astype(jnp.int4))
    assert forms[0].shape == (24, 40) and forms[1].shape == forms[2].shape == (48, 40)
    naive = naive_int32(inp, a_bits)
    codes = quantize_activations(inp["x"], layer_of(inp, a_bits, w_bits))
    outs = []
    for w in forms:
        layer = layer_of(inp, a_bits, w_bits, w=w)
        np.testing.assert_array_equal(qmatmul_int32_ref(inp["x"], layer), naive)
        np.testing.assert_array_equal(qmatmul_int32(inp["x"], layer, interpret=INTERPRET), naive)
        outs.append([np.asarray(f(inp["x"], layer)) for f in (qmatmul_ref, qmatmul_bf16_dot)]
                    + [np.asarray(qmatmul(inp["x"], layer, interpret=INTERPRET)),
                       np.asarray(qmatmul_codes(codes, layer, interpret=INTERPRET))])
    for other in outs[1:]:
        for got, want in zip(other, outs[0], strict=True):
            np.testing.assert_array_equal(got, want)


def test_custom_tiles_mask_every_edge():
    # M = 197 rows, K = 48, N = 40: no dimension is a multiple of its tile.
    inp = make_inputs(11, 1, 48, 40, 8, 8)
    cfg = GemmConfig(block_m=32, block_n=16, block_k=32, num_warps=2, num_stages=2)
    np.testing.assert_array_equal(qmatmul_int32(inp["x"], layer_of(inp), interpret=INTERPRET, config=cfg),
                                  naive_int32(inp, 8))


def test_bad_arguments_are_explained():
    inp = make_inputs(5, 1, 64, 32, 8, 8)
    x = inp["x"]
    with pytest.raises(ValueError, match=r"w_bits=4 takes the weight as \(K, N\)"):
        qmatmul(x, layer_of(inp, w_bits=4, w=inp["w_q"][:40]))
    with pytest.raises(ValueError, match="jnp.int4 weight holds at most 4-bit"):
        qmatmul(x, layer_of(inp, w=inp["w_q"].astype(jnp.int4)))
    with pytest.raises(ValueError, match="per token position"):
        qmatmul_ref(x, layer_of(inp, a_scale=inp["a_scale"][:-1]))
    with pytest.raises(ValueError, match="a_zero must be an integer"):
        qmatmul(x, layer_of(inp, a_zero=inp["a_scale"]))
    with pytest.raises(ValueError, match="a_bits must be in 2..8"):
        layer_of(inp, a_bits=9)
    with pytest.raises(ValueError, match="w_int must be a 2-D int8 or jnp.int4"):
        qmatmul(x, layer_of(inp, w=inp["w_q"].astype(jnp.int32)))
    with pytest.raises(TypeError, match="must be a pallas_kernels.QuantizedLinear"):
        qmatmul_ref(x, {"w_int": inp["w_q"]})
    with pytest.raises(ValueError, match="block_k must be a power of two >= 32"):
        GemmConfig(block_k=16)
    s = jax.ShapeDtypeStruct
    huge = QuantizedLinear(s((256, 64), jnp.int8), s((64,), jnp.float32), s((256,), jnp.float32),
                           s((SEQ,), jnp.float32), s((SEQ,), jnp.int32))
    with pytest.raises(ValueError, match="split the batch"):
        jax.eval_shape(qmatmul, s((2**16, SEQ, 256), jnp.bfloat16), huge)


def test_quantized_linear_is_a_pytree_with_static_bit_widths():
    inp = make_inputs(6, 1, 48, 40, 8, 4)
    layer = layer_of(inp, 8, 4, bias=False)
    leaves, treedef = jax.tree_util.tree_flatten(layer)
    assert len(leaves) == 5  # no bias: no leaf
    assert jax.tree_util.tree_unflatten(treedef, leaves).w_bits == 4
    assert treedef != jax.tree_util.tree_structure(layer_of(inp, 8, 8, bias=False))  # bits are static
    assert (layer.in_features, layer.out_features) == (48, 40)
    w = np.asarray(inp["w"])
    np.testing.assert_array_equal(unpack_weight(pack_weight(w[:47], 4), 4, 47), w[:47])  # odd K: padded
    assert pack_weight(w[:47], 4).shape == (24, 40)


@pytest.mark.parametrize("k,n,w_bits", [(384, 1536, 8), (768, 56, 8), (24, 768, 4), (1536, 384, 4)])
def test_lowers_for_cuda_at_vim_shapes(k, n, w_bits, cuda_target):
    s = jax.ShapeDtypeStruct
    batch = 64
    layer = QuantizedLinear(s((k // 2 if w_bits <= 4 else k, n), jnp.int8), s((n,), jnp.float32),
                            s((k,), jnp.float32), s((SEQ,), jnp.float32), s((SEQ,), jnp.int32),
                            s((n,), jnp.float32), w_bits=w_bits)
    text = jax.jit(qmatmul).trace(s((batch, SEQ, k), jnp.bfloat16), layer).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text  # the Triton custom call, not Mosaic GPU
    assert "ptq4vm_qmatmul" in text
    assert "cvt.rni.f32.f32" in text  # round half to even in the prologue (Triton has no round)
