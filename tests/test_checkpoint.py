"""Orbax float-params checkpoints: round trip, overwrite rules, and clear errors for bad directories."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ptq4vm_jax import checkpoint
from ptq4vm_jax.checkpoint import CheckpointError, abstract_params, load_params, save_params
from ptq4vm_jax.checkpoint.store import metadata_digest


def _random_params(name="vim_micro", seed=0, **overrides):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        abstract_params(name, **overrides))


@pytest.fixture(scope="module")
def params():
    return _random_params()


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return all(x.dtype == y.dtype and x.tobytes() == y.tobytes()
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _edit_metadata(path, drop=(), **changes):
    """Edit and re-seal, as if the checkpoint had been written that way, so that each field's own
    validation is what answers. (An edit that is not re-sealed is refused:
    test_edited_metadata_is_refused.)"""
    meta_path = path / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta.update(changes)
    for key in drop:
        del meta[key]
    meta["metadata_sha256"] = metadata_digest(meta)
    meta_path.write_text(json.dumps(meta))


def test_round_trip_with_metadata(tmp_path, params):
    meta = save_params(tmp_path / "ck", params, model_name="vim_micro", source="vim.pth",
                       source_sha256="ab" * 32, extra={"note": "test"})
    got, loaded = load_params(tmp_path / "ck", model_name="vim_micro")
    assert _same(got, params)
    assert loaded == meta
    assert meta["format"] == "ptq4vm-jax/float-params" and meta["format_version"] == 2
    assert sorted(meta["array_sha256"]) == sorted(checkpoint.store.array_digests(params))
    assert meta["model_name"] == "vim_micro" and meta["model_overrides"] == {}
    assert meta["source_sha256"] == "ab" * 32 and meta["extra"] == {"note": "test"}
    assert meta["jax_version"] == jax.__version__ and meta["created"].endswith("+00:00")
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary directories left behind


def test_edited_metadata_is_refused(tmp_path, params):
    """The sizes in metadata.json decide how the arrays are read: a valid-looking edit (here a
    norm epsilon, which no shape check can see) would silently change the model."""
    save_params(tmp_path / "ck", params, model_name="vim_micro", extra={"train_seconds": 495.0})
    meta_path = tmp_path / "ck" / "metadata.json"
    sealed = meta_path.read_text()
    assert len(json.loads(sealed)["metadata_sha256"]) == 64
    meta_path.write_text(json.dumps({**json.loads(sealed), "model_overrides": {"norm_epsilon": 1.0}}))
    with pytest.raises(CheckpointError, match=r"metadata.json was changed after it was written .*"
                                              "Restore the file or re-create the checkpoint"):
        load_params(tmp_path / "ck")
    meta_path.write_text(json.dumps(json.loads(sealed), indent=4))  # formatting is not content
    assert _same(load_params(tmp_path / "ck")[0], params)
    assert '"train_seconds": 495.0' in sealed  # jq and JavaScript write whole floats as integers
    meta_path.write_text(sealed.replace('"train_seconds": 495.0', '"train_seconds": 495'))
    assert _same(load_params(tmp_path / "ck")[0], params)


def test_overrides_are_stored_and_used(tmp_path):
    p = _random_params(num_classes=7)
    save_params(tmp_path / "ck", p, model_name="vim_micro", model_overrides={"num_classes": 7})
    got, meta = load_params(tmp_path / "ck")
    assert meta["model_overrides"] == {"num_classes": 7} and got["head"]["kernel"].shape == (48, 7)
    assert _same(got, p)


def test_overwrite_replaces_everything(tmp_path, params):
    save_params(tmp_path / "ck", params, model_name="vim_micro")
    other = _random_params(seed=1)
    save_params(tmp_path / "ck", other, model_name="vim_micro")
    assert _same(load_params(tmp_path / "ck")[0], other)
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        save_params(tmp_path / "ck", params, model_name="vim_micro", overwrite=False)


def test_float_params_are_only_replaced_by_the_same_model(tmp_path, params):
    save_params(tmp_path / "ck", params, model_name="vim_micro")
    nano = _random_params("vim_nano")
    want = (r"ck holds float params of vim_micro; refusing to replace it with float params of vim_nano: "
            r"a checkpoint is only replaced by one of the same model. To keep it, choose another "
            r"output path \(CLI: --out\) or delete .*ck yourself")
    with pytest.raises(CheckpointError, match=want):
        save_params(tmp_path / "ck", nano, model_name="vim_nano")
    assert _same(load_params(tmp_path / "ck")[0], params)
    long = "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
    sizes = {"embed_dim": 16, "depth": 1}
    save_params(tmp_path / "t", _random_params("vim_tiny", **sizes), model_name="vim_tiny",
                model_overrides=sizes)
    tiny = _random_params("vim_tiny", seed=1, **sizes)  # the official long name is the same model
    save_params(tmp_path / "t", tiny, model_name=long, model_overrides=sizes)
    assert _same(load_params(tmp_path / "t", model_name="vim_tiny")[0], tiny)


def test_a_checkpoint_is_not_replaced_by_another_format(tmp_path, params):
    save_params(tmp_path / "ck", params, model_name="vim_micro")
    quantized = {"format": checkpoint.QUANT_FORMAT, "format_version": 1, "model_name": "vim_micro"}
    want = (r"ck holds a 'ptq4vm-jax/float-params' checkpoint of vim_micro; refusing to replace it with a "
            r"'ptq4vm-jax/quantized' checkpoint: overwriting only replaces a checkpoint of the same format")
    with pytest.raises(CheckpointError, match=want):
        checkpoint.write_checkpoint(tmp_path / "ck", {"w": np.ones(2, np.float32)}, quantized)
    assert _same(load_params(tmp_path / "ck")[0], params)
    checkpoint.write_checkpoint(tmp_path / "q", {"w": np.ones(2, np.float32)}, quantized)
    with pytest.raises(CheckpointError, match="q holds a 'ptq4vm-jax/quantized' checkpoint of vim_micro; "
                                              "refusing to replace it with a 'ptq4vm-jax/float-params'"):
        save_params(tmp_path / "q", params, model_name="vim_micro")
    assert checkpoint.read_metadata(tmp_path / "q")["format"] == checkpoint.QUANT_FORMAT


def test_refuses_to_replace_a_foreign_directory(tmp_path, params):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(CheckpointError, match="is not a ptq4vm-jax checkpoint; refusing to replace"):
        save_params(tmp_path / "mine", params, model_name="vim_micro")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_refuses_to_replace_a_checkpoint_holding_other_files(tmp_path, params):
    """A checkpoint's directory holds its metadata and its tree; anything else put there (notes,
    a result written inside it) would go with a replacement, so it is refused and kept."""
    save_params(tmp_path / "ck", params, model_name="vim_micro")
    (tmp_path / "ck" / "w8a8").mkdir()
    (tmp_path / "ck" / "w8a8" / "metadata.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"ck holds a checkpoint and also other files \(w8a8\), which "
                                              "replacing it would delete; refusing to replace it"):
        save_params(tmp_path / "ck", params, model_name="vim_micro")
    assert (tmp_path / "ck" / "w8a8" / "metadata.json").read_text() == "{}"
    shutil.rmtree(tmp_path / "ck" / "w8a8")
    (tmp_path / "ck" / ".DS_Store").write_bytes(b"\0")  # a file browser's, not someone's work
    save_params(tmp_path / "ck", params, model_name="vim_micro")  # its own entries alone: replaced


def test_wrong_params_are_caught_at_save(tmp_path, params):
    bad = jax.tree.map(lambda a: a, params)
    bad["head"]["kernel"] = np.zeros((48, 3), np.float32)
    del bad["norm_f"]
    want = r"do not match vim_micro:\n(.|\n)*head/kernel: \(48, 3\) float32, expected \(48, 10\) float32"
    with pytest.raises(CheckpointError, match=want + r"(.|\n)*missing norm_f/weight"):
        save_params(tmp_path / "ck", bad, model_name="vim_micro")
    assert not (tmp_path / "ck").exists()


def test_nonfinite_params_are_neither_saved_nor_loaded(tmp_path, params, monkeypatch):
    bad = jax.tree.map(np.copy, params)
    bad["layers_1"]["mixer"]["A_log"][0, :2] = np.nan
    bad["head"]["bias"][3] = np.inf
    want = (r"refusing to write .*nan: the parameters hold NaN or infinite values \(a model with them "
            r"computes garbage\):\n  head/bias: 1 of 10 values \(0 NaN, 1 inf\)\n  layers_1/mixer/A_log: "
            r"2 of 1536 values \(2 NaN, 0 inf\)\nfind where they came from")
    with pytest.raises(CheckpointError, match=want):
        save_params(tmp_path / "nan", bad, model_name="vim_micro")
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(checkpoint.store, "nonfinite_report", lambda arrays: [])  # a damaged one on disk
    save_params(tmp_path / "nan", bad, model_name="vim_micro")
    monkeypatch.undo()
    want = r"nan holds NaN or infinite parameters .*:\n  head/bias: 1 of 10 (.|\n)*the checkpoint is damaged"
    with pytest.raises(CheckpointError, match=want):
        load_params(tmp_path / "nan")


def test_wrong_model_name(tmp_path, params):
    save_params(tmp_path / "ck", params, model_name="vim_micro")
    with pytest.raises(CheckpointError, match="holds vim_micro, you asked for vim_nano"):
        load_params(tmp_path / "ck", model_name="vim_nano")


def test_newer_version_and_other_formats(tmp_path, params, monkeypatch):
    save_params(tmp_path / "ck", params, model_name="vim_micro")
    _edit_metadata(tmp_path / "ck", format_version=3)
    with pytest.raises(CheckpointError, match="version 3; this ptq4vm-jax reads versions 1 to 2: upgrade"):
        load_params(tmp_path / "ck")
    monkeypatch.setitem(checkpoint.KNOWN_FORMATS, "ptq4vm-jax/quantized", "ptq4vm_jax.load_quantized")
    _edit_metadata(tmp_path / "ck", format="ptq4vm-jax/quantized", format_version=1)
    with pytest.raises(CheckpointError, match="is a 'ptq4vm-jax/quantized' checkpoint.*load it with "
                                              "ptq4vm_jax.load_quantized"):
        load_params(tmp_path / "ck")
    _edit_metadata(tmp_path / "ck", format="someone-else/v9")
    with pytest.raises(CheckpointError, match="not written by this version of ptq4vm-jax"):
        load_params(tmp_path / "ck")


def test_shapes_are_checked_on_restore(tmp_path, params):
    save_params(tmp_path / "ck", params, model_name="vim_micro")
    _edit_metadata(tmp_path / "ck", model_overrides={"num_classes": 7})
    with pytest.raises(CheckpointError, match=r"does not match the model:\n(.|\n)*head/kernel: \(48, 10\) "
                                              r"float32, expected \(48, 7\) float32"):
        load_params(tmp_path / "ck")


def test_missing_and_corrupt_metadata(tmp_path, params):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_params(tmp_path / "nothing")
    save_params(tmp_path / "ck", params, model_name="vim_micro")
    (tmp_path / "ck" / "metadata.json").write_text('{"format": "ptq4vm-jax/float-params", "format_ver')
    with pytest.raises(CheckpointError, match="metadata.json is unreadable.*corrupt"):
        load_params(tmp_path / "ck")
    (tmp_path / "ck" / "metadata.json").write_text('{"format": "ptq4vm-jax/float-params"}')
    with pytest.raises(CheckpointError, match="lacks a 'format' string and an integer 'format_version'"):
        load_params(tmp_path / "ck")
    (tmp_path / "ck" / "metadata.json").unlink()
    with pytest.raises(CheckpointError, match="has no metadata.json"):
        load_params(tmp_path / "ck")
    (tmp_path / "file.pth").write_bytes(b"PK")
    with pytest.raises(CheckpointError, match=r"is a file, not a checkpoint directory; an official .pth / "
                                              r".safetensors file is read by load_torch_checkpoint"):
        load_params(tmp_path / "file.pth")
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / "progress.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds the resume state of a calibration \(resume_dir, CLI: "
                                              r"--resume\), not a checkpoint"):
        load_params(tmp_path / "resume")


def _truncate_files(folder):
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def test_damaged_tree(tmp_path, params):
    save_params(tmp_path / "ck", params, model_name="vim_micro")
    shutil.copytree(tmp_path / "ck", tmp_path / "data")
    _truncate_files(tmp_path / "ck" / "params" / "d")  # the array metadata
    redo = "the checkpoint is incomplete or corrupt: re-create it"
    want = (r"cannot read the parameter tree's metadata in .*ck/params \(its _METADATA or the array "
            rf"metadata it refers to is damaged\); {redo}")
    with pytest.raises(CheckpointError, match=want):
        load_params(tmp_path / "ck")
    _truncate_files(tmp_path / "data" / "params" / "ocdbt.process_0" / "d")  # the arrays
    want = rf"cannot read the parameter tree in .*data/params \(ValueError: .*\); {redo}"
    with pytest.raises(CheckpointError, match=want):
        load_params(tmp_path / "data")
    os.remove(tmp_path / "ck" / "params" / "_METADATA")
    with pytest.raises(CheckpointError, match=rf"ck/params/_METADATA \(the parameter tree's layout\) is "
                                              rf"missing; {redo}"):
        load_params(tmp_path / "ck")
    shutil.rmtree(tmp_path / "ck" / "params")
    with pytest.raises(CheckpointError, match=r"ck/params is missing; the checkpoint is incomplete"):
        load_params(tmp_path / "ck")
    (tmp_path / "ck" / "params").write_text("x")
    with pytest.raises(CheckpointError, match=r"ck/params is a file, not the parameter tree's directory; "
                                              r"the checkpoint is incomplete"):
        load_params(tmp_path / "ck")


@pytest.mark.slow
def test_a_damaged_tree_gives_one_error_and_no_tracebacks(tmp_path, params):
    """Orbax left TensorStore reads running onto a closed event loop ("Event loop is closed"), or as
    failed tasks and futures nobody awaited (asyncio's "... exception was never retrieved"): dozens
    of tracebacks after the error. The second kind appeared on about one run in six, so each
    damaged tree is read several times and the leftovers are collected before the check."""
    save_params(tmp_path / "meta", params, model_name="vim_micro")
    shutil.copytree(tmp_path / "meta", tmp_path / "data")
    _truncate_files(tmp_path / "meta" / "params" / "d")
    _truncate_files(tmp_path / "data" / "params" / "ocdbt.process_0" / "d")
    code = textwrap.dedent(f"""
        import gc, time
        from ptq4vm_jax.checkpoint import CheckpointError, load_params
        for _ in range(4):
            for path in ({str(tmp_path / "meta")!r}, {str(tmp_path / "data")!r}):
                try:
                    load_params(path)
                except CheckpointError as e:
                    print("refused", path)
        time.sleep(0.5)  # let late TensorStore callbacks arrive before the interpreter exits
        gc.collect()
    """)
    # On the CPU (no accelerator lookup notices); other notices jax or absl may print are not
    # what this checks: the tracebacks and asyncio's complaints of the reads left running are.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("refused") == 8, out.stdout
    for leftover in ("Traceback", "Exception ignored", "never retrieved", "Event loop is closed"):
        assert leftover not in out.stderr, out.stderr[-2000:]


def test_only_the_refused_trees_late_failures_are_dropped(tmp_path, params, caplog):
    save_params(tmp_path / "ck", params, model_name="vim_micro")
    _truncate_files(tmp_path / "ck" / "params" / "ocdbt.process_0" / "d")
    with pytest.raises(CheckpointError, match=r"cannot read the parameter tree in .*ck/params"):
        load_params(tmp_path / "ck")
    log = logging.getLogger("asyncio")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for where in (tmp_path / "ck" / "params", tmp_path / "other" / "params"):
            log.error("Task exception was never retrieved\nfuture: <Task exception=ValueError('Error "
                      "reading in OCDBT database at local file \"%s/\"')>", where)
        log.error("Future exception was never retrieved (an unrelated failure)")
    kept = [r.getMessage() for r in caplog.records]
    assert len(kept) == 2 and str(tmp_path / "other") in kept[0] and "unrelated" in kept[1], kept


def test_a_good_load_leaves_the_unraisable_hook_alone(saved):
    before = sys.unraisablehook
    load_params(saved)
    assert sys.unraisablehook is before


def test_the_params_subdirectory_is_named_as_such(saved):
    with pytest.raises(CheckpointError, match=rf"ck/params is the params/ subdirectory of a checkpoint; pass "
                                              rf"the checkpoint itself, its parent {saved}$"):
        load_params(saved / "params")


def test_an_unwritable_place_is_named_at_once(tmp_path, params):
    (tmp_path / "file").write_text("x")
    want = (r"cannot write .*file/sub/ck: cannot create a directory in .*file/sub \(Not a directory\); "
            "choose an output path in a directory you can write to")
    with pytest.raises(CheckpointError, match=want):
        save_params(tmp_path / "file" / "sub" / "ck", params, model_name="vim_micro")



def _orbax_save_that(monkeypatch, first=None, then=None):
    """Orbax's save with ``first()`` before it and ``then()`` after it (a Ctrl-C or a failure
    arriving while a checkpoint is written); returns a list that gets True once the save has run
    in full."""
    import orbax.checkpoint as ocp

    real, completed = ocp.StandardCheckpointer.save, []

    def save(self, *args, **kwargs):
        if first:
            first()
        real(self, *args, **kwargs)
        completed.append(True)
        if then:
            then()

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save)
    return completed


def test_ctrl_c_while_saving_replaces_nothing_and_leaves_nothing(tmp_path, params, monkeypatch):
    """The interrupt is held until Orbax has finished (an exception in mid-save would race its
    writer threads for the directory), then the new directory is dropped, the old checkpoint
    stays whole, and KeyboardInterrupt reaches the caller."""
    import signal

    path = tmp_path / "ck"
    save_params(path, params, model_name="vim_micro")
    before = json.loads((path / "metadata.json").read_text())
    completed = _orbax_save_that(monkeypatch, first=lambda: os.kill(os.getpid(), signal.SIGINT))
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        save_params(path, _random_params(seed=1), model_name="vim_micro")
    assert completed == [True], "the interrupt stopped Orbax in mid-save"
    assert signal.getsignal(signal.SIGINT) is handler
    assert os.listdir(tmp_path) == ["ck"], "a temporary directory was left beside the checkpoint"
    assert json.loads((path / "metadata.json").read_text()) == before
    assert _same(load_params(path)[0], params)


def test_a_failed_save_says_so_in_one_line_and_replaces_nothing(tmp_path, params, monkeypatch):
    """Orbax's and TensorStore's own errors (not OSErrors) are reported as a failed write, a full
    disk with what to do."""
    path = tmp_path / "ck"
    save_params(path, params, model_name="vim_micro")

    def full():
        raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x/manifest.ocdbt": No space left on '
                         "device [os_error_code='28']")

    _orbax_save_that(monkeypatch, then=full)
    want = r"writing .*ck failed \(no space left on the device: free some, or write to another disk\)"
    with pytest.raises(CheckpointError, match=want + "; nothing was replaced$"):
        save_params(path, _random_params(seed=1), model_name="vim_micro")
    assert os.listdir(tmp_path) == ["ck"]
    assert _same(load_params(path)[0], params)

@pytest.fixture(scope="module")
def saved(tmp_path_factory, params):
    path = tmp_path_factory.mktemp("saved") / "ck"
    save_params(path, params, model_name="vim_micro")
    return path


@pytest.mark.parametrize("drop, changes, want", [
    (("model_name",), {}, "'model_name' must be a model name string, got None"),
    ((), {"model_name": 5}, "'model_name' must be a model name string, got 5"),
    ((), {"model_name": "vim_nope"}, "unknown model name 'vim_nope'"),
    ((), {"model_overrides": None}, "'model_overrides' must be an object of model arguments, got None"),
    ((), {"model_overrides": [1]}, "'model_overrides' must be an object"),
    ((), {"model_overrides": {"embed_dimm": 3}}, r"'vim_micro' with overrides .*embed_dimm"),
    ((), {"model_overrides": {"embed_dim": "wide"}}, "embed_dim must be a positive int, got 'wide'"),
], ids=["no-name", "int-name", "unknown-name", "null-overrides", "list-overrides", "unknown-override",
        "bad-override-value"])
def test_invalid_model_metadata(tmp_path, saved, drop, changes, want):
    shutil.copytree(saved, tmp_path / "ck")
    _edit_metadata(tmp_path / "ck", drop=drop, **changes)
    with pytest.raises(CheckpointError, match=rf"ck/metadata.json is invalid \(.*{want}.*\); re-create the "
                                              "checkpoint"):
        load_params(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="metadata.json is invalid"):
        load_params(tmp_path / "ck", model_name="vim_micro")


def test_missing_overrides_mean_none(tmp_path, saved, params):
    shutil.copytree(saved, tmp_path / "ck")
    _edit_metadata(tmp_path / "ck", drop=("model_overrides",))
    assert _same(load_params(tmp_path / "ck")[0], params)
