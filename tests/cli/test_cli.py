"""The ``ptq4vm`` command line: convert -> quantize -> eval on tfds mock data, errors, devices."""

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
import tensorflow_datasets as tfds

from ptq4vm_jax import load_quantized
from ptq4vm_jax.cli import main

GOLDEN = Path(__file__).parents[1] / "data" / "vim_golden"
CKPT = GOLDEN / "base_d32_l3_n16_img48.pth"
MICRO = Path(__file__).parents[2] / "ptq4vm_jax" / "assets" / "vim_micro"
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
    assert meta["source_sha256"] == hashlib.sha256(CKPT.read_bytes()).hexdigest()
    assert meta["model_overrides"]["embed_dim"] == 32


@pytest.mark.slow
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
        for gemm in ("xla", "pallas", "xla-bf16"):  # the Triton kernel: interpret mode off the GPU
            main(["eval", "--quantized", str(qdir), "--data", "tfds:imagenet2012:validation",
                  "--batch-size", "5", "--limit", "5", "--mode", "int", "--gemm", gemm])
            captured = capsys.readouterr()
            int_lines.append(captured.out.strip().splitlines()[-1])
            slow = "warning: --gemm pallas off the GPU runs its kernel in the Pallas interpreter"
            assert (slow in captured.err) == (gemm == "pallas"), captured.err
        main(["eval", "--params", str(converted), "--data", "tfds:imagenet2012:validation",
              "--batch-size", "5", "--limit", "7"])
        f_line = capsys.readouterr().out.strip().splitlines()[-1]
    with pytest.raises(SystemExit, match="holds vim_base, not vim_tiny"):
        main(["eval", "--quantized", str(qdir), "--model", "vim_tiny"])
    resized = "vim_base (depth=3, embed_dim=32, img_size=48, num_classes=12)"  # named with its sizes
    assert q_line.startswith("top-1 ") and f"(n=12; {resized} ptq4vm W4A8, fake mode)" in q_line
    assert f"(n=7; {resized} float)" in f_line
    assert f"(n=5; {resized} ptq4vm W4A8, int mode (xla GEMM))" in int_lines[0]
    assert int_lines[0].split("(n=")[0] == int_lines[1].split("(n=")[0] == int_lines[2].split("(n=")[0]


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
    with pytest.raises(SystemExit, match="--model-arg and --key apply to --checkpoint"):
        main(["eval", "--params", str(converted), "--model-arg", "depth=2"])


@pytest.mark.slow
def test_nan_during_calibration_is_one_line_with_the_resume_hint(tmp_path, capsys, monkeypatch,
                                                                 fresh_programs):
    """Learning that diverges (updates that poison the scales; step 1's loss is NaN): the block
    and step are named in one line with the resume hint, and no checkpoint is written."""
    import jax

    from ptq4vm_jax.calibrate import jlss

    monkeypatch.setattr(jlss.optax, "apply_updates",
                        lambda params, updates: jax.tree.map(lambda a: a * jax.numpy.nan, params))
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "8",
              "--train-batch", "8", "--epochs", "2", "--lr-s", "0.0321", "--keep-learned",
              "--resume", str(tmp_path / "resume"), "--out", str(tmp_path / "q")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "calibration failed" in err and "stage layers_0 at step 1" in err
    assert err.endswith("no block had completed, so " + str(tmp_path / "resume") + " holds nothing to "
                        "continue from")
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_nan_in_the_float_checkpoint_is_named_before_calibration(init_params):
    import numpy as np

    from ptq4vm_jax import create_model, quantize_params

    params = init_params(create_model("vim_nano"), 0)
    params["layers_1"]["mixer"]["A_log"] = params["layers_1"]["mixer"]["A_log"] * np.nan

    def never_read():
        raise AssertionError("the calibration data was read")
        yield

    with pytest.raises(ValueError, match=r"NaN/inf values \(layers_1/mixer/A_log: 512 of 512 values "
                                         r"\(512 NaN, 0 inf\)\): the checkpoint itself is broken"):
        quantize_params(params, never_read(), model="vim_nano", progress=False)


