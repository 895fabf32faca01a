"""Multi-device checks run in subprocesses: XLA's host device count is fixed at jax import.

Starting JAX costs seconds per process, so the subprocesses are started once per module, all at
the same time: one process with four devices, and one pair of processes joined by
``jax.distributed`` that runs every two-process check (its own rows back, then the CLI's eval for
each ``--limit`` of the tests below).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ptq4vm_jax.distributed import data_mesh, maybe_initialize_distributed, replicate, shard_batch

LAUNCH_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE")

FOUR_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from ptq4vm_jax import create_model
    from ptq4vm_jax.distributed import data_mesh, data_parallel, replicate, shard_batch

    assert jax.device_count() == 4, jax.devices()
    mesh = data_mesh()
    x = np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype(np.float32)
    xs, n = shard_batch(x, mesh)
    assert n == 6 and xs.shape == (8, 32, 32, 3), (n, xs.shape)
    assert sorted(s.data.shape[0] for s in xs.addressable_shards) == [2, 2, 2, 2]
    np.testing.assert_array_equal(np.asarray(xs)[:6], x)
    np.testing.assert_array_equal(np.asarray(xs)[6:], 0)
    assert shard_batch(x[:4], mesh)[0].shape[0] == 4

    model = create_model("vim_nano", depth=1)
    params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]
    rep = replicate(params, mesh)
    leaf = rep["head"]["kernel"]
    assert len(leaf.sharding.device_set) == 4 and leaf.addressable_shards[0].data.shape == leaf.shape

    fwd = lambda p, images: model.apply({"params": p}, images)
    want = np.asarray(jax.jit(fwd)(params, x))
    got = data_parallel(fwd, params, mesh)(x)
    assert got.shape == (6, 10), got.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    print("FOUR_DEVICES_OK")
""")

EVAL_LIMITS = ("300", "1")  # "1": one host's share is empty

TWO_PROCESSES = textwrap.dedent("""
    import contextlib, io, json, sys
    import jax, numpy as np
    from ptq4vm_jax.assets import ASSETS
    from ptq4vm_jax.cli import main
    from ptq4vm_jax.distributed import data_parallel, maybe_initialize_distributed

    assert maybe_initialize_distributed()
    assert not maybe_initialize_distributed()  # second call: already initialised
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    fn = lambda p, x: x @ p
    # Each process brings its own 5 rows; it must get back exactly its own 5 results.
    x = np.random.default_rng(jax.process_index()).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(data_parallel(fn, w)(x), x @ w, rtol=1e-6)
    print("PROCESS_OK", jax.process_index(), flush=True)
    # The CLI's eval on the same two processes (it finds jax.distributed joined), once per limit.
    for limit in sys.argv[1:]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(["eval", "--params", str(ASSETS / "vim_micro"), "--data", "digits:test",
                  "--batch-size", "32", "--limit", limit])
        print("EVAL", limit, json.dumps(out.getvalue()), flush=True)
""")


def _env(host_devices_env, devices: int, **extra):
    """This process's environment without its launch settings (or XLA flags), on ``devices``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and k != "XLA_FLAGS"}
    return {**host_devices_env(devices, env), **extra}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(host_devices_env):
    """Start the four-device process and the two-process pair together; their (rc, out, err)."""
    four = subprocess.Popen([sys.executable, "-c", FOUR_DEVICES], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=_env(host_devices_env, 4))
    port = _free_port()
    pair = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_PROCESSES, *EVAL_LIMITS], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            env=_env(host_devices_env, 2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]
    try:
        done = {name: (p, *p.communicate(timeout=300)) for name, p in
                (("four", four), ("pair0", pair[0]), ("pair1", pair[1]))}
    finally:
        for p in (four, *pair):
            p.kill()
    return {name: (p.returncode, out, err) for name, (p, out, err) in done.items()}


@pytest.mark.slow  # subprocesses
def test_sharded_forward_on_four_devices_matches_unsharded(launched):
    rc, out, err = launched["four"]
    assert rc == 0, err[-3000:]
    assert "FOUR_DEVICES_OK" in out


@pytest.mark.slow  # subprocesses
def test_two_processes_each_get_their_own_rows(launched):
    for i in range(2):
        rc, out, err = launched[f"pair{i}"]
        assert rc == 0, err[-3000:]
        assert f"PROCESS_OK {i}" in out.splitlines()


def test_initialize_is_a_no_op_without_launch_variables(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task job is not distributed
    assert maybe_initialize_distributed() is False


def test_partial_launch_variables_are_explained(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES is not; set all three"):
        maybe_initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    for bad in ("5", "-1", "one"):  # refused before JAX would wait minutes for the others
        monkeypatch.setenv("JAX_PROCESS_ID", bad)
        with pytest.raises(ValueError, match=rf"JAX_PROCESS_ID='{bad}' must be an integer from 0 to "
                                             r"JAX_NUM_PROCESSES-1 \(JAX_NUM_PROCESSES='2'\)"):
            maybe_initialize_distributed()


def test_single_device_default_needs_no_padding():
    mesh = data_mesh()
    assert mesh.axis_names == ("data",)
    x = np.arange(6.0).reshape(3, 2)
    xs, n = shard_batch(x, mesh)
    devices = len(mesh.devices.flat)
    assert n == 3 and xs.shape == (-(-3 // devices) * devices, 2)  # (3, 2) on one device: no padding
    np.testing.assert_array_equal(np.asarray(xs)[:3], x)
    np.testing.assert_array_equal(np.asarray(xs)[3:], 0)
    np.testing.assert_array_equal(np.asarray(replicate({"w": x}, mesh)["w"]), x)
    with pytest.raises(ValueError, match="leading batch dimension"):
        shard_batch(np.float32(1.0), mesh)


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("limit", EVAL_LIMITS)
def test_two_process_eval_splits_the_data_and_sums_the_counts(limit, launched, capsys):
    """Each host evaluates its own half; both print the metrics of the whole, as one process does."""
    from ptq4vm_jax.assets import ASSETS
    from ptq4vm_jax.cli import main

    main(["eval", "--params", str(ASSETS / "vim_micro"), "--data", "digits:test", "--batch-size", "32",
          "--limit", limit])
    single = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"(n={limit}; vim_micro float)" in single
    counts = []
    for i in range(2):
        rc, out, err = launched[f"pair{i}"]
        assert rc == 0, err[-3000:]
        evals = dict(line.split(" ", 2)[1:] for line in out.splitlines() if line.startswith("EVAL "))
        *_, share, metrics = json.loads(evals[limit]).strip().splitlines()
        assert metrics == single
        assert share.startswith(f"process {i} of 2: ")
        counts.append(int(share.split(": ")[1].split()[0]))
    assert sum(counts) == int(limit) and max(counts) - min(counts) <= 1  # disjoint halves
