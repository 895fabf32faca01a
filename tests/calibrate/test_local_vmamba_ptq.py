"""PTQ4VM on LocalVMamba, on the untrained ``local_vmamba_micro`` (two stages whose windowed
scans pad their grids): per-direction scales in each direction's own padded scan order, the
default placement, the CLI, integer == fake, and the checkpoint round trip.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq4vm_jax import create_model, load_quantized, quantize_params, save_quantized
from ptq4vm_jax.api import quantized_apply, quantized_layers
from ptq4vm_jax.checkpoint import abstract_params, save_params
from ptq4vm_jax.cli.app import main
from ptq4vm_jax.data import load_digits_dataset
from ptq4vm_jax.quant import init as qinit
from ptq4vm_jax.quant.config import DEFAULT_RULES, QuantConfig
from ptq4vm_jax.quant.params import to_arrays
from ptq4vm_jax.trees import flatten_tree, unflatten_tree

# Calibration end to end through the CLI and the API (several seconds a test): the slow tier.
pytestmark = pytest.mark.slow

MODEL = "local_vmamba_micro"
# One stage (an 8x8 grid) of the micro model, for CI time: its block scans h, v_flip, w3 (the
# grid padded to 9x9) and w2_flip.
OVERRIDES = {"depths": (1,), "directions": (("h", "v_flip", "w3", "w2_flip"),)}
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
PAD = -1  # a padded cell in the orders below


def window_order(h: int, w: int, k: int) -> list[int]:
    """K x K windows in row order, row-major inside each; cells past the grid are padding."""
    order = []
    for gi in range(-(-h // k)):
        for gj in range(-(-w // k)):
            for i in range(gi * k, gi * k + k):
                for j in range(gj * k, gj * k + k):
                    order.append(i * w + j if i < h and j < w else PAD)
    return order


def direction_orders(directions: tuple[str, ...], h: int, w: int) -> list[list[int]]:
    """Each direction's token order (row-major token index, PAD for padding), written out from
    the official ``MultiScan``; all padded at the end to the longest, as the official code does."""
    orders = []
    for name in directions:
        base = name.removesuffix("_flip")
        if base == "h":
            order = list(range(h * w))
        elif base == "v":
            order = [i * w + j for j in range(w) for i in range(h)]
        else:
            order = window_order(h, w, int(base[1:]))
        orders.append(order[::-1] if name.endswith("_flip") else order)
    length = max(map(len, orders))
    return [o + [PAD] * (length - len(o)) for o in orders]


def gather(grid: np.ndarray, order: list[int]) -> np.ndarray:
    """(B, H, W, C) -> (B, L, C) in ``order``, zero tokens at the padding."""
    b, h, w, c = grid.shape
    cells = np.concatenate([grid.reshape(b, h * w, c), np.zeros((b, 1, c), grid.dtype)], axis=1)
    return cells[:, [t if t != PAD else h * w for t in order]]


def seeded_params(seed: int) -> dict:
    """Untrained weights drawn in NumPy (no compiled init): Mamba's A = -(1..N), D = 1 and
    softplus(dt bias) = 0.01, LayerNorms at identity, every other tensor N(0, 1/fan_in)."""
    rng = np.random.default_rng(seed)
    drawn = {}
    for path, leaf in flatten_tree(abstract_params(MODEL, **OVERRIDES)).items():
        shape, name = tuple(leaf.shape), path.split("/")[-1]
        if name == "A_logs":
            value = np.log(np.broadcast_to(np.arange(1, shape[-1] + 1), shape))
        elif name == "Ds" or (name == "scale"):
            value = np.ones(shape)
        elif name == "bias" and "dt_proj" in path:
            value = np.full(shape, np.log(np.expm1(0.01)))
        elif name == "bias":
            value = np.zeros(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        drawn[path] = value.astype(np.float32)
    return unflatten_tree(drawn)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The model, its float params, and what `ptq4vm quantize` (W8A8, PTS init) wrote for it."""
    model = create_model(MODEL, **OVERRIDES)
    params = seeded_params(0)
    root = tmp_path_factory.mktemp("local_vmamba")
    save_params(root / "fp", params, model_name=MODEL, model_overrides=OVERRIDES)
    main(["quantize", "--params", str(root / "fp"), "--calib", "digits:train", "--num-calib", "16",
          "--method", "pts_only", "--out", str(root / "q")])
    images = load_digits_dataset("train", image_size=32)[0][:16]
    return model, params, images, root