@pytest.mark.slow
def test_out_that_would_fail_or_destroy_is_refused_before_any_work(tmp_path, capsys):
    import shutil

    fc = tmp_path / "float"
    shutil.copytree(MICRO, fc)
    base = ["quantize", "--params", str(fc), "--calib", "digits:train", "--num-calib", "8",
            "--method", "rtn"]
    with pytest.raises(SystemExit, match="same path as --params"):
        main([*base, "--out", str(fc)])
    with pytest.raises(SystemExit, match="same path as --resume"):
        main([*base, "--resume", str(tmp_path / "r"), "--out", str(tmp_path / "r")])
    # Inside an input: replacing or deleting the input would take the result with it.
    with pytest.raises(SystemExit, match=r"--out .*float/w8a8 lies inside --params"):
        main([*base, "--out", str(fc / "w8a8")])
    with pytest.raises(SystemExit, match=r"--out .*r/q lies inside --resume"):
        main([*base, "--resume", str(tmp_path / "r"), "--out", str(tmp_path / "r" / "q")])
    assert not (fc / "w8a8").exists() and not (tmp_path / "r").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    for out, said in ((tmp_path / "notes", "exists and is not a ptq4vm-jax checkpoint; refusing"),
                      (MICRO, "holds a 'ptq4vm-jax/float-params' checkpoint of vim_micro; refusing")):
        with pytest.raises(SystemExit) as e:
            main([*base, "--out", str(out)])
        assert e.value.code == 2 and said in capsys.readouterr().err
    with pytest.raises(SystemExit, match="is a file, so no directory can be made under it"):
        main([*base, "--out", str(tmp_path / "notes" / "keep.txt" / "q")])
    with pytest.raises(SystemExit, match="--resume .* is a file"):
        main([*base, "--resume", str(tmp_path / "notes" / "keep.txt"), "--out", str(tmp_path / "q")])
    with pytest.raises(SystemExit, match="a float model .--params / --checkpoint. has neither"):
        main(["eval", "--params", str(fc), "--data", "digits:test", "--mode", "int"])
    with pytest.raises(SystemExit, match="--resume .* is a checkpoint directory"):
        main([*base, "--resume", str(MICRO), "--out", str(tmp_path / "q")])
    with pytest.raises(SystemExit, match="--model-arg and --key apply to --checkpoint"):
        main([*base, "--key", "model_ema", "--out", str(tmp_path / "q")])
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert json.loads((fc / "metadata.json").read_text())["format"] == "ptq4vm-jax/float-params"
    # A quantized checkpoint is replaced by a new run of its model, not by another model's.
    q = tmp_path / "q"
    main([*base, "--out", str(q)])
    main([*base, "--w-bits", "4", "--out", str(q)])
    assert json.loads((q / "metadata.json").read_text())["config"]["w_bits"] == 4
    (q / "notes.txt").write_text("mine")  # a checkpoint that someone keeps other files in
    with pytest.raises(SystemExit) as e:
        main([*base, "--out", str(q)])
    assert e.value.code == 2 and "also other files (notes.txt)" in capsys.readouterr().err
    assert (q / "notes.txt").read_text() == "mine"
    (q / "notes.txt").unlink()
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--params", str(MICRO.parent / "vmamba_micro"), "--calib", "digits:train",
              "--num-calib", "8", "--method", "rtn", "--out", str(q)])
    assert e.value.code == 2
    assert "holds a quantized model of vim_micro; refusing to replace it" in capsys.readouterr().err
    assert json.loads((q / "metadata.json").read_text())["model_name"] == "vim_micro"


