"""Quantized Orbax checkpoints: bit-identical round trips, packed 4-bit, validation, size."""

import dataclasses
import json
import os
import shutil

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
from ptq4vm_jax.checkpoint.store import metadata_digest
from ptq4vm_jax.models import param_shapes

MODEL = "vim_nano"


@pytest.fixture(scope="module")
def model_params_images(init_params):
    model = create_model(MODEL)
    images = np.asarray(jax.random.normal(jax.random.key(0), (8, 32, 32, 3)))
    params = init_params(model, 1)
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.xla_optimized  # integer == fake holds under the compiler users run
def test_int_mode_matches_fake_mode(qparams, model_params_images):
    model, _, images = model_params_images
    fake = np.asarray(quantized_apply(model, qparams, images, mode="fake"))
    real = np.asarray(quantized_apply(model, qparams, images, mode="int"))
    assert np.abs(fake - real).max() <= 1e-3 * np.abs(fake).max()  # any device
    if jax.default_backend() == "cpu":
        # The CPU's XLA path sums the same integers and scales them in the simulation's order:
        # bit for bit there (GPU epilogues may fuse an FMA).
        np.testing.assert_array_equal(fake, real)


@pytest.mark.slow
def test_four_bit_weights_are_packed(qparams):
    layer = qparams.qlayers["layers_0"]["mixer"]["in_proj"]
    k = layer.smooth.shape[0]
    rows = layer.w_int.shape[0]
    assert rows == ((k + 1) // 2 if qparams.config.w_bits == 4 else k)


@pytest.mark.slow
def test_metadata_describes_the_layout(qparams, tmp_path):
    meta = save_quantized(tmp_path / "q", qparams)
    on_disk = json.loads((tmp_path / "q" / "metadata.json").read_text())
    assert on_disk["format"] == "ptq4vm-jax/quantized" and on_disk["format_version"] == 2
    assert len(on_disk["array_sha256"]["qlayers/layers_1/mixer/dt_proj/w_int"]) == 64
    assert on_disk["config"]["w_bits"] == qparams.config.w_bits
    layer = on_disk["layers"]["layers_1/mixer/dt_proj"]
    assert layer["a_zero"] == [[17], "int32"] and layer["w_int"][1] == "int8"
    assert meta["model_name"] == MODEL


@pytest.mark.slow
def test_loading_explains_what_is_wrong(qparams, model_params_images, tmp_path):
    _, params, _ = model_params_images
    save_params(tmp_path / "float", params, model_name=MODEL)
    with pytest.raises(CheckpointError, match="load it with ptq4vm_jax.checkpoint.load_params"):
        load_quantized(tmp_path / "float")
    save_quantized(tmp_path / "q", qparams)
    with pytest.raises(CheckpointError, match="load_quantized"):
        load_params(tmp_path / "q")
    meta_path = tmp_path / "q" / "metadata.json"
    sealed = json.loads(meta_path.read_text())
    edited = {**sealed, "config": {**sealed["config"], "method": "per_token_dynamic"}}
    meta_path.write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match="was changed after it was written"):
        load_quantized(tmp_path / "q")
    meta = {k: v for k, v in sealed.items() if k != "metadata_sha256"}
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        load_quantized(tmp_path / "q")
    meta_path.write_text(json.dumps(_sealed({**meta, "model_name": "vim_micro"})))
    with pytest.raises(CheckpointError, match="vim_micro"):
        load_quantized(tmp_path / "q")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(tmp_path / "nothing")


def test_arrays_that_differ_from_their_digest_are_refused_by_name(saved_w4a8, tmp_path):
    """The sealed metadata holds a sha256 per array: an array that does not match is never served."""
    def edit(meta):
        meta["array_sha256"]["qlayers/layers_0/mixer/out_proj/w_scale"] = "0" * 64
    path = _edited_copy(saved_w4a8, tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"q/params: the arrays qlayers/layers_0/mixer/out_proj/w_scale "
                                              r"differ from what was saved .*damaged"):
        load_quantized(path)
    shutil.rmtree(path)
    path = _edited_copy(saved_w4a8, tmp_path, lambda meta: meta.pop("array_sha256"))
    with pytest.raises(CheckpointError, match=r"version 2 records 'array_sha256', this file has none"):
        load_quantized(path)


