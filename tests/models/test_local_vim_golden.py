"""Parity of our Flax LocalVim with the official hunto/LocalMamba ``local_vim`` (golden logits),
and the converter's handling of the official state dict.

``tests/data/local_vim_golden/`` holds official-format checkpoints of reduced configs, their
inputs and the official model's logits (see the README there), and the official state dict's
key -> shape lists of the full-size models.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import family_spec, read_checkpoint
from convert.local_vim import official_rope_tables
from convert.mapping import map_state_dict
from ptq4vm_jax import create_model, load_torch_checkpoint
from ptq4vm_jax.checkpoint.checks import abstract_params
from ptq4vm_jax.errors import CheckpointError, CheckpointMismatchError
from ptq4vm_jax.models import canonical_name
from ptq4vm_jax.models.local_vim import SMALL_DIRECTIONS, TINY_DIRECTIONS, rope_tables
from ptq4vm_jax.trees import flatten_tree

DATA = Path(__file__).resolve().parents[1] / "data" / "local_vim_golden"
MANIFEST = json.loads((DATA / "manifest.json").read_text())
CASES = {c["name"]: c for c in MANIFEST["cases"]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_the_official_model(name):
    case = CASES[name]
    # the default key reads both {'model': sd} and {'state_dict': sd} (both cases are present)
    params = load_torch_checkpoint(DATA / f"{name}.pth", case["model"], **case["overrides"])
    model = create_model(case["model"], **case["overrides"], scan="ref")
    assert [list(d) for d in model.cfg.directions] == case["directions"]
    x = np.load(DATA / f"{name}_inputs.npy")
    ref = np.load(DATA / f"{name}_logits.npy")
    got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(x)))
    err = np.abs(got - ref).max()
    assert err <= 1e-4 * np.abs(ref).max(), (name, err)
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


def test_goldens_cover_padding_the_state_dict_key_and_the_middle_class_token():
    keys = {c["key"] for c in CASES.values()}
    assert keys == {"model", "state_dict"}
    models = {c["model"] for c in CASES.values()}
    assert models == {"local_vim_tiny", "local_vim_small", "local_vim_tiny_midcls"}
    padded = [d for c in CASES.values() for layer in c["directions"] for d in layer
              if d.startswith("w") and (c["overrides"]["img_size"] // c["overrides"].get("patch_size", 16))
              % int(d[1:].split("_")[0])]
    assert padded  # some window does not divide its grid


def exchange_directions(params: dict, family: str, k: int, j: int) -> dict:
    """``params`` with scan directions k and j exchanging their ``{family}_{i}`` params in every
    layer's mixer."""
    out = dict(params)
    for name, layer in params.items():
        if name.startswith("layers_"):
            mixer = dict(layer["mixer"])
            mixer[f"{family}_{k}"], mixer[f"{family}_{j}"] = mixer[f"{family}_{j}"], mixer[f"{family}_{k}"]
            out[name] = {**layer, "mixer": mixer}
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_logits_catch_a_mixup_of_scan_directions(name):
    """The goldens see every direction's own params: exchanging one family's params of scan
    directions k and k+1 (conv1d, x_proj, dt_proj or D, in every layer, as a port's mix-up would
    be) moves the model's logits by well over the parity tolerance, so a model that feeds a
    direction another's params cannot pass ``test_logits_match_the_official_model``. Measured
    against the model's own logits with the params in place (the parity test compares those with
    the official ones): a model that reads one direction's params for all would move nothing.
    A_log is one per mixer (``test_every_direction_uses_the_last_a_log``), so not exchanged."""
    case = CASES[name]
    params = load_torch_checkpoint(DATA / f"{name}.pth", case["model"], **case["overrides"])
    model = create_model(case["model"], **case["overrides"], scan="ref")
    assert {len(d) for d in model.cfg.directions} == {4}  # the exchanges below are built for 4
    x = jnp.asarray(np.load(DATA / f"{name}_inputs.npy"))
    bound = 10 * 1e-4 * float(np.abs(np.load(DATA / f"{name}_logits.npy")).max())
    apply = jax.jit(model.apply)
    base = np.asarray(apply({"params": params}, x))
    for family in ("conv1d", "x_proj", "dt_proj", "D"):
        for k in range(4):
            j = (k + 1) % 4
            moved = float(np.abs(np.asarray(apply({"params": exchange_directions(params, family, k, j)}, x))
                                 - base).max())
            assert moved > bound, (family, k, j, moved, bound)


def test_every_direction_uses_the_last_a_log():
    name = "tiny_d32_l2_n8_img48"
    case = CASES[name]
    sd = read_checkpoint(DATA / f"{name}.pth")["model"]
    params = load_torch_checkpoint(DATA / f"{name}.pth", case["model"], **case["overrides"])
    for i in range(case["overrides"]["depth"]):
        last = sd[f"layers.{i}.mixer.A_log_3"]
        assert not np.allclose(sd[f"layers.{i}.mixer.A_log_0"], last)
        np.testing.assert_array_equal(params[f"layers_{i}"]["mixer"]["A_log"], last)


