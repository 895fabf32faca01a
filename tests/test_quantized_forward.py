"""``quantized_apply`` runs one compiled program per model, quantized program, mode, GEMM and
input shapes, shared by every ``QuantizedParams`` of those shapes (whose calibration summaries
and configs, static pytree data, differ); a caller's ``nn.intercept_methods`` still sees the
model's modules."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

import ptq4vm_jax as pq
from ptq4vm_jax.data import load_digits_dataset
from ptq4vm_jax.errors import ArgumentWarning
from ptq4vm_jax.quant.layer import capture_dense

ASSET = Path(pq.__file__).parent / "assets" / "vim_micro"


@pytest.fixture(scope="module")
def two_calibrations():
    """Two W8A8 RTN calibrations of vim_micro on other images: other scales and other static data
    (the calibration summary), the same shapes."""
    params, _ = pq.load_params(ASSET, model_name="vim_micro")
    calib = load_digits_dataset("train")[0][:16]
    made = [pq.quantize_params(params, images, model="vim_micro", progress=False,
                               config=pq.QuantConfig(8, 8, method="rtn", num_calib=8))
            for images in (calib[:8], calib[8:])]
    return made, calib[:3]


@pytest.fixture
def compiles():
    """Names of the XLA programs compiled while the test runs."""
    names = []

    def listener(event, secs, **kw):
        if event.endswith("backend_compile_duration"):
            names.append(kw.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield names
    jax.monitoring.unregister_event_duration_listener(listener)


def test_calibrations_of_the_same_shapes_share_one_program(two_calibrations, compiles):
    (one, other), images = two_calibrations
    assert one.info != other.info
    pq.api._forward.cache_clear()
    first = np.asarray(pq.quantized_apply(None, one, images))
    assert compiles.count("jit(_quantized_forward)") <= 1, compiles  # (0 if the persistent cache has it)
    traced = pq.api._forward.cache_info().misses
    before = len(compiles)
    second = np.asarray(pq.quantized_apply(None, other, images))
    assert compiles[before:] == [] and pq.api._forward.cache_info().misses == traced == 1
    assert not np.allclose(first, second, rtol=1e-3)  # (their scales differ)


def test_a_callers_interceptor_sees_the_modules_and_is_not_kept(two_calibrations):
    (rtn, _), images = two_calibrations
    compiled = np.asarray(pq.quantized_apply(None, rtn, images))  # (a program of these shapes exists)
    quantized = set(pq.api.quantized_layers(rtn))
    seen: dict = {}
    with capture_dense(quantized, inputs=seen):  # an nn.intercept_methods interceptor
        inside = np.asarray(pq.quantized_apply(None, rtn, images))
    assert quantized and set(seen) == quantized
    seen.clear()
    again = np.asarray(pq.quantized_apply(None, rtn, images))
    assert seen == {}  # the interceptor did not stay in a compiled program
    np.testing.assert_array_equal(again, compiled)
    np.testing.assert_allclose(inside, compiled, rtol=1e-5, atol=1e-5 * np.abs(compiled).max())


def test_images_are_checked_before_the_compiled_forward(two_calibrations):
    """The compiled forward cannot see values, so ``quantized_apply`` checks them first: NaN/inf
    pixels would become ordinary codes and confident logits; raw pixels are warned about; labels
    and a wrong channel count are named."""
    (qp, _), images = two_calibrations
    model = qp.model()
    broken = np.array(images)
    broken[1, 4, 4, 0] = np.inf
    with pytest.raises(ValueError, match=r"image\(s\) #\[1\] of the batch hold NaN/inf pixels"):
        pq.quantized_apply(model, qp, broken)
    with pytest.raises(ValueError, match="A 1-D array looks like labels"):
        pq.quantized_apply(model, qp, np.arange(3.0))
    with pytest.raises(ValueError, match="They have 1 channels and the model takes 3"):
        pq.quantized_apply(model, qp, np.asarray(images)[..., :1])
    with pytest.warns(ArgumentWarning, match="these look like raw pixels"):
        pq.quantized_apply(model, qp, np.abs(np.asarray(images)) * 255)
    jitted = jax.jit(lambda x: pq.quantized_apply(model, qp, x))(images)  # inside jit: no value checks
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(pq.quantized_apply(model, qp, images)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_inside_jit_a_broken_image_gets_nan_logits(two_calibrations, bad):
    """Where the checks see no values (a caller's jit or vmap), an image with a NaN/inf pixel gets
    NaN logits, as from the float model, not the ordinary codes and logits quantization makes of
    it; the other images are unchanged."""
    (qp, _), images = two_calibrations
    broken = np.array(images)
    broken[1, 4, 4, 0] = bad
    good = np.asarray(pq.quantized_apply(None, qp, images))
    for run in (jax.jit(lambda x: pq.quantized_apply(None, qp, x)),
                jax.vmap(lambda x: pq.quantized_apply(None, qp, x[None])[0])):
        got = np.asarray(run(broken))
        assert np.isnan(got[1]).all()
        np.testing.assert_allclose(got[[0, 2]], good[[0, 2]], rtol=1e-5, atol=1e-5)


def test_torch_images_are_taken_as_calibration_takes_them(two_calibrations):
    torch = pytest.importorskip("torch")
    (qp, _), images = two_calibrations
    got = pq.quantized_apply(None, qp, torch.from_numpy(np.asarray(images)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(pq.quantized_apply(None, qp, images)))
    with pytest.raises(TypeError, match=r"got a torch tensor; .* images.detach\(\).cpu\(\).numpy\(\)"):
        qp.model().apply({"params": qp.params}, torch.from_numpy(np.asarray(images)))


def test_params_in_bfloat16_are_calibrated_and_saved_as_float32(tmp_path):
    """bf16 params are the float model's weights at lower precision: calibration runs on their
    float32 values (exactly), says so, and the checkpoint it makes loads back."""
    import jax.numpy as jnp

    params, _ = pq.load_params(ASSET, model_name="vim_micro")
    half = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    calib = load_digits_dataset("train")[0][:8]
    said = []
    config = pq.QuantConfig(8, 8, method="rtn", num_calib=8)
    qp = pq.quantize_params(half, calib, model="vim_micro", config=config, progress=False, log=said.append)
    assert any("are in bfloat16: calibrated and stored as float32" in line for line in said), said
    pq.save_quantized(tmp_path / "q", qp)
    back = pq.load_quantized(tmp_path / "q")
    kept = jax.tree_util.tree_leaves(back.params)
    assert kept and all(a.dtype == np.float32 for a in kept)
    upcast = pq.quantize_params(jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), half), calib,
                                model="vim_micro", config=config, progress=False, log=lambda _: None)
    np.testing.assert_array_equal(np.asarray(pq.quantized_apply(None, back, calib)),
                                  np.asarray(pq.quantized_apply(None, upcast, calib)))


def test_a_quantized_params_prints_what_it_is_and_is_not_saved_as_float(two_calibrations, tmp_path):
    (qp, _), _ = two_calibrations
    assert repr(qp) == "QuantizedParams(vim_micro: rtn W8A8, 24 quantized linears, calibrated in " \
                       f"{qp.summary['calibration_seconds']:.1f} s)"
    with pytest.raises(TypeError, match="a QuantizedParams is saved with save_quantized"):
        pq.save_params(tmp_path / "x", qp, model_name="vim_micro")
    assert not (tmp_path / "x").exists()
