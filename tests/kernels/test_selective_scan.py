"""selective_scan: the Pallas kernel and its VJP (compiled on GPU, interpret mode
elsewhere) vs selective_scan_ref and its jax.grad, the dispatcher, and CUDA lowering."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_scan import (
    ScanConfig,
    default_scan_config,
    selective_scan,
)
from ptq4vm_jax import gpu
from ptq4vm_jax.ops import scan as scan_ops
from ptq4vm_jax.ops.scan import selective_scan_ref

pytestmark = pytest.mark.slow  # Pallas kernels in the interpreter: compile-heavy
# On a GPU the same cases run the compiled kernels; elsewhere Pallas interpret mode.
INTERPRET = jax.default_backend() != "gpu"


def make_inputs(seed, batch, seq, e, n, dtype=jnp.float32):
    """Random S6 inputs with Mamba-like ranges: A < 0, softplus(delta) around 0.1..1. numpy draws
    them: eager jax.random calls would compile one program per shape."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)
    return dict(
        u=jnp.asarray(normal(batch, seq, e), dtype),
        delta=jnp.asarray(normal(batch, seq, e) * 0.5 - 1.0, dtype),
        A=jnp.asarray(-np.exp(0.5 * normal(e, n))),
        B=jnp.asarray(normal(batch, seq, n), dtype),
        C=jnp.asarray(normal(batch, seq, n), dtype),
        D=jnp.asarray(normal(e)),
        z=jnp.asarray(normal(batch, seq, e), dtype),
        delta_bias=jnp.asarray(0.2 * normal(e)),
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


@pytest.mark.parametrize("unroll,prefetch,reverse", [(4, False, False), (4, True, True), (8, False, True),
                                                    (1, True, False)])
def test_unrolled_and_prefetching_token_loops_match_reference(unroll, prefetch, reverse):
    # L = 33 leaves a remainder after the unrolled trips (33 = 8 * 4 + 1 = 4 * 8 + 1). Each trip
    # count runs, the pipelined and the plain loop, each direction.
    inp = make_inputs(3, 2, 33, 48, 16)
    cfg = ScanConfig(block_e=16, num_warps=1, num_stages=2, unroll=unroll, prefetch=prefetch)
    y = selective_scan(**inp, reverse=reverse, interpret=INTERPRET, config=cfg)
    assert_close(y, selective_scan_ref(**inp, reverse=reverse), 2e-5)


@pytest.mark.parametrize("n,reverse", [(16, False), (1, True)])
def test_exp2_decays_match_reference(n, reverse):
    inp = make_inputs(4, 2, 33, 48, n)
    cfg = ScanConfig(block_e=16, num_warps=1, num_stages=2, exp2=True)
    y = selective_scan(**inp, reverse=reverse, interpret=INTERPRET, config=cfg)
    assert_close(y, selective_scan_ref(**inp, reverse=reverse), 2e-5)


# (batch, seq, E, N, block_e, warps, unroll, prefetch, exp2, reverse, dtype): E = 40 and 72 leave a
# masked last tile; N = 1 (VMamba), 5 (odd) and 16 (Vim); L = 33 leaves a remainder after the trips.
CHANNEL_CASES = [
    (2, 33, 72, 16, 32, 1, 4, True, True, True, jnp.float32),
    (1, 197, 384, 16, 128, 4, 2, True, False, False, jnp.float32),
    (2, 40, 96, 1, 64, 2, 8, True, True, True, jnp.float32),
    (1, 33, 40, 5, 16, 1, 1, False, False, False, jnp.bfloat16),
]


@pytest.mark.parametrize("batch,seq,e,n,block_e,warps,unroll,prefetch,exp2,reverse,dtype", CHANNEL_CASES)
def test_channel_major_state_matches_reference(batch, seq, e, n, block_e, warps, unroll, prefetch, exp2,
                                               reverse, dtype):
    inp = make_inputs(5 + n, batch, seq, e, n, dtype)
    if dtype == jnp.bfloat16:
        inp["D"] = inp["delta_bias"] = None
    cfg = ScanConfig(block_e, warps, 2, unroll=unroll, prefetch=prefetch, exp2=exp2, channel_major=True)
    y = selective_scan(**inp, reverse=reverse, interpret=INTERPRET, config=cfg)
    y_ref = selective_scan_ref(**inp, reverse=reverse)
    assert y.dtype == dtype
    assert_close(y, y_ref, 1e-2 if dtype == jnp.bfloat16 else 2e-5)


def test_scan_config_reaches_the_dispatched_kernel(monkeypatch):
    """``selective_scan(..., backend="pallas", config=...)`` hands its config to the kernel."""
    seen = []

    def spy(*args, _fn=scan_ops.selective_scan_pallas, **kw):
        seen.append(kw.get("config"))
        return _fn(*args, **{**kw, "interpret": INTERPRET})

    monkeypatch.setattr(scan_ops, "selective_scan_pallas", spy)
    inp = make_inputs(6, 2, 9, 48, 16)
    config = ScanConfig(16, 1, 2, channel_major=True)
    y = scan_ops.selective_scan(**inp, backend="pallas", config=config)
    scan_ops.selective_scan(**inp, backend="pallas")
    assert seen == [config, None]
    assert_close(y, selective_scan_ref(**inp), 2e-5)


def test_bf16_inputs_odd_state_and_small_tiles():
    # N = 5 is padded to 8 states; E = 40 is split into 16-wide tiles (the last one masked).
    inp = make_inputs(2, 1, 33, 40, 5, jnp.bfloat16)
    cfg = ScanConfig(block_e=16, num_warps=1, num_stages=2)
    y = selective_scan(**inp, reverse=True, interpret=INTERPRET, config=cfg)
    y_ref = selective_scan_ref(**inp, reverse=True)
    assert y.dtype == jnp.bfloat16
    assert_close(y, y_ref, 1e-2)


@pytest.mark.parametrize("batch,e,n,channel_major", [
    (64, 768, 16, False), (64, 1536, 16, True), (64, 384, 16, False), (256, 384, 16, True),
    (64, 96, 1, False), (1, 384, 16, False), (256, 1536, 16, True), (4096, 96, 1, False),
])
def test_default_tiles_fill_the_gpu(batch, e, n, channel_major):
    cfg = default_scan_config(batch, e, n)
    assert (cfg.unroll, cfg.prefetch) == (4, True)  # the fastest token loop on the H200
    # The faster layout on the H200: channel-major at N = 16 with many channels (Vim-B batch 64,
    # Vim-T/B batch 256), the tile layout with few (Vim-T batch 64) and at N = 1 (VMamba).
    assert cfg.channel_major == channel_major
    assert cfg.exp2 == (n > 1)
    tile = default_scan_config(batch, e, n, channel_major=False)
    assert not tile.channel_major
    programs = batch * -(-e // tile.block_e)
    assert tile.block_e * max(n, 1) <= 512  # the state stays in registers
    assert programs >= 512 or tile.block_e == 16  # enough programs, or the smallest tile
    # Channel-major: each thread holds whole channels, N states each, in registers.
    cm = default_scan_config(batch, e, n, channel_major=True)
    assert cm.channel_major and cm.block_e // (32 * cm.num_warps) * n <= 32


@pytest.mark.parametrize("config", [None, ScanConfig(16, 1, 2), ScanConfig(32, 1, 2, channel_major=True)])
def test_trainable_configs_per_pass(config, monkeypatch):
    """A given config runs both passes of the trainable scan; by default the forward is the
    forward's default and the backward the tile layout."""
    kernels = importlib.import_module("pallas_kernels.selective_scan")
    seen = []
    real = kernels._trainable

    def spy(softplus, reverse, interpret, cfgs, *args):
        seen.append(cfgs)
        return real(softplus, reverse, interpret, cfgs, *args)

    monkeypatch.setattr(kernels, "_trainable", spy)
    inp = make_inputs(8, 1, 9, 32, 16)
    kernels.selective_scan(**inp, interpret=INTERPRET, config=config)
    default = (default_scan_config(1, 32, 16), default_scan_config(1, 32, 16, channel_major=False))
    assert seen == [default if config is None else (config, config)]


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
    with pytest.raises(ValueError, match="unroll must be >= 1"):
        ScanConfig(unroll=0)
    s = jax.ShapeDtypeStruct
    row, state = s((4096, 3136, 192), jnp.float32), s((4096, 3136, 1), jnp.float32)
    with pytest.raises(ValueError, match="split the batch"):
        jax.eval_shape(selective_scan, row, row, s((192, 1), jnp.float32), state, state)


@pytest.mark.parametrize("seq,e,n,config", [
    (197, 768, 16, None), (197, 1536, 16, None), (3136, 96, 1, None), (49, 768, 1, None),
    (197, 1536, 16, ScanConfig(32, 2, 2, unroll=1, prefetch=False)),
    (197, 1536, 16, ScanConfig(32, 2, 2, exp2=True)),
    (197, 1536, 16, default_scan_config(64, 1536, 16, channel_major=True)),
    (3136, 96, 1, ScanConfig(64, 2, 2, unroll=8, channel_major=True)),
])
def test_lowers_for_cuda_at_model_shapes(seq, e, n, config, cuda_target):
    s = jax.ShapeDtypeStruct
    batch = 64
    row, state = s((batch, seq, e), jnp.bfloat16), s((batch, seq, n), jnp.bfloat16)
    args = (row, row, s((e, n), jnp.float32), state, state, s((e,), jnp.float32), row,
            s((e,), jnp.float32))
    text = jax.jit(lambda *a: selective_scan(*a, reverse=True, config=config)).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and "ptq4vm_selective_scan" in text
    effective = config or default_scan_config(batch, e, n)
    assert ("__nv_exp2f" in text) == effective.exp2  # libdevice exp2 for decays


# ----------------------------------------------------------------------------- gradients

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def grads(fn, inp, softplus, reverse, seed=7, **kw):
    """Value and gradients (for every non-None argument) of a random linear readout of ``fn``."""
    shape = inp["u"].shape
    w = jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))
    used = tuple(k for k in ARGS if inp[k] is not None)

    def loss(*xs):
        args = {**inp, **dict(zip(used, xs, strict=True))}
        y = fn(**args, delta_softplus=softplus, reverse=reverse, **kw)
        return jnp.sum(w * y.astype(jnp.float32))

    value, g = jax.value_and_grad(loss, argnums=tuple(range(len(used))))(*(inp[k] for k in used))
    return value, dict(zip(used, g, strict=True))