def test_paths_are_compared_resolved_and_expanded_once(tmp_path, capsys, monkeypatch):
    """A symlink or ".." does not hide --resume inside --out (the run would fail at its end); an
    unexpanded ~ (``--out=~/q``: the shell leaves it) is expanded once for the checks and the
    writers alike; a refused run leaves no directories behind; flags are never abbreviated."""
    from ptq4vm_jax.cli import build_parser

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    base = ["quantize", "--params", str(MICRO), "--calib", "digits:train", "--method", "rtn"]
    for out, resume in ((tmp_path / "link" / "q", real / "q" / "r"),
                        (tmp_path / "x" / ".." / "q2", tmp_path / "q2" / "r")):
        with pytest.raises(SystemExit) as e:
            main([*base, "--out", str(out), "--resume", str(resume)])
        assert e.value.code == 2 and "lies inside --out" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    args = build_parser().parse_args([*base, "--out=~/q", "--resume=~/r", "--data-dir=~/tfds"])
    home = tmp_path / "home"
    assert (args.out, args.resume, args.data_dir) == (str(home / "q"), str(home / "r"), str(home / "tfds"))
    with pytest.raises(SystemExit) as e:  # refused after the --out and --resume checks
        main([*base, "--calib", "digits:trian", "--out", str(tmp_path / "new" / "sub" / "q"),
              "--resume", str(tmp_path / "new2" / "r")])
    assert e.value.code == 2 and "digits:trian" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"] and not any(real.iterdir())
    with pytest.raises(SystemExit) as e:
        main([*base, "--epoch", "3", "--out", str(tmp_path / "q")])
    assert e.value.code == 2 and "unrecognized arguments: --epoch 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*base, "--data-dir", str(tmp_path), "--out", str(tmp_path / "q")])
    assert e.value.code == 2
    assert "--calib digits:train is built in: drop --data-dir" in capsys.readouterr().err
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(SystemExit) as e:
        main([*base, "--out", str(tmp_path / "q"), "--resume", str(tmp_path / "dangling")])
    assert e.value.code == 2 and "dangling is a broken symlink (to " in capsys.readouterr().err


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_runtime_choices_are_not_model_args(tmp_path, capsys, command):
    """``--model-arg dtype=...`` or ``scan=...`` would be stored as a size of the model and change
    every later run silently; the flags that choose them are named instead."""
    more = ["--calib", "digits:train"] if command == "quantize" else []
    for pair in ("dtype=bfloat16", "scan=pallas"):
        with pytest.raises(SystemExit) as e:
            main([command, "--model", "vim_base", "--checkpoint", str(CKPT), *MODEL_ARGS, "--model-arg", pair,
                  "--out", str(tmp_path / "out"), *more])
        assert e.value.code == 2
        assert f"--model-arg {pair.split('=')[0]}: not a size of the model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

def test_interrupt_is_one_line_that_says_what_was_kept(tmp_path, capsys, monkeypatch):
    import ptq4vm_jax

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ptq4vm_jax, "quantize_params", interrupted)
    base = ["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "8",
            "--out", str(tmp_path / "q")]
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "state.npz").write_bytes(b"")  # only its presence matters here
    for extra, said in (([], "rerun with --resume DIR to keep completed blocks"),
                        (["--resume", str(tmp_path / "r")], "no block had completed, so"),
                        (["--resume", str(tmp_path / "done")], "the blocks completed so far are saved in")):
        with pytest.raises(SystemExit) as e:
            main([*base, *extra])
        assert e.value.code == 130
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ptq4vm quantize: interrupted") and said in err[0]
    monkeypatch.setenv("PTQ4VM_DEBUG", "1")  # the traceback, for bug reports
    with pytest.raises(KeyboardInterrupt):
        main(base)


def test_sigterm_stops_like_an_interrupt_and_says_so(tmp_path, capsys, monkeypatch):
    import os
    import signal
    import time

    import ptq4vm_jax

    def killed(*args, **kwargs):  # a scheduler's kill in the middle of calibration
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(ptq4vm_jax, "quantize_params", killed)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "state.npz").write_bytes(b"")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "8",
              "--out", str(tmp_path / "q"), "--resume", str(tmp_path / "done")])
    assert e.value.code == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ptq4vm quantize: terminated (SIGTERM)")
    assert "the blocks completed so far are saved in" in err[0]
    assert signal.getsignal(signal.SIGTERM) is before  # main gives the handler back


