"""Integer inference (`mode="int"`) against fake-quant on the bundled micro model's test split."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ptq4vm_jax as pq
from pallas_kernels import qmatmul_hopper
from pallas_kernels.qlinear import QuantizedActivation, QuantizedLinear, pack_weight
from pallas_kernels.qmatmul import quantize_activations
from ptq4vm_jax import gpu
from ptq4vm_jax.assets import ASSETS
from ptq4vm_jax.data import load_digits_dataset
from ptq4vm_jax.quant import integer
from ptq4vm_jax.quant.integer import gemm_backend_for, int_linear
from ptq4vm_jax.quant.layer import simulate_int_linear

pytestmark = pytest.mark.slow  # whole models through every integer GEMM, interpreters included

@pytest.fixture(scope="module")
def micro():
    params, _ = pq.load_params(ASSETS / "vim_micro", model_name="vim_micro")
    calib, _ = load_digits_dataset("train")
    test_x, test_y = load_digits_dataset("test")
    return params, calib, test_x, test_y


@pytest.fixture(scope="module")
def pts(micro):
    """The PTQ4VM initialisation of the trained vim_micro at the given bits, made once per module:
    on the official 256 images at W8A8 (whose bf16 error bound below depends on them), on 64 at
    the other bits, whose tests claim integer == fake, which holds for any scales."""
    params, calib, _, _ = micro
    made = {}

    def get(bits):
        if bits not in made:
            cfg = pq.QuantConfig(*bits, method="pts_only", num_calib=256 if bits == (8, 8) else 64)
            made[bits] = pq.quantize_params(params, calib, model="vim_micro", config=cfg, progress=False)
        return made[bits]

    return get


@pytest.mark.xla_optimized  # PTS over 256 images, int == fake under the compiler users run
@pytest.mark.parametrize("bits", [(8, 8), (4, 8), (4, 4)], ids=["w8a8", "w4a8", "w4a4"])
def test_int_mode_equals_fake_mode_on_the_whole_test_split(micro, pts, bits):
    test_x = micro[2]
    qp = pts(bits)
    fake = np.asarray(pq.quantized_apply(None, qp, test_x, mode="fake"))
    real = np.asarray(pq.quantized_apply(None, qp, test_x, mode="int"))
    assert np.abs(fake - real).max() <= 1e-3 * np.abs(fake).max()  # the bound, any device
    np.testing.assert_array_equal(fake.argmax(-1), real.argmax(-1))
    if jax.default_backend() == "cpu":
        # The CPU's XLA path sums the same integers and scales them in the simulation's order, so
        # ``simulate_int_linear``'s last-bit claim holds there (GPU epilogues may fuse an FMA).
        np.testing.assert_array_equal(fake, real)


@pytest.mark.xla_optimized  # what each GEMM promises under the compiler users run
def test_the_xla_gemms_equal_fake_mode_and_the_kernels_its_last_bits(micro, pts):
    """``xla-bf16`` (the integer dot on bf16 units) equals fake mode bit for bit on the CPU, as
    ``xla`` does. The Triton kernel (in the interpreter here) computes the same accumulators and
    epilogue, but XLA's optimised build may round the epilogue's multiply and add differently from
    the reference's; an output a last bit apart can flip a code of the next quantized linear, so
    its logits are held to the bound and the classes the GPU tests hold them to."""
    test_x = micro[2][:16]
    qp = pts((8, 8))
    fake = np.asarray(pq.quantized_apply(None, qp, test_x, mode="fake"))
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(np.asarray(pq.quantized_apply(None, qp, test_x, mode="int",
                                                                    gemm="xla-bf16")), fake)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the interpreter's slowness, said off the GPU)
        kernel = np.asarray(pq.quantized_apply(None, qp, test_x, mode="int", gemm="pallas"))
    assert np.abs(kernel - fake).max() <= 1e-3 * np.abs(fake).max()
    np.testing.assert_array_equal(kernel.argmax(-1), fake.argmax(-1))


@pytest.mark.xla_optimized
def test_bf16_int_mode_error_is_small(micro, pts):
    """The speed variant: projections fed bf16 activations; its error is measured, not hidden.
    It holds to what the README states for it (README, "Status"): the fp32 fake mode's class on
    every test image, and the maximum logit error it gives, to the precision printed there."""
    test_x = micro[2]
    qp = pts((8, 8))
    fake = np.asarray(pq.quantized_apply(None, qp, test_x, mode="fake"))
    bf16_model = pq.create_model("vim_micro", dtype=jnp.bfloat16)
    real = np.asarray(pq.quantized_apply(bf16_model, qp, test_x, mode="int"), np.float32)
    rel = np.abs(fake - real).max() / np.abs(fake).max()
    agree = np.mean(fake.argmax(-1) == real.argmax(-1))
    print(f"bf16 int mode vs fp32 fake: max rel error {rel:.2e}, agreement {100 * agree:.2f}%")
    assert 0 < rel <= 6e-2 and agree == 1.0


# ----------------------------------------------------------------------------- GEMM backends

ON_GPU = jax.default_backend() == "gpu"
# wgmma runs compiled on Hopper, in the Mosaic GPU interpreter off the GPU, not on other GPUs.
BACKENDS = ("xla", "xla-bf16", "pallas") + (
    ("wgmma", "mixed") if not ON_GPU or gpu.is_hopper() else ())


def make_layer(seed, k, n, w_bits, a_bits, seq=13):
    """A stored integer layer with random scales, every zero point and full-range weight codes
    (numpy draws them: eager jax.random calls would compile one program per shape)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)
    qmax = 2 ** (w_bits - 1) - 1
    return QuantizedLinear(
        w_int=pack_weight(jnp.asarray(rng.integers(-qmax, qmax + 1, (k, n)), jnp.int8), w_bits),
        w_scale=jnp.asarray(0.02 * np.exp(normal(n))),
        smooth=jnp.asarray(np.exp(0.5 * normal(k))),
        a_scale=jnp.asarray(np.exp(0.3 * normal(seq)) * np.float32(8.0 / 2**a_bits)),
        a_zero=jnp.asarray(rng.integers(0, 2**a_bits, seq), jnp.int32),
        bias=jnp.asarray(normal(n)),
        w_bits=w_bits, a_bits=a_bits,
    )


