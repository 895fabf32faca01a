"""Resumable calibration: a kill anywhere, a layer outside the blocks, damaged state files."""

import dataclasses
import itertools
import os
import time
import types

import jax
import numpy as np
import pytest

from ptq4vm_jax import create_model
from ptq4vm_jax.api import quantize_params, quantized_apply, quantized_layers
from ptq4vm_jax.calibrate import jlss
from ptq4vm_jax.calibrate.resume import fingerprints
from ptq4vm_jax.cli.quantize import resumed_note
from ptq4vm_jax.quant.config import DEFAULT_RULES, QuantConfig, QuantRule
from ptq4vm_jax.quant.params import to_arrays

MODEL = "vim_nano"  # 2 blocks: two saves, each replacing state.npz then progress.json
# The head lies outside every block: resumed layer states must work in the forward that
# initialises it (it needs their float kernels, which the store leaves out).
CFG = QuantConfig(w_bits=4, a_bits=4, num_calib=8, train_batch=4, method="pts_only",
                  rules=(QuantRule(r"^head$"), *DEFAULT_RULES["vim"]))
REPLACES = 4


class Killed(BaseException):
    """A kill: not an Exception, so nothing on the way may catch it."""


@pytest.fixture(scope="module")
def setup(init_params):
    model = create_model(MODEL)
    images = np.asarray(jax.random.normal(jax.random.key(0), (8, 32, 32, 3)))
    params = init_params(model, 1)
    kernel = params["layers_0"]["mixer"]["in_proj"]["kernel"]
    params["layers_0"]["mixer"]["in_proj"]["kernel"] = kernel.at[3].multiply(20.0)
    whole = quantize_params(params, images, model=MODEL, config=CFG, progress=False)
    return params, images, whole


def run(setup, directory, log=lambda _: None):
    params, images, _ = setup
    return quantize_params(params, images, model=MODEL, config=CFG, resume_dir=str(directory),
                           progress=False, log=log)


def assert_same_result(got, want):
    """Equal layer states and float params: the logits are then equal too (as checked once below)."""
    a, b = ({p: to_arrays(v) for p, v in quantized_layers(x).items()} for x in (got, want))
    assert a.keys() == b.keys() and ("head",) in a
    for path in a:
        assert a[path].keys() == b[path].keys(), path
        for k in a[path]:
            np.testing.assert_array_equal(a[path][k], b[path][k], err_msg=f"{path} {k}")
    jax.tree_util.tree_map(np.testing.assert_array_equal, got.params, want.params)
    strip = lambda qp: [{k: v for k, v in s.items() if k != "seconds"} for s in qp.summary["stages"]]
    assert strip(got) == strip(want)


def kill_at_replace(monkeypatch, directory, call: int, after: bool) -> list:
    """Make the ``call``-th os.replace into ``directory`` kill the run, before or after renaming."""
    real = os.replace
    calls = []

    def replace(src, dst):
        if os.path.dirname(os.path.abspath(dst)) != str(directory):
            return real(src, dst)
        calls.append(os.path.basename(dst))
        if len(calls) == call and not after:
            raise Killed
        real(src, dst)
        if len(calls) == call:
            raise Killed

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_an_uninterrupted_resumable_run_replaces_as_counted(setup, tmp_path, monkeypatch):
    """The kill test below covers every os.replace of a run only if there are REPLACES of them."""
    calls = kill_at_replace(monkeypatch, tmp_path, call=REPLACES + 1, after=False)
    assert_same_result(run(setup, tmp_path), setup[2])
    assert calls == ["state.npz", "progress.json"] * 2


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("call", range(1, REPLACES + 1))
@pytest.mark.slow
def test_a_kill_at_any_replace_resumes_to_the_uninterrupted_result(setup, tmp_path, monkeypatch,
                                                                   call, after):
    with monkeypatch.context() as m:
        calls = kill_at_replace(m, tmp_path, call, after)
        with pytest.raises(Killed):
            run(setup, tmp_path)
    assert len(calls) == call
    logs = []
    assert_same_result(run(setup, tmp_path, logs.append), setup[2])
    committed = call // 2 + (after and call % 2 == 1)  # state.npz renames that happened
    resumed = [m for m in logs if m.startswith("resuming after stage")]
    said = (f"resuming after stage {committed} of 2 (layers_{committed - 1}; {committed} calibrated blocks "
            f"done) from {tmp_path}")
    assert resumed == ([said] if committed else [])


