"""Vim through the fused mixer kernel (``scan="fused"``; the Pallas interpreter off the GPU): the
official golden logits, and integer inference equal to fake-quant through it."""

from __future__ import annotations

import dataclasses
import importlib
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ptq4vm_jax as pq
from pallas_kernels.qlinear import QuantizedLinear
from ptq4vm_jax import create_model, load_torch_checkpoint
from ptq4vm_jax.models.vim import VimBlock
from ptq4vm_jax.quant.layer import intercept_dense

pytestmark = pytest.mark.slow  # the fused kernel in the Pallas interpreter inside whole models

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "vim_golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
RTOL = 1e-4  # as tests/models/test_vim_golden.py: max |Δlogits| / max |official logits|, fp32


@pytest.mark.parametrize("case", MANIFEST["reduced"][:1], ids=lambda c: c["name"])
def test_reduced_official_checkpoint_matches_official_logits_through_the_fused_mixer(case):
    """The first reduced golden config (E = 128, N = 16, L = 17, 2 blocks; the others differ in
    sizes the kernel tests cover), block by block: one compiled block serves both."""
    overrides = case["overrides"]
    params = load_torch_checkpoint(GOLDEN / case["checkpoint"], case["model_name"], **overrides)
    model = create_model(case["model_name"], **overrides, scan="fused")
    images = jnp.asarray(np.load(GOLDEN / case["inputs"]))
    carry = jax.jit(partial(model.apply, method="embed"))({"params": params}, images)
    block = jax.jit(VimBlock(model.cfg).apply)
    for i in range(model.cfg.depth):
        carry = block({"params": params[f"layers_{i}"]}, *carry)
    logits = np.asarray(jax.jit(partial(model.apply, method="classify"))({"params": params}, *carry))
    ref = np.load(GOLDEN / case["logits"])
    err = float(np.abs(logits - ref).max() / np.abs(ref).max())
    assert err <= RTOL, f"{case['name']} through the fused mixer: {err:.2e} > {RTOL:.0e}"


def random_block(cfg, rng: np.random.Generator) -> tuple[dict, dict]:
    """A VimBlock's float params (numpy: compiling ``init`` costs more than the test) and a
    W8A8 QuantizedLinear for each of its six linears, per-token scales over cfg.seq_len tokens."""
    block = VimBlock(cfg)
    x = jnp.zeros((1, cfg.seq_len, cfg.embed_dim))
    shapes = jax.eval_shape(block.init, jax.random.key(0), x, x)["params"]

    def fill(path, leaf):
        if path[-1].key in ("A_log", "A_b_log"):  # Mamba's init: the scans decay
            return jnp.log(jnp.broadcast_to(jnp.arange(1, leaf.shape[1] + 1, dtype=jnp.float32), leaf.shape))
        fan_in = leaf.shape[0] if len(leaf.shape) == 2 else 4
        return jnp.asarray(rng.normal(size=leaf.shape) * fan_in ** -0.5, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(fill, shapes)
    seq = cfg.seq_len
    qlayers = {}
    for name, dense in params["mixer"].items():
        if not isinstance(dense, dict) or "kernel" not in dense:
            continue
        k, n = dense["kernel"].shape
        qlayers[name] = QuantizedLinear(
            w_int=jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8),
            w_scale=jnp.asarray(rng.uniform(0.5, 1.5, n) / (127 * k ** 0.5), jnp.float32),
            smooth=jnp.asarray(rng.uniform(0.5, 2.0, k), jnp.float32),
            a_scale=jnp.asarray(rng.uniform(0.02, 0.04, seq), jnp.float32),
            a_zero=jnp.asarray(rng.integers(120, 136, seq), jnp.int32), bias=dense.get("bias"))
    return params, {"mixer": qlayers}


def test_int_equals_fake_through_the_fused_mixer(monkeypatch):
    """A vim_nano block with W8A8 linears: through scan="fused" (the kernel runs, multiplying the
    quantized dt_proj's integer operands on chip in both modes), mode="int" equals mode="fake",
    exactly on the CPU (the integer path is bit-exact, the kernel deterministic, and x_proj /
    dt_proj are quantized in both), and fake mode through the kernel is fake mode through the
    per-direction reference scans up to fp32 rounding."""
    kernels = importlib.import_module("pallas_kernels.vim_mixer")
    calls = []
    real_kernel = kernels._forward  # the fused kernel's launch: (x, z, fwd, bwd, ...)

    def spy(*a, **kw):  # whether each direction's dt_proj came as integer operands (codes, steps)
        calls.append(all(d.dt_weight is not None and d.dt_row_scale is not None for d in a[2:4]))
        return real_kernel(*a, **kw)

    monkeypatch.setattr(kernels, "_forward", spy)
    rng = np.random.default_rng(0)
    cfg = create_model("vim_nano").cfg
    params, qtree = random_block(cfg, rng)
    hidden = jnp.asarray(rng.normal(size=(3, cfg.seq_len, cfg.embed_dim)), jnp.float32)
    residual = jnp.zeros_like(hidden)
    method = pq.QuantConfig(8, 8, method="pts_only")

    @partial(jax.jit, static_argnums=(0, 1))
    def run(mode, scan, p, q, h, r):
        with intercept_dense(q, method, mode):
            return VimBlock(dataclasses.replace(cfg, scan=scan)).apply({"params": p}, h, r)[0]

    fake, real = (np.asarray(run(mode, "fused", params, qtree, hidden, residual)) for mode in ("fake", "int"))
    assert calls == [True, True], "the fused kernel did not run, or not with dt_proj on chip"
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(fake, real)
    else:  # GPU epilogues may fuse an FMA: tests/test_int_mode.py's bound
        assert np.abs(fake - real).max() <= 1e-3 * np.abs(fake).max()
    ref = np.asarray(run("fake", "ref", params, qtree, hidden, residual))
    assert np.abs(fake - ref).max() <= 1e-4 * np.abs(ref).max()
    # The quantized linears matter: the float block is far from the quantized one.
    float_out = np.asarray(jax.jit(VimBlock(cfg).apply)({"params": params}, hidden, residual)[0])
    assert np.abs(float_out - ref).max() > 1e-2 * np.abs(ref).max()