@pytest.mark.parametrize("k,n,w_bits,a_bits", [(128, 64, 8, 8), (128, 128, 4, 4), (48, 192, 8, 8),
                                               (47, 64, 4, 8), (128, 56, 8, 8), (24, 128, 4, 4)])
def test_every_int_gemm_backend_computes_the_same_linear(k, n, w_bits, a_bits):
    """xla, the Triton kernel and wgmma (Mosaic GPU interpreter off the GPU; K = 48, 47, 24 and
    N = 56, as in x_proj / dt_proj, zero-padded to 64) give the same outputs, and they equal
    fake quantization of the layer. Each takes the codes of a fused producer too (a
    QuantizedActivation; at K = 47 the packed weight's zero row gets a padded code column) and
    gives the same output from them."""
    layer = make_layer(k + n + w_bits, k, n, w_bits, a_bits)
    x = jnp.asarray(3.0 * np.random.default_rng(k).standard_normal((2, 13, k), np.float32))
    outs = {backend: np.asarray(int_linear(x, layer, backend)) for backend in BACKENDS}
    assert np.abs(outs["xla"]).max() > 0
    produced = QuantizedActivation(quantize_activations(x, layer), jnp.dtype(jnp.float32))
    for backend in BACKENDS:
        np.testing.assert_array_equal(np.asarray(int_linear(produced, layer, backend)), outs[backend],
                                      err_msg=f"{backend} on codes")
    for backend in BACKENDS[1:]:
        if ON_GPU:  # a GPU build may contract the epilogue's (acc * s_a) * s_w + b into an FMA
            np.testing.assert_allclose(outs[backend], outs["xla"], rtol=2e-6,
                                       atol=2e-6 * np.abs(outs["xla"]).max(), err_msg=backend)
        else:
            np.testing.assert_array_equal(outs[backend], outs["xla"], err_msg=backend)
    sim = np.asarray(simulate_int_linear(x, layer))
    np.testing.assert_allclose(outs["xla"], sim, rtol=1e-5, atol=1e-5 * np.abs(sim).max())


@pytest.fixture(scope="module")
def tiny64(init_params):
    """RTN W8A8 of a randomly initialised vim_micro with embed_dim 64 (the arithmetic, not
    accuracy): its in_proj (64 -> 256) and out_proj (128 -> 64) fit wgmma, the rest Triton."""
    embed_dim = 64
    images = np.random.default_rng(7).standard_normal((8, 32, 32, 3), np.float32)
    model = pq.create_model("vim_micro", embed_dim=embed_dim)
    params = init_params(model, 0)
    cfg = pq.QuantConfig(8, 8, method="rtn", num_calib=8, train_batch=8)
    return pq.quantize_params(params, np.asarray(images), model="vim_micro", config=cfg,
                              model_overrides={"embed_dim": embed_dim}, progress=False,
                              log=lambda _: None)


