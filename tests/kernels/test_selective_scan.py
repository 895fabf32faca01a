"""selective_scan: Pallas kernel (compiled on GPU, interpret mode elsewhere) vs selective_scan_ref,
and CUDA lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_scan import ScanConfig, default_scan_config, selective_scan
from ptq4vm_jax.ops.scan import selective_scan_ref

# On a GPU the same cases run the compiled kernels; elsewhere Pallas interpret mode.
INTERPRET = jax.default_backend() != "gpu"


def make_inputs(seed, batch, seq, e, n, dtype=jnp.float32):
    """Random S6 inputs with Mamba-like ranges: A < 0, softplus(delta) around 0.1..1."""
    ks = jax.random.split(jax.random.key(seed), 8)
    return dict(
        u=jax.random.normal(ks[0], (batch, seq, e)).astype(dtype),
        delta=(jax.random.normal(ks[1], (batch, seq, e)) * 0.5 - 1.0).astype(dtype),
        A=-jnp.exp(0.5 * jax.random.normal(ks[2], (e, n))),
        B=jax.random.normal(ks[3], (batch, seq, n)).astype(dtype),
        C=jax.random.normal(ks[4], (batch, seq, n)).astype(dtype),
        D=jax.random.normal(ks[5], (e,)),
        z=jax.random.normal(ks[6], (batch, seq, e)).astype(dtype),
        delta_bias=0.2 * jax.random.normal(ks[7], (e,)),
    )


def assert_close(y, y_ref, rel):
    y, y_ref = np.asarray(y, np.float32), np.asarray(y_ref, np.float32)
    assert np.isfinite(y_ref).all()
    scale = np.abs(y_ref).max()
    assert scale > 0
    np.testing.assert_allclose(y, y_ref, rtol=rel, atol=rel * scale)


# (batch, seq, E, N, use D, z, delta_bias, softplus, reverse): Vim (N=16, L=197) and VMamba (N=1).
CASES = [
    (1, 197, 384, 16, True, True, True, True, False),  # Vim-T forward branch
    (2, 197, 384, 16, True, True, False, True, True),  # Vim backward branch, reverse in place
    (2, 49, 96, 1, True, False, True, True, True),  # VMamba d_state=1, E=96 (6 tiles of 16)
    (1, 196, 384, 1, False, False, False, False, False),  # VMamba-T stage 3 (L=196, E=384), bare scan
]


@pytest.mark.parametrize("batch,seq,e,n,use_d,use_z,use_bias,softplus,reverse", CASES)
def test_kernel_matches_reference(batch, seq, e, n, use_d, use_z, use_bias, softplus, reverse):
    inp = make_inputs(seq + e + n, batch, seq, e, n)
    for name, used in (("D", use_d), ("z", use_z), ("delta_bias", use_bias)):
        if not used:
            inp[name] = None
    if not softplus:  # the caller passes a ready step size: keep it positive so the state decays
        inp["delta"] = jax.nn.softplus(inp["delta"])
    y = selective_scan(**inp, delta_softplus=softplus, reverse=reverse, interpret=INTERPRET)
    y_ref = selective_scan_ref(**inp, delta_softplus=softplus, reverse=reverse)
    assert y.shape == (batch, seq, e) and y.dtype == jnp.float32
    assert_close(y, y_ref, 2e-5)


def test_reverse_equals_forward_on_flipped_tokens():
    inp = make_inputs(1, 1, 64, 32, 16)
    y_rev = selective_scan(**inp, reverse=True, interpret=INTERPRET)
    flipped = {k: (jnp.flip(v, axis=1) if v is not None and v.ndim == 3 else v) for k, v in inp.items()}
    y_fwd = selective_scan(**flipped, reverse=False, interpret=INTERPRET)
    assert_close(y_rev, jnp.flip(y_fwd, axis=1), 1e-6)


def test_bf16_inputs_odd_state_and_small_tiles():
    # N = 5 is padded to 8 states; E = 40 is split into 16-wide tiles (the last one masked).
    inp = make_inputs(2, 1, 33, 40, 5, jnp.bfloat16)
    cfg = ScanConfig(block_e=16, num_warps=1, num_stages=2)
    y = selective_scan(**inp, reverse=True, interpret=INTERPRET, config=cfg)
    y_ref = selective_scan_ref(**inp, reverse=True)
    assert y.dtype == jnp.bfloat16
    assert_close(y, y_ref, 1e-2)


@pytest.mark.parametrize("batch,e,n", [(64, 768, 16), (64, 96, 1), (1, 384, 16), (256, 1536, 16)])
def test_default_tiles_fill_the_gpu(batch, e, n):
    cfg = default_scan_config(batch, e, n)
    programs = batch * -(-e // cfg.block_e)
    assert cfg.block_e * max(n, 1) <= 512  # the state stays in registers
    assert programs >= 512 or cfg.block_e == 16  # enough programs, or the smallest tile


def test_bad_arguments_are_explained():
    inp = make_inputs(0, 1, 8, 16, 4)
    with pytest.raises(ValueError, match=r"A must be \(E, N\)"):
        selective_scan(**{**inp, "A": inp["A"].T}, interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"B must be \(B, L, N\)"):
        selective_scan(**{**inp, "B": inp["B"][:, :-1]}, interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"D must be \(E,\)"):
        selective_scan(**{**inp, "D": inp["D"][:3]}, interpret=INTERPRET)
    with pytest.raises(ValueError, match="block_e must be a power of two"):
        ScanConfig(block_e=24)
    s = jax.ShapeDtypeStruct
    row, state = s((4096, 3136, 192), jnp.float32), s((4096, 3136, 1), jnp.float32)
    with pytest.raises(ValueError, match="split the batch"):
        jax.eval_shape(selective_scan, row, row, s((192, 1), jnp.float32), state, state)


@pytest.mark.parametrize("seq,e,n", [(197, 768, 16), (197, 1536, 16), (3136, 96, 1), (49, 768, 1)])
def test_lowers_for_cuda_at_model_shapes(seq, e, n):
    s = jax.ShapeDtypeStruct
    batch = 64
    row, state = s((batch, seq, e), jnp.bfloat16), s((batch, seq, n), jnp.bfloat16)
    args = (row, row, s((e, n), jnp.float32), state, state, s((e,), jnp.float32), row,
            s((e,), jnp.float32))
    text = jax.jit(lambda *a: selective_scan(*a, reverse=True)).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and "ptq4vm_selective_scan" in text
