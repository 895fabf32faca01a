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


def test_a_quantized_params_prints_what_it_is_and_is_not_saved_as_float(two_calibrations, tmp_path):
    (qp, _), _ = two_calibrations
    assert repr(qp) == "QuantizedParams(vim_micro: rtn W8A8, 24 quantized linears, calibrated in " \
                       f"{qp.summary['calibration_seconds']:.1f} s)"
    with pytest.raises(TypeError, match="a QuantizedParams is saved with save_quantized"):
        pq.save_params(tmp_path / "x", qp, model_name="vim_micro")
    assert not (tmp_path / "x").exists()