@pytest.mark.slow
def test_errors_name_the_flags_not_the_library_arguments(tmp_path, capsys):
    cases = [
        (["eval", "--params", str(MICRO), "--data", "digits:test", "--limit", "0"],
         "--limit must be a positive integer"),
        (["eval", "--quantized", str(MICRO), "--data", "digits:test"], "give it as --params"),
        (["eval", "--params", str(MICRO), "--model", "vim_nano", "--data", "digits:test"],
         r"holds vim_micro, not vim_nano; pass --model vim_micro \(or leave --model out\) or convert"),
        (["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "2048",
          "--train-batch", "256", "--out", str(tmp_path / "q")],
         r"error: --calib digits:train has only 1442 images; pass --num-calib 1280 \(or fewer, a multiple of "
         r"--train-batch 256\) or a larger dataset"),
        (["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "2048",
          "--method", "rtn", "--out", str(tmp_path / "q")],  # no learning: no batch multiple
         r"has only 1442 images; pass --num-calib 1442 \(or fewer\) or a larger dataset$"),
        (["quantize", "--params", str(MICRO), "--calib", "digits", "--out", str(tmp_path / "q")],
         r"error: --calib digits: give the split, digits:train or digits:test"),
        (["eval", "--params", str(MICRO), "--data", "digits:test", "--batch-size", "0"],
         r"error: --batch-size must be a positive integer, got 0$"),
        (["eval", "--params", str(MICRO), "--data", "digits:val"],
         r"error: --data digits:val: give the split"),
        (["eval", "--params", str(MICRO), "--data", "tfds:mnist:test", "--data-dir",
          str(tmp_path / "nowhere")], r"error: --data-dir .*nowhere does not exist; give the directory"),
        (["quantize", "--params", str(MICRO), "--calib", "digits:train", "--out", "/proc/ptq4vm_no/q"],
         r"error: --out /proc/ptq4vm_no/q: cannot create or write in /proc/ptq4vm_no"),
        (["quantize", "--params", str(MICRO), "--calib", "digits:train", "--method", "rtn", "--out",
          str(tmp_path / "q"), "--resume", "/proc/ptq4vm_no/r"],
         r"error: --resume /proc/ptq4vm_no/r cannot be created or written"),
        (["quantize", "--params", str(MICRO), "--calib", "digits:train", "--out", str(tmp_path / "q"),
          "--resume", str(tmp_path / "q" / "r")], r"error: --resume .*q/r lies inside --out"),
        (["quantize", "--params", str(MICRO), "--calib", "digits:train", "--w-bits", "1",
          "--out", str(tmp_path / "q")], r"error: --w-bits must be an integer from 2 to 8, got 1$"),
        (["quantize", "--params", str(MICRO), "--calib", "digits:train", "--train-batch", "0",
          "--out", str(tmp_path / "q")], r"error: --train-batch must be a positive integer, got 0$"),
        (["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "24",
          "--train-batch", "16", "--out", str(tmp_path / "q")],
         r"--num-calib \(24\) must be a multiple of --train-batch \(16\)"),
        (["eval", "--quantized", str(tmp_path / "nothing"), "--data", "digits:test", "--gemm", "xla"],
         r"error: --gemm xla picks the integer GEMM of --mode int; add --mode int"),
        (["eval", "--data", "digits:test"], r"error: give exactly one of --checkpoint .*\(or, for eval, "
                                            r"--quantized"),
        (["quantize", "--params", str(MICRO), "--calib", "imagenet", "--out", str(tmp_path / "q")],
         r"^ptq4vm quantize: error: --calib 'imagenet': unknown data spec"),
        (["quantize", "--params", str(MICRO), "--calib", "digits:train", "--loss-axis", "width",
          "--out", str(tmp_path / "q")],
         r"error: --loss-axis width reproduces the released VMamba code only"),
        (["quantize", "--params", str(MICRO.parent / "vmamba_micro"), "--calib", "digits:train",
          "--official-inner-proj", "--out", str(tmp_path / "q")],
         r"error: --official-inner-proj reproduces the released Vim code only"),
    ]
    for argv, said in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert re.search(said, err, re.M), err