# (batch, seq, E, N, use D, z, delta_bias, softplus, reverse, layout). E = 72 runs as 16-wide
# tiles, the last one masked; N = 5 is padded to 8 states in the tile layout. D, z, delta_bias
# and softplus are differentiated around the kernels, the same for both layouts; the kernels see
# the layout, the direction and N. Channel-major runs at N = 1 and N = 5 (its per-state loop is
# unrolled over N, so N = 16 only makes the program longer), forwards and reversed.
GRAD_CASES = [
    (2, 33, 72, 16, True, True, True, True, False, "default"),  # Vim forward branch
    (2, 33, 72, 16, True, True, True, True, True, "default"),  # Vim backward branch (reverse)
    (2, 40, 48, 1, True, False, True, True, True, "default"),  # VMamba: d_state 1, no gate
    (1, 17, 40, 5, False, False, False, False, False, "default"),  # bare scan, odd state size
    (2, 40, 48, 1, True, False, True, True, True, "channel-major"),
    (1, 17, 40, 5, False, False, False, False, False, "channel-major"),
]


@pytest.mark.parametrize("batch,seq,e,n,use_d,use_z,use_bias,softplus,reverse,layout", GRAD_CASES)
def test_trainable_gradients_match_reference(batch, seq, e, n, use_d, use_z, use_bias, softplus, reverse,
                                             layout):
    inp = make_inputs(seq * e + n, batch, seq, e, n)
    for name, used in (("D", use_d), ("z", use_z), ("delta_bias", use_bias)):
        if not used:
            inp[name] = None
    if not softplus:
        inp["delta"] = jax.nn.softplus(inp["delta"])
    # Channel-major in both passes; 32-wide tiles leave E = 72 and 40 a masked last tile.
    config = ScanConfig(32, 1, 2, exp2=True, channel_major=True) if layout == "channel-major" else None
    value, g = grads(selective_scan, inp, softplus, reverse, interpret=INTERPRET, config=config)
    value_ref, g_ref = grads(selective_scan_ref, inp, softplus, reverse)
    np.testing.assert_allclose(float(value), float(value_ref), rtol=1e-5)
    assert set(g) == {k for k in ARGS if inp[k] is not None}
    for k in g:
        assert g[k].shape == inp[k].shape and g[k].dtype == inp[k].dtype, k
        assert_close(g[k], g_ref[k], 1e-5)


