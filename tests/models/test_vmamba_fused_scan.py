"""VMamba through the fused cross-scan kernel (``scan="fused"``; the Pallas interpreter off the
GPU): the official golden outputs, and integer inference equal to fake-quant through it."""

from __future__ import annotations

import importlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ptq4vm_jax as pq
from convert import read_checkpoint
from convert.vmamba import config_overrides
from ptq4vm_jax import create_model, load_torch_checkpoint
from ptq4vm_jax.models.vmamba import VSSBlock

pytestmark = pytest.mark.slow  # the kernel in the Pallas interpreter inside whole models

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "vmamba_golden"
CASE, BASE = "reduced_v2v", "vmamba_tiny"  # the configs PTQ4VM quantizes (v05_noz SS2D)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def spy_kernel(monkeypatch) -> list:
    """Records, per kernel launch (traced), whether dt_proj came on chip (its weight) and as an
    integer layer (with its per-token steps): ``_forward(interpret, cfg, u, delta, A, B, C, D,
    delta_bias, dt_weight, dt_row_scale, ...)``."""
    kernels = importlib.import_module("pallas_kernels.cross_scan")
    calls, real = [], kernels._forward
    monkeypatch.setattr(kernels, "_forward", lambda *a: calls.append((a[9] is not None, a[10] is not None))
                        or real(*a))
    return calls


def test_reduced_official_checkpoint_matches_official_outputs_through_the_fused_scan(monkeypatch):
    """The reduced v2v checkpoint's logits, and one block alone on an H=5, W=7 grid (where a
    transposed order would show), within 1e-4 of the official model's maximum, as the unfused
    path is (tests/models/test_vmamba_golden.py)."""
    calls = spy_kernel(monkeypatch)
    path = GOLDEN / f"{CASE}.pth"
    overrides = config_overrides(read_checkpoint(path)["config"])
    model = create_model(BASE, **overrides, scan="fused")
    io = np.load(GOLDEN / f"{CASE}.npz")
    params = load_torch_checkpoint(path, BASE, **overrides)
    assert rel_err(jax.jit(model.apply)({"params": params}, io["images"]), io["logits_model"]) <= 1e-4
    cfg = model.cfg
    block = jax.jit(VSSBlock(cfg, cfg.stage_dims[1]).apply)({"params": params["layers_1"]["blocks_0"]},
                                                            io["block_input"])
    assert rel_err(block, io["block_output"]) <= 1e-4
    assert calls and set(calls) == {(True, False)}, "the fused kernel did not run with dt_proj on chip"


#: vmamba_micro cut to its first two stages (grids 8 x 8 and 4 x 4): fewer programs to compile.
SMALL = {"depths": (1, 1)}


def test_calibration_and_integer_inference_through_the_fused_scan(init_params, monkeypatch):
    """PTQ4VM (PTS init + one JLSS epoch) on a two-stage vmamba_micro through scan="fused", whose
    training step differentiates through the kernel's VJP, against scan="pallas" (the same Pallas
    scans per direction and their VJPs): close, not equal, since Adam's first, normalised step
    turns rounding-level gradient differences into step-sized ones where a gradient is near zero
    (scan="pallas" and scan="ref" differ by about 1e-2 of the max logit the same way), against
    W4A8's distance from the float model. Then the calibrated model through the kernel:
    mode="int" equals mode="fake" exactly on the CPU (both run the kernel; the integer path is
    bit-exact; both multiply the quantized dt_proj's integer operands on chip), and fake mode
    through the kernel is fake mode through the per-direction scans up to fp32 rounding."""
    calls = spy_kernel(monkeypatch)
    images = np.random.default_rng(6).standard_normal((4, 32, 32, 3)).astype(np.float32)
    params = init_params(create_model("vmamba_micro", **SMALL), 0)
    qcfg = pq.QuantConfig(4, 8, method="ptq4vm", num_calib=4, train_batch=4, epochs=1, revert_worse=False)
    ref_model = create_model("vmamba_micro", **SMALL, scan="ref")
    x = jnp.asarray(images)
    learned, logits = {}, {}
    for scan in ("pallas", "fused"):
        learned[scan] = pq.quantize_params(params, images, model="vmamba_micro", config=qcfg, progress=False,
                                           log=lambda _: None, model_overrides={**SMALL, "scan": scan})
        logits[scan] = np.asarray(pq.quantized_apply(ref_model, learned[scan], x))
    assert calls, "the fused kernel did not run"
    float_logits = np.asarray(jax.jit(ref_model.apply)({"params": params}, x))
    assert rel_err(logits["fused"], logits["pallas"]) <= 5e-2
    assert rel_err(logits["pallas"], float_logits) > 1e-1  # W4A8: far from float

    fused = create_model("vmamba_micro", **SMALL, scan="fused")
    calls.clear()
    fake, real = (np.asarray(pq.quantized_apply(fused, learned["fused"], x, mode=m)) for m in ("fake", "int"))
    # Both modes multiply the quantized dt_proj on chip from its integer codes and steps.
    assert calls and set(calls) == {(True, True)}
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(fake, real)
    else:  # GPU epilogues may fuse an FMA: tests/test_int_mode.py's bound
        assert np.abs(fake - real).max() <= 1e-3 * np.abs(fake).max()
    assert rel_err(fake, logits["fused"]) <= 1e-4