@pytest.mark.slow
def test_corrupt_values_are_refused(qparams, tmp_path):
    layer = qparams.qlayers["layers_0"]["mixer"]["out_proj"]
    bad_layer = dataclasses.replace(layer, a_zero=layer.a_zero.at[0].set(-3))
    qlayers = jax.tree.map(lambda a: a, qparams.qlayers)
    qlayers["layers_0"]["mixer"]["out_proj"] = bad_layer
    save_quantized(tmp_path / "bad", dataclasses.replace(qparams, qlayers=qlayers))
    with pytest.raises(CheckpointError, match="layers_0/mixer/out_proj/a_zero must lie in"):
        load_quantized(tmp_path / "bad")


@pytest.mark.slow
def test_out_of_range_weight_codes_are_refused(qparams, tmp_path):
    """One code just outside [-qmax, qmax]; for packed 4-bit weights a low nibble of -8."""
    w_bits = qparams.config.w_bits
    bad_code = 8 if w_bits <= 4 else (-128 if w_bits == 8 else 2 ** (w_bits - 1))
    qlayers = jax.tree.map(lambda a: a, qparams.qlayers)
    layer = qlayers["layers_1"]["mixer"]["in_proj"]
    bad_w = layer.w_int.at[2, 3].set(bad_code)
    qlayers["layers_1"]["mixer"]["in_proj"] = dataclasses.replace(layer, w_int=bad_w)
    save_quantized(tmp_path / "bad", dataclasses.replace(qparams, qlayers=qlayers))
    with pytest.raises(CheckpointError, match=f"in_proj/w_int must lie in .* for {w_bits}-bit"):
        load_quantized(tmp_path / "bad")


@pytest.fixture(scope="module")
def saved_w4a8(tmp_path_factory, model_params_images):
    _, params, images = model_params_images
    cfg = QuantConfig(w_bits=4, a_bits=8, method="rtn", num_calib=8)
    path = tmp_path_factory.mktemp("saved") / "q"
    save_quantized(path, quantize_params(params, images, model=MODEL, config=cfg, progress=False))
    return path


def _set(key, value):
    return lambda meta: meta.update({key: value})


def _del(key):
    return lambda meta: meta.pop(key)


def _set_leaf(layer, leaf, value):
    return lambda meta: meta["layers"][layer].update({leaf: value})


