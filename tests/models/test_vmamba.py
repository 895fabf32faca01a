"""VMamba structure: cross-scan order, token-major Dense layout, block-wise use, registry."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq4vm_jax import create_model
from ptq4vm_jax.models import canonical_name, model_family, param_shapes
from ptq4vm_jax.models.vmamba import (
    NUM_DIRECTIONS,
    Downsample,
    VMambaConfig,
    VSSBlock,
    cross_merge,
    cross_scan,
    vmamba_blockwise,
)


def random_params(model, seed: int = 0) -> dict:
    """Every parameter drawn off its init (no ones/zeros no-ops), without compiling ``init``."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "scale":
            return 1 + 0.3 * rng.standard_normal(shape, np.float32)
        if name in ("bias", "A_logs", "Ds"):
            return 0.3 * rng.standard_normal(shape, np.float32)
        return rng.standard_normal(shape, np.float32) / np.sqrt(np.prod(shape[:-1]))  # kernels

    shapes = param_shapes(model)
    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def micro():
    model = create_model("vmamba_micro")
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    return model, random_params(model), images


@pytest.fixture(scope="module")
def micro_calls(micro):
    return record_calls(*micro)


def record_calls(model, params, images):
    """(module path, input, output) of every Dense/Conv ``__call__`` in order, and the logits."""
    order: list[str] = []

    def run(p, x):
        calls = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
                path = "/".join(context.module.path)
                order.append(path)
                calls[path] = (args[0], out)
            return out

        with nn.intercept_methods(interceptor):
            return model.apply({"params": p}, x), calls

    logits, calls = jax.jit(run)(params, images)
    return [(path, *calls[path]) for path in order], logits


def test_cross_scan_puts_positions_in_scan_order():
    h, w = 3, 5  # non-square, so row- and column-major orders differ in length of runs
    marker = jnp.arange(h * w, dtype=jnp.float32).reshape(1, h, w, 1)  # value = row-major position
    rows = [r * w + c for r in range(h) for c in range(w)]
    cols = [r * w + c for c in range(w) for r in range(h)]
    want = [rows, cols, rows[::-1], cols[::-1]]
    got = cross_scan(marker)
    assert len(got) == NUM_DIRECTIONS
    for k in range(NUM_DIRECTIONS):
        assert got[k].shape == (1, h * w, 1)
        assert got[k][0, :, 0].astype(int).tolist() == want[k], f"direction {k}"


@pytest.mark.slow
def test_cross_merge_returns_each_direction_to_its_position():
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
    weights = (1.0, 10.0, 100.0, 1000.0)  # a mis-placed direction cannot cancel out
    merged = cross_merge([c * s for c, s in zip(weights, cross_scan(x), strict=True)], 3, 5)
    np.testing.assert_allclose(merged, sum(weights) * x.reshape(2, 15, 4), rtol=1e-6)


@pytest.mark.slow
def test_every_projection_is_a_token_major_dense(micro, micro_calls):
    model, params, _ = micro
    calls, logits = micro_calls
    calls = [c for c in calls if "conv" not in c[0]]
    assert logits.shape == (2, 10)
    cfg = model.cfg
    names = ["in_proj", *(f"{p}_{k}" for k in range(NUM_DIRECTIONS) for p in ("x_proj", "dt_proj")),
             "out_proj"]
    want = []
    for s, (h, w) in enumerate(cfg.stage_hw):
        for j in range(cfg.depths[s]):
            want += [(f"layers_{s}/blocks_{j}/op/{n}", h * w) for n in names]
            want += [(f"layers_{s}/blocks_{j}/mlp/{n}", h * w) for n in ("fc1", "fc2")]
    assert [c[0] for c in calls[:-1]] == [p for p, _ in want]  # 12 per block, in forward order
    for (path, x, _), (_, tokens) in zip(calls, want, strict=False):
        assert x.ndim == 3 and x.shape[:2] == (2, tokens), (path, x.shape)
    assert calls[-1][0] == "head"
    op = params["layers_0"]["blocks_0"]["op"]
    assert "bias" not in op["in_proj"] and "bias" not in op["out_proj"] and "bias" not in op["x_proj_0"]
    assert set(op["dt_proj_3"]) == {"kernel", "bias"}
    assert op["A_logs"].shape == (NUM_DIRECTIONS, 16, 1) and op["Ds"].shape == (NUM_DIRECTIONS, 16)


@pytest.mark.slow
def test_x_proj_k_and_dt_proj_k_see_direction_k_in_scan_order(micro, micro_calls):
    """A per-token scale of x_proj_k / dt_proj_k indexes the tokens of scan order k."""
    model = micro[0]
    calls = {path: (x, out) for path, x, out in micro_calls[0]}
    r = model.cfg.dt_rank(model.cfg.stage_dims[1])
    op = "layers_1/blocks_0/op/"
    act = jax.nn.silu(calls[op + "conv2d"][1])  # (B, H, W, E): what the scans read
    for k, seq in enumerate(cross_scan(act)):
        x_in, x_out = calls[op + f"x_proj_{k}"]
        np.testing.assert_allclose(x_in, seq, rtol=1e-6, atol=1e-6, err_msg=f"x_proj_{k}")
        np.testing.assert_allclose(calls[op + f"dt_proj_{k}"][0], x_out[..., :r], rtol=1e-6,
                                   err_msg=f"dt_proj_{k}")