def test_quantize_flags_reach_the_config():
    from ptq4vm_jax.cli import build_parser
    from ptq4vm_jax.cli.quantize import quant_config

    args = build_parser().parse_args(["quantize", "--params", "p", "--out", "o", "--loss-axis", "width",
                                      "--official-inner-proj", "--act-grid", "official", "--loss", "mse"])
    cfg = quant_config(args)
    got = (cfg.loss_axis, cfg.train_inner_proj, cfg.act_grid, cfg.loss)
    assert got == ("width", False, "official", "mse")
    defaults = quant_config(build_parser().parse_args(["quantize", "--params", "p", "--out", "o"]))
    assert (defaults.loss_axis, defaults.train_inner_proj) == ("channel", True)


def test_unprepared_tfds_dataset_is_named_and_not_downloaded(tmp_path):
    (tmp_path / "tfds").mkdir()  # (a --data-dir that does not exist is refused before tfds runs)
    with pytest.raises(SystemExit, match=r"(?s)there is no prepared mnist under .*nothing is downloaded"):
        main(["eval", "--params", str(MICRO), "--data", "tfds:mnist:test", "--data-dir",
              str(tmp_path / "tfds")])


def test_an_empty_tfds_dataset_folder_is_named_without_tfds_noise(tmp_path, capsys, caplog):
    """A dataset folder with nothing prepared in it: tfds blames the file format and absl warns
    about the folder first; the error says what is missing, and nothing comes before it."""
    (tmp_path / "tfds" / "mnist" / "3.0.1").mkdir(parents=True)
    with pytest.raises(SystemExit):
        main(["eval", "--params", str(MICRO), "--data", "tfds:mnist:test", "--data-dir",
              str(tmp_path / "tfds")])
    err = capsys.readouterr().err
    assert err.startswith("ptq4vm eval: error: could not open tfds:mnist:test"), err
    assert "mnist holds no prepared dataset (no dataset_info.json in it)" in err, err
    assert not [r for r in caplog.records if r.name == "absl"], caplog.records


@pytest.mark.slow
def test_eval_is_data_parallel_over_local_devices(converted, capsys, host_devices_env):
    """Four virtual CPU devices give the same metrics as one (batch sharded, padding dropped).
    The one-device run is this process's, the four-device one a subprocess (XLA's host device
    count is fixed at jax import)."""
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
        if n == jax.local_device_count():
            capsys.readouterr()
            exec(compile(code, "<eval>", "exec"), {"__name__": "__main__"})
            got = capsys.readouterr().out.strip().splitlines()
        else:
            env = host_devices_env(n)
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 timeout=300)
            assert out.returncode == 0, out.stderr[-2000:]
            got = out.stdout.strip().splitlines()
        assert got[0] == f"devices {n}"
        lines[n] = got[-1]
    assert lines[1] == lines[4] and "(n=10;" in lines[1]