def test_direction_scales_come_from_each_directions_padded_scan_order(micro):
    """PTS init of x_proj_k: per-token statistics of the tokens in direction k's own order,
    padded cells (zero tokens) included at their positions (block 0: h, v_flip, w3 on 8x8
    padded to 9x9, w2_flip)."""
    model, params, images, root = micro
    qp = load_quantized(root / "q")

    def conv_out(x):
        got = {}

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if "/".join(context.module.path) == "layers_0/blocks_0/op/conv2d":
                got["out"] = out
            return out

        with nn.intercept_methods(record):
            model.apply({"params": params}, x)
        return got["out"]

    # (The lowest XLA optimisation level: the same function, compiled in a third of the time.)
    compiled = jax.jit(conv_out).lower(jnp.asarray(images)).compile(FAST_COMPILE)
    grid = np.asarray(jax.nn.silu(compiled(jnp.asarray(images))))
    (h, w), directions = model.cfg.stage_hw[0], model.cfg.directions[0]
    orders = direction_orders(directions, h, w)
    assert len(orders[0]) == 81 and orders[2].count(PAD) == 17  # w3 on 8x8 scans a 9x9 grid
    op = ("layers_0", "blocks_0", "op")
    layers = {p[-1]: to_arrays(v) for p, v in quantized_layers(qp).items() if p[:3] == op}
    for k in range(4):
        layer = layers[f"x_proj_{k}"]
        scales = [np.asarray(qinit.init_act_scale(gather(grid, o), layer["smooth"], 8)[0]) for o in orders]
        np.testing.assert_allclose(layer["a_scale"], scales[k], rtol=1e-5, err_msg=f"x_proj_{k}")
        for j in set(range(4)) - {k}:
            assert not np.allclose(scales[j], scales[k], rtol=1e-2), (k, j)


def test_cli_quantize_int_equals_fake_and_checkpoint_round_trips(micro, tmp_path):
    """`ptq4vm quantize` wrote the default placement with per-token scales over each stage's
    padded sequences; integer mode equals fake mode bit for bit, and a save/load round trip
    changes nothing."""
    model, params, _, root = micro
    qp = load_quantized(root / "q")
    assert qp.config.rules == DEFAULT_RULES["local_vmamba"] and qp.config.alpha == 0.65
    assert [s["name"] for s in qp.summary["stages"]] == ["layers_0/blocks_0"]
    layers = {"/".join(p): to_arrays(v) for p, v in quantized_layers(qp).items()}
    names = ("in_proj", *(f"{n}_{k}" for n in ("x_proj", "dt_proj") for k in range(4)), "out_proj")
    assert set(layers) == {f"layers_0/blocks_0/op/{n}" for n in names}
    # 64 tokens on the grid; the directions' sequences are 81 long (w3 pads the grid to 9x9).
    for path, layer in layers.items():
        want = 64 if path.endswith(("in_proj", "out_proj")) else 81
        assert layer["a_scale"].shape == (want,), path
        assert np.isfinite(layer["a_scale"]).all() and (layer["a_scale"] > 0).all(), path
    op = qp.params["layers_0"]["blocks_0"]["op"]
    assert {"attn", "conv2d", "out_norm", "A_logs", "Ds"} <= set(op) and "in_proj" not in op

    x = jnp.asarray(load_digits_dataset("test", image_size=32)[0][:8])
    want = np.asarray(quantized_apply(None, qp, x, mode="fake"))
    np.testing.assert_array_equal(np.asarray(quantized_apply(None, qp, x, mode="int")), want)

    save_quantized(tmp_path / "again", qp)
    back = load_quantized(tmp_path / "again")
    assert (back.model_name, back.model_overrides, back.config) == (qp.model_name, qp.model_overrides,
                                                                     qp.config)
    again = {"/".join(p): to_arrays(v) for p, v in quantized_layers(back).items()}
    assert again.keys() == layers.keys()
    for path in layers:
        for key in layers[path]:
            np.testing.assert_array_equal(again[path][key], layers[path][key], err_msg=f"{path} {key}")
    floats, floats_back = flatten_tree(qp.params), flatten_tree(back.params)
    assert floats.keys() == floats_back.keys()
    for path in floats:
        np.testing.assert_array_equal(floats_back[path], floats[path], err_msg=path)


