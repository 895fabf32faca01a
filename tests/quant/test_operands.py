"""A linear handed to its consumer's kernel as operands (``OperandDense``, ``intercept_dense``):
the float layer's operands give the Dense's output, a stored layer's give the quantized layer's
output to the last bit, and calibration's train form hands over its output."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ptq4vm_jax as pq
from pallas_kernels.qlinear import LinearOperands, QuantizedLinear, pack_weight
from ptq4vm_jax.models.layers import OperandDense, dense, operand_dense
from ptq4vm_jax.ops.mixer import mixer_direction
from ptq4vm_jax.quant.layer import (
    TrainLinear,
    integer_operands,
    intercept_dense,
    qlinear,
    simulate_int_linear,
)

STATIC = pq.QuantConfig(8, 8, method="pts_only")


def stored_layer(rng: np.random.Generator, k: int, n: int, seq: int, w_bits: int,
                 a_bits: int) -> QuantizedLinear:
    top = 2**a_bits - 1
    w_max = 2 ** (w_bits - 1)
    codes = jnp.asarray(rng.integers(-w_max + 1, w_max, (k, n)), jnp.int8)
    return QuantizedLinear(
        w_int=pack_weight(codes, w_bits), w_scale=jnp.asarray(rng.uniform(1e-3, 4e-3, n), jnp.float32),
        smooth=jnp.asarray(rng.uniform(0.5, 2.0, k), jnp.float32),
        a_scale=jnp.asarray(rng.uniform(2.0, 4.0, seq) / top, jnp.float32),
        a_zero=jnp.asarray(rng.integers(top // 3, 2 * top // 3, seq), jnp.int32),
        bias=jnp.asarray(rng.normal(size=n), jnp.float32), w_bits=w_bits, a_bits=a_bits)


def delta_of(ops: LinearOperands) -> jax.Array:
    """What the mixer kernel computes from them before softplus (its jnp form, plus the bias)."""
    d = mixer_direction(jnp.zeros((4, ops.w.shape[1])), jnp.zeros(ops.w.shape[1]), ops, None, None,
                        None, None)
    return d.full_delta() + d.delta_bias


@pytest.mark.parametrize("k,w_bits,a_bits", [(12, 8, 8), (7, 4, 4), (48, 4, 8)])
def test_integer_operands_give_the_stored_layer_to_the_last_bit(k, w_bits, a_bits):
    """Centred codes times weight codes, scaled per token then per channel, plus the bias:
    ``simulate_int_linear`` (fake mode's stored layer, equal to integer inference) bit for bit,
    packed int4 weights with an odd K included."""
    rng = np.random.default_rng(k)
    seq, n = 9, 40
    layer = stored_layer(rng, k, n, seq, w_bits, a_bits)
    x = jnp.asarray(rng.normal(size=(3, seq, k)), jnp.float32)
    ops = jax.jit(integer_operands)(x, layer)
    assert ops.w.shape == (k, n) and ops.row_scale.shape == (seq,)
    assert np.all(np.asarray(ops.x) == np.round(np.asarray(ops.x)))  # integers, exact in fp32
    want = jax.jit(simulate_int_linear)(x, layer)
    np.testing.assert_array_equal(np.asarray(jax.jit(delta_of)(ops)), np.asarray(want))


def test_integer_operands_refuse_a_flat_input():
    layer = stored_layer(np.random.default_rng(0), 4, 8, 5, 8, 8)
    with pytest.raises(ValueError, match=r"\(B, L, K\)"):
        integer_operands(jnp.zeros((5, 4)), layer)


def model(dtype, operands: bool) -> nn.Module:
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return (operand_dense if operands else dense)(dtype, 16, True, "proj")(x)

    return Net()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_operand_dense_has_the_dense_parameters_and_its_operands_give_its_output(dtype):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 8)), dtype)
    params = model(dtype, True).init(jax.random.key(0), x)
    ref_params = model(dtype, False).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref_params)
    np.testing.assert_array_equal(params["params"]["proj"]["kernel"], ref_params["params"]["proj"]["kernel"])
    ops = model(dtype, True).apply(params, x)
    assert isinstance(ops, LinearOperands) and ops.x.dtype == ops.w.dtype == jnp.dtype(dtype)
    y = model(dtype, False).apply(params, x)
    got = jnp.einsum("blk,kn->bln", ops.x.astype(jnp.float32), ops.w.astype(jnp.float32)) + ops.bias
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(y, np.float32),
                               rtol=1e-5 if dtype == jnp.float32 else 2e-2, atol=1e-5)
    assert issubclass(OperandDense, nn.Dense)  # every observer of Dense calls sees it


@pytest.mark.parametrize("mode", ["fake", "int"])
def test_interception_hands_a_stored_layers_integer_operands_in_both_modes(mode):
    """The same integer operands in fake and integer mode, so integer inference through the
    consumer's kernel equals fake-quant through it."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    net = model(jnp.float32, True)
    params = net.init(jax.random.key(0), x)
    layer = stored_layer(rng, 8, 16, 5, 8, 8)
    with intercept_dense({"proj": layer}, STATIC, mode):
        ops = net.apply(params, x)
    assert isinstance(ops, LinearOperands)
    for got, ref in zip(jax.tree.leaves(ops), jax.tree.leaves(integer_operands(x, layer)), strict=True):
        np.testing.assert_array_equal(got, ref)


def test_interception_hands_calibrations_train_form_as_its_output():
    """A layer being calibrated (learnable scales, float kernel) cannot be taken apart into
    integer operands: the kernel gets its fake-quant output, with the gradients of ``qlinear``."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    net = model(jnp.float32, True)
    params = net.init(jax.random.key(0), x)
    stored = stored_layer(rng, 8, 16, 5, 8, 8)
    train = TrainLinear(kernel=params["params"]["proj"]["kernel"], smooth=stored.smooth,
                        w_scale=jnp.full(16, 0.01), a_scale=stored.a_scale, a_zero=stored.a_zero,
                        bias=params["params"]["proj"]["bias"])

    def run(layer):
        with intercept_dense({"proj": layer}, STATIC, "fake"):
            return net.apply(params, x)

    np.testing.assert_array_equal(run(train), qlinear(x, train, STATIC, "fake"))
    with_step = lambda s: dataclasses.replace(train, a_scale=s)
    grads = jax.grad(lambda s: jnp.sum(run(with_step(s)) ** 2))(train.a_scale)
    want = jax.grad(lambda s: jnp.sum(qlinear(x, with_step(s), STATIC, "fake") ** 2))(train.a_scale)
    np.testing.assert_array_equal(grads, want)
    assert np.abs(np.asarray(grads)).max() > 0


def test_interception_hands_dynamic_activation_layers_as_their_output():
    """``per_token_dynamic`` quantizes each input by its own range at run time: no static steps
    to hand a kernel, so the layer's fake-quant output goes instead."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    net = model(jnp.float32, True)
    params = net.init(jax.random.key(0), x)
    layer = stored_layer(rng, 8, 16, 5, 8, 8)
    dynamic = pq.QuantConfig(8, 8, method="per_token_dynamic")
    with intercept_dense({"proj": layer}, dynamic, "fake"):
        y = net.apply(params, x)
    assert not isinstance(y, LinearOperands)
    np.testing.assert_array_equal(y, qlinear(x, layer, dynamic, "fake"))
