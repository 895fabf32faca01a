"""PTQ4VM on LocalVim: a reduced official-format LocalVim-T checkpoint (the golden
``tiny_dirs_d48_l2_n4_img40_p8``: 5×5 grid, 2 layers with the same four directions, windows
that pad the grid) converted, quantized through the API and the CLI, saved and loaded, run in
fake and integer mode.

Placement (in_proj, each direction's x_proj and dt_proj, out_proj; the gate stays float), the
per-direction token order of the per-token scales, JLSS block by block, int == fake, the Orbax
round trip. Untrained weights: this checks mechanics, not accuracy. Both layers share their
directions, so one compiled calibration program serves both blocks.
"""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq4vm_jax import create_model, load_torch_checkpoint
from ptq4vm_jax.api import quantize_params, quantized_apply, quantized_layers
from ptq4vm_jax.checkpoint.quantized import load_quantized, save_quantized
from ptq4vm_jax.cli.app import main as cli
from ptq4vm_jax.data import load_digits_dataset
from ptq4vm_jax.models import param_shapes
from ptq4vm_jax.quant import init as qinit
from ptq4vm_jax.quant.config import DEFAULT_RULES, QuantConfig
from ptq4vm_jax.quant.layer import capture_dense
from ptq4vm_jax.quant.params import to_arrays

# Calibration end to end on a converted model (several seconds a test): the slow tier.
pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1] / "data" / "local_vim_golden"
CASE = "tiny_dirs_d48_l2_n4_img40_p8"
GOLDEN = DATA / f"{CASE}.pth"
MODEL = "local_vim_tiny"
OVERRIDES = next(c for c in json.loads((DATA / "manifest.json").read_text())["cases"]
                 if c["name"] == CASE)["overrides"]
DIRECTIONS = ("v", "w3", "h_flip", "w4_flip")
GRID = 5


@pytest.fixture(scope="module")
def micro():
    params = load_torch_checkpoint(GOLDEN, MODEL, **OVERRIDES)
    images = load_digits_dataset("train", image_size=OVERRIDES["img_size"])[0]
    model = create_model(MODEL, **OVERRIDES)
    assert model.cfg.directions == (DIRECTIONS, DIRECTIONS) and model.cfg.grid_size == (GRID, GRID)
    return SimpleNamespace(params=params, model=model, calib=images[:16], test=images[16:18])


# JLSS learns the weight steps; σ and the activation steps keep their PTS initialisation (learning
# rates 1e-30 move no float32 value), so the scan-order test can recompute them from the inputs.
RECIPE = dict(num_calib=16, train_batch=8, epochs=1, lr_s=1e-30, lr_a=1e-30)


@pytest.fixture(scope="module")
def float_run(micro):
    """The float model on the calibration and test images: (logits, layer 0's in_proj input)."""
    path = ("layers_0", "mixer", "in_proj")

    def run(x):
        store = {}
        with capture_dense({path}, inputs=store):
            logits = micro.model.apply({"params": micro.params}, x)
        return logits, store[path]

    logits, captured = jax.jit(run)(np.concatenate([micro.calib, micro.test]))
    return SimpleNamespace(test_logits=np.asarray(logits[16:]), calib_in_proj=np.asarray(captured[:16]))


@pytest.fixture(scope="module")
def w4a8(micro):
    """PTQ4VM W4A8 through the API (one epoch of two mini-batches per block)."""
    return quantize_params(micro.params, micro.calib, model=MODEL, model_overrides=OVERRIDES,
                           config=QuantConfig(4, 8, **RECIPE), progress=False)


def test_every_projection_of_each_direction_is_quantized_and_calibrated_blockwise(w4a8):
    assert w4a8.config.rules == DEFAULT_RULES["local_vim"]
    names = {"/".join(p) for p in quantized_layers(w4a8)}
    per_layer = ["in_proj", "out_proj", *(f"{p}_{k}" for p in ("x_proj", "dt_proj") for k in range(4))]
    assert names == {f"layers_{i}/mixer/{n}" for i in range(2) for n in per_layer}
    stages = w4a8.summary["stages"]
    assert [s["name"] for s in stages] == ["layers_0", "layers_1"]  # JLSS, block by block
    for s in stages:  # learning lowers each block's loss and is kept (revert_worse keeps the
        # start whenever it does not, so a final loss no worse than the start proves nothing)
        assert np.isfinite(s["loss_init"]) and s["loss_learned"] < s["loss_init"] and not s["reverted"], s
        assert s["loss_final"] == s["loss_learned"]
    # a window that does not divide the 5x5 grid pads it: a scale per position of the padded sequence
    lengths = {p[-1]: to_arrays(q)["a_scale"].shape[0] for p, q in quantized_layers(w4a8).items()
               if p[0] == "layers_0"}
    assert lengths == {"in_proj": 25, "out_proj": 25, **{f"{p}_{k}": n for p in ("x_proj", "dt_proj")
                                                         for k, n in enumerate((25, 36, 25, 64))}}