@pytest.mark.slow
def test_warnings_print_as_one_line_naming_the_command(tmp_path, capsys):
    main(["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "8", "--method",
          "rtn", "--epochs", "5", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert "ptq4vm quantize: warning: method='rtn' does not learn or smooth: epochs=5 is ignored\n" in err
    assert "UserWarning" not in err


@pytest.mark.slow
def test_eval_dtype_bfloat16_builds_the_bf16_variant(tmp_path, capsys, monkeypatch):
    """--dtype bfloat16 reaches the model both for a float and for a quantized checkpoint, and the
    line printed says so; the bf16 runs stay close to the float32 ones (vim_micro, digits)."""
    import jax.numpy as jnp

    import ptq4vm_jax
    from ptq4vm_jax import api
    from ptq4vm_jax.models import registry
    from ptq4vm_jax.quant import params as quant_params

    built = []

    def spy(name, **overrides):
        built.append(overrides.get("dtype", jnp.float32))
        return registry.create_model(name, **overrides)

    monkeypatch.setattr(ptq4vm_jax, "create_model", spy)
    monkeypatch.setattr(api, "create_model", spy)
    monkeypatch.setattr(quant_params, "create_model", spy)  # QuantizedParams.model()
    q = tmp_path / "q"
    main(["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "64",
          "--method", "rtn", "--out", str(q)])
    top1 = {}
    for source in (["--params", str(MICRO)], ["--quantized", str(q), "--mode", "int", "--gemm", "xla"]):
        for dtype in ("float32", "bfloat16"):
            built.clear()
            capsys.readouterr()
            main(["eval", *source, "--data", "digits:test", "--limit", "64", "--dtype", dtype])
            line = capsys.readouterr().out.strip().splitlines()[-1]
            assert jnp.dtype(dtype) in built  # the model evaluated (checks may build others)
            assert line.endswith(", bfloat16 projections)") == (dtype == "bfloat16")
            top1[source[0], dtype] = float(line.split()[1])
    for source in ("--params", "--quantized"):
        assert abs(top1[source, "bfloat16"] - top1[source, "float32"]) <= 100 * 2 / 64  # two images
    assert top1["--params", "float32"] > 80


@pytest.mark.slow
def test_eval_refuses_int_mode_for_a_per_token_dynamic_checkpoint(tmp_path):
    q = tmp_path / "dynamic"
    main(["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "16",
          "--method", "per_token_dynamic", "--out", str(q)])
    with pytest.raises(SystemExit, match="is per_token_dynamic: .*no integer mode; use --mode fake"):
        main(["eval", "--quantized", str(q), "--data", "digits:test", "--limit", "8", "--mode", "int"])


@pytest.mark.slow
def test_replacing_an_output_is_announced_and_foreign_resume_dirs_are_refused(tmp_path, capsys):
    q = tmp_path / "q"
    rtn = ["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "16",
           "--method", "rtn"]
    main([*rtn, "--out", str(q)])
    assert "will be replaced" not in capsys.readouterr().err
    main([*rtn, "--w-bits", "4", "--out", str(q)])
    assert re.search(r"note: --out .*q holds a checkpoint \(vim_micro rtn W8A8, written 20\d\d-.*\); it "
                     r"will be replaced at the end", capsys.readouterr().err)
    assert load_quantized(q).config.w_bits == 4
    with pytest.raises(SystemExit, match=r"is a quantized checkpoint; quantize needs the float model"):
        main(["quantize", "--params", str(q), "--calib", "digits:train", "--out", str(tmp_path / "q2")])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        main([*rtn, "--out", str(tmp_path / "q3"), "--resume", str(mine)])
    assert e.value.code == 2
    assert re.search(r"--resume .*mine holds other files \(notes.txt\) and no resume state; give a new or "
                     "empty directory", capsys.readouterr().err)
    assert os.listdir(mine) == ["notes.txt"] and not (tmp_path / "q3").exists()


@pytest.mark.slow
def test_a_run_whose_learning_diverges_says_so(tmp_path, capsys):
    main(["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "16",
          "--train-batch", "16", "--epochs", "2", "--lr-w", "1e30", "--lr-a", "1e30", "--lr-s", "1e30",
          "--out", str(tmp_path / "q")])
    assert re.search(r"^learning diverged in 4 of 4 blocks, which kept their initial scales",
                     capsys.readouterr().out, re.M)


def test_version_is_the_package_version(capsys):
    import ptq4vm_jax

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ptq4vm-jax {ptq4vm_jax.__version__}"


def test_a_library_error_naming_an_argument_names_its_flag(tmp_path, capsys, monkeypatch):
    """The flag is found from the error's ``argument`` attribute, not from its text; an error
    without one prints as the library wrote it."""
    import ptq4vm_jax

    def refuse(argument):
        def quantize_params(*args, **kwargs):
            e = ValueError("resume_dir /x is not usable")
            if argument:
                e.argument = argument
            raise e
        return quantize_params

    base = ["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "8",
            "--method", "rtn", "--out", str(tmp_path / "q")]
    for argument, said in (("resume_dir", "error: resume_dir /x is not usable (resume_dir: --resume on "
                                          "the command line)\n"),
                           (None, "error: resume_dir /x is not usable\n"),
                           ("no_such_parameter", "error: resume_dir /x is not usable\n")):
        monkeypatch.setattr(ptq4vm_jax, "quantize_params", refuse(argument))
        with pytest.raises(SystemExit) as e:
            main(base)
        assert e.value.code == 2
        assert capsys.readouterr().err.endswith(said)


@pytest.mark.slow  # calibrates through the CLI
def test_a_library_warning_the_command_already_gave_is_not_repeated(tmp_path, capsys, monkeypatch):
    import warnings

    import ptq4vm_jax

    q = tmp_path / "q"
    main(["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "16",
          "--method", "rtn", "--out", str(q)])
    real = ptq4vm_jax.quantized_apply

    def warns(*args, **kwargs):
        for argument in ("gemm", "mode"):
            w = UserWarning(f"about {argument}")
            w.argument = argument
            warnings.warn(w, stacklevel=2)
        # (XLA's GEMM: test_quantize_then_eval_on_tfds_mock_data runs the Triton kernel's path)
        return real(*args, **{**kwargs, "gemm": "xla"})

    monkeypatch.setattr(ptq4vm_jax, "quantized_apply", warns)
    capsys.readouterr()
    main(["eval", "--quantized", str(q), "--data", "digits:test", "--limit", "8", "--mode", "int",
          "--gemm", "pallas"])
    err = capsys.readouterr().err
    assert err.count("warning: --gemm pallas off the GPU runs its kernel in the Pallas interpreter") == 1
    assert "about gemm" not in err  # the command said it already
    assert "warning: about mode (mode: --mode on the command line)" in err


@pytest.mark.slow
def test_scan_flag_reaches_calibration_and_evaluation(tmp_path, capsys, monkeypatch):
    """--scan fused: `quantize` calibrates with it and does not store the choice; `eval` builds
    the float and the quantized model with it (integer mode through the fused kernels counts what
    --scan auto counts on the same images), says so, and warns once that off the GPU the kernels
    run in the interpreter."""
    from ptq4vm_jax import api
    from ptq4vm_jax.quant import params as quant_params

    calibrated, built = [], []
    real_quantize, real_create = api.quantize_params, quant_params.create_model
    monkeypatch.setattr(api, "quantize_params", lambda *a, **kw: calibrated.append(
        kw["model_overrides"].get("scan")) or real_quantize(*a, **kw))
    import ptq4vm_jax

    monkeypatch.setattr(ptq4vm_jax, "quantize_params", api.quantize_params)
    monkeypatch.setattr(ptq4vm_jax, "create_model", lambda name, **kw: built.append(kw.get("scan"))
                        or real_create(name, **kw))
    q = tmp_path / "q"
    main(["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "8",
          "--method", "rtn", "--scan", "ref", "--out", str(q)])
    assert calibrated == ["ref"] and "scan" not in load_quantized(q).model_overrides
    with pytest.raises(SystemExit):  # before anything is loaded
        main(["eval", "--params", str(MICRO), "--data", "digits:test", "--scan", "triton"])
    assert "invalid choice: 'triton'" in capsys.readouterr().err
    built.clear()
    main(["eval", "--params", str(MICRO), "--data", "digits:test", "--limit", "8", "--scan", "ref"])
    assert built == ["ref"] and capsys.readouterr().out.strip().endswith(", scan ref)")
    lines = {}
    for scan in ("fused", "auto"):
        main(["eval", "--quantized", str(q), "--mode", "int", "--data", "digits:test", "--limit", "8",
              "--batch-size", "8", "--scan", scan])
        out, err = capsys.readouterr()
        lines[scan] = out.strip().splitlines()[-1]
        assert lines[scan].endswith(", scan fused)") == (scan == "fused"), lines[scan]
        assert err.count("warning: --scan fused off the GPU runs its kernels in the Pallas interpreter") == (
            scan == "fused"), err
    assert lines["fused"].split("(")[0] == lines["auto"].split("(")[0]


def test_an_error_after_blocks_were_kept_names_the_resume_state(tmp_path, capsys, monkeypatch):
    """A library error in quantize (a failed final save, say) says the completed blocks are kept."""
    import ptq4vm_jax
    from ptq4vm_jax.errors import CheckpointError

    def save_failed(*args, **kwargs):
        raise CheckpointError("writing q failed (no space left on the device); nothing was replaced")

    monkeypatch.setattr(ptq4vm_jax, "quantize_params", save_failed)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "state.npz").write_bytes(b"")  # only its presence matters here
    for resume, said in ((tmp_path / "done", "the blocks completed so far are saved in"), (None, "")):
        with pytest.raises(SystemExit) as e:
            main(["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "8",
                  "--out", str(tmp_path / "q"), *(["--resume", str(resume)] if resume else [])])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no space left" in err and said in err, err
        assert resume or "--resume" not in err, err


def test_the_demo_says_it_replaces_earlier_checkpoints(tmp_path, capsys, monkeypatch):
    import shutil

    import ptq4vm_jax

    earlier = tmp_path / "vim_micro" / "ptq4vm_w4a8"
    fixture = Path(__file__).parents[1] / "data" / "quantized_v1" / "vim_micro_w4a8_pts"
    shutil.copytree(fixture, earlier, ignore=shutil.ignore_patterns("*.npy"))  # the checkpoint alone

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ptq4vm_jax, "quantize_params", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path), "--quiet"])
    assert e.value.code == 130
    assert "holds checkpoints (ptq4vm_w4a8); the demo replaces them" in capsys.readouterr().err
    assert (earlier / "metadata.json").is_file()