def test_a_resumed_run_counts_the_seconds_of_its_restored_blocks(setup, tmp_path, monkeypatch):
    """The recorded total is every block's time, those of the interrupted run included; the CLI
    line says how much of it this run spent and which blocks came from --resume."""
    ticks = itertools.count(1)
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + 100.0 * next(ticks))
    with monkeypatch.context() as m:  # the interrupted run's block took 100 s more than it did
        m.setattr(jlss, "time", clock)
        kill_at_replace(m, tmp_path, call=2, after=True)  # killed once layers_0 is saved
        with pytest.raises(Killed):
            run(setup, tmp_path)
    s = run(setup, tmp_path).summary
    assert s["stages"][0]["seconds"] >= 100.0  # (as recorded before the interruption)
    assert s["calibration_seconds"] >= sum(st["seconds"] for st in s["stages"])  # the table's sum
    assert s["resumed_stages"] == ["layers_0"]
    this_run = s["calibration_seconds_this_run"]
    assert this_run < 100.0 and this_run >= s["stages"][1]["seconds"]
    assert s["calibration_seconds"] == pytest.approx(this_run + s["stages"][0]["seconds"])
    assert resumed_note(s) == f" ({this_run:.1f}s in this run; block layers_0 from --resume)"
    s = run(setup, tmp_path).summary  # a finished run again: every block restored
    assert s["resumed_stages"] == ["layers_0", "layers_1"]
    assert s["calibration_seconds"] >= sum(st["seconds"] for st in s["stages"]) >= 100.0
    assert resumed_note(s).endswith("in this run; 2 blocks, layers_0 to layers_1, from --resume)")
    fresh = run(setup, tmp_path / "fresh").summary
    assert fresh["resumed_stages"] == [] and resumed_note(fresh) == ""
    assert fresh["calibration_seconds"] == fresh["calibration_seconds_this_run"]


def test_rerunning_a_finished_run_with_a_head_rule_gives_its_result(setup, tmp_path):
    first = run(setup, tmp_path)
    logs = []
    again = run(setup, tmp_path, logs.append)
    assert any(m.startswith("resuming after stage 2 of 2") for m in logs)
    assert_same_result(first, setup[2])
    assert_same_result(again, setup[2])