def _cpu_has_avx512() -> bool:
    """Whether XLA's CPU code may use AVX-512 here (not where XLA_FLAGS caps it at AVX2)."""
    if "--xla_cpu_max_isa=AVX2" in os.environ.get("XLA_FLAGS", ""):
        return False
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown: assume the wider vectors


@pytest.mark.xla_optimized
def test_int_mode_equals_fake_mode_and_tracks_float(micro, w4a8, float_run):
    """Under XLA's default optimisations, as a user runs, integer mode equals fake mode to the
    last bits on the CPU's XLA integer path, and W4A8 stays within a tenth of the largest float
    logit (modest headroom over this checkpoint's error, so a broken scale or order fails it).

    Bit for bit where XLA's CPU code uses AVX2: with AVX-512 the two programs' fused loops
    (each out_proj's epilogue fused into RoPE and the norm that follow) round a last bit
    differently, which no code flips here (a flipped one moves a logit by far more than 1e-6)."""
    x = jnp.asarray(micro.test)
    fake, real = (np.asarray(quantized_apply(micro.model, w4a8, x, mode=m)) for m in ("fake", "int"))
    assert np.abs(fake - real).max() <= 1e-6 * np.abs(fake).max()
    np.testing.assert_array_equal(fake.argmax(-1), real.argmax(-1))
    if jax.default_backend() == "cpu" and not _cpu_has_avx512():
        np.testing.assert_array_equal(fake, real)
    ref = float_run.test_logits
    assert 0 < np.abs(fake - ref).max() <= 0.1 * np.abs(ref).max()


def test_orbax_round_trip_is_bit_exact(w4a8, tmp_path):
    save_quantized(tmp_path / "q", w4a8)
    back = load_quantized(tmp_path / "q")
    assert back.model_name == MODEL and back.config == w4a8.config
    for (p, a), (q, b) in zip(sorted(quantized_layers(w4a8).items()), sorted(quantized_layers(back).items()),
                              strict=True):
        assert p == q
        for k, v in to_arrays(a).items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(to_arrays(b)[k]), err_msg=f"{p} {k}")
    for p, v in w4a8.params["layers_0"]["mixer"].items():  # the float params of what stays float
        if not isinstance(v, dict):
            np.testing.assert_array_equal(np.asarray(v), np.asarray(back.params["layers_0"]["mixer"][p]))