IN_PROJ = "layers_0/mixer/in_proj"
BAD_METADATA = {  # edit of metadata.json -> what the error must say
    "layers-list": (_set("layers", []), r"'layers' must map each layer path to \{leaf: \[shape"),
    "layers-missing": (_del("layers"), r"'layers' must map each layer path .*got NoneType"),
    "layer-not-object": (lambda m: m["layers"].update({IN_PROJ: [[4], "int8"]}),
                         f"'layers' entry '{IN_PROJ}' must map leaf names"),
    "dtype-int99": (_set_leaf(IN_PROJ, "w_int", [[16, 128], "int99"]),
                    f"layer {IN_PROJ}/w_int: unknown dtype 'int99'"),
    "dtype-not-str": (_set_leaf(IN_PROJ, "w_int", [[16, 128], 8]), "dtype must be a dtype name, got 8"),
    "dtype-wrong-kind": (_set_leaf(IN_PROJ, "w_int", [[16, 128], "float32"]),
                         f"layer {IN_PROJ}/w_int has dtype float32, it must be int8"),
    "a_scale-int": (_set_leaf(IN_PROJ, "a_scale", [[17], "int32"]),
                    "a_scale has dtype int32, it must be floating"),
    "shape-float": (_set_leaf(IN_PROJ, "smooth", [[32.0], "float32"]),
                    r"smooth: shape must be a list of non-negative ints, got \[32.0\]"),
    "shape-negative": (_set_leaf(IN_PROJ, "smooth", [[-1], "float32"]), "non-negative ints"),
    "leaf-not-pair": (_set_leaf(IN_PROJ, "smooth", "float32"), r"smooth: must be \[shape"),
    "unknown-leaf": (_set_leaf(IN_PROJ, "kernel", [[32, 128], "float32"]), "unknown leaf 'kernel'"),
    "model-name-missing": (_del("model_name"), "'model_name' must be a model name string, got None"),
    "overrides-null": (_set("model_overrides", None), "'model_overrides' must be an object"),
    "overrides-unknown": (_set("model_overrides", {"embed_dimm": 3}),
                          r"'vim_nano' with overrides .*embed_dimm"),
    "config-null": (_set("config", None), "'config' must be the QuantConfig as an object, got None"),
    "config-bad-bits": (lambda m: m["config"].update(w_bits=99),
                        "'config': w_bits must be an integer from 2 to 8"),
    "config-unknown-key": (lambda m: m["config"].update(bitz=3), "'config': .*bitz"),
    "calibration-list": (_set("calibration", []), "'calibration' must be an object"),
}
NOT_THE_MODEL = {  # well-formed metadata that does not fit the model
    "no-such-layer": (lambda m: m["layers"].update({"layers_0/mixer/nope": m["layers"][IN_PROJ]}),
                      "quantized layer layers_0/mixer/nope does not exist in vim_nano"),
    "not-linear": (lambda m: m["layers"].update({"norm_f/weight": m["layers"][IN_PROJ]}),
                   "norm_f/weight in vim_nano is not a linear layer"),
    "w_int-shape": (_set_leaf(IN_PROJ, "w_int", [[32, 128], "int8"]),
                    rf"{IN_PROJ}/w_int has shape \(32, 128\), the model needs \(16, 128\)"),
    "no-a_scale": (lambda m: m["layers"][IN_PROJ].pop("a_scale"), rf"{IN_PROJ} lacks \['a_scale'\]"),
    "a_scale-2d": (_set_leaf(IN_PROJ, "a_scale", [[17, 1], "float32"]),
                   r"a_scale must have shape \(tokens,\), got \(17, 1\)"),
    "a_zero-length": (_set_leaf(IN_PROJ, "a_zero", [[5], "int32"]),
                      r"a_zero has shape \(5,\), the model needs \(17,\)"),
    "no-bias": (lambda m: m["layers"]["layers_0/mixer/dt_proj"].pop("bias"), r"dt_proj lacks \['bias'\]"),
    "extra-bias": (_set_leaf(IN_PROJ, "bias", [[128], "float32"]),
                   "in_proj has a bias, the model's layer has none"),
}


def _sealed(meta):
    return {**meta, "metadata_sha256": metadata_digest(meta)}


def _edited_copy(saved, tmp_path, edit):
    """A copy with edited and re-sealed metadata (as if written that way), so that each field's
    own validation is what answers."""
    shutil.copytree(saved, tmp_path / "q")
    meta_path = tmp_path / "q" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("metadata_sha256")
    edit(meta)
    meta_path.write_text(json.dumps(_sealed(meta)))
    return tmp_path / "q"


@pytest.mark.parametrize("edit, want", BAD_METADATA.values(), ids=BAD_METADATA.keys())
def test_invalid_metadata_is_named(saved_w4a8, tmp_path, edit, want):
    path = _edited_copy(saved_w4a8, tmp_path, edit)
    with pytest.raises(CheckpointError, match=rf"q/metadata.json is invalid \(.*{want}.*\); re-create the "
                                              "checkpoint"):
        load_quantized(path)


@pytest.mark.parametrize("edit, want", NOT_THE_MODEL.values(), ids=NOT_THE_MODEL.keys())
def test_metadata_that_does_not_fit_the_model(saved_w4a8, tmp_path, edit, want):
    path = _edited_copy(saved_w4a8, tmp_path, edit)
    want = rf"q/metadata.json does not match vim_nano: .*{want}; .*re-create it"
    with pytest.raises(CheckpointError, match=want):
        load_quantized(path)


