"""vim_mixer: the fused bidirectional Vim mixer kernel and its VJP (compiled on GPU,
interpret mode elsewhere) vs ops.mixer.vim_mixer_ref and its jax.grad, the integer dt_proj feed
against the quantized layer, the dispatcher, and CUDA lowering."""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.qlinear import QuantizedLinear
from pallas_kernels.qmatmul import quantize_activations
from pallas_kernels.vim_mixer import MixerConfig, MixerDirection, vim_mixer
from ptq4vm_jax import gpu
from ptq4vm_jax.ops import mixer as mixer_ops
from ptq4vm_jax.ops import scan as scan_ops
from ptq4vm_jax.ops.mixer import vim_mixer_ref
from ptq4vm_jax.quant.layer import simulate_int_linear

pytestmark = pytest.mark.slow  # Pallas kernels in the interpreter: compile-heavy
INTERPRET = jax.default_backend() != "gpu"


def make_direction(rng, batch, seq, e, n, *, rank=None, d_conv=4, dtype=jnp.float32):
    """Random inputs of one direction with Vim-like ranges (A < 0, softplus(Δ) about 0.1..1).
    ``rank``: Δ as x_proj's Δ-rank columns with dt_proj on chip. numpy draws them: eager
    jax.random calls would compile one program per shape."""
    bound = d_conv ** -0.5
    f32 = lambda a, dt=jnp.float32: jnp.asarray(np.asarray(a, np.float32), dt)
    delta = (rng.normal(size=(batch, seq, e)) * 0.5 - 1.0 if rank is None
             else rng.normal(size=(batch, seq, rank)))
    return MixerDirection(
        conv_weight=f32(rng.uniform(-bound, bound, (d_conv, e))),
        conv_bias=f32(rng.uniform(-0.5, 0.5, e)),
        delta=f32(delta, dtype),
        B=f32(rng.normal(size=(batch, seq, n)), dtype),
        C=f32(rng.normal(size=(batch, seq, n)), dtype),
        A=f32(-np.exp(0.5 * rng.normal(size=(e, n)))),
        D=f32(rng.uniform(0.5, 1.5, e)),
        delta_bias=f32(0.2 * rng.normal(size=e) - (0.0 if rank is None else 1.0)),
        dt_weight=None if rank is None else f32(rng.normal(size=(rank, e)) * rank ** -0.5),
    )


def make_inputs(seed, batch, seq, e, n, *, gate=True, rank_f=None, rank_b=None, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, seq, e)).astype(np.float32), dtype)
    z = jnp.asarray(rng.normal(size=(batch, seq, e)).astype(np.float32), dtype) if gate else None
    return (x, z, make_direction(rng, batch, seq, e, n, rank=rank_f, dtype=dtype),
            make_direction(rng, batch, seq, e, n, rank=rank_b, dtype=dtype))


def assert_close(y, y_ref, rel):
    y, y_ref = np.asarray(y, np.float32), np.asarray(y_ref, np.float32)
    assert np.isfinite(y_ref).all()
    scale = np.abs(y_ref).max()
    assert scale > 0
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=rel * scale)


# (batch, L, E, N, gate, divide_out, Δ-rank per direction (None: Δ given), config): Vim-T's width
# at L = 197 (the interpreter walks 2 x 197 tokens per tile). The other shapes and flags
# (L = 65, E = 128, no gate, the sum, dt_proj on chip, the prefetching loop) are the integer-feed
# test's; a masked last tile the gradient test's (its forward is this kernel).
PLAIN = MixerConfig(128, 4, 2, unroll=1, prefetch=False)
SMALL = MixerConfig(16, 1, 2, unroll=1, prefetch=False)  # a masked last tile at E = 24
CASES = [(1, 197, 384, 16, True, True, (None, None), PLAIN)]


@pytest.mark.parametrize("batch,seq,e,n,gate,divide_out,ranks,config", CASES)
def test_kernel_matches_reference(batch, seq, e, n, gate, divide_out, ranks, config):
    x, z, fwd, bwd = make_inputs(seq + e + n, batch, seq, e, n, gate=gate, rank_f=ranks[0], rank_b=ranks[1])
    y = vim_mixer(x, z, fwd, bwd, divide_out=divide_out, interpret=INTERPRET, config=config)
    y_ref = vim_mixer_ref(x, z, fwd, bwd, divide_out=divide_out)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, y_ref, 1e-5)


