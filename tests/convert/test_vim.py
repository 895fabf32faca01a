"""Official Vim checkpoints -> our tree: round trips through torch.save and safetensors, strict errors."""

import argparse
import hashlib

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch

from convert import CheckpointError, CheckpointMismatchError, family_spec
from ptq4vm_jax import load_torch_checkpoint
from ptq4vm_jax.checkpoint import convert_checkpoint, load_params


def _torch_sd(sd: dict, dtype=torch.float32) -> dict:
    return {k: torch.from_numpy(v.copy()).to(dtype) for k, v in sd.items()}


def _assert_tree_equal(got: dict, want: dict) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == np.float32 and g.shape == w.shape
        assert g.tobytes() == np.asarray(w, np.float32).tobytes()


def test_training_checkpoint_round_trip(tmp_path, vim_micro_params, vim_micro_official):
    sd = _torch_sd(vim_micro_official)
    optim = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    path = tmp_path / "vim_micro.pth"
    torch.save({"model": sd, "optimizer": optim.state_dict(), "epoch": 3,
                "args": argparse.Namespace(model="vim_micro", lr=5e-4, drop_path=0.0)}, path)
    _assert_tree_equal(load_torch_checkpoint(path, "vim_micro"), vim_micro_params)


@pytest.mark.parametrize("dtype, np_dtype",
                         [(torch.float16, np.float16), (torch.bfloat16, ml_dtypes.bfloat16)])
def test_half_precision_checkpoints_widen_exactly(tmp_path, vim_micro_params, vim_micro_official, dtype,
                                                  np_dtype):
    torch.save({"model": _torch_sd(vim_micro_official, dtype)}, tmp_path / "half.pth")
    want = jax.tree.map(lambda a: np.asarray(a).astype(np_dtype).astype(np.float32), vim_micro_params)
    _assert_tree_equal(load_torch_checkpoint(tmp_path / "half.pth", "vim_micro"), want)


def test_bare_state_dict_with_ddp_prefix_and_ema_key(tmp_path, vim_micro_params, vim_micro_official):
    bare = {f"module.{k}": v for k, v in _torch_sd(vim_micro_official).items()}
    torch.save(bare, tmp_path / "bare.pth")
    _assert_tree_equal(load_torch_checkpoint(tmp_path / "bare.pth", "vim_micro"), vim_micro_params)

    ema = {k: v + 1 for k, v in vim_micro_official.items()}
    torch.save({"model": _torch_sd(vim_micro_official), "model_ema": _torch_sd(ema)}, tmp_path / "ema.pth")
    got = load_torch_checkpoint(tmp_path / "ema.pth", "vim_micro", key="model_ema")
    _assert_tree_equal(got, jax.tree.map(lambda a: np.asarray(a) + 1, vim_micro_params))


def test_safetensors_round_trip(tmp_path, vim_micro_params, vim_micro_official):
    safetensors.numpy.save_file(vim_micro_official, str(tmp_path / "vim.safetensors"))
    _assert_tree_equal(load_torch_checkpoint(tmp_path / "vim.safetensors", "vim_micro"), vim_micro_params)


def test_missing_key_lists_the_entries(tmp_path, vim_micro_official):
    torch.save({"model": _torch_sd(vim_micro_official), "epoch": 3}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"no entry 'model_ema'.*'model' \(state_dict of 75 tensors\)"
                                              r".*'epoch' \(int\)"):
        load_torch_checkpoint(tmp_path / "c.pth", "vim_micro", key="model_ema")


def test_missing_extra_and_misshaped_keys_reported_together(tmp_path, vim_micro_official):
    sd = dict(vim_micro_official)
    del sd["layers.1.mixer.A_b_log"]
    sd["layers.0.mixer.gamma"] = np.ones(48, np.float32)
    sd["head.weight"] = np.ones((11, 48), np.float32)
    sd["layers.2.mixer.conv1d.weight"] = np.ones((96, 4), np.float32)
    torch.save({"model": _torch_sd(sd)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_torch_checkpoint(tmp_path / "bad.pth", "vim_micro")
    msg = str(err.value)
    assert "missing: model parameters the checkpoint does not provide (1)" in msg
    assert "layers_1/mixer/A_b_log  (official key layers.1.mixer.A_b_log)" in msg
    assert "layers.0.mixer.gamma  (no rule maps this key)" in msg
    assert "head.weight (11, 48) -> head/kernel (48, 11), the model expects (48, 10)" in msg
    assert "layers.2.mixer.conv1d.weight -> layers_2/mixer/conv1d/kernel: official shape (96, 4)" in msg
    assert "hint: the shapes say embed_dim=48" in msg


def test_a_checkpoint_lacking_only_some_tensors_is_called_partial(tmp_path, vim_micro_official):
    """A backbone export without its head has the architecture's shapes and names: the hint says
    what is missing, not that the key names differ."""
    sd = {k: v for k, v in vim_micro_official.items() if not k.startswith("head.")}
    torch.save({"model": _torch_sd(sd)}, tmp_path / "nohead.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_torch_checkpoint(tmp_path / "nohead.pth", "vim_micro")
    msg = str(err.value)
    assert "only lacks some tensors (head.bias, head.weight): a partial export, e.g. a backbone" in msg, msg
    assert "only key names differ" not in msg


def test_wrong_model_points_to_the_right_one(tmp_path, vim_micro_official):
    torch.save({"model": _torch_sd(vim_micro_official)}, tmp_path / "micro.pth")
    want = r"does not fit vim_nano:(.|\n)*layers\.3\.norm\.weight(.|\n)*that is vim_micro; pass model_name"
    with pytest.raises(CheckpointMismatchError, match=want):
        load_torch_checkpoint(tmp_path / "micro.pth", "vim_nano")
    with pytest.raises(CheckpointMismatchError, match="without the overrides depth"):
        load_torch_checkpoint(tmp_path / "micro.pth", "vim_micro", depth=2)


def test_non_float_parameter_is_rejected(tmp_path, vim_micro_official):
    sd = _torch_sd(vim_micro_official)
    sd["pos_embed"] = sd["pos_embed"].to(torch.int64)
    torch.save(sd, tmp_path / "int.pth")
    with pytest.raises(CheckpointMismatchError, match="pos_embed: dtype int64, expected a float"):
        load_torch_checkpoint(tmp_path / "int.pth", "vim_micro")


def test_foreign_checkpoint_gets_a_family_hint(tmp_path):
    torch.save({"model": {"stem.0.weight": torch.ones(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointMismatchError, match="none of the vim parameter names were found"):
        load_torch_checkpoint(tmp_path / "other.pth", "vim_micro")


def test_unknown_family_is_explained():
    with pytest.raises(CheckpointError, match="no checkpoint converter for model family 'resnet'"):
        family_spec("resnet")


@pytest.mark.slow
def test_convert_checkpoint_writes_a_float_checkpoint(tmp_path, vim_micro_params, vim_micro_official):
    src = tmp_path / "vim_micro_ema.pth"
    torch.save({"model_ema": _torch_sd(vim_micro_official), "epoch": 9}, src)
    meta = convert_checkpoint(src, "vim_micro", tmp_path / "out", key="model_ema")
    assert meta["source"] == "vim_micro_ema.pth" and meta["extra"] == {"key": "model_ema"}
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    params, loaded = load_params(tmp_path / "out", model_name="vim_micro")
    assert loaded == meta
    _assert_tree_equal(params, vim_micro_params)