@pytest.mark.parametrize("scan", ["fused", "ref"])
def test_int_mode_feeds_in_proj_and_out_proj_their_producers_codes(scan):
    """In integer mode the add + norm hands in_proj its input codes, and through the fused mixer
    the kernel hands out_proj its codes (no separate quantize pass); x_proj and dt_proj, and
    out_proj of the per-direction path, still take floats. Fake mode passes floats everywhere."""
    import flax.linen as nn

    from pallas_kernels.qlinear import QuantizedActivation

    rng = np.random.default_rng(1)
    cfg = dataclasses.replace(create_model("vim_nano").cfg, scan=scan)
    params, qtree = random_block(cfg, rng)
    hidden = jnp.asarray(rng.normal(size=(1, cfg.seq_len, cfg.embed_dim)), jnp.float32)
    method = pq.QuantConfig(8, 8, method="pts_only")
    fed = {}

    def record(next_fun, args, kwargs, context):  # installed outside: sees what the model passes
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
            fed[context.module.path[-1]] = isinstance(args[0], QuantizedActivation)
        return next_fun(*args, **kwargs)

    for mode in ("fake", "int"):
        fed.clear()
        with nn.intercept_methods(record), intercept_dense(qtree, method, mode):
            jax.eval_shape(VimBlock(cfg).apply, {"params": params}, hidden, hidden)
        codes = {name for name, is_codes in fed.items() if is_codes}
        assert len(fed) == 6
        want = set() if mode == "fake" else {"in_proj", "out_proj"} if scan == "fused" else {"in_proj"}
        assert codes == want, mode


def dense_calls(scan: str) -> list[tuple[str, ...]]:
    """Module paths of the nn.Dense calls of a vim_nano forward (traced, not run)."""
    import flax.linen as nn

    model = create_model("vim_nano", scan=scan)
    x = jnp.zeros((1, 32, 32, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    seen = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
            seen.append(tuple(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.apply, {"params": params}, x)
    return seen


def test_fused_mixer_calls_every_linear_the_unfused_one_does():
    """The fused path keeps x_proj, dt_proj (both directions), in_proj and out_proj as the model's
    nn.Dense calls, in the same order (dt_proj an ``OperandDense``, which hands the kernel its
    operands), so quantization by interception reaches all of them."""
    fused = dense_calls("fused")
    assert fused == dense_calls("ref")
    assert ("layers_1", "mixer", "dt_proj_b") in fused and ("layers_0", "mixer", "x_proj") in fused


def test_calibration_runs_through_the_fused_kernels(init_params, monkeypatch):
    """Calibration of vim_nano through scan="fused" (the add + norm and mixer kernels, their
    VJPs in training) against scan="pallas" (a Pallas scan per direction): PTS initialisation
    gives the same quantized model to fp32 rounding; one JLSS epoch a close one (Adam's first,
    normalised step turns rounding-level gradient differences into step-sized ones where a
    gradient is near zero, as between the per-direction backends), against W4A8's distance from
    the float model. Then the whole W4A8 model through the kernels: mode="int" == mode="fake"."""
    kernels = [importlib.import_module(f"pallas_kernels.{name}") for name in ("vim_mixer", "add_norm")]
    calls = []
    for module in kernels:
        monkeypatch.setattr(module, "_forward", partial(lambda real, *a: calls.append(1) or real(*a),
                                                        module._forward))
    images = np.random.default_rng(6).standard_normal((4, 32, 32, 3)).astype(np.float32)
    params = init_params(create_model("vim_nano"), 0)
    ref_model = create_model("vim_nano", scan="ref")
    x = jnp.asarray(images)
    float_logits = np.asarray(jax.jit(ref_model.apply)({"params": params}, x))
    rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
    for method, epochs, bound in (("pts_only", None, 1e-5), ("ptq4vm", 1, 5e-2)):
        qcfg = pq.QuantConfig(4, 8, method=method, num_calib=4, train_batch=4, epochs=epochs,
                              revert_worse=False)
        logits = {}
        for scan in ("pallas", "fused"):
            calls.clear()  # after the loop: what this method's fused calibration ran, alone
            qp = pq.quantize_params(params, images, model="vim_nano", config=qcfg, progress=False,
                                    log=lambda _: None, model_overrides={"scan": scan})
            logits[scan] = np.asarray(pq.quantized_apply(ref_model, qp, x))
        assert calls, f"{method}: the fused kernels did not run"
        assert rel(logits["fused"], logits["pallas"]) <= bound, method
        assert rel(logits["pallas"], float_logits) > 1e-1, method  # W4A8: far from float
    # The whole model through the fused kernels, W4A8 as calibrated: integer inference (codes from
    # the kernels' epilogues) equals fake-quant (the same kernels' float outputs, quantized).
    fused = create_model("vim_nano", scan="fused")
    fake, real = (np.asarray(pq.quantized_apply(fused, qp, x, mode=m)) for m in ("fake", "int"))
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(fake, real)
    else:  # GPU epilogues may fuse an FMA: tests/test_int_mode.py's bound
        assert np.abs(fake - real).max() <= 1e-3 * np.abs(fake).max()