def _order(name: str, h: int, w: int) -> list[int]:
    """Row-major grid index of each sequence position (-1: padding), cell by cell."""
    kind, flip = name.split("_")[0], name.endswith("_flip")
    if kind == "h":
        seq = [i * w + j for i in range(h) for j in range(w)]
    elif kind == "v":
        seq = [i * w + j for j in range(w) for i in range(h)]
    else:
        k = int(kind[1:])
        hg, wg = -(-h // k), -(-w // k)
        seq = [i * w + j if i < h and j < w else -1
               for a in range(hg) for b in range(wg) for i in range(a * k, a * k + k)
               for j in range(b * k, b * k + k)]
    return seq[::-1] if flip else seq


def test_direction_scales_come_from_that_directions_tokens(micro, w4a8, float_run):
    """PTS init of x_proj_k: per-token statistics of direction k's sequence, rebuilt here in numpy
    from in_proj's float output (the patches in direction k's order, zeros on padding, then
    direction k's causal conv and SiLU)."""
    mixer = micro.params["layers_0"]["mixer"]
    e = mixer["in_proj"]["kernel"].shape[1] // 2
    kernel = np.asarray(mixer["in_proj"]["kernel"], np.float64)
    xz = np.asarray(float_run.calib_in_proj, np.float64) @ kernel
    pad = GRID * GRID  # the index of an appended zero token
    x = np.concatenate([xz[..., :e], np.zeros_like(xz[:, :1, :e])], axis=1)
    layers = {p[-1]: to_arrays(v) for p, v in quantized_layers(w4a8).items() if p[0] == "layers_0"}
    scales = []
    for k, name in enumerate(DIRECTIONS):
        seq = x[:, [t if t >= 0 else pad for t in _order(name, GRID, GRID)]]
        kernel, bias = (np.asarray(mixer[f"conv1d_{k}"][n], np.float64) for n in ("kernel", "bias"))
        taps = kernel.shape[0]
        padded = np.pad(seq, ((0, 0), (taps - 1, 0), (0, 0)))
        conv = sum(padded[:, i : i + seq.shape[1]] * kernel[i] for i in range(taps)) + bias
        act = conv / (1 + np.exp(-conv))
        layer = layers[f"x_proj_{k}"]
        want = np.asarray(qinit.init_act_scale(jnp.asarray(act, jnp.float32), layer["smooth"], 8)[0])
        np.testing.assert_allclose(layer["a_scale"], want, rtol=1e-4, err_msg=name)
        scales.append(want)
    # h_flip is not v reordered: the per-token scales are each direction's own
    assert not np.allclose(np.sort(scales[0]), np.sort(scales[2]), rtol=1e-3)


def test_cli_converts_quantizes_like_the_api_and_evaluates(w4a8, tmp_path, capsys):
    """``ptq4vm convert/quantize/eval --model local_vim_tiny`` with the API test's recipe."""
    value = lambda k, v: tuple(map(tuple, v)) if k == "directions" else v
    args = [f"--model-arg={k}={value(k, v)}" for k, v in OVERRIDES.items()]
    base = ["--model", MODEL, "--checkpoint", str(GOLDEN), *args]
    cli(["convert", *base, "--out", str(tmp_path / "float")])
    out = tmp_path / "q"
    cli(["quantize", "--model", MODEL, "--params", str(tmp_path / "float"), "--calib", "digits:train",
         "--num-calib", "16", "--train-batch", "8", "--epochs", "1", "--lr-s", "1e-30", "--lr-a", "1e-30",
         "--w-bits", "4", "--a-bits", "8", "--out", str(out)])
    back = load_quantized(out)
    assert back.config == w4a8.config
    for p, layer in quantized_layers(w4a8).items():  # the same calibration images, the same result
        for k, v in to_arrays(layer).items():
            np.testing.assert_array_equal(np.asarray(to_arrays(quantized_layers(back)[p])[k]), np.asarray(v),
                                          err_msg=f"{p} {k}")
    capsys.readouterr()
    cli(["eval", "--quantized", str(out), "--mode", "int", "--data", "digits:test", "--limit", "4",
         "--batch-size", "4"])
    assert "top-1" in capsys.readouterr().out.lower()


@pytest.mark.xla_optimized
def test_middle_class_token_variant_at_w8a8_through_the_cli(tmp_path):
    """An untrained one-layer LocalVim with the middle class token (4x4 grid, class token at
    sequence position 8 of every direction, w3 padding its grid to 6x6), W8A8 PTS init through
    ``ptq4vm quantize``: the class token keeps its own scale in each direction's sequence,
    ``mode="int"`` equals fake mode bit for bit under XLA's defaults, and the report places
    each direction's tokens on the grid with the class token off it."""
    from ptq4vm_jax.checkpoint import save_params
    from ptq4vm_jax.report.stats import token_order

    name, dirs = "local_vim_tiny_midcls", ("h", "v_flip", "w3", "w2_flip")
    overrides = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, d_state=4, num_classes=10,
                     directions=(dirs,))
    model = create_model(name, **overrides)
    assert model.cfg.cls_token and model.cfg.cls_position == 8 and model.cfg.seq_len == 17
    images = load_digits_dataset("train", image_size=16)[0]
    rng = np.random.default_rng(0)  # drawn in numpy: compiling model.init costs more than the test
    shapes = param_shapes(model)
    params = jax.tree.map(lambda a: (rng.standard_normal(a.shape) / np.sqrt(a.shape[0])).astype(np.float32),
                          shapes)
    save_params(tmp_path / "fp", params, model_name=name, model_overrides=overrides)
    cli(["quantize", "--params", str(tmp_path / "fp"), "--calib", "digits:train", "--num-calib", "8",
         "--method", "pts_only", "--w-bits", "8", "--a-bits", "8", "--out", str(tmp_path / "q")])
    qp = load_quantized(tmp_path / "q")
    assert (qp.config.w_bits, qp.config.a_bits, qp.config.method) == (8, 8, "pts_only")
    lengths = {p[-1]: to_arrays(v)["a_scale"].shape[0] for p, v in quantized_layers(qp).items()}
    assert lengths == {"in_proj": 17, "out_proj": 17, **{f"{p}_{k}": n for p in ("x_proj", "dt_proj")
                                                         for k, n in enumerate((17, 17, 37, 17))}}
    x = jnp.asarray(images[8:10])
    fake, real = (np.asarray(quantized_apply(None, qp, x, mode=m)) for m in ("fake", "int"))
    np.testing.assert_array_equal(fake, real)
    order = token_order(model, ("layers_0", "mixer", "x_proj_1"), 17)  # v_flip, class token at 8
    assert order.class_index == 8 and order.direction == "reversed column-major (v_flip)"
    cells = [tuple(c) for c in order.cell]
    column_major = [(r, c) for c in range(4) for r in range(4)][::-1]
    assert cells == column_major[:8] + [(-1, -1)] + column_major[8:]
    padded = token_order(model, ("layers_0", "mixer", "dt_proj_2"), 37)  # w3: 36 cells + class token
    assert padded.class_index == 8 and sum(c[0] >= 0 for c in padded.cell) == 16
