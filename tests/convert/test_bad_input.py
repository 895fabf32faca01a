"""Converter inputs that used to give a wrong hint or a silently wrong model."""

import argparse
from pathlib import Path

import pytest
import torch

from convert import CheckpointError, CheckpointMismatchError, read_checkpoint
from ptq4vm_jax import load_torch_checkpoint
from ptq4vm_jax.models import create_model

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "vim_golden"
STRIDE8 = GOLDEN / "small_d96_l2_n8_img48_stride8.pth"  # patch 16, stride 8, 48 px: a 5x5 token grid
SIZES = {"embed_dim": 96, "depth": 2, "d_state": 8, "num_classes": 10}


def _resave(tmp_path, **entries) -> Path:
    """The stride-8 golden weights, saved with ``entries`` (e.g. other training args) beside them."""
    sd = read_checkpoint(STRIDE8)["model"]
    path = tmp_path / "ck.pth"
    torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in sd.items()}, **entries}, path)
    return path


def _hint(path, **overrides) -> str:
    with pytest.raises(CheckpointMismatchError) as err:
        load_torch_checkpoint(path, "vim_tiny", **SIZES, **overrides)
    msg = str(err.value)
    return msg[msg.index("hint:"):]


@pytest.mark.slow
def test_recorded_input_size_settles_the_stride():
    """args.input_size=48 with a 5x5 grid of 16-px patches means stride 8, not 80 px at stride 16."""
    hint = _hint(STRIDE8, img_size=48)
    assert "training args say" in hint and "img_size=48" in hint
    assert hint.endswith("keep vim_tiny and pass stride=8 (CLI: --model-arg stride=8)")
    assert _hint(STRIDE8).endswith("keep vim_tiny and pass img_size=48, stride=8 (CLI: --model-arg "
                                   "img_size=48 --model-arg stride=8)")


def test_stride_in_the_recorded_model_name_settles_the_image_size(tmp_path):
    name = "vim_small_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
    path = _resave(tmp_path, args=argparse.Namespace(model=name, nb_classes=10))
    assert _hint(path).endswith("keep vim_tiny and pass img_size=48, stride=8 (CLI: --model-arg "
                                "img_size=48 --model-arg stride=8)")


def test_without_recorded_args_both_readings_of_the_token_count_are_named(tmp_path):
    hint = _hint(_resave(tmp_path))
    assert "img_size=80" not in hint.split("either")[0]
    assert ("pass either img_size=80, stride=16 or img_size=48, stride=8 (CLI: either --model-arg "
            "img_size=80 --model-arg stride=16 or --model-arg img_size=48 --model-arg stride=8)") in hint
    assert "checkpoint records no input size" in hint
    # what the user asked for, if it fits the grid, is taken as the reading
    load_torch_checkpoint(_resave(tmp_path), "vim_tiny", **SIZES, img_size=80)


def test_shapes_that_fit_but_recorded_args_that_do_not_are_refused():
    """80 px at stride 16 gives the same 26 tokens as 48 px at stride 8: only the args tell."""
    want = (r"was trained with img_size=48, stride=8, but vim_tiny has img_size=80, stride=16; pass those as "
            r"overrides \(img_size=48, stride=8; CLI: --model-arg img_size=48 --model-arg stride=8\)")
    with pytest.raises(CheckpointMismatchError, match=want):
        load_torch_checkpoint(STRIDE8, "vim_tiny", **SIZES, img_size=80)
    params = load_torch_checkpoint(STRIDE8, "vim_tiny", **SIZES, img_size=48, stride=8)
    assert params["pos_embed"].shape == (1, 26, 96)


@pytest.mark.parametrize("bare", [False, True], ids=["entry", "bare"])
def test_nonfinite_weights_are_refused_by_name(tmp_path, vim_micro_official, bare):
    sd = {k: torch.from_numpy(v.copy()).double() for k, v in vim_micro_official.items()}
    sd["layers.0.mixer.in_proj.weight"][0, :3] = float("nan")
    sd["head.bias"][1] = float("-inf")
    sd["layers.2.mixer.D"][0] = 1e39  # finite in float64, inf as our float32
    torch.save(sd if bare else {"model": sd}, tmp_path / "nan.pth")
    where = "the state_dict" if bare else "entry 'model'"
    want = rf"nan.pth: NaN or infinite weights in 3 tensor\(s\) of {where} \(float64 values beyond float32's"
    with pytest.raises(CheckpointError, match=want) as err:
        load_torch_checkpoint(tmp_path / "nan.pth", "vim_micro")
    msg = str(err.value)
    assert "layers.0.mixer.in_proj.weight: 3 of 9216 values (3 NaN, 0 inf)" in msg
    assert "head.bias: 1 of 10 values (0 NaN, 1 inf)" in msg
    assert "layers.2.mixer.D: 1 of 96 values (0 NaN, 1 inf)" in msg


@pytest.mark.parametrize("name, want", [
    ("Vim_Tiny", r"unknown model name 'Vim_Tiny' \(did you mean 'vim_tiny'\? Names are case-sensitive.\)"),
    ("vim_tinny", r"unknown model name 'vim_tinny' \(did you mean 'vim_tiny'\?\); known models: .*vim_base"),
    ("VSSM1_TINY_0230", r"did you mean 'vssm1_tiny_0230', i.e. vmambav2_tiny_224\? Names are case-sensitive"),
    ("resnet50", r"unknown model name 'resnet50'; known models: .*vim_base"),
    (None, r"a model name must be a string such as 'vim_tiny', got None"),
])
def test_model_names_are_exact_with_a_suggestion(name, want):
    with pytest.raises(ValueError, match=want):
        create_model(name)
    with pytest.raises(ValueError, match=want):
        load_torch_checkpoint(STRIDE8, name)


@pytest.mark.parametrize("path,model,family", [
    (GOLDEN / "tiny_d64_l2_n16_img64.pth", "vmamba_tiny", "vim"),
    (GOLDEN.parent / "vmamba_golden" / "reduced_v2v.pth", "vim_tiny", "vmamba"),
])
@pytest.mark.slow
def test_a_checkpoint_of_the_other_family_is_named_as_such(path, model, family):
    """The size hint of the family asked for used to point at one of its own models (the head
    and patch-embed shapes fit); the key names decide the family first."""
    with pytest.raises(CheckpointMismatchError) as err:
        load_torch_checkpoint(path, model)
    hint = str(err.value).splitlines()[-1]
    assert hint.startswith(f"hint: the parameter names are those of a {family} checkpoint, not a ")
    assert f"convert it as a {family} model ({family}_base" in hint