def test_rope_tables_equal_the_official_buffers():
    sd = read_checkpoint(DATA / "small_d64_l2_n16_img80.pth")["state_dict"]
    cos, sin = rope_tables(5, 64)
    np.testing.assert_allclose(cos, sd["rope.freqs_cos"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(sin, sd["rope.freqs_sin"], atol=1e-6, rtol=0)


def test_a_rope_table_of_another_grid_is_refused():
    sd = dict(read_checkpoint(DATA / "tiny_d32_l2_n8_img48.pth")["model"])
    sd["rope.freqs_cos"] = sd["rope.freqs_cos"][::-1]
    with pytest.raises(CheckpointError, match=r"rope.freqs_cos differs from the RoPE table of a 3x3 grid"):
        family_spec("local_vim").preprocess(sd)
    sd["rope.freqs_cos"] = sd["rope.freqs_cos"][:, :30]
    with pytest.raises(CheckpointError, match=r"rope.freqs_cos has shape \(9, 30\)"):
        family_spec("local_vim").preprocess(sd)


def test_a_middle_cls_checkpoint_as_the_rope_model_names_the_switches():
    case = CASES["midcls_d32_l2_n8_img64"]
    overrides = dict(case["overrides"])
    want = r"(?s)unexpected: .*cls_token .*keep local_vim_tiny and pass cls_token=True, rope=False"
    with pytest.raises(CheckpointMismatchError, match=want):
        load_torch_checkpoint(DATA / "midcls_d32_l2_n8_img64.pth", "local_vim_tiny", **overrides)


def test_vim_and_local_vim_checkpoints_are_told_apart():
    vim = Path(__file__).resolve().parents[1] / "data" / "vim_golden" / "tiny_d64_l2_n16_img64.pth"
    with pytest.raises(CheckpointMismatchError, match=r"names are those of a vim checkpoint, not a "
                                                      r"local_vim one: convert it as a vim model"):
        load_torch_checkpoint(vim, "local_vim_tiny", img_size=64, embed_dim=64, depth=2, num_classes=10)
    want = r"names are those of a local_vim checkpoint, not a vim one: convert it as a local_vim model \("
    with pytest.raises(CheckpointMismatchError, match=want + r".*local_vim_tiny"):
        load_torch_checkpoint(DATA / "tiny_d32_l2_n8_img48.pth", "vim_tiny", img_size=48, embed_dim=32,
                              depth=2, d_state=8, num_classes=10)


def test_official_names_and_directions():
    assert canonical_name("local_vim_tiny_middle_cls_token") == "local_vim_tiny_midcls"
    assert create_model("local_vim_small").cfg.directions == SMALL_DIRECTIONS
    mid = create_model("local_vim_tiny_midcls").cfg
    assert mid.directions == TINY_DIRECTIONS and mid.cls_token and not mid.rope
    assert create_model("local_vim_tiny", depth=3).cfg.directions == TINY_DIRECTIONS[:3]
    with pytest.raises(ValueError, match="depth 21 is more than the 20 layers"):
        create_model("local_vim_tiny", depth=21)
    with pytest.raises(ValueError, match="unknown scan direction 'x'"):
        create_model("local_vim_tiny", depth=1, directions=(("h", "x"),))
    with pytest.raises(ValueError, match="img_size 50 must be a multiple of patch_size 16"):
        create_model("local_vim_tiny", img_size=50)


def _layer_pattern(shapes: dict, layer: int) -> dict:
    prefix = f"layers.{layer}."
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


@pytest.mark.parametrize("official", ["local_vim_tiny", "local_vim_small", "local_vim_tiny_middle_cls_token"])
def test_full_size_models_have_the_official_parameter_shapes(official):
    """The official full-size state dict (key -> shape, recorded from the official builders) maps
    onto our model's abstract params with nothing missing, unexpected or mis-shaped.

    Every official layer has the same keys and shapes (four directions each), so the check builds
    ours at the full width, image size and classes with depth 2 (tracing 20 layers three times
    would cost seconds) against the official layers 0-1, and checks the other 18 repeat them;
    the full-depth ``local_vim_tiny`` is built once, abstractly, in the last line.
    """
    shapes = json.loads((DATA / "official_state_dict_shapes.json").read_text())[official]
    for layer in range(20):
        assert _layer_pattern(shapes, layer) == _layer_pattern(shapes, 0), layer
    assert not _layer_pattern(shapes, 20)
    sd = {k: np.zeros(s, np.float32) for k, s in shapes.items()
          if not k.startswith("layers.") or int(k.split(".")[1]) < 2}
    if "rope.freqs_cos" in sd:
        sd["rope.freqs_cos"], sd["rope.freqs_sin"] = official_rope_tables(14, shapes["rope.freqs_cos"][1])
    name = canonical_name(official)
    spec = family_spec("local_vim")
    expected = {p: tuple(s.shape) for p, s in flatten_tree(abstract_params(name, depth=2)).items()}
    _, mismatch = map_state_dict(spec.preprocess(sd), spec.rules, expected)
    assert not mismatch, mismatch.describe()
    mid = name.endswith("midcls")
    assert spec.infer_overrides(sd) == dict(
        embed_dim=384 if official == "local_vim_small" else 192, channels=3, patch_size=16, img_size=224,
        depth=2, d_state=16, num_classes=1000, cls_token=mid, rope=not mid)
    if official == "local_vim_tiny":
        full = flatten_tree(abstract_params(name))
        assert sum(int(np.prod(s.shape)) for s in full.values()) == sum(
            int(np.prod(s)) for k, s in shapes.items() if not k.startswith("rope.")
            and not any(k.endswith(f"A_log_{i}") for i in range(3)))  # one A_log per mixer
