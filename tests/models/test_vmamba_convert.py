"""VMamba checkpoint conversion: official loader renames, Linear2d layouts, strict errors."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from convert import CheckpointError, CheckpointMismatchError, read_checkpoint
from convert.vmamba import config_overrides
from ptq4vm_jax import load_torch_checkpoint

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "vmamba_golden"


@pytest.fixture(scope="module")
def official():
    """The reduced_v2v checkpoint: its state_dict, config, and our model name + overrides."""
    ckpt = read_checkpoint(GOLDEN / "reduced_v2v.pth")
    return ckpt["model"], ckpt["config"], "vmamba_tiny", config_overrides(ckpt["config"])


@pytest.fixture(scope="module")
def reference_params(official):
    sd, _, name, overrides = official
    return load_torch_checkpoint(GOLDEN / "reduced_v2v.pth", name, **overrides)


def save(tmp_path: Path, state_dict: dict, **extra) -> Path:
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, **extra}, path)
    return path


def assert_same_tree(a, b) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_legacy_names_and_conv_shaped_linear2d_weights_load_the_same(official, reference_params, tmp_path):
    """What ``VSSM._load_from_state_dict`` and ``Linear2d._load_from_state_dict`` accept."""
    sd, _, name, overrides = official
    legacy = {}
    for key, value in sd.items():
        if re.search(r"\.(in_proj|out_proj|fc1|fc2)\.weight$", key):
            value = value[:, :, None, None]  # Linear2d saved conv-style (out, in, 1, 1)
        key = re.sub(r"^patch_embed\.0\.", "patch_embed.proj.", key)
        key = re.sub(r"^patch_embed\.2\.", "patch_embed.norm.", key)
        key = re.sub(r"^classifier\.(norm|head)\.", r"\1.", key)
        key = re.sub(r"(blocks\.\d+\.)norm\.", r"\1ln_1.", key)
        key = re.sub(r"(blocks\.\d+\.)op\.", r"\1self_attention.", key)
        legacy[key] = value
    assert "layers.0.blocks.0.ln_1.weight" in legacy and "head.weight" in legacy
    assert "layers.0.blocks.0.self_attention.x_proj_weight" in legacy
    params = load_torch_checkpoint(save(tmp_path, legacy), name, **overrides)
    assert_same_tree(params, reference_params)


def test_stacked_direction_tensors_split_into_their_own_dense(official, reference_params):
    sd = official[0]
    op = reference_params["layers_2"]["blocks_1"]["op"]
    stacked = "layers.2.blocks.1.op."
    for k in range(4):
        np.testing.assert_array_equal(op[f"x_proj_{k}"]["kernel"], sd[stacked + "x_proj_weight"][k].T)
        np.testing.assert_array_equal(op[f"dt_proj_{k}"]["kernel"], sd[stacked + "dt_projs_weight"][k].T)
        np.testing.assert_array_equal(op[f"dt_proj_{k}"]["bias"], sd[stacked + "dt_projs_bias"][k])
    e = op["Ds"].shape[1]
    np.testing.assert_array_equal(op["Ds"][3], sd[stacked + "Ds"][3 * e:])
    np.testing.assert_array_equal(op["A_logs"][1], sd[stacked + "A_logs"][e:2 * e])


def test_every_problem_is_reported_by_name(official, tmp_path):
    sd, _, name, overrides = official
    bad = dict(sd)
    del bad["layers.0.blocks.0.op.Ds"]
    bad["layers.0.blocks.0.op.x_proj_bias"] = np.zeros((4, 5), np.float32)
    bad["layers.1.blocks.0.op.x_proj_weight"] = sd["layers.1.blocks.0.op.x_proj_weight"][:3]
    bad["layers.2.blocks.0.mlp.fc1.weight"] = sd["layers.2.blocks.0.mlp.fc1.weight"][:, :-1]
    with pytest.raises(CheckpointMismatchError) as err:
        load_torch_checkpoint(save(tmp_path, bad), name, **overrides)
    msg = str(err.value)
    assert "layers_0/blocks_0/op/Ds  (official key layers.0.blocks.0.op.Ds)" in msg
    assert "layers.0.blocks.0.op.x_proj_bias  (no rule maps this key)" in msg
    assert "layers_1/blocks_0/op/x_proj_3/kernel  (official key layers.1.blocks.0.op.x_proj_weight[3])" in msg
    assert re.search(r"layers\.2\.blocks\.0\.mlp\.fc1\.weight \(128, 31\) -> "
                     r"layers_2/blocks_0/mlp/fc1/kernel \(31, 128\), the model expects \(32, 128\)", msg)


@pytest.mark.slow
def test_the_size_hint_includes_what_the_recorded_config_says_and_can_be_followed(official, tmp_path):
    sd, _, name, overrides = official
    with pytest.raises(CheckpointMismatchError) as err:
        load_torch_checkpoint(GOLDEN / "reduced_v2v.pth", "vmamba_micro")
    assert "closest is vmamba_micro with dims=(16, 24, 32, 48), img_size=48 " in str(err.value)
    load_torch_checkpoint(GOLDEN / "reduced_v2v.pth", "vmamba_micro", dims=(16, 24, 32, 48), img_size=48)
    broken = {k: v[:-1] if k.endswith("A_logs") else v for k, v in sd.items()}
    with pytest.raises(CheckpointMismatchError, match=r"vmamba_tiny has; only tensor shapes/dtypes differ"):
        load_torch_checkpoint(save(tmp_path, broken), name, **overrides)


def test_key_picks_model_or_model_ema(official):
    sd, _, name, overrides = official
    ema = load_torch_checkpoint(GOLDEN / "reduced_v2v.pth", name, key="model_ema", **overrides)
    assert not np.array_equal(ema["head"]["kernel"], sd["classifier.head.weight"].T)
    with pytest.raises(CheckpointError, match="no entry 'ema'.*'model'.*'model_ema'.*'config'"):
        load_torch_checkpoint(GOLDEN / "reduced_v2v.pth", name, key="ema", **overrides)


def test_unsupported_official_configs_are_refused(official):
    config = official[1]
    vssm = dict(config["MODEL"]["VSSM"], SSM_FORWARDTYPE="v2", DOWNSAMPLE="v1")
    changed = {**config, "MODEL": {**config["MODEL"], "VSSM": vssm}}
    with pytest.raises(CheckpointError, match=r"FORWARDTYPE='v2' \(supported: 'v05_noz'\).*DOWNSAMPLE='v1'"):
        config_overrides(changed)
    with pytest.raises(CheckpointError, match="not an official VMamba config"):
        config_overrides({"MODEL": {"TYPE": "vssm"}})


@pytest.mark.slow
def test_the_checkpoints_training_config_is_checked(official, tmp_path):
    """Settings shapes cannot show: an unsupported one, or one our model would differ in."""
    sd, config, name, overrides = official
    plain = lambda c: {k: plain(v) for k, v in c.items()} if isinstance(c, Mapping) else c
    config = plain(config)  # torch.save of plain dicts, as yacs configs unpickle to
    vssm = dict(config["MODEL"]["VSSM"], SSM_FORWARDTYPE="v2")
    path = save(tmp_path, sd, config={**config, "MODEL": {**config["MODEL"], "VSSM": vssm}})
    with pytest.raises(CheckpointError, match=r"FORWARDTYPE='v2' \(supported: 'v05_noz'\)"):
        load_torch_checkpoint(path, name, **overrides)
    path = save(tmp_path, sd, config=config)
    with pytest.raises(CheckpointMismatchError, match=r"trained with img_size=48, but vmamba_tiny has "
                                                      r"img_size=64; .*--model-arg img_size=48"):
        load_torch_checkpoint(path, name, **{**overrides, "img_size": 64})  # no shape shows it
    load_torch_checkpoint(path, name, **overrides)