def test_progress_json_is_only_a_mirror(setup, tmp_path):
    run(setup, tmp_path)
    assert '"next_stage": 2' in (tmp_path / "progress.json").read_text()
    (tmp_path / "progress.json").write_text('{"next_stage": 0, garbled')
    assert_same_result(run(setup, tmp_path), setup[2])


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble_the_middle(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = b"\x5a" * 64
    path.write_bytes(bytes(data))


def not_a_zip(path):
    path.write_bytes(b"this is not what was saved" * 8)


@pytest.mark.parametrize("damage", [truncate, garble_the_middle, not_a_zip])
def test_damaged_state_is_reported_as_corrupt(setup, tmp_path, damage):
    run(setup, tmp_path)
    damage(tmp_path / "state.npz")
    with pytest.raises(ValueError, match=r"resume state is corrupt \(.+\); delete the directory") as e:
        run(setup, tmp_path)
    assert e.value.argument == "resume_dir" and "allow_pickle" not in str(e.value)  # (np.load's advice)
    if damage is not_a_zip:
        assert "state.npz is not an .npz archive" in str(e.value)


def test_a_deleted_state_file_is_said_and_the_run_starts_afresh(setup, tmp_path):
    run(setup, tmp_path)
    (tmp_path / "state.npz").unlink()
    logs = []
    assert_same_result(run(setup, tmp_path, log=logs.append), setup[2])
    assert any("has progress.json but no state.npz (deleted?): starting afresh" in m for m in logs)


def test_state_of_the_first_format_is_refused_by_version(setup, tmp_path):
    np.savez(tmp_path / "state.npz", **{"fp|0": np.zeros(3), "q|0": np.zeros(3)})
    with pytest.raises(ValueError, match=r"another format version \(1\)"):
        run(setup, tmp_path)


def test_each_part_digest_is_that_part_fingerprinted_alone():
    parts = dict(model="vim_nano", config={"alpha": 0.5, "rules": None},
                 params={"w": np.arange(6.0).reshape(2, 3)}, images=np.ones((2, 2), np.float32))
    whole, digests = fingerprints(**parts)
    assert digests == {k: fingerprints(**{k: v})[0] for k, v in parts.items()}
    assert whole not in digests.values() and len(set(digests.values())) == 4
    assert fingerprints(**{**parts, "images": np.zeros((2, 2), np.float32)})[0] != whole


def test_state_of_another_run_is_refused(setup, tmp_path):
    run(setup, tmp_path)
    params, images, _ = setup
    with pytest.raises(ValueError, match=r"different run \(config: alpha 0\.5 -> 0\.6\)"):
        quantize_params(params, images, model=MODEL, config=dataclasses.replace(CFG, alpha=0.6),
                        resume_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match=r"different run \(config: a_bits 4 -> 8, w_bits 4 -> 8\)"):
        quantize_params(params, images, model=MODEL, config=dataclasses.replace(CFG, w_bits=8, a_bits=8),
                        resume_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match=r"different run \(images differ\)"):
        quantize_params(params, images[::-1], model=MODEL, config=CFG, resume_dir=str(tmp_path),
                        progress=False)
    other = jax.tree_util.tree_map(lambda a: a * 1.01, params)
    with pytest.raises(ValueError, match=r"different run \(params differ\)"):
        quantize_params(other, images, model=MODEL, config=CFG, resume_dir=str(tmp_path), progress=False)


@pytest.mark.slow
def test_a_resumed_run_gives_the_uninterrupted_logits(setup, tmp_path, monkeypatch):
    """A kill between the two renames of the second save (the state of stage 2, progress.json
    of stage 1) once made the resumed run calibrate stage 2 again on its own output."""
    _, images, whole = setup
    with monkeypatch.context() as m:
        kill_at_replace(m, tmp_path, call=4, after=False)
        with pytest.raises(Killed):
            run(setup, tmp_path)
    np.testing.assert_array_equal(quantized_apply(None, run(setup, tmp_path), images),
                                  quantized_apply(None, whole, images))


@pytest.mark.slow
def test_resumed_chains_stay_sharded_over_local_devices(host_devices_env):
    """On four (virtual CPU) devices, the chains of a resumed run are data-parallel again."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import tempfile, jax, numpy as np
        from ptq4vm_jax import create_model, quantize_params, QuantConfig
        from ptq4vm_jax.api import quantized_layers
        from ptq4vm_jax.calibrate.resume import ResumeStore
        m = create_model("vim_nano")
        x = np.asarray(jax.random.normal(jax.random.key(0), (8, 32, 32, 3)))
        p = jax.jit(m.init)(jax.random.key(1), x[:1])["params"]
        cfg = QuantConfig(4, 4, num_calib=8, train_batch=4, method="pts_only")
        whole = quantized_layers(quantize_params(p, x, model="vim_nano", config=cfg, progress=False))
        devices, save = [], ResumeStore.save
        def spy(self, next_stage, layers, fp, q, reports):
            devices.append(sorted({len(a.sharding.device_set) for a in jax.tree_util.tree_leaves((fp, q))}))
            if next_stage == 1 and len(devices) == 1:
                save(self, next_stage, layers, fp, q, reports)
                raise KeyboardInterrupt
            return save(self, next_stage, layers, fp, q, reports)
        ResumeStore.save = spy
        d = tempfile.mkdtemp()
        try:
            quantize_params(p, x, model="vim_nano", config=cfg, progress=False, resume_dir=d)
        except KeyboardInterrupt:
            pass
        resumed = quantized_layers(quantize_params(p, x, model="vim_nano", config=cfg,
                                                   progress=False, resume_dir=d))
        same = jax.tree_util.tree_all(jax.tree.map(np.array_equal, resumed, whole))
        print(jax.local_device_count(), devices, same)
    """)
    env = host_devices_env(4)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "4 [[4], [4]] True"


def test_a_full_disk_while_saving_keeps_the_last_state_and_no_partial_file(tmp_path, monkeypatch):
    """A save that fails (a full disk, above all) names the directory and what to do, keeps the
    state saved before, and leaves no half-written temporary file filling the disk."""
    import errno

    from ptq4vm_jax.calibrate.resume import ResumeStore
    from ptq4vm_jax.errors import ArgumentError

    carry = {"x": np.ones((2, 3), np.float32)}
    store = ResumeStore(tmp_path / "r", "fp", jax.tree_util.tree_structure(carry))
    store.save(1, {("layers_0", "in_proj"): {"a_scale": np.ones(3, np.float32)}}, carry, carry, [])
    saved = (tmp_path / "r" / "state.npz").read_bytes()

    def full(f, **arrays):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    want = r"saving the resume state in .*r failed \(no space left on the device\); the blocks saved before"
    with pytest.raises(ArgumentError, match=want + " are kept. Free some space") as e:
        store.save(2, {}, carry, carry, [])
    assert e.value.argument == "resume_dir"
    assert sorted(os.listdir(tmp_path / "r")) == ["progress.json", "state.npz"]
    assert (tmp_path / "r" / "state.npz").read_bytes() == saved
