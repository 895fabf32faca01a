"""cross_scan_merge: VMamba's K-direction scan + merge in one kernel (compiled on GPU, interpret
mode elsewhere) against the composition with the lax.scan reference, its VJP against jax.grad
through that composition, the orders against the model's cross-scan, the dispatcher, and CUDA
lowering."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cross_scan import CrossScanConfig, cross_scan_merge, cross_scan_merge_ref, full_delta
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


def dt_operands(seed, batch, seq, e, rank, *, integer):
    """Each direction's dt_proj input (K, B, L, R) and weight (K, R, E): floats, or an integer
    layer's centred codes and weight codes with its per-token and per-channel steps."""
    rng = np.random.default_rng(seed)
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))
    if not integer:
        return {"delta": f32(rng.normal(size=(4, batch, seq, rank))),
                "dt_weight": f32(rng.normal(size=(4, rank, e)) * rank ** -0.5)}
    return {"delta": f32(rng.integers(-128, 128, (4, batch, seq, rank))),
            "dt_weight": f32(rng.integers(-127, 128, (4, rank, e))),
            "dt_row_scale": f32(rng.uniform(0.01, 0.03, (4, seq))),
            "dt_col_scale": f32(rng.uniform(2e-3, 6e-3, (4, e)) * rank ** -0.5)}


@pytest.mark.parametrize("integer", [False, True])
def test_dt_proj_on_chip_matches_reference(integer):
    """Δ = dt_proj(Δ-rank) multiplied in the kernel (a float layer; an integer one's codes and
    steps, whose sum is exact) gives the reference fed the Δ XLA computes: the same function."""
    batch, h, w, e, n, rank = 1, 5, 7, 24, 1, 5
    u, _, a, b, c, d, bias, orders = make_inputs(7, batch, h, w, e, n)
    dt = dt_operands(8, batch, h * w, e, rank, integer=integer)
    scales = {k: v for k, v in dt.items() if k != "delta"}
    config = CrossScanConfig(16, 1, 2, unroll=1, prefetch=False)
    y = cross_scan_merge(u, dt["delta"], a, b, c, d, bias, orders, **scales, interpret=INTERPRET,
                         config=config)
    assert_close(y, reference(u, full_delta(**dt), a, b, c, d, bias, orders), 1e-5)


def test_dt_proj_off_chip_by_config(monkeypatch):
    """``CrossScanConfig(dt_on_chip=False)``: XLA computes Δ and the kernel takes it as given."""
    kernels = importlib.import_module("pallas_kernels.cross_scan")
    seen = []
    real = kernels._forward
    # _forward(interpret, cfg, u, delta, A, B, C, D, delta_bias, dt_weight, ...)
    monkeypatch.setattr(kernels, "_forward", lambda *a: seen.append(a[9]) or real(*a))
    u, _, a, b, c, d, bias, orders = make_inputs(9, 1, 2, 3, 16, 1)
    dt = dt_operands(10, 1, 6, 16, 3, integer=False)
    config = CrossScanConfig(16, 1, 2, unroll=1, prefetch=False, dt_on_chip=False)
    y = cross_scan_merge(u, dt["delta"], a, b, c, d, bias, orders, dt_weight=dt["dt_weight"],
                         interpret=INTERPRET, config=config)
    assert seen == [None]  # no dt_weight reached the kernel
    assert_close(y, reference(u, full_delta(**dt), a, b, c, d, bias, orders), 1e-5)