def test_integer_dt_proj_feed_equals_the_quantized_layer():
    """Δ from integer codes on chip (codes, weight codes, per-token and per-channel steps) gives
    what the quantized dt_proj (``simulate_int_linear``, fake mode's integer-form layer) gives, at
    L = 65, E = 128, N = 16, without the gate, the sum of the directions; the backward direction
    runs a float dt_proj on chip (R = 8). Two tokens per loop trip with the next trip's loads
    prefetched: 65 = 32 x 2 + a remainder of 1."""
    batch, seq, e, n, r = 2, 65, 128, 16, 6
    x, _, fwd, bwd = make_inputs(11, batch, seq, e, n, gate=False, rank_b=8)
    rng = np.random.default_rng(12)
    low = jnp.asarray(rng.normal(size=(batch, seq, r)), jnp.float32)  # x_proj's Δ-rank columns
    layer = QuantizedLinear(
        w_int=jnp.asarray(rng.integers(-127, 128, (r, e)), jnp.int8),
        w_scale=jnp.asarray(rng.uniform(2e-3, 6e-3, e), jnp.float32),
        smooth=jnp.asarray(rng.uniform(0.5, 2.0, r), jnp.float32),
        a_scale=jnp.asarray(rng.uniform(0.01, 0.03, seq), jnp.float32),
        a_zero=jnp.full((seq,), 128, jnp.int32), bias=fwd.delta_bias)
    codes = jax.jit(quantize_activations)(low, layer).astype(jnp.int32) + 2 ** (layer.a_bits - 1)  # q
    on_chip = MixerDirection(**{**vars(fwd), "delta": (codes - layer.a_zero[:, None]).astype(jnp.float32),
                                "dt_weight": layer.w_int.astype(jnp.float32), "dt_row_scale": layer.a_scale,
                                "dt_col_scale": layer.w_scale})
    delta = jax.jit(simulate_int_linear)(low, layer)  # dt_proj with its bias, as fake mode runs it
    given = MixerDirection(**{**vars(fwd), "delta": delta, "delta_bias": None})
    cfg = MixerConfig(64, 2, 2, unroll=2)
    y = vim_mixer(x, None, on_chip, bwd, divide_out=False, interpret=INTERPRET, config=cfg)
    assert_close(y, vim_mixer_ref(x, None, given, bwd, divide_out=False), 1e-5)