@pytest.mark.parametrize("platform,hopper,want", [
    ("gpu", True, ["wgmma"] * 3),
    ("gpu", False, ["xla"] * 3),  # the Triton GEMM runs slower than XLA's dot there
    ("cpu", False, ["xla"] * 3),
])
def test_auto_gemm_picks_wgmma_on_hopper_only(monkeypatch, platform, hopper, want):
    # in_proj, x_proj (N = 56) and dt_proj (K = 24): wgmma pads K and N to multiples of 64.
    monkeypatch.setattr(gpu, "on_gpu", lambda: platform == "gpu")
    monkeypatch.setattr(gpu, "is_hopper", lambda: hopper)
    got = [gemm_backend_for(394, k, n, "auto") for k, n in [(768, 3072), (768, 56), (24, 768)]]
    assert got == want


@pytest.mark.parametrize("backend", ["wgmma", "mixed"])
def test_wgmma_backends_off_hopper_are_explained(monkeypatch, backend):
    monkeypatch.setattr(gpu, "on_gpu", lambda: True)
    monkeypatch.setattr(gpu, "is_hopper", lambda: False)
    with pytest.raises(ValueError, match=rf"gemm='{backend}' needs a Hopper GPU .* gemm='pallas', "
                                         r"'xla-bf16' or 'xla'"):
        gemm_backend_for(394, 768, 3072, backend)


def test_gemm_backend_choice_and_bad_names(tiny64):
    auto = "wgmma" if gpu.is_hopper() else "xla"
    assert gemm_backend_for(394, 768, 3072, "auto") == auto
    assert gemm_backend_for(394, 768, 56, "auto") == auto  # x_proj: N padded to 64 on wgmma
    if "wgmma" in BACKENDS:
        assert gemm_backend_for(394, 768, 3072, "wgmma") == "wgmma"
        assert gemm_backend_for(394, 24, 768, "wgmma") == "wgmma"  # dt_proj: K padded to 64
        # Beyond the kernel's int32 offsets only the Triton kernel's masked tiles go.
        assert gemm_backend_for(2**22, 768, 768, "wgmma") == "pallas"
        # mixed: wgmma for in_proj / out_proj, the bf16 dot for x_proj (N = 56) and dt_proj (K = 24)
        got = [gemm_backend_for(394, k, n, "mixed") for k, n in [(384, 1536), (768, 384), (768, 56),
                                                                 (24, 768)]]
        assert got == ["wgmma", "wgmma", "xla-bf16", "xla-bf16"]
    assert gemm_backend_for(394, 768, 56, "xla-bf16") == "xla-bf16"
    with pytest.raises(ValueError, match="gemm must be one of"):
        gemm_backend_for(394, 768, 56, "cutlass")
    with pytest.raises(ValueError, match="gemm must be one of"):
        pq.quantized_apply(None, tiny64, jnp.zeros((1, 32, 32, 3)), mode="int", gemm="wgmma-1pass")
    with pytest.raises(ValueError, match="gemm must be one of"):
        pq.quantized_apply(None, tiny64, jnp.zeros((1, 32, 32, 3)), mode="int", gemm="tc")


