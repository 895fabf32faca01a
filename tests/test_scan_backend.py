"""The scan backend is a static field of the model config: the same choice serves float
evaluation, quantized evaluation and calibration; "pallas" runs the kernel in the Pallas
interpreter off the GPU; checkpoints do not store it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ptq4vm_jax as pq
from ptq4vm_jax import gpu
from ptq4vm_jax.ops import scan as scan_ops

ON_GPU = jax.default_backend() == "gpu"


@pytest.fixture
def kernel_calls(monkeypatch, fresh_forwards):
    """Counts the scans that reach the Pallas kernel; the kernel runs as this machine can. It
    counts traces, so ``quantized_apply`` starts without compiled forwards and keeps none traced
    through the spy (or under a platform a test fakes)."""
    calls = []

    def spy(*args, _fn=scan_ops.selective_scan_pallas, **kw):
        calls.append(args[0].shape)
        return _fn(*args, **{**kw, "interpret": not ON_GPU})

    monkeypatch.setattr(scan_ops, "selective_scan_pallas", spy)
    return calls


@pytest.mark.slow  # the Pallas interpreter through a model
def test_scan_field_picks_the_backend(kernel_calls, init_params):
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    ref = pq.create_model("vim_nano", scan="ref")
    assert ref.cfg.scan == "ref" and pq.create_model("vim_nano").cfg.scan == "auto"
    params = init_params(ref, 1)
    y_ref = np.asarray(ref.apply({"params": params}, images))
    assert kernel_calls == []
    y = np.asarray(jax.jit(pq.create_model("vim_nano", scan="pallas").apply)({"params": params}, images))
    assert len(kernel_calls) == 4  # two blocks, two branches each
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4 * np.abs(y_ref).max())


@pytest.mark.slow  # the Pallas interpreter through a model
def test_vmamba_block_runs_the_backend_of_its_config(kernel_calls, init_params):
    """VMamba's four scan directions: one vmapped kernel call per block."""
    model = {scan: pq.create_model("vmamba_micro", img_size=16, scan=scan) for scan in ("ref", "pallas")}
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))  # 16 tokens: the interpreter is slow
    params = init_params(model["ref"], 1)
    carry = model["ref"].apply({"params": params}, images, method="embed")
    out = {scan: np.asarray(jax.jit(pq.models.blockwise(m).stages[0].apply)(params, carry))
           for scan, m in model.items()}
    assert len(kernel_calls) == 1
    np.testing.assert_allclose(out["pallas"], out["ref"], rtol=1e-4, atol=1e-4 * np.abs(out["ref"]).max())


def test_unknown_scan_backend_is_explained():
    for name in ("vim_nano", "vmamba_micro"):
        with pytest.raises(ValueError, match="unknown scan backend 'cuda'; choose one of 'auto', 'ref', "
                                             "'pallas'"):
            pq.create_model(name, scan="cuda")


@pytest.fixture(scope="module")
def nano(init_params):
    images = jax.random.normal(jax.random.key(7), (8, 32, 32, 3))
    params = init_params(pq.create_model("vim_nano"), 0)
    return params, np.asarray(images)


@pytest.mark.slow  # the Pallas interpreter through a model
def test_float_and_quantized_evaluation_run_the_same_scan(nano, kernel_calls, monkeypatch):
    """On a GPU ("auto" resolves to the kernel) both the float model and ``quantized_apply`` run
    the kernel; elsewhere both run the reference. The platform check is faked both ways."""
    params, images = nano
    cfg = pq.QuantConfig(8, 8, method="rtn", num_calib=8, train_batch=8)
    qp = pq.quantize_params(params, images, model="vim_nano", config=cfg, progress=False, log=lambda _: None)
    model = pq.create_model("vim_nano")
    for platform in ("cpu", "gpu"):
        monkeypatch.setattr(gpu, "on_gpu", lambda platform=platform: platform == "gpu")
        pq.api._forward.cache_clear()  # the platform is faked: a forward traced for the other must go
        kernel_calls.clear()
        model.apply({"params": params}, images[:2])
        float_calls = len(kernel_calls)
        pq.quantized_apply(None, qp, images[:2])
        assert float_calls == len(kernel_calls) - float_calls == (4 if platform == "gpu" else 0), platform


