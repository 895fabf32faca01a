"""The lax.scan reference of the selective scan: its hand-written gradient against jax's own
differentiation of the same recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ptq4vm_jax.ops.scan import selective_scan_ref

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def autodiff_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, reverse=False):
    """The S6 recurrence as one plain ``lax.scan``, differentiated by jax itself."""
    dt = delta.astype(jnp.float32) + (0.0 if delta_bias is None else delta_bias.astype(jnp.float32))
    dt = jax.nn.softplus(dt) if delta_softplus else dt
    u32, A32 = u.astype(jnp.float32), A.astype(jnp.float32)

    def step(h, inp):
        dt_t, u_t, b_t, c_t = inp
        h = jnp.exp(dt_t[:, :, None] * A32) * h + (dt_t * u_t)[:, :, None] * b_t[:, None, :]
        return h, jnp.einsum("ben,bn->be", h, c_t, precision=lax.Precision.HIGHEST)

    xs = tuple(jnp.swapaxes(t.astype(jnp.float32), 0, 1) for t in (dt, u32, B, C))
    h0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), jnp.float32)
    y = jnp.swapaxes(lax.scan(step, h0, xs, reverse=reverse)[1], 0, 1)
    y = y if D is None else y + u32 * D.astype(jnp.float32)
    y = y if z is None else y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(u.dtype)


def inputs(seed, batch, seq, e, n, dtype=jnp.float32):
    """A < 0 and softplus(delta) around 0.1..1, as in Mamba; numpy, not one compiled jax.random
    program per shape."""
    draw = np.random.default_rng(seed).standard_normal
    x = lambda *shape, scale=1.0, shift=0.0: jnp.asarray(scale * draw(shape, np.float32) + shift, dtype)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return dict(u=x(batch, seq, e), delta=x(batch, seq, e, scale=0.5, shift=-1.0),
                A=f32(-np.exp(0.5 * draw((e, n), np.float32))), B=x(batch, seq, n), C=x(batch, seq, n),
                D=f32(draw(e, np.float32)), z=x(batch, seq, e), delta_bias=f32(0.2 * draw(e, np.float32)))


def value_and_grads(fn, inp, softplus, reverse):
    used = tuple(k for k in ARGS if inp[k] is not None)
    w = np.random.default_rng(1).standard_normal(inp["u"].shape, np.float32)

    def loss(*xs):
        y = fn(**{**inp, **dict(zip(used, xs, strict=True))}, delta_softplus=softplus, reverse=reverse)
        return jnp.sum(w * jnp.tanh(y.astype(jnp.float32)))

    value, g = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(used)))))(*(inp[k] for k in used))
    return value, dict(zip(used, g, strict=True))


# (batch, seq, E, N, use D/z/delta_bias, softplus, reverse): Vim's two branches, VMamba's d_state 1.
CASES = [(2, 19, 24, 16, True, True, False), (2, 19, 24, 16, True, True, True),
         (3, 11, 8, 1, False, False, True), (1, 7, 5, 3, False, True, False)]


@pytest.mark.parametrize("batch,seq,e,n,extras,softplus,reverse", CASES)
def test_gradients_equal_autodiff_of_the_recurrence(batch, seq, e, n, extras, softplus, reverse):
    inp = inputs(seq + e + n, batch, seq, e, n)
    if not extras:
        inp.update(D=None, z=None, delta_bias=None)
    if not softplus:  # a ready step size: positive, so the state decays
        inp["delta"] = jax.nn.softplus(inp["delta"])
    y = selective_scan_ref(**inp, delta_softplus=softplus, reverse=reverse)
    np.testing.assert_array_equal(y, autodiff_scan(**inp, delta_softplus=softplus, reverse=reverse))
    value, g = value_and_grads(selective_scan_ref, inp, softplus, reverse)
    value_ad, g_ad = value_and_grads(autodiff_scan, inp, softplus, reverse)
    np.testing.assert_allclose(float(value), float(value_ad), rtol=1e-6)
    for k, ref in g_ad.items():
        assert g[k].shape == ref.shape and g[k].dtype == ref.dtype, k
        scale = float(jnp.abs(ref).max())
        assert scale > 0, k
        np.testing.assert_allclose(g[k], ref, rtol=2e-5, atol=2e-5 * scale, err_msg=k)


def test_gradients_vmapped_over_directions_and_in_bf16():
    """VMamba vmaps the scan over its directions; bf16 inputs get bf16 gradients."""
    dirs = [inputs(10 + k, 2, 9, 16, 1, jnp.bfloat16) for k in range(4)]
    stacked = tuple(jnp.stack([d[k] for d in dirs]) for k in ("u", "delta", "A", "B", "C", "D"))
    w = np.random.default_rng(3).standard_normal(stacked[0].shape, np.float32)

    def loss(fn):
        scan = lambda u, delta, A, B, C, D: fn(u, delta, A, B, C, D=D)
        return lambda *xs: jnp.sum(w * jax.vmap(scan)(*xs).astype(jnp.float32))

    g = jax.grad(loss(selective_scan_ref), argnums=tuple(range(6)))(*stacked)
    g_ad = jax.grad(loss(autodiff_scan), argnums=tuple(range(6)))(*stacked)
    for x, gk, ref in zip(stacked, g, g_ad, strict=True):
        assert gk.dtype == x.dtype
        np.testing.assert_allclose(np.asarray(gk, np.float32), np.asarray(ref, np.float32), rtol=2e-2,
                                   atol=2e-2 * float(jnp.abs(ref.astype(jnp.float32)).max()))
