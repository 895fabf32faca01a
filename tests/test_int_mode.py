"""Integer inference (`mode="int"`) against fake-quant on the bundled micro model's test split."""

import jax.numpy as jnp
import numpy as np
import pytest

import ptq4vm_jax as pq
from ptq4vm_jax.cli import ASSETS
from ptq4vm_jax.data import load_digits_dataset


@pytest.fixture(scope="module")
def micro():
    params, _ = pq.load_params(ASSETS / "vim_micro", model_name="vim_micro")
    calib, _ = load_digits_dataset("train")
    test_x, test_y = load_digits_dataset("test")
    return params, calib, test_x, test_y


@pytest.mark.parametrize("bits", [(8, 8), (4, 8), (4, 4)], ids=["w8a8", "w4a8", "w4a4"])
def test_int_mode_equals_fake_mode_on_the_whole_test_split(micro, bits):
    params, calib, test_x, _ = micro
    cfg = pq.QuantConfig(*bits, method="pts_only")
    qp = pq.quantize_params(params, calib, model="vim_micro", config=cfg, progress=False)
    fake = np.asarray(pq.quantized_apply(None, qp, test_x, mode="fake"))
    real = np.asarray(pq.quantized_apply(None, qp, test_x, mode="int"))
    assert np.abs(fake - real).max() <= 1e-3 * np.abs(fake).max()
    np.testing.assert_array_equal(fake.argmax(-1), real.argmax(-1))


def test_bf16_int_mode_error_is_small(micro):
    """The speed variant: projections fed bf16 activations; its error is measured, not hidden."""
    params, calib, test_x, _ = micro
    qp = pq.quantize_params(params, calib, model="vim_micro",
                            config=pq.QuantConfig(8, 8, method="pts_only"), progress=False)
    fake = np.asarray(pq.quantized_apply(None, qp, test_x, mode="fake"))
    bf16_model = pq.create_model("vim_micro", dtype=jnp.bfloat16)
    real = np.asarray(pq.quantized_apply(bf16_model, qp, test_x, mode="int"), np.float32)
    rel = np.abs(fake - real).max() / np.abs(fake).max()
    agree = np.mean(fake.argmax(-1) == real.argmax(-1))
    print(f"bf16 int mode vs fp32 fake: max rel error {rel:.2e}, agreement {100 * agree:.2f}%")
    assert 0 < rel < 5e-2 and agree >= 0.99
