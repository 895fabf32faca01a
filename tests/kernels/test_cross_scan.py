"""cross_scan_merge: VMamba's K-direction scan + merge in one kernel (compiled on GPU, interpret
mode elsewhere) against the composition with the lax.scan reference, its VJP against jax.grad
through that composition, the orders against the model's cross-scan, the dispatcher, and CUDA
lowering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cross_scan import CrossScanConfig, cross_scan_merge, cross_scan_merge_ref
from ptq4vm_jax.models.vmamba import cross_merge, cross_scan
from ptq4vm_jax.ops import cross_scan as cross_scan_ops
from ptq4vm_jax.ops.cross_scan import grid_orders
from ptq4vm_jax.ops.scan import selective_scan_ref

pytestmark = pytest.mark.slow  # Pallas kernels in the interpreter: compile-heavy
INTERPRET = jax.default_backend() != "gpu"
reference = functools.partial(cross_scan_merge_ref, scan=selective_scan_ref)


def make_inputs(seed, batch, h, w, e, n, *, with_d=True, with_bias=True):
    """u (B, H·W, E) and the four directions' stacked inputs with VMamba-like ranges (numpy draws:
    eager jax.random calls would compile one program per shape)."""
    rng = np.random.default_rng(seed)
    k, seq = 4, h * w
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))
    return (f32(rng.normal(size=(batch, seq, e))), f32(rng.normal(size=(k, batch, seq, e)) * 0.5 - 1.0),
            f32(-np.exp(0.5 * rng.normal(size=(k, e, n)))), f32(rng.normal(size=(k, batch, seq, n))),
            f32(rng.normal(size=(k, batch, seq, n))), f32(rng.uniform(0.5, 1.5, (k, e))) if with_d else None,
            f32(0.2 * rng.normal(size=(k, e))) if with_bias else None, jnp.asarray(grid_orders(h, w)))


def assert_close(y, y_ref, rel):
    y, y_ref = np.asarray(y, np.float32), np.asarray(y_ref, np.float32)
    scale = np.abs(y_ref).max()
    assert np.isfinite(y_ref).all() and scale > 0
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=rel * scale)


def test_orders_are_the_models_cross_scan():
    """Step i of direction k reads row-major token grid_orders[k, i]: the model's cross_scan
    sequences, on a non-square grid (a transposed order would show)."""
    h, w = 3, 5
    x = jnp.arange(2 * h * w * 2, dtype=jnp.float32).reshape(2, h, w, 2)
    rows = x.reshape(2, h * w, 2)
    for k, seq in enumerate(cross_scan(x)):
        np.testing.assert_array_equal(np.asarray(rows[:, grid_orders(h, w)[k]]), np.asarray(seq))


# (batch, H, W, E, N, D and Δ bias, config): VMamba-T's stage-3 grid (7 x 7) at its d_inner with
# N = 1 and the default loop (4 tokens per trip, prefetch; 49 = 12 x 4 + 1); a non-square grid
# with a masked last channel tile and N = 4, plain loop, no D or bias.
CASES = [(2, 7, 7, 96, 1, True, CrossScanConfig(32, 1, 2)),
         (1, 5, 7, 24, 4, False, CrossScanConfig(16, 1, 2, unroll=1, prefetch=False))]


@pytest.mark.parametrize("batch,h,w,e,n,extras,config", CASES)
def test_kernel_matches_reference(batch, h, w, e, n, extras, config):
    args = make_inputs(h * w + e + n, batch, h, w, e, n, with_d=extras, with_bias=extras)
    y = cross_scan_merge(*args, interpret=INTERPRET, config=config)
    assert y.shape == args[0].shape and y.dtype == jnp.float32
    y_ref = reference(*args)
    assert_close(y, y_ref, 1e-5)
    if extras:  # the model's unfused merge of the four reference scans: the same function
        u, delta, a, b, c, d, bias, _ = args
        seqs = cross_scan(u.reshape(batch, h, w, e))
        ys = [selective_scan_ref(s, delta[k], a[k], b[k], c[k], d[k], None, bias[k])
              for k, s in enumerate(seqs)]
        assert_close(y, cross_merge(ys, h, w), 1e-5)


def test_trainable_gradients_match_reference():
    args = make_inputs(3, 2, 3, 4, 24, 2)
    arrays, orders = args[:-1], args[-1]
    probe = jnp.asarray(np.random.default_rng(4).normal(size=args[0].shape), jnp.float32)
    loss = lambda fn: lambda *a: jnp.sum(probe * fn(*a, orders))
    kernel = functools.partial(cross_scan_merge, interpret=INTERPRET, config=CrossScanConfig(16, 1, 2))
    argnums = tuple(range(len(arrays)))
    value, g = jax.value_and_grad(loss(kernel), argnums=argnums)(*arrays)
    value_ref, g_ref = jax.value_and_grad(loss(reference), argnums=argnums)(*arrays)
    np.testing.assert_allclose(float(value), float(value_ref), rtol=1e-5)
    for got, want in zip(g, g_ref, strict=True):
        assert got.shape == want.shape
        assert_close(got, want, 1e-5)


@pytest.mark.parametrize("backend,kernel", [("fused", True), ("ref", False)])
def test_dispatcher_runs_the_backend_it_is_given(backend, kernel, monkeypatch):
    calls = []

    def spy(*a, _fn=cross_scan_ops.cross_scan_merge_pallas, **kw):
        calls.append(1)
        return _fn(*a, **kw)

    monkeypatch.setattr(cross_scan_ops, "cross_scan_merge_pallas", spy)
    args = make_inputs(5, 1, 2, 3, 16, 1)
    y = cross_scan_ops.cross_scan_merge(*args, backend=backend)
    assert calls == ([1] if kernel else [])
    assert_close(y, reference(*args), 1e-5)


def test_bad_arguments_are_explained():
    u, delta, a, b, c, d, bias, orders = make_inputs(0, 1, 2, 3, 16, 1)
    with pytest.raises(ValueError, match=r"orders must be \(K, L\) with L=6"):
        cross_scan_merge(u, delta, a, b, c, d, bias, orders[:, :5], interpret=True)
    with pytest.raises(ValueError, match=r"B must have shape \(4, 1, 6, 1\) \(K=4 directions\)"):
        cross_scan_merge(u, delta, a, b[:3], c, d, bias, orders, interpret=True)
    with pytest.raises(ValueError, match="block_e must be a power of two"):
        CrossScanConfig(block_e=24)


def test_lowers_for_cuda_at_vmamba_shapes(cuda_target):
    """VMamba-T's first stage at batch 64 (L = 3136, d_inner 96, N = 1): the forward kernel and
    the trainable backward (the per-direction Pallas scans) lower for CUDA."""
    s = jax.ShapeDtypeStruct
    k, batch, seq, e, n = 4, 64, 3136, 96, 1
    args = (s((batch, seq, e), jnp.float32), s((k, batch, seq, e), jnp.float32), s((k, e, n), jnp.float32),
            s((k, batch, seq, n), jnp.float32), s((k, batch, seq, n), jnp.float32), s((k, e), jnp.float32),
            None, s((k, seq), jnp.int32))
    text = jax.jit(cross_scan_merge).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and "ptq4vm_cross_scan" in text and "__nv_exp2f" in text
    loss = lambda u, dt, a, b, c, d, o: jnp.sum(cross_scan_merge(u, dt, a, b, c, d, None, o))
    grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5)))
    text = grads.trace(*args[:6], args[7]).lower(lowering_platforms=("cuda",)).as_text()
    assert "ptq4vm_cross_scan" in text and "ptq4vm_selective_scan_bwd" in text
