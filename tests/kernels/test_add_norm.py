"""add_rmsnorm: the residual add + RMSNorm kernel (compiled on GPU, interpret mode elsewhere) vs
add_rmsnorm_ref, its int8 codes for the next linear, its VJP, the dispatch by backend, and CUDA
lowering."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.add_norm import NormConfig, add_rmsnorm, add_rmsnorm_codes_ref, add_rmsnorm_ref
from pallas_kernels.qlinear import QuantizedActivation, QuantizedLinear
from pallas_kernels.qmatmul import quantize_activations
from ptq4vm_jax.ops import norm as norm_ops

INTERPRET = jax.default_backend() != "gpu"
EPS = 1e-5


def make_inputs(seed, batch, seq, d, dtype=jnp.float32, a_bits=8):
    """hidden, residual (a wider spread, as deep in a residual stream), weight, and the next
    linear's per-token asymmetric input quantizer (its weight is not read)."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(batch, seq, d)).astype(np.float32), dtype)
    residual = jnp.asarray(rng.normal(size=(batch, seq, d)) * 3, jnp.float32)
    weight = jnp.asarray(rng.uniform(0.5, 1.5, d), jnp.float32)
    top = 2**a_bits - 1
    quant = QuantizedLinear(
        w_int=jnp.zeros((d, 8), jnp.int8), w_scale=jnp.ones(8, jnp.float32),
        smooth=jnp.asarray(rng.uniform(0.5, 2.0, d), jnp.float32),
        a_scale=jnp.asarray(rng.uniform(2.0, 6.0, seq) / top, jnp.float32),
        a_zero=jnp.asarray(rng.integers(top // 3, 2 * top // 3, seq), jnp.int32), a_bits=a_bits)
    return hidden, residual, weight, quant


# (batch, L, D, dtype, a_bits, rows per program): Vim-T's width at L = 197 (394 rows: a masked last
# tile of 4), and L = 65 at D = 128 in bf16 with 4-bit activations (the next power of two is D).
CASES = [(2, 197, 192, jnp.float32, 8, 4), (3, 65, 128, jnp.bfloat16, 4, 8)]


@pytest.mark.parametrize("batch,seq,d,dtype,a_bits,rows", CASES)
def test_kernel_matches_reference_and_its_codes_are_the_linears(batch, seq, d, dtype, a_bits, rows):
    hidden, residual, weight, quant = make_inputs(seq + d, batch, seq, d, dtype, a_bits)
    cfg = NormConfig(rows, 4)
    out, res = add_rmsnorm(hidden, residual, weight, eps=EPS, interpret=INTERPRET, config=cfg)
    out_ref, res_ref = add_rmsnorm_ref(hidden, residual, weight, eps=EPS)
    assert out.dtype == dtype and res.dtype == jnp.float32 and out.shape == res.shape == hidden.shape
    np.testing.assert_array_equal(np.asarray(res), np.asarray(res_ref))  # one rounding: the add
    o, o_ref = np.asarray(out, np.float32), np.asarray(out_ref, np.float32)
    scale = np.abs(o_ref).max()
    np.testing.assert_allclose(o, o_ref, rtol=0, atol=(1e-5 if dtype == jnp.float32 else 1e-2) * scale)

    codes, res_q = add_rmsnorm(hidden, residual, weight, eps=EPS, quant=quant, interpret=INTERPRET,
                               config=cfg)
    assert codes.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(res_q), np.asarray(res))
    # Exactly the codes the linear would compute from the kernel's float output: what makes
    # integer inference through the kernel equal fake-quant through it.
    own = np.asarray(quantize_activations(out, quant))
    np.testing.assert_array_equal(np.asarray(codes), own)
    c = np.asarray(codes).astype(int)
    assert len(np.unique(c)) > 2 ** (a_bits - 1), "the quantizer's range is hardly used"
    # Against the reference's codes: equal but where the two float outputs straddle a rounding
    # boundary (the row sums differ in their last bits).
    c_ref = np.asarray(add_rmsnorm_codes_ref(hidden, residual, weight, quant, eps=EPS)[0]).astype(int)
    assert np.abs(c - c_ref).max() <= 1 and np.mean(c != c_ref) <= 1e-3


def test_gradients_match_the_reference():
    hidden, residual, weight, _ = make_inputs(5, 2, 9, 24)
    probe = jnp.asarray(np.random.default_rng(6).normal(size=hidden.shape), jnp.float32)

    def loss(fn, *args):
        out, res = fn(*args)
        return jnp.sum(probe * out) + 0.5 * jnp.sum(probe * res)

    kernel = lambda *a: add_rmsnorm(*a, eps=EPS, interpret=INTERPRET, config=NormConfig(8, 4))
    reference = lambda *a: add_rmsnorm_ref(*a, eps=EPS)
    g = jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2))(hidden, residual, weight)
    g_ref = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(hidden, residual, weight)
    for got, want in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("backend,kernel", [("fused", True), ("auto", False)])
