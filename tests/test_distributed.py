"""Multi-device checks run in subprocesses: XLA's host device count is fixed at jax import."""

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
    params = model.init(jax.random.key(0), x[:1])["params"]
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

TWO_PROCESSES = textwrap.dedent("""
    import jax, numpy as np
    from ptq4vm_jax.distributed import data_parallel, maybe_initialize_distributed

    assert maybe_initialize_distributed()
    assert not maybe_initialize_distributed()  # second call: already initialised
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    fn = lambda p, x: x @ p
    # Each process brings its own 5 rows; it must get back exactly its own 5 results.
    x = np.random.default_rng(jax.process_index()).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(data_parallel(fn, w)(x), x @ w, rtol=1e-6)
    print("PROCESS_OK", jax.process_index())
""")


TWO_PROCESS_EVAL = textwrap.dedent("""
    import sys
    from ptq4vm_jax.cli import ASSETS, main
    main(["eval", "--params", str(ASSETS / "vim_micro"), "--data", "digits:test", "--batch-size", "32",
          "--limit", sys.argv[1]])
""")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and k != "XLA_FLAGS"}
    return {**env, **extra}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_forward_on_four_devices_matches_unsharded():
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", FOUR_DEVICES], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FOUR_DEVICES_OK" in proc.stdout


def test_two_processes_each_get_their_own_rows():
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_PROCESSES], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
            env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2",
                     JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                     JAX_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, err[-3000:]
        assert f"PROCESS_OK {i}" in out


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


@pytest.mark.parametrize("limit", ["300", "1"])  # "1": one host's share is empty
def test_two_process_eval_splits_the_data_and_sums_the_counts(limit, capsys):
    """Each host evaluates its own half; both print the metrics of the whole, as one process does."""
    from ptq4vm_jax.cli import ASSETS, main

    main(["eval", "--params", str(ASSETS / "vim_micro"), "--data", "digits:test", "--batch-size", "32",
          "--limit", limit])
    single = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"(n={limit}; vim_micro float)" in single
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_PROCESS_EVAL, limit], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2",
                     JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                     JAX_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    counts = []
    for i, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, err[-3000:]
        *_, share, metrics = out.strip().splitlines()
        assert metrics == single
        assert share.startswith(f"process {i} of 2: ")
        counts.append(int(share.split(": ")[1].split()[0]))
    assert sum(counts) == int(limit) and max(counts) - min(counts) <= 1  # disjoint halves
