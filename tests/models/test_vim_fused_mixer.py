"""Vim through the fused mixer kernel (``scan="fused"``; the Pallas interpreter off the GPU): the
official golden logits, and integer inference equal to fake-quant through it."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ptq4vm_jax as pq
from ptq4vm_jax import create_model, load_torch_checkpoint
from ptq4vm_jax.models.registry import image_shape
from ptq4vm_jax.models.vim import VimBlock

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


def test_fused_mixer_is_the_kernel_and_int_equals_fake_through_it(monkeypatch):
    """vim_nano W8A8 (PTS scales): through scan="fused", mode="int" equals mode="fake" (the CPU's
    integer path is bit-exact, the kernel deterministic), and both stay within 1e-3 of fake mode
    with the per-direction reference scans."""
    from pallas_kernels import vim_mixer as kernels

    calls = []
    real_kernel = kernels.vim_mixer
    monkeypatch.setattr(kernels, "vim_mixer", lambda *a, **kw: calls.append(1) or real_kernel(*a, **kw))
    rng = np.random.default_rng(0)
    images = rng.uniform(-2, 2, (12, 32, 32, 3)).astype(np.float32)
    params = random_params("vim_nano", rng)
    qp = pq.quantize_params(params, images[:8], model="vim_nano", progress=False, log=lambda _: None,
                            config=pq.QuantConfig(8, 8, method="pts_only", num_calib=8))
    test = images[8:]
    run = jax.jit(lambda mode, scan, q, x: pq.quantized_apply(None, q, x, mode=mode, scan=scan),
                  static_argnums=(0, 1))
    fake, real = (np.asarray(run(mode, "fused", qp, test)) for mode in ("fake", "int"))
    assert calls, "the fused kernel did not run"
    np.testing.assert_array_equal(fake, real)
    ref = np.asarray(run("fake", "ref", qp, test))
    assert np.abs(fake - ref).max() <= 1e-3 * np.abs(ref).max()


def random_params(name: str, rng: np.random.Generator) -> dict:
    """O(1) random weights in the model's param shapes (numpy: compiling ``init`` costs more than
    the rest of the test), with Mamba's A_log = log(1..N) so that the scans decay."""
    model = create_model(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape(model)[1:])))

    def fill(path, leaf):
        if path[-1].key in ("A_log", "A_b_log"):
            return jnp.log(jnp.broadcast_to(jnp.arange(1, leaf.shape[1] + 1, dtype=jnp.float32), leaf.shape))
        fan_in = leaf.shape[0] if len(leaf.shape) == 2 else 1
        return jnp.asarray(rng.normal(size=leaf.shape) * min(0.5, fan_in ** -0.5), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes["params"])


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
    nn.Dense calls, in the same order, so quantization by interception reaches all of them."""
    fused = dense_calls("fused")
    assert fused == dense_calls("ref")
    assert ("layers_1", "mixer", "dt_proj_b") in fused and ("layers_0", "mixer", "x_proj") in fused
