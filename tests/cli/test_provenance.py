"""A quantized checkpoint records where it came from (the float model, the calibration data), and
evaluating it on its calibration data says so."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ptq4vm_jax.checkpoint import load_params, read_metadata
from ptq4vm_jax.checkpoint.store import array_digest
from ptq4vm_jax.cli import main
from ptq4vm_jax.trees import flatten_tree

MICRO = Path(__file__).parents[2] / "ptq4vm_jax" / "assets" / "vim_micro"


def test_quantize_records_its_float_model_and_calibration_data(tmp_path, capsys):
    out = tmp_path / "q"
    main(["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "8",
          "--method", "rtn", "--out", str(out)])
    origin = read_metadata(out)["provenance"]
    params, _ = load_params(MICRO)
    digests = json.dumps({path: array_digest(value) for path, value in flatten_tree(params).items()},
                         sort_keys=True)
    assert origin == {"float_model": {"params": str(MICRO.resolve()),
                                      "params_sha256": hashlib.sha256(digests.encode()).hexdigest()},
                      "calib": "digits:train", "num_calib": 8, "data_dir": None}
    capsys.readouterr()
    main(["eval", "--quantized", str(out), "--data", "digits:train", "--limit", "16"])
    said = capsys.readouterr().err
    assert (f"warning: --data digits:train is the data --quantized {out} was calibrated on (8 of its "
            "images): its top-1 there overstates the accuracy on unseen images") in said, said
    main(["eval", "--quantized", str(out), "--data", "digits:test", "--limit", "16"])
    assert "calibrated on" not in capsys.readouterr().err


def test_the_calibration_data_directory_is_compared_as_tfds_resolves_it(monkeypatch, tmp_path):
    """No --data-dir and an explicit ~/tensorflow_datasets (or $TFDS_DATA_DIR) are the same data."""
    from ptq4vm_jax.cli.dataspecs import data_dir_of

    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    home = data_dir_of("tfds:imagenet2012:train", None)
    assert home == data_dir_of("tfds:imagenet2012:train", "~/tensorflow_datasets")
    assert home == os.path.abspath(os.path.expanduser("~/tensorflow_datasets"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert data_dir_of("tfds:imagenet2012:train", None) == data_dir_of("tfds:x:y", str(tmp_path))
    assert data_dir_of("tfds:x:y", None) == str(tmp_path)
    assert data_dir_of("digits:train", None) is None


def test_a_torch_checkpoint_is_recorded_with_the_entry_read(tmp_path):
    """--checkpoint without --key: the record names the entry the weights came from (here
    LocalMamba's 'state_dict'), as `ptq4vm convert` does, and the same weights get the same
    params_sha256 as from --params."""
    import torch

    from tests.convert.conftest import official_vim_state_dict

    params, _ = load_params(MICRO)
    sd = {k: torch.from_numpy(v) for k, v in official_vim_state_dict(params).items()}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "local.pth")
    common = ["--calib", "digits:train", "--num-calib", "8", "--method", "rtn"]
    main(["quantize", "--model", "vim_micro", "--checkpoint", str(tmp_path / "local.pth"), *common,
          "--out", str(tmp_path / "a")])
    main(["quantize", "--params", str(MICRO), *common, "--out", str(tmp_path / "b")])
    a, b = (read_metadata(tmp_path / d)["provenance"]["float_model"] for d in "ab")
    assert a["key"] == "state_dict"
    assert a["sha256"] == hashlib.sha256((tmp_path / "local.pth").read_bytes()).hexdigest()
    assert a["params_sha256"] == b["params_sha256"]
