"""What the converter says to its user: the entry ``key`` picks, the size hints, the names
``--model-arg`` accepts; as the library words them and as ``ptq4vm convert`` prints them."""

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

from convert import CheckpointError, CheckpointMismatchError
from ptq4vm_jax import load_torch_checkpoint
from ptq4vm_jax.checkpoint import abstract_params, convert_checkpoint, read_metadata
from ptq4vm_jax.choices import RUNTIME_CHOICES
from ptq4vm_jax.cli import main
from ptq4vm_jax.cli.loading import model_overrides
from tests.convert.conftest import official_vim_state_dict

PAIRS = "either img_size=60, stride=4 or img_size=32, stride=2"
PAIR_FLAGS = ("either --model-arg img_size=60 --model-arg stride=4 or --model-arg img_size=32 "
              "--model-arg stride=2")


def _torch_sd(sd: dict) -> dict:
    return {k: torch.from_numpy(v.copy()) for k, v in sd.items()}


def _official(model: str, **overrides) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                          abstract_params(model, **overrides))
    return official_vim_state_dict(params)


@pytest.fixture()
def bare_files(tmp_path, vim_micro_official):
    torch.save(_torch_sd(vim_micro_official), tmp_path / "bare.pth")
    safetensors.numpy.save_file(vim_micro_official, str(tmp_path / "bare.safetensors"))
    return tmp_path / "bare.pth", tmp_path / "bare.safetensors"


@pytest.fixture(scope="module")
def stride2(tmp_path_factory):
    """A vim_micro of stride 2: its 15x15 token grid also fits img_size=60 at stride 4."""
    path = tmp_path_factory.mktemp("s2") / "s2.pth"
    torch.save({"model": _torch_sd(_official("vim_micro", stride=2))}, path)
    return path


# ------------------------------------------------------------------------------------------ key


def test_an_explicit_key_must_name_an_entry_of_the_file(bare_files, tmp_path, vim_micro_official):
    for path, key in [(bare_files[0], "model_ema"), (bare_files[1], "model")]:
        with pytest.raises(CheckpointError, match=f"is a bare state_dict of 75 tensors with no entry "
                                                  f"'{key}': drop key=") as err:
            load_torch_checkpoint(path, "vim_micro", key=key)
        assert err.value.argument == "key"
        load_torch_checkpoint(path, "vim_micro")  # the default key reads a bare state_dict
    torch.save({"state_dict": _torch_sd(vim_micro_official)}, tmp_path / "local.pth")
    load_torch_checkpoint(tmp_path / "local.pth", "vim_micro")  # LocalMamba's layout, by default
    with pytest.raises(CheckpointError, match=r"has no entry 'model'.*'state_dict' \(state_dict of 75"):
        load_torch_checkpoint(tmp_path / "local.pth", "vim_micro", key="model")
    torch.save({"epoch": 3}, tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match=r"has no entry 'model' or 'state_dict'.*'epoch' \(int\)"):
        load_torch_checkpoint(tmp_path / "none.pth", "vim_micro")


def test_metadata_records_the_entry_read(bare_files, tmp_path, vim_micro_official):
    torch.save({"state_dict": _torch_sd(vim_micro_official)}, tmp_path / "local.pth")
    assert convert_checkpoint(bare_files[0], "vim_micro", tmp_path / "a")["extra"] == {"key": None}
    assert convert_checkpoint(tmp_path / "local.pth", "vim_micro", tmp_path / "b")["extra"] == {
        "key": "state_dict"}


@pytest.mark.parametrize("which, key", [(0, "model_ema"), (1, "model")])
def test_cli_refuses_a_key_the_file_lacks(bare_files, tmp_path, capsys, which, key):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["convert", "--model", "vim_micro", "--checkpoint", str(bare_files[which]), "--key", key,
              "--out", str(out)])
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert f"is a bare state_dict of 75 tensors with no entry '{key}'" in err
    assert "--key on the command line" in err


def test_cli_default_key_reads_a_bare_state_dict(bare_files, tmp_path):
    main(["convert", "--model", "vim_micro", "--checkpoint", str(bare_files[1]),
          "--out", str(tmp_path / "o")])
    assert read_metadata(tmp_path / "o")["extra"] == {"key": None}


def test_every_key_flag_states_its_default(capsys):
    helps = []
    for command in ("convert", "quantize", "eval", "report"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps.append(" ".join(capsys.readouterr().out.split()))
    for text in helps:
        assert "(default: model, else state_dict, else the file's bare state dict)" in text


# ------------------------------------------------------------------------------------------ hints


def test_hint_names_the_pairs_and_their_flags(stride2, capsys, tmp_path):
    with pytest.raises(CheckpointMismatchError) as err:
        load_torch_checkpoint(stride2, "vim_micro")
    msg = str(err.value)
    assert "as vim_micro has, but not its image size and stride: pass " + PAIRS in msg
    assert f"(CLI: {PAIR_FLAGS})" in msg and "pass plus" not in msg

    with pytest.raises(SystemExit):
        main(["convert", "--model", "vim_tiny", "--checkpoint", str(stride2), "--model-arg", "embed_dim=48",
              "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert (f"that is vim_micro; pass model_name='vim_micro' without the overrides embed_dim, plus {PAIRS} "
            f"(CLI: --model vim_micro without --model-arg embed_dim, plus {PAIR_FLAGS})") in err


def test_hint_spells_out_the_closest_models_flags(tmp_path):
    torch.save({"model": _torch_sd(_official("vim_micro", depth=3, num_classes=7))}, tmp_path / "d3.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_torch_checkpoint(tmp_path / "d3.pth", "vim_nano")
    msg = str(err.value)
    assert ("closest is vim_micro with depth=3, num_classes=7 (pass model_name='vim_micro' and depth=3, "
            "num_classes=7, plus either img_size=32, stride=4 or img_size=18, stride=2") in msg
    assert ("; CLI: --model vim_micro --model-arg depth=3 --model-arg num_classes=7, plus either --model-arg "
            "img_size=32 --model-arg stride=4 or --model-arg img_size=18 --model-arg stride=2)") in msg


# ------------------------------------------------------------------------------------ --model-arg


def test_model_arg_lists_only_what_it_accepts(bare_files, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "--model", "vim_micro", "--checkpoint", str(bare_files[0]), "--model-arg", "foo=1",
              "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    listed = err.split("accepted: ")[1].strip().split(", ")
    assert "embed_dim" in listed and not set(listed) & set(RUNTIME_CHOICES)
    for name in listed:  # each listed name gets past --model-arg's own checks, and nothing else
        model_overrides([f"{name}=1"], "vim_micro")
    for name in RUNTIME_CHOICES:
        with pytest.raises(SystemExit):
            model_overrides([f"{name}=1"], "vim_micro")