def test_trainable_gradients_bf16_and_vmapped_directions():
    # VMamba vmaps the scan over its four directions (each with its own A, B, C, D); bf16 inputs
    # get bf16 gradients.
    dirs = [make_inputs(10 + k, 1, 24, 32, 1, jnp.bfloat16) for k in range(2)]
    stacked = {k: jnp.stack([d[k] for d in dirs]) for k in ("u", "delta", "A", "B", "C", "D")}
    w = jnp.asarray(np.random.default_rng(3).standard_normal(stacked["u"].shape, np.float32))

    def loss(fn, **kw):
        scan = lambda u, delta, A, B, C, D: fn(u, delta, A, B, C, D=D, **kw)
        return lambda *xs: jnp.sum(w * jax.vmap(scan)(*xs).astype(jnp.float32))

    xs = tuple(stacked.values())
    g = jax.grad(loss(selective_scan, interpret=INTERPRET), argnums=tuple(range(6)))(*xs)
    g_ref = jax.grad(loss(selective_scan_ref), argnums=tuple(range(6)))(*xs)
    for x, name, gk, gr in zip(xs, stacked, g, g_ref, strict=True):
        assert gk.dtype == x.dtype, name
        assert_close(gk, gr, 2e-2)


@pytest.mark.parametrize("backend,on_gpu,kernel", [
    ("ref", True, False), ("pallas", False, True), ("pallas", True, True), ("auto", True, True),
    ("auto", False, False),
])
def test_dispatcher_runs_the_backend_it_is_given(backend, on_gpu, kernel, monkeypatch):
    """``selective_scan(backend=...)`` runs the kernel for "pallas" everywhere (the interpreter
    off the GPU) and for "auto" on a GPU, the reference otherwise, every argument in its place,
    and the kernel's gradients are the reference's. The platform check is faked both ways and
    the kernel always runs as this machine can (compiled on a GPU, interpreted elsewhere), so
    the routing is tested on every machine, not compared reference against reference."""
    calls = []

    def spy(*args, _fn=scan_ops.selective_scan_pallas, **kw):
        calls.append(kw["interpret"])
        return _fn(*args, **{**kw, "interpret": INTERPRET})

    monkeypatch.setattr(scan_ops, "selective_scan_pallas", spy)
    monkeypatch.setattr(gpu, "on_gpu", lambda: on_gpu)
    # D, z and delta_bias all differ, delta_softplus=False and reverse=True are not the defaults:
    # a dropped or misplaced argument changes the output.
    inp = make_inputs(5, 1, 16, 32, 16)
    inp["delta"] = jax.nn.softplus(inp["delta"])
    kw = dict(delta_softplus=False, reverse=True)
    y_ref = selective_scan_ref(**inp, **kw)
    y = scan_ops.selective_scan(**inp, **kw, backend=backend)
    if not kernel:
        assert calls == []
        np.testing.assert_array_equal(y, y_ref)
        return
    assert calls == [not on_gpu]  # the interpreter exactly when the platform is not a GPU
    assert_close(y, y_ref, 2e-5)
    value, g = grads(functools.partial(scan_ops.selective_scan, backend=backend), inp, False, True)
    value_ref, g_ref = grads(selective_scan_ref, inp, False, True)
    assert set(g) == set(ARGS)
    for k in g:
        assert_close(g[k], g_ref[k], 1e-5)