def test_python_dash_m_runs_the_command():
    for module in ("ptq4vm_jax", "ptq4vm_jax.cli"):
        done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.startswith("ptq4vm-jax "), done


def test_ctrl_c_while_starting_up_is_one_line_and_130(capsys, monkeypatch):
    import importlib

    cli_main = importlib.import_module("ptq4vm_jax.cli.app")  # the parser and dispatch

    def importing(*args, **kwargs):  # Ctrl-C while the arguments are parsed
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "build_parser", importing)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--params", str(MICRO)])
    assert e.value.code == 130 and capsys.readouterr().err == "ptq4vm: interrupted\n"


@pytest.mark.slow  # calibrates (RTN) through the CLI
def test_a_finished_run_says_its_resume_state_is_kept(tmp_path, capsys):
    main(["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "8",
          "--method", "rtn", "--out", str(tmp_path / "q"), "--resume", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert re.search(r"note: --resume .*r \(\d+\.\d MB\) holds the finished run, which this command would "
                     r"reuse; delete it when you no longer need it", out), out
    assert (tmp_path / "r" / "state.npz").is_file()


def test_a_missing_optional_package_is_one_line_with_its_pip_name(tmp_path, capsys, monkeypatch):
    """The digits data needs scikit-learn, which a machine may lack (the GPU machine does)."""
    from ptq4vm_jax.data import digits

    for name in ("sklearn", "sklearn.datasets"):  # (importing them now raises ModuleNotFoundError)
        monkeypatch.setitem(sys.modules, name, None)
    digits._raw_digits.cache_clear()
    try:
        with pytest.raises(SystemExit) as e:
            main(["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "8",
                  "--method", "rtn", "--out", str(tmp_path / "q")])
    finally:
        digits._raw_digits.cache_clear()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ptq4vm quantize: error: this needs scikit-learn, which is not installed here: "
                   "pip install scikit-learn"), err
    assert not (tmp_path / "q").exists()


def test_the_summary_table_shows_learning_columns_only_when_something_learned(tmp_path, capsys):
    """A run that learns shows the loss at the PTS initialisation, after learning and kept; one
    that does not (RTN, PTS only, epochs 0) has one state per block and shows one loss."""
    main(["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "8",
          "--method", "rtn", "--out", str(tmp_path / "q")])
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("block"))
    assert header.split() == ["block", "loss", "seconds"], header
    main(["quantize", "--params", str(MICRO), "--calib", "digits:train", "--num-calib", "8", "--epochs", "1",
          "--train-batch", "8", "--out", str(tmp_path / "q")])
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("block"))
    assert "loss (PTS init)" in header and "loss (learned)" in header and "loss (kept)" in header, header
