"""Evaluation on the command line: a batch no larger than what is evaluated, a resized model named
with its sizes, and running out of memory as one line naming the flag to lower."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from ptq4vm_jax import data
from ptq4vm_jax.cli import main

MICRO = Path(__file__).parents[2] / "ptq4vm_jax" / "assets" / "vim_micro"


def test_eval_batches_no_larger_than_the_images_it_evaluates(monkeypatch, capsys):
    """A --batch-size above --limit (or the dataset) would only pad every step with blank images."""
    sizes, real = [], data.eval_batches

    def spy(source, batch_size, **kw):
        sizes.append(batch_size)
        return real(source, batch_size, **kw)

    monkeypatch.setattr(data, "eval_batches", spy)
    main(["eval", "--params", str(MICRO), "--data", "digits:test", "--batch-size", "100000", "--limit", "40"])
    assert "(n=40; vim_micro float)" in capsys.readouterr().out
    main(["eval", "--params", str(MICRO), "--data", "digits:test", "--batch-size", "100000"])
    assert sizes == [40, 355]


@pytest.mark.parametrize("command,flag", [("eval", "lower --batch-size"),
                                          ("quantize", "lower --train-batch (images per learning step)")])
def test_running_out_of_device_memory_is_one_line_naming_the_flag(command, flag, monkeypatch, capsys,
                                                                  tmp_path):
    def too_big(args):  # XLA's allocation failure, as a device raises it (not provoked: an
        # overcommitting host would hand out the memory and then kill the process)
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1099511627776 bytes.")

    monkeypatch.setattr(f"ptq4vm_jax.cli.app.cmd_{command}", too_big)
    argv = {"eval": ["eval", "--params", str(MICRO), "--data", "digits:test"],
            "quantize": ["quantize", "--params", str(MICRO), "--calib", "digits:train", "--out",
                         str(tmp_path / "q")]}[command]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert err.startswith(f"ptq4vm {command}: error: the device ran out of memory (RESOURCE_EXHAUSTED: "), err
    assert flag in err and len(err.strip().splitlines()) == 1, err


def test_eval_names_a_resized_model_with_its_sizes(tmp_path, capsys):
    from ptq4vm_jax import create_model, save_params

    params = jax.jit(create_model("vim_nano", depth=1).init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    save_params(tmp_path / "p", params["params"], model_name="vim_nano", model_overrides={"depth": 1})
    main(["eval", "--params", str(tmp_path / "p"), "--data", "digits:test", "--limit", "8"])
    assert "(n=8; vim_nano (depth=1) float)" in capsys.readouterr().out


def test_out_of_memory_with_kept_blocks_says_lowering_the_flags_is_a_new_run(monkeypatch, capsys, tmp_path):
    """--train-batch and --num-calib are part of what a resume directory continues: lowering them
    cannot continue the kept blocks, and the line must not suggest it."""
    def too_big(args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1099511627776 bytes.")

    monkeypatch.setattr("ptq4vm_jax.cli.app.cmd_quantize", too_big)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "state.npz").write_bytes(b"")  # blocks were completed
    with pytest.raises(SystemExit):
        main(["quantize", "--params", str(MICRO), "--calib", "digits:train", "--out", str(tmp_path / "q"),
              "--resume", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert "lower --train-batch (images per learning step) or --num-calib (a new run: the blocks completed " \
           f"so far in --resume {tmp_path / 'r'} continue only a rerun with the same settings)" in err, err
    assert "with the same --resume to continue" not in err