def test_blockwise_stages_are_blocks_then_downsample(micro):
    """Numerics: test_vmamba_golden runs the full-size models through these stages."""
    model, params, _ = micro
    cfg = model.cfg
    stages = vmamba_blockwise(model).stages
    want = []
    for s, dim in enumerate(cfg.stage_dims):
        want += [((f"layers_{s}", f"blocks_{j}"), VSSBlock(cfg, dim)) for j in range(cfg.depths[s])]
        if s + 1 < cfg.num_stages:
            want.append(((f"layers_{s}", "downsample"), Downsample(cfg, cfg.stage_dims[s + 1])))
    assert [(st.path, st.module) for st in stages] == want
    for st in stages:  # each stage's params subtree is exactly what its module declares
        node = params[st.path[0]][st.path[1]]
        x = jnp.zeros((1, 4, 4, cfg.stage_dims[int(st.path[0].removeprefix("layers_"))]))
        shapes = jax.eval_shape(st.module.init, jax.random.key(0), x)["params"]
        assert jax.tree_util.tree_map(jnp.shape, shapes) == jax.tree_util.tree_map(jnp.shape, node)


def test_registered_sizes_are_the_official_configs():
    official = {  # classification/configs/vssm/*.yaml and the vmamba_*_s*l* builders
        "vmamba_tiny": ((2, 2, 8, 2), 96, 1.0), "vmamba_small": ((2, 2, 20, 2), 96, 1.0),
        "vmamba_base": ((2, 2, 20, 2), 128, 1.0), "vmambav2_tiny_224": ((2, 2, 5, 2), 96, 2.0),
        "vmambav2_small_224": ((2, 2, 15, 2), 96, 2.0), "vmambav2_base_224": ((2, 2, 15, 2), 128, 2.0),
    }
    for name, (depths, dims, ratio) in official.items():
        c = create_model(name).cfg
        assert (c.depths, c.dims, c.ssm_ratio) == (depths, dims, ratio), name
        assert (c.img_size, c.patch_size, c.ssm_d_state, c.ssm_dt_rank, c.ssm_conv, c.ssm_conv_bias,
                c.mlp_ratio, c.num_classes) == (224, 4, 1, "auto", 3, False, 4.0, 1000), name
        assert model_family(name) == "vmamba"
    assert create_model("vmamba_tiny").cfg.stage_hw == ((56, 56), (28, 28), (14, 14), (7, 7))


@pytest.mark.parametrize("alias, name", [
    ("vmambav2v_tiny_224", "vmamba_tiny"), ("vmamba_small_s1l20", "vmamba_small"),
    ("vssm1_base_0229s", "vmamba_base"), ("vmamba_base_s2l15", "vmambav2_base_224"),
    ("vssm1_small_0229", "vmambav2_small_224"),
])
def test_official_names_are_aliases(alias, name):
    assert canonical_name(alias) == name
    assert create_model(alias).cfg == create_model(name).cfg


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="unknown VMamba argument.*embed_dim"):
        create_model("vmamba_tiny", embed_dim=96)
    with pytest.raises(ValueError, match="dims .* one width per stage"):
        VMambaConfig(dims=(16, 32), depths=(1, 1, 1))
    with pytest.raises(ValueError, match="ssm_conv must be an odd kernel size"):
        VMambaConfig(ssm_conv=4)
    with pytest.raises(ValueError, match="ssm_dt_rank must be 'auto' or a positive int"):
        VMambaConfig(ssm_dt_rank="big")
    for bad, message in ((dict(dims=-16), "dims must be a positive int or one per stage, got -16"),
                         (dict(dims="96"), "dims must be a positive int or one per stage, got '96'"),
                         (dict(depths=2), "depths must be positive ints, one per stage, got 2"),
                         (dict(depths=[2, 0]), r"depths must be positive ints, one per stage, got \(2, 0\)"),
                         (dict(ssm_ratio=0), "ssm_ratio must be a number > 0, got 0"),
                         (dict(mlp_ratio=-1.0), "mlp_ratio must be a number > 0, got -1.0"),
                         (dict(num_classes=0), "num_classes must be a positive int, got 0"),
                         (dict(img_size=224.0), "img_size must be a positive int, got 224.0"),
                         (dict(ssm_d_state=0), "ssm_d_state must be a positive int, got 0")):
        with pytest.raises(ValueError, match="invalid VMamba config: " + message):
            create_model("vmamba_micro", **bad)
    listed = create_model("vmamba_micro", depths=[1, 1, 2, 1], dims=[16, 32, 64, 128]).cfg
    assert (listed.depths, listed.dims) == ((1, 1, 2, 1), (16, 32, 64, 128))
    model = create_model("vmamba_micro")
    with pytest.raises(ValueError, match=r"NHWC images of shape \(batch, 32, 32, 3\).*channels-first"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 3, 32, 32)))
    with pytest.raises(ValueError, match=r"NHWC images of shape \(batch, 32, 32, 3\).*img_size"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 16, 16, 3)))