def test_metadata_and_stored_tree_must_agree(saved_w4a8, tmp_path):
    """Consistent, plausible metadata (another token count) still meets the stored arrays."""
    def edit(meta):
        meta["layers"][IN_PROJ].update(a_scale=[[5], "float32"], a_zero=[[5], "int32"])

    path = _edited_copy(saved_w4a8, tmp_path, edit)
    with pytest.raises(CheckpointError, match=rf"does not match the model:\n.*{IN_PROJ}/a_scale: \(17,\)"):
        load_quantized(path)


def test_unedited_copy_loads(saved_w4a8, tmp_path):
    back = load_quantized(_edited_copy(saved_w4a8, tmp_path, lambda meta: None))
    assert back.config.w_bits == 4
    assert back.qlayers["layers_0"]["mixer"]["in_proj"].w_int.shape == (16, 128)


def test_save_quantized_refuses_float_params(model_params_images, tmp_path):
    _, params, _ = model_params_images
    want = (r"save_quantized needs a QuantizedParams \(from quantize_params or load_quantized\), got dict; "
            "float params are saved with save_params")
    with pytest.raises(TypeError, match=want):
        save_quantized(tmp_path / "q", params)
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_vim_tiny_w8a8_checkpoint_is_well_under_half_the_float_size(tmp_path):
    # vim_tiny's 24 blocks and widths at 32 px: the linears' weights are the same size as at
    # 224 px; only the per-token vectors and the position embedding shrink (under 1 % of the
    # float checkpoint at 224 px).
    small = {"img_size": 32}
    model = create_model("vim_tiny", **small)
    images = np.asarray(jax.random.normal(jax.random.key(0), (2, 32, 32, 3)))
    # Random weights of the right shapes (sizes, not accuracy, are checked): no init to compile.
    shapes = param_shapes(model)
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda a: rng.normal(0, 0.02, a.shape).astype(a.dtype), shapes)
    cfg = QuantConfig(w_bits=8, a_bits=8, method="rtn", num_calib=2)
    qp = quantize_params(params, images, model="vim_tiny", config=cfg, model_overrides=small,
                         progress=False)
    save_params(tmp_path / "float", params, model_name="vim_tiny", model_overrides=small)
    save_quantized(tmp_path / "w8a8", qp)
    ratio = _dir_bytes(tmp_path / "w8a8") / _dir_bytes(tmp_path / "float")
    assert ratio < 0.4, ratio


def test_quantizing_onto_the_float_checkpoint_is_refused(model_params_images, saved_w4a8, tmp_path):
    """``quantize --params fc --out fc`` must not turn the float checkpoint into a quantized one."""
    _, params, _ = model_params_images
    save_params(tmp_path / "fc", params, model_name=MODEL)
    qp = load_quantized(saved_w4a8)
    with pytest.raises(CheckpointError, match="fc holds a 'ptq4vm-jax/float-params' checkpoint of vim_nano; "
                                              "refusing to replace it with a 'ptq4vm-jax/quantized'"):
        save_quantized(tmp_path / "fc", qp)
    load_params(tmp_path / "fc", model_name=MODEL)
    shutil.copytree(saved_w4a8, tmp_path / "q")
    save_quantized(tmp_path / "q", qp)  # quantized replaces quantized
    assert load_quantized(tmp_path / "q").config == qp.config


def test_nonfinite_values_are_not_saved(saved_w4a8, tmp_path):
    qp = load_quantized(saved_w4a8)
    params = jax.tree.map(np.array, qp.params)
    params["norm_f"]["weight"][0] = np.nan
    want = r"refusing to write .*q: the parameters hold NaN .*:\n  params/norm_f/weight: 1 of 32 values"
    with pytest.raises(CheckpointError, match=want):
        save_quantized(tmp_path / "q", dataclasses.replace(qp, params=params))
    assert not (tmp_path / "q").exists()
