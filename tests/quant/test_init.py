"""σ and step-size initialisers pinned to hand-computed values (docs/method.md §4.2, §5).

Small ``n_grid`` values keep every candidate of a grid search checkable by hand; scores use
|e|^2.4 with 2^2.4 ≈ 5.278 and 3^2.4 ≈ 13.97.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq4vm_jax.quant import init as qi


def test_smoothing_scale_formula_and_clamps():
    act = np.array([4.0, 1e-4, 9.0, 0.0], np.float32)
    kernel = np.array([[1.0, -16.0], [0.5, 0.25], [0.0, 0.0], [1e8, -3.0]], np.float32)  # Flax (in, out)
    sigma = qi.smoothing_scale(act, kernel, 0.5)
    expected = [
        0.5,  # sqrt(4) / sqrt(16): the weight max runs over the out axis
        0.0447213595,  # act clamped to 1e-3: sqrt(1e-3) / sqrt(0.5)
        948.683298,  # weight max 0 clamped to 1e-5: sqrt(9) / sqrt(1e-5)
        1e-5,  # sqrt(1e-3) / sqrt(1e8) = 3.2e-6, clamped up to 1e-5
    ]
    np.testing.assert_allclose(sigma, expected, rtol=1e-5)
    # alpha 0.65: 4^0.65 / 16^0.35 = 2^(1.3 - 1.4) = 2^-0.1
    np.testing.assert_allclose(qi.smoothing_scale(act, kernel, 0.65)[0], 0.9330329915, rtol=1e-5)


def test_smoothing_scale_rejects_bad_input():
    kernel = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"smooth must have shape \(in,\) = \(3,\)"):
        qi.smoothing_scale(np.ones(2, np.float32), kernel, 0.5)
    with pytest.raises(ValueError, match="alpha must be in"):
        qi.smoothing_scale(np.ones(3, np.float32), kernel, 1.5)


def test_weight_grid_search_clips_an_outlier_when_that_wins():
    # 2 bit (qmax 1, levels {-s, 0, s}), n_grid 4: r = 4, m in {1, 2, 3, 4}, s = m.
    # col 0 = fifteen 1s and a 4:
    #   m=1: only the 4 errs, by 3 -> 13.97/16 = 0.873   <- best: clipping wins
    #   m=2: 1/2 rounds to 0 (err 1 x15), 4 -> 2 (err 2) -> (15 + 5.278)/16
    #   m=3: 1 -> 0 (x15), 4 -> 3 (err 1) -> 16/16;  m=4: 1 -> 0 (x15), 4 exact -> 15/16
    # col 1 = seven 1s, eight 0s and a 4: m=1 13.97/16, m=2 (7+5.278)/16, m=3 8/16, m=4 7/16 <- best
    col0 = [1.0] * 15 + [4.0]
    col1 = [1.0] * 7 + [0.0] * 8 + [4.0]
    w_tilde = np.array([col0, col1], np.float32).T
    smooth = (2.0 ** (np.arange(16) % 3 - 1)).astype(np.float32)
    kernel = w_tilde / smooth[:, None]  # the search runs on kernel·σ = w_tilde
    np.testing.assert_array_equal(qi.init_weight_scale(kernel, smooth, 2, n_grid=4), [1.0, 4.0])


def test_weight_grid_search_exponent_changes_the_winner():
    # eleven 1s and a 4, 2 bit, n_grid 4: m=1 scores 3^p/12, m=4 scores 11/12 (m=2, 3 lose).
    # p=2: 9 < 11 -> m=1;  p=2.4: 13.97 > 11 -> m=4.
    kernel = np.array([[1.0]] * 11 + [[4.0]], np.float32)
    smooth = np.ones(12, np.float32)
    np.testing.assert_array_equal(qi.init_weight_scale(kernel, smooth, 2, n_grid=4, p=2.0), [1.0])
    np.testing.assert_array_equal(qi.init_weight_scale(kernel, smooth, 2, n_grid=4), [4.0])


def test_weight_grid_search_refuses_an_exponent_that_is_not_positive():
    # |e|^p is computed as exp(p·log|e|): at p <= 0 an exact zero error would give 1 or NaN.
    kernel, smooth = np.ones((4, 2), np.float32), np.ones(4, np.float32)
    for p in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="p \\(the exponent of the L_p score\\) must be > 0"):
            qi.init_weight_scale(kernel, smooth, 4, p=p)


def test_weight_grid_search_ties_keep_the_smaller_step():
    # [-3, -2, -1], 2 bit, n_grid 3: r = 3, s = m in {1, 2, 3}
    #   m=1: errors [2, 1, 0] -> (5.278 + 1)/3
    #   m=2: -1.5 rounds to -2 -> clip -1 -> -2 (err 1), -2 exact, -0.5 rounds to 0 (err 1) -> 2/3
    #   m=3: -3 exact, -2/3 -> -1 -> -3 (err 1), -1/3 -> 0 (err 1) -> 2/3  (tie: strict < keeps m=2)
    kernel = np.array([[-3.0], [-2.0], [-1.0]], np.float32)
    np.testing.assert_array_equal(qi.init_weight_scale(kernel, np.ones(3, np.float32), 2, n_grid=3), [2.0])


def test_weight_grid_search_default_grid_includes_the_full_range():
    # col 0 lies on the 4-bit grid of step 0.5 and reaches ±3.5: only m = r (i = 100) is lossless.
    # col 1 is all zeros: every candidate scores 0, s floors at 1e-8.
    col0 = np.arange(-7, 8) * 0.5
    kernel = np.stack([col0, np.zeros(15)], axis=1).astype(np.float32)
    s = qi.init_weight_scale(kernel, np.ones(15, np.float32), 4)
    np.testing.assert_allclose(s, [0.5, 1e-8], rtol=1e-6)


def _tokens(rows: list[list[float]], smooth: np.ndarray) -> np.ndarray:
    """(N=2, L, C=2) input whose token l pools the 4 values rows[l] of x/σ."""
    xt = np.array(rows, np.float32).reshape(len(rows), 2, 2).transpose(1, 0, 2)
    return xt * smooth


SMOOTH_A = np.array([2.0, 0.5], np.float32)
# 2 bit (qmax 3). Rows are x/σ pooled over batch and channels.
ROWS = [
    [0.0, 1.0, 2.0, 3.0],
    [-3.0, -2.0, -1.0, 0.0],
    [1.0, 2.0, 3.0, 4.0],
]
# fixed, a = 0 (full range) is lossless for every row:
#   row 0: lo 0, hi 3 -> s 1, z 0;  row 1: lo -3, hi 0 -> s 1, z 3;
#   row 2: [1, 4] widened to contain 0 -> [0, 4]: s 4/3, z 0
FIXED = ([1.0, 1.0, 4.0 / 3.0], [0, 3, 0])
# official, n_grid 4 (a in .25, .5, .75, 1):
#   row 0, a=.25: [0.75, 2.25], s .5, zero round(-1.5) = -2: x^ = [1, 1, 2, 2.5], errors [1, 0, 0, .5]
#     -> 0.297; a >= .5 are constants (1.5, 2.25, 3): 1.418 and worse. Widened [0, 2.25]: s .75, z 0
#   row 1 mirrors row 0: [-2.25, -0.75] -> [-2.25, 0]: s .75, z -round(-3) = 3
#   row 2 is row 0 + 1: [1.75, 3.25] -> [0, 3.25]: s 3.25/3, z 0
OFFICIAL_4 = ([0.75, 0.75, 3.25 / 3.0], [0, 3, 0])


@pytest.mark.slow
def test_act_grid_search_per_token_fixed_vs_official():
    x = _tokens(ROWS, SMOOTH_A)
    for (s, z), expected in [
        (qi.init_act_scale(x, SMOOTH_A, 2, n_grid=4), FIXED),
        (qi.init_act_scale(x, SMOOTH_A, 2), FIXED),  # default grid "fixed", n_grid 100: a=0 still wins
        (qi.init_act_scale(x, SMOOTH_A, 2, grid="official", n_grid=4), OFFICIAL_4),
    ]:
        assert s.dtype == jnp.float32 and z.dtype == jnp.int32
        np.testing.assert_allclose(s, expected[0], rtol=1e-6)
        np.testing.assert_array_equal(z, expected[1])


@pytest.mark.slow
def test_act_grid_official_keeps_a_degenerate_candidate():
    # one row: -100 and 127 ones, 2 bit, n_grid 4.
    # official: a=.25 range [-74.75, -24.25] puts the ones at -16.8 (score ~1030); a=1 is the
    #   degenerate "constant 1" (s = 1e-8): only -100 errs, 101^2.4/128 ~ 505 -> it wins,
    #   best (lo, hi) = (1, -100), widened to [0, 0]: s = 1e-8, z = 0.
    # fixed: a=0 full range [-100, 1]: s = 101/3, z = round(2.97) = 3, every error is 1 -> wins.
    x = np.array([[[-100.0] + [1.0] * 127]], np.float32)
    ones = np.ones(128, np.float32)
    s, z = qi.init_act_scale(x, ones, 2, grid="official", n_grid=4)
    np.testing.assert_allclose(s, [1e-8], rtol=1e-6)
    np.testing.assert_array_equal(z, [0])
    s, z = qi.init_act_scale(x, ones, 2, grid="fixed", n_grid=4)
    np.testing.assert_allclose(s, [101.0 / 3.0], rtol=1e-6)
    np.testing.assert_array_equal(z, [3])


def _act_grid_float64(x: np.ndarray, bits: int, n_grid: int, p: float) -> tuple[np.ndarray, np.ndarray]:
    """The fixed-grid search of docs/method.md §5.1 in float64 NumPy, |e|^p by ``np.power``."""
    qmax = 2**bits - 1
    xmin, xmax = x.min(axis=(0, 2)), x.max(axis=(0, 2))
    best = (np.full(xmin.shape, np.inf), xmin, xmax)
    for i in range((n_grid + 1) // 2):
        a = i / n_grid
        lo, hi = xmin * (1 - a) + xmax * a, xmin * a + xmax * (1 - a)
        s = np.maximum((hi - lo) / qmax, 1e-8)[:, None]
        z = np.round(-lo / s[:, 0])[:, None]
        x_hat = s * (np.clip(np.round(x / s) + z, 0, qmax) - z)
        score = np.power(np.abs(x - x_hat), p).mean(axis=(0, 2))
        better = score < best[0]
        best = tuple(np.where(better, new, old) for new, old in zip((score, lo, hi), best, strict=True))
    lo, hi = np.minimum(best[1], 0.0), np.maximum(best[2], 0.0)
    s = np.maximum((hi - lo) / qmax, 1e-8)
    return s, np.clip(-np.round(lo / s), 0, qmax).astype(np.int32)


@pytest.mark.parametrize("bits", [4, 8])
def test_act_grid_search_matches_a_float64_reference_on_random_tokens(bits):
    """float32 under XLA picks the candidates float64 picks, away from hand-made ties."""
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((6, 9, 24)) * rng.uniform(0.1, 5.0, (1, 9, 1)) + rng.uniform(-1, 1, (1, 9, 1)))
    x = x.astype(np.float32)
    s, z = qi.init_act_scale(x, np.ones(24, np.float32), bits, n_grid=40)
    want_s, want_z = _act_grid_float64(x.astype(np.float64), bits, n_grid=40, p=2.4)
    np.testing.assert_allclose(s, want_s, rtol=1e-6)
    np.testing.assert_array_equal(z, want_z)


def test_act_grid_rejects_bad_options():
    x = _tokens(ROWS, SMOOTH_A)
    with pytest.raises(ValueError, match="grid must be one of"):
        qi.init_act_scale(x, SMOOTH_A, 4, grid="torch")
    with pytest.raises(ValueError, match="n_grid must be a positive int"):
        qi.init_act_scale(x, SMOOTH_A, 4, n_grid=0)
    with pytest.raises(ValueError, match="must be > 0"):
        qi.init_act_scale(x, SMOOTH_A, 4, p=0.0)
    with pytest.raises(ValueError, match=r"\(\.\.\., L, C\)"):
        qi.init_act_scale(np.ones(4, np.float32), np.ones(4, np.float32), 4)


@pytest.mark.slow
def test_act_grid_search_memory_stays_near_the_input_size():
    """Vim-B x_proj input (256, 197, 1536) fp32 is 296 MiB; the search must not hold copies per candidate."""
    shape = (256, 197, 1536)
    smooth = jnp.ones(shape[-1], jnp.float32)
    compiled = (
        jax.jit(lambda x: qi.init_act_scale(x, smooth, 4, grid="official"))
        .lower(jax.ShapeDtypeStruct(shape, jnp.float32))
        .compile()
    )
    input_bytes = np.prod(shape) * 4
    assert compiled.memory_analysis().temp_size_in_bytes <= 3 * input_bytes


@pytest.mark.slow
def test_minmax_baselines():
    kernel = np.array([[0.375, -2.0, 5.0], [0.25, 1.75, -9.0]], np.float32)
    smooth = np.array([2.0, 0.5], np.float32)
    # |kernel·σ| column max = [0.75, 4, 10], / qmax 7
    np.testing.assert_allclose(
        qi.minmax_weight_scale(kernel, smooth, 4), [0.75 / 7, 4.0 / 7, 10.0 / 7], rtol=1e-6
    )
    # one range for the whole tensor: x/σ spans [-3, 9] -> 2 bit s = 12/3 = 4, z = round(3/4) = 1
    x = np.array([[[-6.0, 1.0], [4.0, 4.5]]], np.float32)  # x/σ = [[-3, 2], [2, 9]]
    s, z = qi.minmax_act_scale_per_tensor(x, smooth, 2)
    np.testing.assert_array_equal(s, [4.0, 4.0])
    np.testing.assert_array_equal(z, [1, 1])
    assert z.dtype == jnp.int32
    # all positive -> range widened to [0, 6]: s = 2, z = 0
    s, z = qi.minmax_act_scale_per_tensor(np.array([[1.0, 6.0], [2.0, 3.0]], np.float32), np.ones(2), 2)
    np.testing.assert_array_equal(s, [2.0, 2.0])
    np.testing.assert_array_equal(z, [0, 0])