@pytest.mark.slow  # the Pallas interpreter through a model
def test_scan_is_a_runtime_choice_not_saved(nano, kernel_calls):
    """Calibration runs the scan the overrides name; the qparams do not keep it;
    ``quantized_apply(scan=...)`` or a model built with another scan override it."""
    params, images = nano
    cfg = pq.QuantConfig(8, 8, method="rtn", num_calib=8, train_batch=8)
    qp = pq.quantize_params(params, images, model="vim_nano", config=cfg, progress=False,
                            log=lambda _: None, model_overrides={"scan": "pallas"})
    assert kernel_calls, "calibration did not run the kernel"
    assert "scan" not in dict(qp.model_overrides) and qp.model().cfg.scan == "auto"
    kernel_calls.clear()
    y_ref = np.asarray(pq.quantized_apply(None, qp, images[:2], scan="ref"))
    assert kernel_calls == []
    y = np.asarray(pq.quantized_apply(None, qp, images[:2], scan="pallas"))
    assert len(kernel_calls) == 4
    pq.api._forward.cache_clear()  # (quantized_apply keeps the program above: this model equals its model)
    y_model = np.asarray(pq.quantized_apply(pq.create_model("vim_nano", scan="pallas"), qp, images[:2]))
    assert len(kernel_calls) == 8
    np.testing.assert_array_equal(y_model, y)
    # Quantization turns the kernel's float rounding into an occasional flipped code.
    assert np.abs(y - y_ref).max() <= 1e-2 * np.abs(y_ref).max()
    with pytest.raises(ValueError, match="unknown scan backend 'lax'"):
        pq.quantized_apply(None, qp, images[:2], scan="lax")


@pytest.mark.slow  # the Pallas interpreter through a model
def test_calibration_differentiates_through_the_kernel(nano, kernel_calls):
    """What JLSS differentiates, a block's output, has the same gradients through the kernel
    (its Pallas backward) as through the reference."""
    params, images = nano
    model = {scan: pq.create_model("vim_nano", scan=scan) for scan in ("ref", "pallas")}
    stage = {scan: pq.models.blockwise(m).stages[0] for scan, m in model.items()}
    carry = model["ref"].apply({"params": params}, images[:2], method="embed")

    def loss(scan):
        return lambda p, c: jnp.sum(stage[scan].output(stage[scan].apply(p, c)) ** 2)

    g_ref = jax.grad(loss("ref"), argnums=(0, 1))(params, carry)
    assert kernel_calls == []
    g = jax.grad(loss("pallas"), argnums=(0, 1))(params, carry)
    assert len(kernel_calls) == 2  # the block's two branches
    flat, flat_ref = jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)
    assert len(flat) == len(flat_ref) > 10
    for a, b in zip(flat, flat_ref, strict=True):
        scale = float(np.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1e-6))


def test_dtype_is_a_runtime_choice_not_saved(nano, monkeypatch):
    """Like the scan, a compute dtype given to calibration is used there and not kept with the
    qparams (a checkpoint of them would otherwise run every later evaluation in it)."""
    params, images = nano
    built = []
    real = pq.api.create_model

    def spy(name, **overrides):
        built.append(overrides.get("dtype"))
        return real(name, **overrides)

    monkeypatch.setattr(pq.api, "create_model", spy)
    cfg = pq.QuantConfig(8, 8, method="rtn", num_calib=8, train_batch=8)
    qp = pq.quantize_params(params, images, model="vim_nano", config=cfg, progress=False,
                            log=lambda _: None, model_overrides={"dtype": jnp.bfloat16})
    assert built[0] == jnp.bfloat16
    assert dict(qp.model_overrides) == {} and qp.model().cfg.dtype == jnp.float32
