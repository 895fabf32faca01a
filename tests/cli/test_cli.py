"""The ``ptq4vm`` command line: convert -> quantize -> eval on tfds mock data, errors, devices."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from ptq4vm_jax import load_quantized
from ptq4vm_jax.cli import main

GOLDEN = Path(__file__).parents[1] / "data" / "vim_golden"
CKPT = GOLDEN / "base_d32_l3_n16_img48.pth"
MODEL_ARGS = ["--model-arg", "img_size=48", "--model-arg", "embed_dim=32", "--model-arg", "depth=3",
              "--model-arg", "num_classes=12"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "float"
    main(["convert", "--model", "vim_base", "--checkpoint", str(CKPT), "--out", str(out), *MODEL_ARGS])
    return out


def test_convert_writes_provenance(converted):
    meta = json.loads((converted / "metadata.json").read_text())
    assert meta["model_name"] == "vim_base" and meta["source"] == CKPT.name
    assert len(meta["source_sha256"]) == 64
    assert meta["model_overrides"]["embed_dim"] == 32


def test_quantize_then_eval_on_tfds_mock_data(converted, tmp_path, capsys):
    qdir = tmp_path / "w4a8"
    with tfds.testing.mock_data(num_examples=12):
        main(["quantize", "--params", str(converted), "--calib", "tfds:imagenet2012:train",
              "--num-calib", "8", "--epochs", "2", "--w-bits", "4", "--a-bits", "8",
              "--out", str(qdir)])
        qp = load_quantized(qdir)
        assert (qp.config.w_bits, qp.config.a_bits, qp.config.num_calib) == (4, 8, 8)
        assert len(qp.summary["stages"]) == 3
        capsys.readouterr()
        main(["eval", "--quantized", str(qdir), "--data", "tfds:imagenet2012:validation",
              "--batch-size", "5"])
        q_line = capsys.readouterr().out.strip().splitlines()[-1]
        int_lines = []
        for gemm in ("xla", "pallas"):  # the Triton kernel runs in interpret mode off the GPU
            main(["eval", "--quantized", str(qdir), "--data", "tfds:imagenet2012:validation",
                  "--batch-size", "5", "--limit", "5", "--mode", "int", "--gemm", gemm])
            int_lines.append(capsys.readouterr().out.strip().splitlines()[-1])
        main(["eval", "--params", str(converted), "--data", "tfds:imagenet2012:validation",
              "--batch-size", "5", "--limit", "7"])
        f_line = capsys.readouterr().out.strip().splitlines()[-1]
    with pytest.raises(SystemExit, match="holds vim_base, not vim_tiny"):
        main(["eval", "--quantized", str(qdir), "--model", "vim_tiny"])
    assert q_line.startswith("top-1 ") and "(n=12)" in q_line
    assert "(n=7)" in f_line
    assert int_lines[0] == int_lines[1] and "(n=5)" in int_lines[0]


def test_errors_are_explained(converted, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "--model", "vim_huge", "--checkpoint", str(CKPT), "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "unknown model name 'vim_huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="exactly one of --checkpoint"):
        main(["quantize", "--model", "vim_tiny", "--out", str(tmp_path / "q")])
    with pytest.raises(SystemExit) as e:
        main(["convert", "--model", "vim_tiny", "--checkpoint", str(CKPT), "--out", str(tmp_path / "y")])
    assert e.value.code == 2
    assert "embed_dim" in capsys.readouterr().err  # the shapes say which model this is
    with pytest.raises(SystemExit, match="tfds:NAME:SPLIT"):
        main(["eval", "--params", str(converted), "--data", "tfds:imagenet2012"])
    with pytest.raises(SystemExit, match="--quantized carries its model"):
        main(["eval", "--quantized", str(tmp_path / "q"), "--params", str(converted)])
    with pytest.raises(SystemExit, match="--model-arg applies to --checkpoint"):
        main(["eval", "--params", str(converted), "--model-arg", "depth=2"])


def test_nan_during_calibration_is_one_line_with_the_resume_hint(tmp_path, capsys):
    """Float params that produce NaN: the block is named, the completed blocks are kept."""
    import jax
    import numpy as np

    from ptq4vm_jax import create_model, save_params

    model = create_model("vim_nano")
    params = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    params["layers_1"]["mixer"]["A_log"] = params["layers_1"]["mixer"]["A_log"] * np.nan
    save_params(tmp_path / "nan", params, model_name="vim_nano")
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--params", str(tmp_path / "nan"), "--calib", "digits:train",
              "--num-calib", "8", "--method", "rtn", "--resume", str(tmp_path / "resume"),
              "--out", str(tmp_path / "q")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "calibration failed" in err and "layers_1" in err and "--resume" in err


def test_eval_is_data_parallel_over_local_devices(converted):
    """Four virtual CPU devices give the same metrics as one (batch sharded, padding dropped)."""
    code = textwrap.dedent(f"""
        import jax, tensorflow_datasets as tfds
        from ptq4vm_jax.cli import main
        print("devices", jax.local_device_count())
        with tfds.testing.mock_data(num_examples=10):
            main(["eval", "--params", {str(converted)!r}, "--data", "tfds:imagenet2012:validation",
                  "--batch-size", "6"])
    """)
    lines = {}
    for n in (1, 4):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        got = out.stdout.strip().splitlines()
        assert got[0] == f"devices {n}"
        lines[n] = got[-1]
    assert lines[1] == lines[4] and "(n=10)" in lines[1]
