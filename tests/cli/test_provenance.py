"""A quantized checkpoint records where it came from (the float model, the calibration data), and
evaluating it on its calibration data says so."""

from __future__ import annotations

import hashlib
import json
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
