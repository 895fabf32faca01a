"""QuantizedParams' layers: the typed layer <-> the per-layer arrays of a checkpoint, and the
abstract checkpoint tree from jax.eval_shape of the finalize step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.qlinear import QuantizedLinear
from ptq4vm_jax import create_model
from ptq4vm_jax.api import quantize_params
from ptq4vm_jax.quant.config import QuantConfig
from ptq4vm_jax.quant.params import (
    abstract_checkpoint,
    flatten_layers,
    from_arrays,
    layers_from_arrays,
    layers_to_arrays,
    to_arrays,
)

MODEL = "vim_nano"


@pytest.fixture(scope="module")
def rtn(init_params):
    model = create_model(MODEL)
    images = np.asarray(jax.random.normal(jax.random.key(0), (4, 32, 32, 3)))
    params = init_params(model, 1)
    cfg = QuantConfig(4, 8, method="rtn", num_calib=4, train_batch=4)
    return quantize_params(params, images, model=MODEL, config=cfg, progress=False, log=lambda _: None)


def test_a_layer_round_trips_through_its_arrays(rtn):
    layers = flatten_layers(rtn.qlayers)
    assert len(layers) == 12 and all(isinstance(v, QuantizedLinear) for v in layers.values())
    for path, layer in layers.items():
        arrays = to_arrays(layer)
        assert set(arrays) == {"w_int", "w_scale", "smooth", "a_scale", "a_zero"} | (
            {"bias"} if layer.bias is not None else set()), path
        back = from_arrays(arrays, 4, 8)
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(layer)
        jax.tree.map(np.testing.assert_array_equal, back, layer)
    tree = layers_to_arrays(rtn.qlayers)
    assert isinstance(tree["layers_0"]["mixer"]["in_proj"], dict)
    again = layers_from_arrays(tree, 4, 8)
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(rtn.qlayers)


def test_abstract_checkpoint_is_what_saving_writes(rtn):
    tokens = {p: layer.a_scale.shape[0] for p, layer in flatten_layers(rtn.qlayers).items()}
    got = abstract_checkpoint(MODEL, {}, tokens, rtn.config)
    want = jax.eval_shape(lambda: {"params": rtn.params, "qlayers": layers_to_arrays(rtn.qlayers)})
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert (g.shape, g.dtype) == (w.shape, w.dtype)
    dt_proj = got["qlayers"]["layers_0"]["mixer"]["dt_proj"]  # K = dt_rank: odd, packed with a zero row
    k = rtn.qlayers["layers_0"]["mixer"]["dt_proj"].in_features
    assert dt_proj["w_int"].dtype == jnp.int8 and dt_proj["w_int"].shape[0] == (k + 1) // 2
    # Another bit width gives another tree (in_proj: K = 32, N = 128).
    eight = abstract_checkpoint(MODEL, {}, tokens, QuantConfig(8, 8))
    assert eight["qlayers"]["layers_0"]["mixer"]["in_proj"]["w_int"].shape == (32, 128)
    assert got["qlayers"]["layers_0"]["mixer"]["in_proj"]["w_int"].shape == (16, 128)


def test_abstract_checkpoint_refuses_paths_that_are_no_linear_layer(rtn):
    with pytest.raises(ValueError, match="layers_9/mixer/in_proj does not exist in vim_nano"):
        abstract_checkpoint(MODEL, {}, {("layers_9", "mixer", "in_proj"): 17}, rtn.config)
    with pytest.raises(ValueError, match="layers_0/norm in vim_nano is not a linear layer"):
        abstract_checkpoint(MODEL, {}, {("layers_0", "norm"): 17}, rtn.config)
