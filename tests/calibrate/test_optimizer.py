"""The JLSS optimizer against a numpy transcription of the recipe in the spec (§6.2 step 5):
global-norm clipping over every trained array, then AdamW with one learning rate per group
(σ, weight steps, activation steps), and a step skipped when a gradient is not finite."""

import jax.numpy as jnp
import numpy as np
import optax

from ptq4vm_jax.calibrate.jlss import make_optimizer
from ptq4vm_jax.quant.config import QuantConfig

CFG = QuantConfig(lr_w=1e-3, lr_a=2e-3, lr_s=3e-2, weight_decay=1e-2, grad_clip=2.0)
LR = {"w_scale": CFG.lr_w, "a_scale": CFG.lr_a, "smooth": CFG.lr_s}
PATHS = [("in_proj",), ("x_proj_b",)]


def params0():
    rng = np.random.default_rng(0)
    return {p: {k: rng.uniform(0.5, 1.5, 4).astype(np.float32) for k in LR} for p in PATHS}


def reference(params, grads_seq, lr=LR, clip=CFG.grad_clip, b1=0.9, b2=0.999, eps=1e-8):
    """AdamW (decoupled decay), written out; a non-finite step changes nothing, not even t."""
    p = {(path, k): np.array(v, np.float64) for path, st in params.items() for k, v in st.items()}
    m = {key: np.zeros_like(v) for key, v in p.items()}
    v2 = {key: np.zeros_like(v) for key, v in p.items()}
    t = 0
    for grads in grads_seq:
        g = {(path, k): np.array(v, np.float64) for path, st in grads.items() for k, v in st.items()}
        if not all(np.all(np.isfinite(x)) for x in g.values()):
            continue
        norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
        if norm > clip:
            g = {key: x * clip / norm for key, x in g.items()}
        t += 1
        for key, x in g.items():
            m[key] = b1 * m[key] + (1 - b1) * x
            v2[key] = b2 * v2[key] + (1 - b2) * x * x
            m_hat, v_hat = m[key] / (1 - b1**t), v2[key] / (1 - b2**t)
            p[key] = p[key] - lr[key[1]] * (m_hat / (np.sqrt(v_hat) + eps) + CFG.weight_decay * p[key])
    return p


def run(params, grads_seq):
    opt = make_optimizer(CFG)
    tree = {path: {k: jnp.asarray(v) for k, v in st.items()} for path, st in params.items()}
    state = opt.init(tree)
    for grads in grads_seq:
        grads = {path: {k: jnp.asarray(v, jnp.float32) for k, v in st.items()} for path, st in grads.items()}
        updates, state = opt.update(grads, state, tree)
        tree = optax.apply_updates(tree, updates)
    return {(path, k): np.asarray(v) for path, st in tree.items() for k, v in st.items()}


def grads_like(params, scale, seed):
    rng = np.random.default_rng(seed)
    return {p: {k: (scale * rng.standard_normal(4)).astype(np.float32) for k in st}
            for p, st in params.items()}


def test_each_group_moves_at_its_own_rate_after_clipping_and_a_skipped_step():
    params = params0()
    nan_step = grads_like(params, 1.0, 9)
    nan_step[("x_proj_b",)]["a_scale"][2] = np.nan
    # Small gradients (unclipped), a NaN step (skipped), then large ones (clipped to norm 2).
    seq = [grads_like(params, 0.01, 1), nan_step, grads_like(params, 100.0, 2), grads_like(params, 50.0, 3)]
    got, want = run(params, seq), reference(params, seq)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=2e-6, atol=1e-7, err_msg=str(key))


def test_reference_detects_a_swapped_group_or_a_missing_clip():
    """The comparison above can fail: the reference tells the recipe from near variants."""
    params = params0()
    seq = [grads_like(params, 0.01, 1), grads_like(params, 100.0, 2), grads_like(params, 50.0, 3)]
    got = run(params, seq)
    swapped = reference(params, seq, lr={**LR, "a_scale": LR["smooth"], "smooth": LR["a_scale"]})
    unclipped = reference(params, seq, clip=np.inf)
    for variant in (swapped, unclipped):
        assert max(np.abs(got[k] - variant[k]).max() for k in got) > 1e-4