def test_ops_dispatch_and_quantized_output(backend, kernel, monkeypatch):
    """The model's backend picks the kernel ("fused") or XLA; with ``quant`` either hands the
    linear a QuantizedActivation holding the codes of its own float output."""
    ops_kernel = importlib.import_module("pallas_kernels.add_norm")._forward
    calls = []
    monkeypatch.setattr(importlib.import_module("pallas_kernels.add_norm"), "_forward",
                        lambda *a: calls.append(a[5] is not None) or ops_kernel(*a))
    hidden, residual, weight, quant = make_inputs(8, 2, 9, 24, jnp.bfloat16)
    run = lambda **kw: norm_ops.add_rmsnorm(hidden, residual, weight, eps=EPS, out_dtype=jnp.bfloat16,
                                            backend=backend, **kw)
    out, res = run()
    q, res_q = run(quant=quant)
    assert calls == ([False, True] if kernel else [])
    assert isinstance(q, QuantizedActivation) and q.dtype == jnp.bfloat16 and q.shape == hidden.shape
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(quantize_activations(out, quant)))
    np.testing.assert_array_equal(np.asarray(res_q), np.asarray(res))


def test_bad_arguments_are_explained():
    hidden, residual, weight, quant = make_inputs(0, 1, 5, 16)
    with pytest.raises(ValueError, match=r"residual must match hidden's shape \(1, 5, 16\)"):
        add_rmsnorm(hidden, residual[:, 1:], weight, eps=EPS, interpret=True)
    with pytest.raises(ValueError, match=r"weight must be \(D,\) = \(16,\)"):
        add_rmsnorm(hidden, residual, weight[:8], eps=EPS, interpret=True)
    with pytest.raises(ValueError, match=r"a_scale and a_zero \(5,\)"):
        short = QuantizedLinear(quant.w_int, quant.w_scale, quant.smooth, quant.a_scale[:4], quant.a_zero[:4])
        add_rmsnorm(hidden, residual, weight, eps=EPS, quant=short, interpret=True)
    with pytest.raises(ValueError, match="block_rows must be a power of two"):
        NormConfig(block_rows=3)


def test_lowers_for_cuda_at_vim_shapes(cuda_target):
    """Vim-B at batch 64 (D = 768), bf16 output: the float kernel and the codes kernel (PTX
    round-half-to-even in its epilogue) lower for CUDA."""
    s = jax.ShapeDtypeStruct
    batch, seq, d = 64, 197, 768
    row = s((batch, seq, d), jnp.bfloat16)
    res, w = s((batch, seq, d), jnp.float32), s((d,), jnp.float32)
    quant = QuantizedLinear(s((d, 2 * d), jnp.int8), s((2 * d,), jnp.float32), w, s((seq,), jnp.float32),
                            s((seq,), jnp.int32))
    lower = lambda f, *a: jax.jit(f).trace(*a).lower(lowering_platforms=("cuda",)).as_text()
    text = lower(lambda h, r, w: add_rmsnorm(h, r, w, eps=EPS), row, res, w)
    assert "__gpu$xla.gpu.triton" in text and "ptq4vm_add_rmsnorm" in text
    text = lower(lambda h, r, w, q: add_rmsnorm(h, r, w, eps=EPS, quant=q), row, res, w, quant)
    assert "ptq4vm_add_rmsnorm" in text and "cvt.rni.f32.f32" in text
