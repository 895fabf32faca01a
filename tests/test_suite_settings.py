"""The suite's compile settings (tests/conftest.py) reach the tests they are meant for."""

import os
from pathlib import Path

import jax
import pytest
from jax._src import compiler as jax_compiler

FLAG = "jax_disable_most_optimizations"
FAST_CODEGEN = ("xla_cpu_use_fusion_emitters", False)


def _session_default() -> bool:
    return os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true", "t", "yes", "y", "on")


def _xla_knows_fast_codegen() -> bool:
    try:
        jax.jit(lambda x: x * 2, compiler_options=dict([FAST_CODEGEN])).lower(1.0).compile()
    except Exception:
        return False
    return True


def _overrides_of_a_compile_now() -> list:
    return list(jax_compiler.get_compile_options(num_replicas=1, num_partitions=1).env_option_overrides)


_DOUBLE = jax.jit(lambda x: x * 2)  # compiled under both settings by the tests below


def test_tests_compile_with_the_sessions_fast_setting_and_pass_it_to_subprocesses():
    assert jax.config.values[FLAG] == _session_default()
    assert float(_DOUBLE(1.0)) == 2.0


def test_fast_compiles_use_the_classic_cpu_emitters_where_xla_has_them():
    want = [FAST_CODEGEN] if _session_default() and _xla_knows_fast_codegen() else []
    assert _overrides_of_a_compile_now() == want
    # Options a caller passes are kept, beside the suite's.
    got = jax_compiler.get_compile_options(num_replicas=1, num_partitions=1,
                                           env_options_overrides={"xla_cpu_enable_fast_math": False})
    assert dict(got.env_option_overrides) == {**dict(want), "xla_cpu_enable_fast_math": False}


@pytest.mark.xla_optimized
def test_a_test_marked_xla_optimized_compiles_as_users_do():
    assert jax.config.values[FLAG] is False
    assert _overrides_of_a_compile_now() == []
    # Its own program, not the one the fast setting compiled for the first test of this file
    # (kept for later tests where jax has user contexts to key its caches on the setting).
    kept = _DOUBLE._cache_size()
    assert float(_DOUBLE(1.0)) == 2.0
    assert _DOUBLE._cache_size() == kept + (1 if _session_default() else 0)


def test_marked_tests_run_last_in_their_file(request):
    """Each file's tests are contiguous, its selected ``xla_optimized`` ones last, so a worker
    switches compile settings at most twice per file. This file's marked test, when selected
    (not under ``-m "not xla_optimized"`` or a ``-k`` that leaves it out), runs after this one."""
    seen: dict = {}
    for item in request.session.items:
        marks = seen.setdefault(item.path, [])
        assert not marks or list(seen)[-1] == item.path, f"{item.path} is split"
        marks.append(item.get_closest_marker("xla_optimized") is not None)
    assert all(marks == sorted(marks) for marks in seen.values())
    mine = [item for item in request.session.items if item.path == request.node.path]
    marked = [i for i, item in enumerate(mine) if item.get_closest_marker("xla_optimized") is not None]
    if marked:
        assert mine.index(request.node) < marked[0]


def _allowed_cores(status: str) -> set[int]:
    """The cores of a /proc/<pid>/task/<tid>/status text's ``Cpus_allowed_list``."""
    spec = next(line.split(":", 1)[1].strip() for line in status.splitlines()
                if line.startswith("Cpus_allowed_list:"))
    cores: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or not hasattr(os, "sched_getaffinity"),
                    reason="reads thread affinities from Linux's /proc")
def test_a_workers_xla_threads_share_one_core_and_the_test_thread_has_them_all():
    """tests/conftest.py's ``_one_compute_core_per_worker``: worker i's XLA thread pools run on
    core i (modulo the cores); the thread running the tests keeps every core."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    threads = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            threads[int(tid)] = _allowed_cores(Path(f"/proc/self/task/{tid}/status").read_text())
        except (OSError, StopIteration):  # a thread that ended meanwhile
            continue
    single = {tid for tid, allowed in threads.items() if len(allowed) == 1}
    if not (worker.startswith("gw") and workers >= 2):  # one process: nothing pinned
        assert not single or len(os.sched_getaffinity(0)) == 1
        return
    # pytest-xdist's controller started this worker and was never pinned.
    cores = sorted(_allowed_cores(Path(f"/proc/{os.getppid()}/status").read_text()))
    assert threads[os.getpid()] == set(cores)  # the test thread traces and compiles on every core
    if workers > len(cores):  # more workers than cores: nothing pinned
        assert not single or len(cores) == 1
        return
    core = cores[int(worker[2:]) % len(cores)]
    assert single and all(threads[tid] == {core} for tid in single), threads
