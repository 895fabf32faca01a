"""Quantized Orbax checkpoints: bit-identical round trips, packed 4-bit, validation, size."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from ptq4vm_jax import (
    CheckpointError,
    QuantConfig,
    create_model,
    load_params,
    load_quantized,
    quantize_params,
    quantized_apply,
    save_params,
    save_quantized,
)

MODEL = "vim_nano"


@pytest.fixture(scope="module")
def model_params_images():
    model = create_model(MODEL)
    images = np.asarray(jax.random.normal(jax.random.key(0), (8, 32, 32, 3)))
    params = model.init(jax.random.key(1), images[:1])["params"]
    return model, params, images


@pytest.fixture(scope="module", params=[(8, 8), (6, 6), (4, 8), (4, 4)],
                ids=["w8a8", "w6a6", "w4a8", "w4a4"])
def qparams(request, model_params_images):
    _, params, images = model_params_images
    w, a = request.param
    cfg = QuantConfig(w_bits=w, a_bits=a, method="pts_only", num_calib=8)
    return quantize_params(params, images, model=MODEL, config=cfg, progress=False)


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_round_trip_gives_bit_identical_outputs(qparams, model_params_images, tmp_path):
    model, _, images = model_params_images
    save_quantized(tmp_path / "q", qparams)
    back = load_quantized(tmp_path / "q")
    assert back.config == qparams.config and back.model_name == MODEL
    assert back.summary == qparams.summary
    for mode in ("fake", "int"):
        a = np.asarray(quantized_apply(model, qparams, images, mode=mode))
        b = np.asarray(quantized_apply(model, back, images, mode=mode))
        np.testing.assert_array_equal(a, b)


def test_int_mode_matches_fake_mode(qparams, model_params_images):
    model, _, images = model_params_images
    fake = np.asarray(quantized_apply(model, qparams, images, mode="fake"))
    real = np.asarray(quantized_apply(model, qparams, images, mode="int"))
    assert np.abs(fake - real).max() <= 1e-3 * np.abs(fake).max()


def test_four_bit_weights_are_packed(qparams):
    layer = qparams.qlayers["layers_0"]["mixer"]["in_proj"]
    k = layer["smooth"].shape[0]
    rows = layer["w_int"].shape[0]
    assert rows == ((k + 1) // 2 if qparams.config.w_bits == 4 else k)


def test_metadata_describes_the_layout(qparams, tmp_path):
    meta = save_quantized(tmp_path / "q", qparams)
    on_disk = json.loads((tmp_path / "q" / "metadata.json").read_text())
    assert on_disk["format"] == "ptq4vm-jax/quantized" and on_disk["format_version"] == 1
    assert on_disk["config"]["w_bits"] == qparams.config.w_bits
    layer = on_disk["layers"]["layers_1/mixer/dt_proj"]
    assert layer["a_zero"] == [[17], "int32"] and layer["w_int"][1] == "int8"
    assert meta["model_name"] == MODEL


def test_loading_explains_what_is_wrong(qparams, model_params_images, tmp_path):
    _, params, _ = model_params_images
    save_params(tmp_path / "float", params, model_name=MODEL)
    with pytest.raises(CheckpointError, match="load it with ptq4vm_jax.checkpoint.load_params"):
        load_quantized(tmp_path / "float")
    save_quantized(tmp_path / "q", qparams)
    with pytest.raises(CheckpointError, match="load_quantized"):
        load_params(tmp_path / "q")
    meta_path = tmp_path / "q" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        load_quantized(tmp_path / "q")
    meta_path.write_text(json.dumps({**meta, "model_name": "vim_micro"}))
    with pytest.raises(CheckpointError, match="vim_micro"):
        load_quantized(tmp_path / "q")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(tmp_path / "nothing")


def test_corrupt_values_are_refused(qparams, tmp_path):
    bad_layer = dict(qparams.qlayers["layers_0"]["mixer"]["out_proj"])
    bad_layer["a_zero"] = bad_layer["a_zero"].at[0].set(-3)
    qlayers = jax.tree.map(lambda a: a, qparams.qlayers)
    qlayers["layers_0"]["mixer"]["out_proj"] = bad_layer
    save_quantized(tmp_path / "bad", dataclasses.replace(qparams, qlayers=qlayers))
    with pytest.raises(CheckpointError, match="layers_0/mixer/out_proj/a_zero must lie in"):
        load_quantized(tmp_path / "bad")


def test_out_of_range_weight_codes_are_refused(qparams, tmp_path):
    """One code just outside [-qmax, qmax]; for packed 4-bit weights a low nibble of -8."""
    w_bits = qparams.config.w_bits
    bad_code = 8 if w_bits <= 4 else (-128 if w_bits == 8 else 2 ** (w_bits - 1))
    qlayers = jax.tree.map(lambda a: a, qparams.qlayers)
    layer = dict(qlayers["layers_1"]["mixer"]["in_proj"])
    layer["w_int"] = layer["w_int"].at[2, 3].set(bad_code)
    qlayers["layers_1"]["mixer"]["in_proj"] = layer
    save_quantized(tmp_path / "bad", dataclasses.replace(qparams, qlayers=qlayers))
    with pytest.raises(CheckpointError, match=f"in_proj/w_int must lie in .* for {w_bits}-bit"):
        load_quantized(tmp_path / "bad")


def test_vim_tiny_w8a8_checkpoint_is_well_under_half_the_float_size(tmp_path):
    model = create_model("vim_tiny")
    images = np.asarray(jax.random.normal(jax.random.key(0), (2, 224, 224, 3)))
    params = jax.jit(model.init)(jax.random.key(1), images[:1])["params"]
    cfg = QuantConfig(w_bits=8, a_bits=8, method="rtn", num_calib=2)
    qp = quantize_params(params, images, model="vim_tiny", config=cfg, progress=False)
    save_params(tmp_path / "float", params, model_name="vim_tiny")
    save_quantized(tmp_path / "w8a8", qp)
    ratio = _dir_bytes(tmp_path / "w8a8") / _dir_bytes(tmp_path / "float")
    assert ratio < 0.4, ratio
