"""Images a model would silently misread are refused with the cause and the fix."""

import jax
import numpy as np
import pytest

from ptq4vm_jax import create_model

pytestmark = pytest.mark.slow  # every check run eagerly, op by op, on two models

@pytest.fixture(scope="module", params=["vim_nano", "vmamba_micro"])
def model_and_params(request, init_params):
    model = create_model(request.param)
    size, ch = model.cfg.img_size, getattr(model.cfg, "channels", None) or model.cfg.in_chans
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, size, size, ch)))  # a real forward pass
    return model, init_params(model, 0), x


def test_bad_images_are_refused(model_and_params):
    model, params, x = model_and_params

    def apply(images):
        return model.apply({"params": params}, images)

    nan = x.copy()
    nan[1, 0, 0, 0] = np.nan
    cases = [
        (x.astype(np.uint8), TypeError, "normalised float images, got dtype uint8"),
        (x[:0], ValueError, "empty batch"),
        (nan, ValueError, r"image\(s\) #\[1\] of the batch hold NaN/inf"),
        (x.transpose(0, 3, 1, 2), ValueError, "channels-first"),
        (x[0], ValueError, "one image: add a batch axis"),
        (x[:, :8, :8], ValueError, "Resize/crop"),
        ({"image": x, "label": np.zeros(2)}, TypeError, r"got a dict; .* images = batch\['image'\]"),
        (list(x), TypeError, r"got a list; stack them into one array first"),
    ]
    torch = pytest.importorskip("torch")
    cases.append((torch.from_numpy(x.copy()), TypeError,
                  r"got a torch tensor; .* \(quantized_apply converts"))
    for images, error, message in cases:
        with pytest.raises(error, match=message):
            apply(images)


def test_good_images_pass_eagerly_and_under_jit(model_and_params):
    model, params, x = model_and_params
    eager = model.apply({"params": params}, x)
    jitted = jax.jit(lambda p, im: model.apply({"params": p}, im))(params, x)
    assert np.ptp(np.asarray(eager), axis=0).max() > 1e-3  # the two images give different logits
    # One program and op by op round differently in the last bits (fusion, and the tests compile
    # without LLVM's optimisations): a few ulps of the largest logit.
    scale = float(np.abs(np.asarray(jitted)).max())
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_a_compute_dtype_that_is_not_a_float_dtype_is_refused(dtype):
    for name in ("vim_nano", "vmamba_micro", "local_vim_tiny", "local_vmamba_micro"):
        with pytest.raises(ValueError, match=r"dtype must be a floating-point dtype.*mode='int'"):
            create_model(name, dtype=dtype)
    create_model("vim_nano", dtype="bfloat16")  # a float dtype by name