def test_unknown_scan_backend_is_explained():
    inp = make_inputs(0, 1, 8, 16, 4)
    with pytest.raises(ValueError, match="unknown scan backend 'triton'.*'auto', 'ref', 'pallas'"):
        scan_ops.selective_scan(**inp, backend="triton")


def test_trainable_state_buffer_overflow_is_explained():
    s = jax.ShapeDtypeStruct
    row, state = s((256, 197, 3072), jnp.float32), s((256, 197, 16), jnp.float32)
    a = s((3072, 16), jnp.float32)
    # The forward alone needs no state buffer: only differentiating is refused.
    assert jax.eval_shape(selective_scan, row, row, a, state, state).shape == row.shape
    loss = lambda u: jnp.sum(selective_scan(u, u, jnp.zeros(a.shape), jnp.zeros(state.shape),
                                                      jnp.zeros(state.shape)))
    with pytest.raises(ValueError, match="state buffer .* split the batch"):
        jax.eval_shape(jax.grad(loss), row)


@pytest.mark.parametrize("directions,seq,e,n,config", [
    (1, 197, 384, 16, None), (4, 3136, 96, 1, None),
    (1, 197, 384, 16, ScanConfig(64, 1, 2, exp2=True, channel_major=True)),
])
def test_backward_lowers_for_cuda_at_model_shapes(directions, seq, e, n, config, cuda_target):
    # Vim-T (one direction, gated, reverse) and VMamba-T stage 1 (four vmapped directions).
    s = jax.ShapeDtypeStruct
    lead = (directions, 64)
    row, state = s((*lead, seq, e), jnp.bfloat16), s((*lead, seq, n), jnp.bfloat16)
    vec = s((directions, e), jnp.float32)
    args = (row, row, s((directions, e, n), jnp.float32), state, state, vec, row, vec)
    gated = n > 1
    scan = lambda u, dt, a, b, c, d, z, bias: selective_scan(
        u, dt, a, b, c, d, z if gated else None, bias, reverse=gated, config=config)
    loss = lambda *a: jnp.sum(jax.vmap(scan)(*a).astype(jnp.float32))
    text = jax.jit(jax.grad(loss, argnums=tuple(range(8)))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
    assert "ptq4vm_selective_scan_states" in text and "ptq4vm_selective_scan_bwd" in text