def test_quantized_apply_gemm_backends_agree_through_the_model(tiny64, monkeypatch, fresh_forwards):
    """Every backend runs what ``gemm`` names, and all agree. ``quantized_apply`` compiles one
    program per GEMM, so each call below traces its own after the others ran: the GEMM is the
    argument passed, fixed at trace time, not a context read while tracing. in_proj takes its
    codes from the add + norm (integer mode's fused producer): each backend's entry point on codes
    counts as that backend."""
    qp = tiny64
    calls = {g: {"codes": [], "triton": 0, "bf16": []} for g in BACKENDS}
    backend = []  # the one running now
    wgmma = qmatmul_hopper.qmatmul_codes_wgmma

    def spy_codes(codes, layer, *, w_t, **kw):
        calls[backend[-1]]["codes"].append(w_t.shape)  # (N, K) of the padded weight
        return wgmma(codes, layer, w_t=w_t, **kw)

    def spy_triton(fn):
        def run(*a, **kw):
            calls[backend[-1]]["triton"] += 1
            return fn(*a, **kw)
        return run

    def spy_bf16(fn):
        def run(x, layer, **kw):
            calls[backend[-1]]["bf16"].append((layer.out_features, x.shape[-1]))  # (N, K)
            return fn(x, layer, **kw)
        return run

    for name in ("qmatmul_bf16_dot", "qmatmul_codes_bf16_dot"):
        monkeypatch.setattr(integer, name, spy_bf16(getattr(integer, name)))
    for name in ("qmatmul", "qmatmul_codes"):
        monkeypatch.setattr(integer, name, spy_triton(getattr(integer, name)))
    monkeypatch.setattr(integer, "NARROW", 64)  # embed_dim 64: in_proj and out_proj count as wide
    monkeypatch.setattr(qmatmul_hopper, "qmatmul_codes_wgmma", spy_codes)
    # (fresh_forwards: the spies count traces, so no forward traced before them may be reused)
    images = jnp.asarray(np.random.default_rng(3).standard_normal((2, 32, 32, 3), np.float32))
    logits = {}
    for g in BACKENDS:
        backend.append(g)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            logits[g] = np.asarray(pq.quantized_apply(None, qp, images, mode="int", gemm=g))
        slow = [w for w in seen if "runs its kernel in the Pallas interpreter" in str(w.message)]
        assert len(slow) == (not ON_GPU and g not in ("xla", "xla-bf16")), (g, seen)  # said off the GPU
    for g in BACKENDS[1:]:
        if ON_GPU:  # an FMA-rounded output may flip a code of the next quantized linear
            assert np.abs(logits[g] - logits["xla"]).max() <= 1e-3 * np.abs(logits["xla"]).max(), g
            np.testing.assert_array_equal(logits[g].argmax(-1), logits["xla"].argmax(-1))
        else:
            np.testing.assert_array_equal(logits[g], logits["xla"], err_msg=g)
    linears = calls["pallas"]["triton"]  # every linear of one forward ran the Triton kernel
    pallas = calls["pallas"]
    assert linears > 0 and pallas["codes"] == pallas["bf16"] == []
    assert len(calls["xla-bf16"]["bf16"]) == linears and calls["xla"]["triton"] == 0
    if "wgmma" in BACKENDS:
        # in_proj 64 -> 256, out_proj 128 -> 64, x_proj 128 -> 36 (padded to 64), dt_proj 4 -> 128
        assert sorted(set(calls["wgmma"]["codes"])) == [(64, 128), (128, 64), (256, 64)]
        assert len(calls["wgmma"]["codes"]) == linears and calls["wgmma"]["triton"] == 0
        mixed = calls["mixed"]  # x_proj (K 128 -> N 36) and dt_proj (4 -> 128) on the bf16 dot
        assert sorted(set(mixed["codes"])) == [(64, 128), (256, 64)]
        assert sorted(set(mixed["bf16"])) == [(36, 128), (128, 4)]
        assert len(mixed["codes"]) + len(mixed["bf16"]) == linears and mixed["triton"] == 0


def test_wrong_arguments_to_quantized_apply_are_explained(tiny64, micro):
    params = micro[0]
    images = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(TypeError, match="qparams must be a QuantizedParams .* got dict"):
        pq.quantized_apply(None, params, images)
    with pytest.raises(ValueError, match=r"made for vim_micro \(VimConfig\), but the model passed has "
                                         r"embed_dim=48 \(qparams: 64\); pass model=None"):
        pq.quantized_apply(pq.create_model("vim_micro"), tiny64, images)
    with pytest.raises(ValueError, match=r"has embed_dim=48 \(qparams: 64\), num_classes=5 \(qparams: 10\);"):
        pq.quantized_apply(pq.create_model("vim_micro", num_classes=5), tiny64, images)
    with pytest.raises(ValueError, match=r"\(VimConfig\), but the model passed is a VMamba;"):
        pq.quantized_apply(pq.create_model("vmamba_micro"), tiny64, images)
    with pytest.raises(ValueError, match="made for vim_micro, not vim_nano"):
        pq.quantized_apply("vim_nano", tiny64, images)


def test_per_token_dynamic_has_no_int_mode(micro):
    """Its activation scales come from each input at run time: there is no static integer form."""
    params, calib, test_x, _ = micro
    cfg = pq.QuantConfig(8, 8, method="per_token_dynamic", num_calib=16)
    qp = pq.quantize_params(params, calib, model="vim_micro", config=cfg, progress=False,
                            log=lambda _: None)
    assert np.isfinite(np.asarray(pq.quantized_apply(None, qp, test_x[:4], mode="fake"))).all()
    with pytest.raises(ValueError, match="mode='int' needs static activation scales.*mode='fake'"):
        pq.quantized_apply(None, qp, test_x[:4], mode="int")