def test_report_profiles_each_direction_in_its_padded_scan_order(micro, tmp_path):
    """`ptq4vm report` on the CLI's checkpoint with data: the block's out_proj and
    its four x_proj_k by default, each direction's stored a_scale laid on the grid through that
    direction's padded order (padding cells dropped), the float-vs-quantized numbers with data."""
    _, _, _, root = micro
    qp = load_quantized(root / "q")
    x_projs = [f"layers_0/blocks_0/op/x_proj_{k}" for k in range(4)]
    orders = direction_orders(OVERRIDES["directions"][0], 8, 8)
    out = tmp_path / "r"
    main(["report", "--quantized", str(root / "q"), "--out", str(out), "--params", str(root / "fp"),
          "--data", "digits:test", "--limit", "8"])
    report = json.loads((out / "report.json").read_text())
    assert list(report["layers"]) == ["layers_0/blocks_0/op/out_proj", *x_projs]
    assert report["directions"] == {"layers_0/blocks_0/op/x_proj": x_projs}
    figures = [f["file"] for f in report["figures"]]
    assert "directions_layers_0_blocks_0_op_x_proj.png" in figures
    assert all((out / f).stat().st_size > 0 for f in figures)
    for k, name in enumerate(x_projs):
        entry = report["layers"][name]
        stored = np.asarray(to_arrays(quantized_layers(qp)[tuple(name.split("/"))])["a_scale"])
        np.testing.assert_array_equal(np.asarray(entry["a_scale"], np.float32), stored)
        assert entry["order"]["grid"] == [8, 8] and entry["order"]["class_token_index"] is None
        want = np.full(64, np.nan)
        for position, token in enumerate(orders[k]):
            if token != PAD:
                want[token] = stored[position]
        np.testing.assert_array_equal(np.asarray(entry["a_scale_on_grid"], np.float64).ravel(), want)
    assert report["layers"]["layers_0/blocks_0/op/x_proj_2"]["order"]["direction"] == "3x3 windows (w3)"
    assert report["metrics"]["images"] == 8 and 0.0 <= report["metrics"]["agreement"] <= 100.0
    assert len(report["layer_error"]["layers"]) == 10 and "layer_error.png" in figures


def test_w4a8_with_jlss_through_the_api_learns_and_int_equals_fake(micro):
    """W4A8 PTQ4VM through ``quantize_params`` (JLSS: eight epochs of two mini-batches per block
    at the LocalVMamba recipe's learning rates, all three scale families learning): learning
    lowers the block loss below the PTS start and is kept (``revert_worse`` keeps the start
    whenever it does not, so a final loss no worse than the start holds by construction),
    4-bit weights are stored, and integer mode equals fake mode bit for bit."""
    model, params, images, _ = micro
    config = QuantConfig(4, 8, num_calib=16, train_batch=8, epochs=8)
    qp = quantize_params(params, images, model=MODEL, model_overrides=OVERRIDES, config=config,
                         progress=False)
    (stage,) = qp.summary["stages"]
    assert stage["name"] == "layers_0/blocks_0" and np.isfinite(stage["loss_init"])
    assert stage["loss_learned"] < stage["loss_init"] and not stage["reverted"], stage
    assert stage["loss_final"] == stage["loss_learned"]
    layers = {p[-1]: q for p, q in quantized_layers(qp).items()}
    assert {q.w_bits for q in layers.values()} == {4} and {q.a_bits for q in layers.values()} == {8}
    x = jnp.asarray(load_digits_dataset("test", image_size=32)[0][:8])
    fake = np.asarray(quantized_apply(None, qp, x, mode="fake"))
    np.testing.assert_array_equal(np.asarray(quantized_apply(None, qp, x, mode="int")), fake)
    assert np.isfinite(fake).all()
