import jax
import jax.numpy as jnp
import pytest

from ptq4vm_jax import create_model
from ptq4vm_jax.models import canonical_name, param_shapes, registry


@pytest.mark.slow
def test_vim_micro_forward_shapes(init_params):
    model = create_model("vim_micro")
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    params = init_params(model, 1)
    logits = model.apply({"params": params}, x)
    assert logits.shape == (2, 10)
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert params["pos_embed"].shape == (1, 65, 48)


def test_official_names_are_aliases():
    long = "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
    assert canonical_name(long) == "vim_small"


def test_wrong_model_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model name 'vim_huge'.*vim_tiny"):
        create_model("vim_huge")


def test_unknown_override_is_rejected():
    with pytest.raises(ValueError, match="unknown Vim argument"):
        create_model("vim_tiny", embed_dims=3)


@pytest.mark.parametrize("overrides,message", [
    (dict(embed_dim=0), "embed_dim must be a positive int, got 0"),
    (dict(patch_size=0), "patch_size must be a positive int"),
    (dict(img_size=4, patch_size=8, stride=8), "patch_size 8 is larger than img_size 4"),
    (dict(depth=2.5), "depth must be a positive int"),
])
def test_invalid_sizes_are_explained(overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model("vim_micro", **overrides)


def test_wrong_image_size_is_explained():
    model = create_model("vim_micro")
    with pytest.raises(ValueError, match="NHWC images of shape"):
        model.init(jax.random.key(0), jnp.ones((1, 3, 32, 32)))


def test_param_shapes_are_the_initialised_ones_traced_once_per_model(init_params):
    model = create_model("vim_nano")
    params = init_params(model, 1)
    shapes = param_shapes(model)
    spec = lambda a: (a.shape, a.dtype)
    assert jax.tree.map(spec, shapes) == jax.tree.map(spec, params)
    hits = registry._traced_param_shapes.cache_info().hits
    shapes["layers_0"].clear()  # each call has its own dicts
    again = param_shapes(create_model("vim_nano"))  # an equal model: no second trace
    assert registry._traced_param_shapes.cache_info().hits == hits + 1
    assert jax.tree.map(spec, again) == jax.tree.map(spec, params)
    wider = param_shapes(create_model("vim_nano", embed_dim=40))
    assert wider["pos_embed"].shape[-1] == 40


def test_dense_paths_are_every_linear_traced_once_per_model_and_params_layout(init_params):
    """The Dense call sites of a real forward; one abstract trace serves every equal model with
    params of the same layout."""
    import flax.linen as nn
    import numpy as np

    from ptq4vm_jax import api
    from ptq4vm_jax.models import image_shape

    model = create_model("vim_nano")
    params = init_params(model, 1)
    called = set()

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
            called.add(tuple(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply({"params": params}, np.zeros(image_shape(model), np.float32))
    paths = api.dense_paths(model, params, image_shape(model))
    assert paths == sorted(called) and len(called) > 4
    misses = api._traced_dense_paths.cache_info().misses
    paths.clear()  # each call has its own list
    numpy_params = jax.tree.map(np.asarray, params)  # the same layout, other arrays: no second trace
    assert api.dense_paths(create_model("vim_nano"), numpy_params, image_shape(model)) == sorted(called)
    assert api._traced_dense_paths.cache_info().misses == misses
    wider = create_model("vim_nano", embed_dim=40)
    assert api.dense_paths(wider, init_params(wider, 1), image_shape(wider)) == sorted(called)
    assert api._traced_dense_paths.cache_info().misses == misses + 1


def test_a_resized_model_is_labelled_with_its_sizes():
    """Output names a resized model with the sizes it was built with, never as the stock one; the
    run-time choices (dtype, scan) are not sizes."""
    import jax.numpy as jnp

    from ptq4vm_jax.models import model_label

    runtime = {"scan": "ref", "dtype": jnp.bfloat16}
    assert model_label("vim_tiny") == model_label("vim_tiny", runtime) == "vim_tiny"
    assert model_label("vim_tiny", {"embed_dim": 48, "depth": 4}) == "vim_tiny (depth=4, embed_dim=48)"
    assert model_label("vim_tiny", {"embed_dim": 192, "depth": 4}) == "vim_tiny (depth=4)"  # stock: left out