def test_trainable_gradients_with_dt_proj_on_chip():
    """Gradients for dt_proj's input and weight (and the rest) through the kernel's VJP equal
    jax.grad through the reference."""
    u, _, a, b, c, d, bias, orders = make_inputs(11, 1, 2, 3, 16, 1)
    dt = dt_operands(12, 1, 6, 16, 3, integer=False)
    probe = jnp.asarray(np.random.default_rng(13).normal(size=u.shape), jnp.float32)
    kernel = functools.partial(cross_scan_merge, interpret=INTERPRET, config=CrossScanConfig(16, 1, 2))

    def loss(fn):
        def value(u, delta, w, a, bias):
            return jnp.sum(probe * fn(u, delta, a, b, c, d, bias, orders, dt_weight=w))
        return value

    args = (u, dt["delta"], dt["dt_weight"], a, bias)
    value, g = jax.value_and_grad(loss(kernel), argnums=tuple(range(5)))(*args)
    value_ref, g_ref = jax.value_and_grad(loss(reference), argnums=tuple(range(5)))(*args)
    np.testing.assert_allclose(float(value), float(value_ref), rtol=1e-5)
    for got, want in zip(g, g_ref, strict=True):
        assert got.shape == want.shape
        assert_close(got, want, 1e-5)


def test_stack_dt_keeps_operands_of_one_form_and_multiplies_out_the_rest():
    """Four float dt_proj operands stack into one K-leading LinearOperands (what the kernel takes);
    a mix of forms (a layer's output beside operands, or operands with and without steps) becomes
    one fp32 Δ; either way the scan gets the same function."""
    from pallas_kernels.qlinear import LinearOperands

    u, _, a, b, c, d, bias, orders = make_inputs(14, 1, 2, 3, 16, 1)
    dt = dt_operands(15, 1, 6, 16, 3, integer=False)
    ops = [LinearOperands(dt["delta"][k], dt["dt_weight"][k], bias=bias[k]) for k in range(4)]
    want = reference(u, full_delta(**dt), a, b, c, d, bias, orders)
    scan = lambda delta: cross_scan_ops.cross_scan_merge(u, delta, a, b, c, d, None, orders, backend="ref")
    stacked = cross_scan_ops.stack_dt(ops)
    assert isinstance(stacked, LinearOperands)
    assert stacked.w.shape == (4, 3, 16) and stacked.bias.shape == (4, 16)
    assert_close(scan(stacked), want, 1e-5)
    unit_steps = LinearOperands(ops[3].x, ops[3].w, col_scale=jnp.ones(16), bias=bias[3])
    delta = cross_scan_ops.stack_dt([ops[0].output(), *ops[1:3], unit_steps])
    assert not isinstance(delta, LinearOperands) and delta.shape == (4, 1, 6, 16)
    assert_close(scan(delta), want, 1e-5)
    with pytest.raises(ValueError, match="carry their own bias"):
        cross_scan_ops.cross_scan_merge(u, stacked, a, b, c, d, bias, orders, backend="ref")


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
    with pytest.raises(ValueError, match=r"dt_weight must have shape \(4, 2, 16\)"):
        cross_scan_merge(u, delta[..., :2], a, b, c, d, bias, orders, dt_weight=jnp.ones((4, 3, 16)),
                         interpret=True)
    with pytest.raises(ValueError, match="give dt_weight too"):
        cross_scan_merge(u, delta, a, b, c, d, bias, orders, dt_col_scale=jnp.ones((4, 16)), interpret=True)
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
    # An integer dt_proj on chip (R = 6: centred codes, weight codes, both steps).
    r = 6
    dt = {"dt_weight": s((k, r, e), jnp.float32), "dt_row_scale": s((k, seq), jnp.float32),
          "dt_col_scale": s((k, e), jnp.float32)}
    low_rank = s((k, batch, seq, r), jnp.float32)
    text = jax.jit(cross_scan_merge).trace(args[0], low_rank, *args[2:], **dt).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "ptq4vm_cross_scan" in text
    loss = lambda u, dt, a, b, c, d, o: jnp.sum(cross_scan_merge(u, dt, a, b, c, d, None, o))
    grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5)))
    text = grads.trace(*args[:6], args[7]).lower(lowering_platforms=("cuda",)).as_text()
    assert "ptq4vm_cross_scan" in text and "ptq4vm_selective_scan_bwd" in text