def out_quantizer(seed, seq, e, a_bits):
    """out_proj's per-token asymmetric input quantizer over (B, L, E) values of about unit size
    (its weight is not read)."""
    rng = np.random.default_rng(seed)
    top = 2**a_bits - 1
    return QuantizedLinear(
        w_int=jnp.zeros((e, 8), jnp.int8), w_scale=jnp.ones(8, jnp.float32),
        smooth=jnp.asarray(rng.uniform(0.5, 2.0, e), jnp.float32),
        a_scale=jnp.asarray(rng.uniform(1.0, 3.0, seq) / top, jnp.float32),
        a_zero=jnp.asarray(rng.integers(top // 3, 2 * top // 3, seq), jnp.int32), a_bits=a_bits)


@pytest.mark.parametrize("batch,seq,e,n,gate,dtype,a_bits,config", [
    (2, 65, 128, 16, True, jnp.bfloat16, 8, MixerConfig(64, 1, 2, unroll=2)),
    (1, 11, 24, 4, False, jnp.float32, 4, SMALL),  # a masked last tile, 4-bit codes
])
def test_out_proj_codes_epilogue(batch, seq, e, n, gate, dtype, a_bits, config):
    """With ``quant`` (out_proj's input quantizer) the kernel writes the int8 codes of its value:
    exactly what out_proj computes from the kernel's float output (so integer inference through
    the kernel equals fake-quant through it), and in fp32 the reference value's codes but where
    the two values straddle a rounding boundary."""
    x, z, fwd, bwd = make_inputs(seq + e, batch, seq, e, n, gate=gate, dtype=dtype)
    quant = out_quantizer(seq, seq, e, a_bits)
    y = vim_mixer(x, z, fwd, bwd, interpret=INTERPRET, config=config)
    codes = vim_mixer(x, z, fwd, bwd, interpret=INTERPRET, config=config, quant=quant)
    assert codes.dtype == jnp.int8 and codes.shape == x.shape
    c = np.asarray(codes).astype(int)
    np.testing.assert_array_equal(c, np.asarray(quantize_activations(y, quant)))
    assert len(np.unique(c)) > 2 ** (a_bits - 1), "the quantizer's range is hardly used"
    if dtype == jnp.float32:
        c_ref = np.asarray(quantize_activations(vim_mixer_ref(x, z, fwd, bwd), quant)).astype(int)
        assert np.abs(c - c_ref).max() <= 1 and np.mean(c != c_ref) <= 1e-2


def grads(fn, args, seed=3, **kw):
    """Value and gradients (every array leaf) of a random linear readout of ``fn(x, z, fwd, bwd)``."""
    w = jnp.asarray(np.random.default_rng(seed).normal(size=args[0].shape), jnp.float32)
    loss = lambda *a: jnp.sum(w * fn(*a, **kw).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*args)


def test_trainable_gradients_match_reference():
    # dt_proj on chip forwards, Δ given backwards; E = 24 masks the last 16-wide tile.
    args = make_inputs(7, 2, 11, 24, 2, rank_f=3)
    cfg = SMALL
    value, g = grads(vim_mixer, args, interpret=INTERPRET, config=cfg)
    value_ref, g_ref = grads(vim_mixer_ref, args)
    np.testing.assert_allclose(float(value), float(value_ref), rtol=1e-5)
    leaves, ref_leaves = jax.tree.leaves_with_path(g), jax.tree.leaves_with_path(g_ref)
    assert [p for p, _ in leaves] == [p for p, _ in ref_leaves] and len(leaves) == 2 + 2 * 8 + 1
    for (path, gk), (_, gr) in zip(leaves, ref_leaves, strict=True):
        assert gk.shape == gr.shape and gk.dtype == gr.dtype, path
        assert_close(gk, gr, 1e-5)


@pytest.mark.parametrize("backend,on_gpu,kernel", [("fused", False, True), ("auto", True, False),
                                                   ("auto", False, False), ("ref", True, False)])
def test_dispatcher_runs_the_backend_it_is_given(backend, on_gpu, kernel, monkeypatch):
    """The model's scan backend picks the mixer core: the kernel for "fused" everywhere (the
    interpreter off the GPU) and only for "fused": "auto" keeps the per-direction scans."""
    calls = []

    def spy(*args, _fn=mixer_ops.vim_mixer_pallas, **kw):
        calls.append(kw["interpret"])
        return _fn(*args, **{**kw, "interpret": INTERPRET})

    monkeypatch.setattr(mixer_ops, "vim_mixer_pallas", spy)
    monkeypatch.setattr(gpu, "on_gpu", lambda: on_gpu)
    # ("auto" on a faked GPU runs the per-direction Pallas scans: as this machine can)
    scan = scan_ops.selective_scan_pallas
    monkeypatch.setattr(scan_ops, "selective_scan_pallas",
                        lambda *a, **kw: scan(*a, **{**kw, "interpret": INTERPRET}))
    x, z, fwd, bwd = make_inputs(5, 1, 9, 16, 2)
    y = mixer_ops.vim_mixer(x, z, fwd, bwd, divide_out=False, backend=backend,
                            config=SMALL)
    assert calls == ([not on_gpu] if kernel else [])
    assert_close(y, vim_mixer_ref(x, z, fwd, bwd, divide_out=False), 1e-5)


def test_packed_input_reads_x_and_the_gate_in_place():
    """``packed=True`` (the model's call: in_proj's whole output, x and z side by side) is the
    same kernel on the same values: bit-equal to separate halves in value and codes, gradients
    to float ulps, with a masked last channel tile (E = 24, 16 channels per program) so the gate's offset and
    mask both show."""
    x, z, fwd, bwd = make_inputs(21, 2, 9, 24, 4, rank_f=3)
    xz = jnp.concatenate([x, z], axis=-1)
    config = MixerConfig(16, 1, 2, unroll=1, prefetch=False)
    run = lambda *a, **kw: vim_mixer(*a, interpret=INTERPRET, config=config, **kw)
    y = run(xz, None, fwd, bwd, packed=True)
    assert y.shape == x.shape
    np.testing.assert_array_equal(y, run(x, z, fwd, bwd))
    quant = out_quantizer(22, 9, 24, 8)
    np.testing.assert_array_equal(run(xz, None, fwd, bwd, packed=True, quant=quant),
                                  run(x, z, fwd, bwd, quant=quant))
    probe = jnp.asarray(np.random.default_rng(23).normal(size=x.shape), jnp.float32)
    g_xz = jax.grad(lambda t: jnp.sum(probe * run(t, None, fwd, bwd, packed=True)))(xz)
    g_x, g_z = jax.grad(lambda a, b: jnp.sum(probe * run(a, b, fwd, bwd)), argnums=(0, 1))(x, z)
    # The backward is jnp around the Pallas scans: XLA fuses the split differently (float ulps).
    assert_close(g_xz, jnp.concatenate([g_x, g_z], axis=-1), 1e-6)


def test_dt_proj_off_chip_by_config(monkeypatch):
    """``MixerConfig(dt_on_chip=False)``: given dt_proj's operands, XLA computes Δ first and the
    kernel takes it as given (no dt_weight reaches it); the value is the reference's."""
    kernels = importlib.import_module("pallas_kernels.vim_mixer")  # the package exports the function
    seen = []
    real = kernels._forward
    monkeypatch.setattr(kernels, "_forward", lambda *a, **kw: seen.append([d.dt_weight for d in a[2:4]])
                        or real(*a, **kw))
    x, z, fwd, bwd = make_inputs(6, 1, 9, 24, 4, rank_f=5, rank_b=3)
    config = MixerConfig(16, 1, 2, unroll=1, prefetch=False, dt_on_chip=False)
    y = vim_mixer(x, z, fwd, bwd, interpret=INTERPRET, config=config)
    assert seen == [[None, None]]
    assert_close(y, vim_mixer_ref(x, z, fwd, bwd), 1e-5)


def test_bad_arguments_are_explained():
    x, z, fwd, bwd = make_inputs(0, 1, 8, 16, 4)
    with pytest.raises(ValueError, match=r"unknown scan backend 'triton'.*'auto', 'ref', 'pallas', 'fused'"):
        mixer_ops.vim_mixer(x, z, fwd, bwd, backend="triton")
    with pytest.raises(ValueError, match=r"z must match x's shape"):
        vim_mixer(x, z[:, :-1], fwd, bwd, interpret=True)
    with pytest.raises(ValueError, match=r"bwd.B must have shape \(1, 8, 4\)"):
        vim_mixer(x, z, fwd, MixerDirection(**{**vars(bwd), "B": bwd.B[:, 1:]}), interpret=True)
    with pytest.raises(ValueError, match=r"fwd.dt_weight must have shape \(3, 16\)"):
        vim_mixer(x, z, MixerDirection(**{**vars(fwd), "delta": fwd.delta[..., :3],
                                          "dt_weight": jnp.ones((4, 16))}), bwd, interpret=True)
    with pytest.raises(ValueError, match=r"packed=True takes in_proj's whole output"):
        vim_mixer(x, z, fwd, bwd, interpret=True, packed=True)
    with pytest.raises(ValueError, match="give dt_weight too"):
        vim_mixer(x, z, MixerDirection(**{**vars(fwd), "dt_col_scale": jnp.ones(16)}), bwd, interpret=True)
    with pytest.raises(ValueError, match=r"quant must quantize .* a_scale and a_zero \(8,\)"):
        vim_mixer(x, z, fwd, bwd, interpret=True, quant=out_quantizer(0, 7, 16, 8))
    with pytest.raises(ValueError, match="block_e must be a power of two"):
        MixerConfig(block_e=48)
    s = jax.ShapeDtypeStruct
    big = s((4096, 197, 3072), jnp.bfloat16)
    with pytest.raises(ValueError, match="split the batch"):
        jax.eval_shape(lambda x: vim_mixer(x, None, fwd, bwd), big)


def test_lowers_for_cuda_at_vim_shapes(cuda_target):
    """Vim-S at batch 64 in bf16: dt_proj on chip forwards (R = 24), Δ given backwards; the
    forward kernel and the trainable one's backward (the Pallas scans) lower for CUDA."""
    s = jax.ShapeDtypeStruct
    batch, seq, e, n, r = 64, 197, 768, 16, 24
    row, state, vec = s((batch, seq, e), jnp.bfloat16), s((batch, seq, n), jnp.bfloat16), s((e,), jnp.float32)

    def direction(rank):
        delta = row if rank is None else s((batch, seq, rank), jnp.bfloat16)
        weight = None if rank is None else s((rank, e), jnp.float32)
        a = s((e, n), jnp.float32)
        return MixerDirection(s((4, e), jnp.float32), vec, delta, state, state, a, vec, vec, weight)

    args = (row, row, direction(r), direction(None))
    text = jax.jit(vim_mixer).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and "ptq4vm_vim_mixer" in text
    assert "__nv_exp2f" in text  # exp2 decays
    # The model's call: in_proj's whole output, the gate read in place.
    xz = s((batch, seq, 2 * e), jnp.bfloat16)
    packed = functools.partial(vim_mixer, packed=True)
    text = jax.jit(packed).trace(xz, None, *args[2:]).lower(lowering_platforms=("cuda",)).as_text()
    assert "ptq4vm_vim_mixer" in text
    # Integer inference's dt_proj in both directions (centred codes, weight codes, both steps).
    integer = dataclasses.replace(direction(r), delta=s((batch, seq, r), jnp.float32),
                                  dt_row_scale=s((seq,), jnp.float32), dt_col_scale=vec)
    text = jax.jit(vim_mixer).trace(row, row, integer, integer).lower(lowering_platforms=("cuda",)).as_text()
    assert "ptq4vm_vim_mixer" in text
    quant = QuantizedLinear(s((e, 384), jnp.int8), s((384,), jnp.float32), vec, s((seq,), jnp.float32),
                            s((seq,), jnp.int32))
    text = jax.jit(lambda *a: vim_mixer(*a[:4], quant=a[4])).trace(*args, quant).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "ptq4vm_vim_mixer" in text and "cvt.rni.f32.f32" in text  # out_proj's codes in the epilogue
    loss = lambda *a: jnp.sum(vim_mixer(*a).astype(jnp.float32))
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "ptq4vm_vim_mixer" in text and "ptq4vm_selective_scan_bwd" in text
