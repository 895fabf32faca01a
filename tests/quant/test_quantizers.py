"""Fake quantizers pinned to hand-computed values (docs/method.md §3, §11.2).

Every expected number below was worked out by hand from the formulas; the comments show
the intermediate steps. Steps and σ are powers of two so the float32 values are exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.qlinear import QuantizedLinear
from pallas_kernels.qmatmul import quantize_activations
from ptq4vm_jax.quant import quantizers as qz

# --- weight example: Flax (in=2, out=3), 4 bit -> qmax 7 --------------------------------
KERNEL = np.array([[0.375, -2.0, 5.0], [0.25, 1.75, -9.0]], np.float32)
SMOOTH_W = np.array([2.0, 0.5], np.float32)
W_SCALE = np.array([0.25, 0.5, 1.0], np.float32)
# W~ = kernel*σ[:,None] = [[0.75, -4, 10], [0.125, 0.875, -4.5]]
# v = W~/s_w           = [[3, -8, 10], [0.5, 1.75, -4.5]]
# codes = clip(round_half_even(v), -7, 7) = [[3, -7, 7], [0, 2, -4]]
W_CODES = np.array([[3, -7, 7], [0, 2, -4]], np.int8)
W_HAT = np.array([[0.75, -3.5, 7.0], [0.0, 1.0, -4.0]], np.float32)
G2x3 = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)  # cotangent, catches index mix-ups

# --- activation example: x (N=1, L=2, C=3), 4 bit -> qmax 15 ------------------------------
X = np.array([[[3.0, 0.5, 7.0], [-6.0, 0.125, 0.3]]], np.float32)
SMOOTH_A = np.array([2.0, 0.5, 1.0], np.float32)
A_SCALE = np.array([0.5, 0.25], np.float32)
A_ZERO = np.array([3, 10], np.int32)
# token 0: x/σ = [1.5, 1, 7],     v = /0.5  = [3, 2, 14];   inside iff -3 < v < 12 -> 14 clipped above
#          codes = clip(round(v)+3, 0, 15) = [6, 5, 15];  x^ = 0.5*(codes-3) = [1.5, 1, 6]
# token 1: x/σ = [-3, 0.25, 0.3], v = /0.25 = [-12, 1, 1.2]; inside iff -10 < v < 5 -> -12 clipped below
#          codes = [0, 11, 11];  x^ = 0.25*(codes-10) = [-2.5, 0.25, 0.25]
A_CODES = np.array([[[6, 5, 15], [0, 11, 11]]], np.int32)
X_HAT = np.array([[[1.5, 1.0, 6.0], [-2.5, 0.25, 0.25]]], np.float32)


def act_codes(x, smooth, a_scale, a_zero, bits):
    """The integer path's activation codes in [0, qmax]: ``quantize_activations`` (int8 codes
    ``q - 2^(bits-1)``, what every integer GEMM reads) shifted back by 2^(bits-1)."""
    c = np.shape(smooth)[0]
    layer = QuantizedLinear(jnp.zeros((c, 1), jnp.int8), jnp.ones(1), jnp.asarray(smooth),
                            jnp.asarray(a_scale), jnp.asarray(a_zero), a_bits=bits)
    codes = quantize_activations(jnp.asarray(x), layer)
    assert codes.dtype == jnp.int8
    return codes.astype(jnp.int32) + 2 ** (bits - 1)


def test_qmax_per_bit_width():
    assert [qz.weight_qmax(b) for b in (2, 4, 6, 8)] == [1, 7, 31, 127]
    assert [qz.act_qmax(b) for b in (2, 4, 6, 8)] == [3, 15, 63, 255]


@pytest.mark.parametrize("bits", [1, 9, 4.0, True, "8"])
def test_bad_bits_are_rejected(bits):
    with pytest.raises(ValueError, match="bits must be a Python int in 2..8"):
        qz.weight_qmax(bits)
    with pytest.raises(ValueError, match="bits must be a Python int in 2..8"):
        qz.fake_quant_act(X, SMOOTH_A, A_SCALE, A_ZERO, bits)


@pytest.mark.slow
def test_round_ste_rounds_half_to_even_with_identity_gradient():
    x = jnp.array([0.5, 1.5, 2.5, -0.5, -1.5, 1.2, -2.7])
    np.testing.assert_array_equal(qz.round_ste(x), [0.0, 2.0, 2.0, -0.0, -2.0, 1.0, -3.0])
    g = jax.grad(lambda x: jnp.sum(qz.round_ste(x) * jnp.arange(1.0, 8.0)))(x)
    np.testing.assert_array_equal(g, np.arange(1.0, 8.0))


def test_fake_quant_weight_values():
    np.testing.assert_array_equal(qz.fake_quant_weight(KERNEL, SMOOTH_W, W_SCALE, 4), W_HAT)


def test_fake_quant_weight_gradients():
    def loss(kernel, smooth, w_scale):
        return jnp.sum(qz.fake_quant_weight(kernel, smooth, w_scale, 4) * G2x3)

    g_k, g_sm, g_s = jax.grad(loss, argnums=(0, 1, 2))(KERNEL, SMOOTH_W, W_SCALE)
    # d/ds per element: inside round(v)-v, above +qmax, below -qmax
    #   [[3-3, -7 (below), +7 (above)], [0-0.5, 2-1.75, -4+4.5]] = [[0, -7, 7], [-0.5, 0.25, 0.5]]
    # weighted column sums: [1*0 + 4*-0.5, 2*-7 + 5*0.25, 3*7 + 6*0.5]
    np.testing.assert_allclose(g_s, [-2.0, -12.75, 24.0], rtol=1e-6)
    # d/dkernel = G * σ_in * inside; inside = [[1,0,0],[1,1,1]]
    np.testing.assert_allclose(g_k, [[2.0, 0.0, 0.0], [2.0, 2.5, 3.0]], rtol=1e-6)
    # d/dσ_i = Σ_j G_ij * kernel_ij * inside_ij: [1*0.375, 4*0.25 + 5*1.75 + 6*(-9)]
    np.testing.assert_allclose(g_sm, [0.375, -44.25], rtol=1e-6)


def test_weight_clip_boundary_counts_as_clipped_like_torch_hardtanh():
    # σ = 1, s = 1, 4 bit: v = [7, -7, 6.75, 7.25]; only 6.75 is strictly inside (-7, 7).
    kernel = np.array([[7.0], [-7.0], [6.75], [7.25]], np.float32)
    smooth, w_scale = np.ones(4, np.float32), np.ones(1, np.float32)
    w_hat = qz.fake_quant_weight(kernel, smooth, w_scale, 4)
    np.testing.assert_array_equal(w_hat, [[7.0], [-7.0], [7.0], [7.0]])
    g_k, g_s = jax.grad(lambda k, s: jnp.sum(qz.fake_quant_weight(k, smooth, s, 4)), argnums=(0, 1))(
        kernel, w_scale
    )
    np.testing.assert_array_equal(g_k, [[0.0], [0.0], [1.0], [0.0]])
    np.testing.assert_allclose(g_s, [7.0 - 7.0 + (7.0 - 6.75) + 7.0])  # 7.25


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_step_gradient_uses_true_division_at_the_range_end(bits):
    """With s_w = absmax/qmax the channel max often lands exactly on ±qmax under IEEE division.

    Torch treats it as clipped (d/ds_w = ±qmax); XLA's default a * (1/b) rewrite would put it an
    ulp inside (d/ds_w ≈ 0) on about 40 % of channels, shifting the first JLSS steps.
    """
    qmax = qz.weight_qmax(bits)
    rng = np.random.default_rng(bits)
    kernel = rng.normal(size=(16, 64)).astype(np.float32)
    w_scale = (np.abs(kernel).max(0) / np.float32(qmax)).astype(np.float32)
    v = kernel / w_scale  # numpy: IEEE float32 division, as torch
    on_edge = np.abs(v) >= qmax
    assert on_edge.sum() >= 20  # the case this test is about really occurs
    expected = np.where(on_edge, np.sign(v) * qmax, np.round(v) - v).sum(0)
    g = jax.grad(lambda s: jnp.sum(qz.fake_quant_weight(kernel, np.ones(16, np.float32), s, bits)))(w_scale)
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-4)


def test_fake_quant_act_values():
    np.testing.assert_array_equal(qz.fake_quant_act(X, SMOOTH_A, A_SCALE, A_ZERO, 4), X_HAT)


@pytest.mark.slow
def test_fake_quant_act_gradients():
    g = G2x3[None]

    def loss(x, smooth, a_scale):
        return jnp.sum(qz.fake_quant_act(x, smooth, a_scale, A_ZERO, 4) * g)

    g_x, g_sm, g_s = jax.grad(loss, argnums=(0, 1, 2))(X, SMOOTH_A, A_SCALE)
    # d/ds: inside round(v)-v, above qmax-z, below -z
    #   token 0: 1*0 + 2*0 + 3*(15-3) = 36;  token 1: 4*(-10) + 5*(1-1) + 6*(1-1.2) = -41.2
    np.testing.assert_allclose(g_s, [36.0, -41.2], rtol=1e-6)
    # d/dx = G * inside / σ
    np.testing.assert_allclose(g_x, [[[0.5, 4.0, 0.0], [0.0, 10.0, 6.0]]], rtol=1e-6)
    # d/dσ_c = Σ_l G * inside * (-x/σ²): c0: 1*(-3/4); c1: 2*(-0.5/0.25) + 5*(-0.125/0.25); c2: 6*(-0.3)
    np.testing.assert_allclose(g_sm, [-0.75, -6.5, -1.8], rtol=1e-6)


def test_act_clip_boundary_counts_as_clipped_like_torch_hardtanh():
    # s = 1, z = 5, 4 bit: v + z = [15, 0, 15.25, -0.25, 14.75]; only the last is inside (0, 15).
    x = np.array([[10.0, -5.0, 10.25, -5.25, 9.75]], np.float32)
    smooth, zero = np.ones(5, np.float32), np.array([5], np.int32)
    x_hat = qz.fake_quant_act(x, smooth, np.ones(1, np.float32), zero, 4)
    np.testing.assert_array_equal(x_hat, [[10.0, -5.0, 10.0, -5.0, 10.0]])
    g_x, g_s = jax.grad(lambda x, s: jnp.sum(qz.fake_quant_act(x, smooth, s, zero, 4)), argnums=(0, 1))(
        x, np.ones(1, np.float32)
    )
    np.testing.assert_array_equal(g_x, [[0.0, 0.0, 0.0, 0.0, 1.0]])
    # (15-5) + (-5) + (15-5) + (-5) + (round(4.75) - 4.75)
    np.testing.assert_allclose(g_s, [10.25])


def test_act_scales_index_the_token_axis_and_broadcast_over_batch():
    batch = np.concatenate([X, X[:, ::-1]], axis=0)  # second item: tokens swapped
    out = qz.fake_quant_act(batch, SMOOTH_A, A_SCALE, A_ZERO, 4)
    np.testing.assert_array_equal(out[0], X_HAT[0])
    np.testing.assert_array_equal(qz.fake_quant_act(X[0], SMOOTH_A, A_SCALE, A_ZERO, 4), X_HAT[0])
    # swapped tokens meet the other token's (s, z): token 0's row under (0.25, 10) -> v = [6, 4, 28]
    # codes = clip(v + 10, 0, 15) = [15, 14, 15] -> 0.25*(codes-10) = [1.25, 1, 1.25]
    np.testing.assert_array_equal(out[1, 1], [1.25, 1.0, 1.25])


def test_token_count_mismatch_names_both_lengths():
    x = np.zeros((1, 5, 3), np.float32)
    with pytest.raises(ValueError, match=r"calibrated for 2 tokens but the input has 5 tokens.*image size"):
        qz.fake_quant_act(x, SMOOTH_A, A_SCALE, A_ZERO, 4)


def test_shape_errors_say_what_shape_was_expected():
    with pytest.raises(ValueError, match=r"w_scale must have shape \(out,\) = \(3,\)"):
        qz.fake_quant_weight(KERNEL, SMOOTH_W, W_SCALE[:2], 4)
    with pytest.raises(ValueError, match=r"smooth must have shape \(in,\) = \(2,\)"):
        qz.quantize_weight_int(KERNEL, SMOOTH_A, W_SCALE, 4)
    with pytest.raises(ValueError, match=r"smooth must have shape \(C,\) = \(3,\)"):
        qz.fake_quant_act_dynamic(X, SMOOTH_W, 4)


def test_integer_forms_of_the_hand_examples():
    w = qz.quantize_weight_int(KERNEL, SMOOTH_W, W_SCALE, 4)
    assert w.dtype == jnp.int8
    np.testing.assert_array_equal(w, W_CODES)
    np.testing.assert_array_equal(act_codes(X, SMOOTH_A, A_SCALE, A_ZERO, 4), A_CODES)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.slow
def test_integer_forms_equal_fake_forms_bit_exactly(bits):
    rng = np.random.default_rng(bits)
    n, length, c_in, c_out = 2, 5, 16, 8
    kernel = rng.normal(size=(c_in, c_out)).astype(np.float32)
    smooth = rng.uniform(0.2, 3.0, c_in).astype(np.float32)
    w_absmax = np.abs(kernel * smooth[:, None]).max(0)
    w_scale = (w_absmax / qz.weight_qmax(bits) * rng.uniform(0.4, 1.1, c_out)).astype(np.float32)
    x = (rng.normal(size=(n, length, c_in)) * rng.uniform(0.5, 4.0, (length, 1))).astype(np.float32)
    a_scale = rng.uniform(0.5, 2.0, length).astype(np.float32) * 8.0 / qz.act_qmax(bits)
    a_zero = rng.integers(0, qz.act_qmax(bits) + 1, length).astype(np.int32)

    fns = [
        lambda k, sm, s: qz.fake_quant_weight(k, sm, s, bits),
        lambda k, sm, s: qz.quantize_weight_int(k, sm, s, bits),
        lambda x, sm, s, z: qz.fake_quant_act(x, sm, s, z, bits),
        lambda x, sm, s, z: act_codes(x, sm, s, z, bits),
    ]
    for fq_w, q_w, fq_a, q_a in (fns, [jax.jit(f) for f in fns]):
        codes_w = np.asarray(q_w(kernel, smooth, w_scale))
        assert codes_w.dtype == np.int8 and np.abs(codes_w).max() <= qz.weight_qmax(bits)
        np.testing.assert_array_equal(w_scale * codes_w.astype(np.float32), fq_w(kernel, smooth, w_scale))
        codes_a = np.asarray(q_a(x, smooth, a_scale, a_zero))
        assert codes_a.min() >= 0 and codes_a.max() <= qz.act_qmax(bits)
        assert len(np.unique(codes_a)) > 2  # the data really spans the grid
        dequant = a_scale[:, None] * (codes_a - a_zero[:, None]).astype(np.float32)
        np.testing.assert_array_equal(dequant, fq_a(x, smooth, a_scale, a_zero))


def test_smoothing_is_the_identity_when_rounding_is_lossless():
    """(x/σ)(σW) == xW: inputs built on the quantization grids, so only smoothing acts."""
    rng = np.random.default_rng(0)
    n, length, c_in, c_out, bits = 2, 4, 8, 5, 4
    smooth = (2.0 ** rng.integers(-3, 4, c_in)).astype(np.float32)
    a_scale = (2.0 ** rng.integers(-4, 0, length)).astype(np.float32)
    a_zero = rng.integers(0, 16, length).astype(np.int32)
    a_codes = rng.integers(0, 16, (n, length, c_in))
    x = (smooth * a_scale[:, None] * (a_codes - a_zero[:, None])).astype(np.float32)
    w_scale = (2.0 ** rng.integers(-5, -1, c_out)).astype(np.float32)
    w_codes = rng.integers(-7, 8, (c_in, c_out))
    kernel = (w_codes * w_scale / smooth[:, None]).astype(np.float32)

    x_hat = qz.fake_quant_act(x, smooth, a_scale, a_zero, bits)
    w_hat = qz.fake_quant_weight(kernel, smooth, w_scale, bits)
    np.testing.assert_array_equal(x_hat, x / smooth)
    np.testing.assert_array_equal(w_hat, kernel * smooth[:, None])
    np.testing.assert_array_equal(act_codes(x, smooth, a_scale, a_zero, bits), a_codes)
    np.testing.assert_array_equal(qz.quantize_weight_int(kernel, smooth, w_scale, bits), w_codes)
    np.testing.assert_allclose(x_hat @ w_hat, x @ kernel, rtol=1e-5, atol=1e-5)


def test_dynamic_per_token_minmax():
    # 2 bit -> qmax 3; one range per (batch, token) row, forced to contain 0.
    row = np.array(
        [
            [0.0, 1.0, 2.0, 3.0],  # lo 0, hi 3: s 1, z 0 -> exact
            [-1.0, 0.5, 2.0, 0.2],  # lo -1, hi 2: s 1, z 1; v=[-1,.5,2,.2] -> round [-1,0,2,0]
            [2.0, 4.0, 6.0, 5.0],  # lo forced to 0, hi 6: s 2, z 0; v=[1,2,3,2.5] -> [1,2,3,2]
        ],
        np.float32,
    )
    expected = np.array([[0.0, 1.0, 2.0, 3.0], [-1.0, 0.0, 2.0, 0.0], [2.0, 4.0, 6.0, 4.0]], np.float32)
    x = np.stack([row, 2.0 * row])  # batch item 1 gets its own, doubled, ranges
    ones = np.ones(4, np.float32)
    out = qz.fake_quant_act_dynamic(x, ones, 2)
    np.testing.assert_array_equal(out, np.stack([expected, 2.0 * expected]))
    smooth = np.array([1.0, 1.0, 2.0, 0.5], np.float32)
    np.testing.assert_array_equal(qz.fake_quant_act_dynamic(x * smooth, smooth, 2), out)


def test_integer_activation_codes_round_ties_to_even():
    """Exact ties (x / (smooth * a_scale) = k + 0.5) go to the even neighbour, as jnp.round and the
    kernels do; half-up would give [9, 10, 11, 8, 7]."""
    x = np.array([[0.5, 1.5, 2.5, -0.5, -1.5]], np.float32)
    codes = act_codes(x, np.ones(5, np.float32), np.ones(1, np.float32), np.array([8], np.int32), 4)
    np.testing.assert_array_equal(codes, [[8, 10, 10, 8, 6]])
