"""Suite-wide settings and fixtures.

Two costs dominate the suite on a CPU: XLA compiles, and the memory mappings that compiled
programs keep. Both are handled here, once for every test module:

- Most tests run small programs once, where XLA's optimisation passes cost far more than they
  save: they compile with ``jax_disable_most_optimizations`` (LLVM at -O0, no fast math), and
  so do the processes they start. They also use XLA's classic CPU emitters (``_FAST_CODEGEN``,
  here and in the processes ``host_devices_env`` prepares), which compile the same programs
  faster than the fusion emitters XLA uses by default (BENCHMARKS.md, "Test suite compile
  settings") and can differ from them in the last bit of a result.
- Tests marked ``xla_optimized`` compile exactly as users' programs do (XLA's defaults): those
  whose time goes into running programs (calibration over hundreds of images, the demo), where
  optimised programs run faster, and those that claim bit equality (integer ==
  fake quantization, a golden reproduced exactly), which must hold under the compiler users
  run. The setting is part of jax's jit cache key (``_SETTING_KEY``, a ``jax.make_user_context``),
  so no test runs a program compiled under the other one, and each setting keeps its programs
  across switches (a jax without user contexts drops them instead). Marked tests run last in
  their file, so a file switches once.
- A persistent compilation cache for the session (a fresh temporary directory, also given to
  the subprocesses the tests start through ``JAX_COMPILATION_CACHE_DIR``): a program compiled
  again, by a new ``jax.jit`` wrapper, after ``jax.clear_caches()`` or in another process, is
  read back instead of recompiled.
- Under pytest-xdist each worker's XLA computations run on one CPU core of their own
  (``_one_compute_core_per_worker``): XLA's CPU thread pools are as large as the machine, so
  two workers on two cores would otherwise run four busy threads and wait on each other's.
- Compiled programs are dropped only when the process holds many memory mappings. Every CPU
  executable maps its code; the suite compiles thousands of programs (interpret-mode kernels
  among them, large ones), and kept alive to the end they crashed XLA's CPU compiler late in
  the suite (SIGABRT, then SIGSEGV), as happens when ``vm.max_map_count`` is exhausted.
"""

from __future__ import annotations

import functools
import gc
import inspect
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from jax._src import compiler as _jax_compiler  # builds the options of every XLA compile
from jax._src import xla_bridge as _xla_bridge  # says whether the CPU client exists yet

# jax's switch for the fast-compiling, slow-running programs most tests want; its environment
# variable carries the choice to the processes tests start. A value the caller set is kept.
_NO_OPT_FLAG, _NO_OPT_ENV = "jax_disable_most_optimizations", "JAX_DISABLE_MOST_OPTIMIZATIONS"
# XLA compile options added while the fast setting is on (an XLA without them: not added).
_FAST_CODEGEN = {"xla_cpu_use_fusion_emitters": False}
# Programs that compile faster than this are not written to the cache (nearly free to redo).
_CACHE_MIN_COMPILE_SECS = 0.2
# Clear compiled programs once the process maps more than this share of vm.max_map_count.
_MAPS_CLEAR_FRACTION = 0.4
# The files that take longest, longest first. Under ``-n auto --dist loadfile`` a file is one
# unit of work handed to the next free worker in collection order, so a long file collected
# last keeps one worker busy long after the other has finished; collected first, the short
# files fill in around it. Files not listed keep their order, after these.
_LONGEST_FILES = (
    "tests/calibrate/test_vmamba_ptq.py",
    "tests/test_int_mode.py",
    "tests/cli/test_demo.py",
    "tests/cli/test_cli.py",
    "tests/calibrate/test_jlss.py",
    "tests/test_quantized_checkpoint.py",
    "tests/kernels/test_selective_scan.py",
    "tests/kernels/test_qmatmul.py",
    "tests/calibrate/test_local_vim_ptq.py",
    "tests/kernels/test_vim_mixer.py",
    "tests/test_scan_backend.py",
    "tests/calibrate/test_resume.py",
)


def _start_compilation_cache() -> Path | None:
    """Point JAX, and every process the tests start, at a cache directory for this session.

    A directory the caller already set in ``JAX_COMPILATION_CACHE_DIR`` is used and kept;
    otherwise a temporary one is made and removed at the end of the session (CI runs start
    empty, and a fresh cache keeps compile-counting tests meaningful).
    """
    given = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="ptq4vm-tests-jax-cache-"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(_CACHE_MIN_COMPILE_SECS))
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    return None if given else path


def _fast_compiles_by_default() -> bool:
    """Turn ``_NO_OPT_FLAG`` on unless the caller set ``_NO_OPT_ENV``; the default of this test run."""
    if _NO_OPT_ENV not in os.environ:
        os.environ[_NO_OPT_ENV] = "1"
        jax.config.update(_NO_OPT_FLAG, True)
    return bool(jax.config.values[_NO_OPT_FLAG])


def _fast_codegen_overrides() -> dict:
    """The options ``_FAST_CODEGEN`` adds to a compile now: all of them while the fast setting
    is on, none under XLA's defaults."""
    return dict(_FAST_CODEGEN) if _FAST_CODEGEN_INSTALLED and jax.config.values[_NO_OPT_FLAG] else {}


def _install_fast_codegen() -> bool:
    """Wrap jax's compile-option builder so compiles made under the fast setting carry
    ``_FAST_CODEGEN``. False, with nothing changed, where this jax has no such builder or this
    XLA does not know the options (the suite then compiles with XLA's emitters, only slower)."""
    build = getattr(_jax_compiler, "get_compile_options", None)
    try:
        signature = inspect.signature(build)
        if "env_options_overrides" not in signature.parameters:
            return False
        jax.jit(lambda x: x + 1, compiler_options=_FAST_CODEGEN).lower(1.0).compile()
    except Exception:  # no such builder, or "No such compile option" from another XLA
        return False

    @functools.wraps(build)
    def get_compile_options(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        given = call.arguments.get("env_options_overrides") or {}
        call.arguments["env_options_overrides"] = {**_fast_codegen_overrides(), **given} or None
        return build(*call.args, **call.kwargs)

    _jax_compiler.get_compile_options = get_compile_options
    return True


def _one_compute_core_per_worker() -> None:
    """Under pytest-xdist, give this worker's XLA computations one CPU core of their own.

    XLA's CPU client sizes its thread pools to the cores the process may run on when it is
    created, and its threads keep the CPU affinity they were started with. Each worker runs
    as many threads as there are cores, so two workers on two cores run four busy threads, and
    a parallel loop of XLA's can wait on a thread of its own that is descheduled. The client is
    therefore created while this thread may run on one core only (worker i takes core i, modulo the
    cores), and the thread then gets every core back, for tracing and compiling, as do the
    processes the tests start. Nothing changes without workers, without the affinity API, with
    fewer cores than workers, or when the client already exists.
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit()):
        return
    if not hasattr(os, "sched_setaffinity") or _xla_bridge.backends_are_initialized():
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < int(count) or int(count) < 2:
        return
    core = cores[int(worker[2:]) % len(cores)]
    os.sched_setaffinity(0, {core})
    try:
        jax.devices("cpu")  # creates the CPU client, and its thread pools on this core
    finally:
        os.sched_setaffinity(0, cores)


_one_compute_core_per_worker()
_NO_OPT_DEFAULT = _fast_compiles_by_default()
_SETTING_KEY = jax.make_user_context(_NO_OPT_DEFAULT) if hasattr(jax, "make_user_context") else None
_OWN_CACHE = _start_compilation_cache()
_FAST_CODEGEN_INSTALLED = _install_fast_codegen()


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_pytest(tmp_path_factory):
    """Temporary files made during the tests, by this process or those it starts, go under
    pytest's own directory, which pytest prunes, not into the machine's: tfds's mock data, for
    one, makes a temporary directory per dataset it looks up and leaves it."""
    where = str(tmp_path_factory.mktemp("tempfile"))
    before = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = where, where
    yield
    tempfile.tempdir = before[0]
    if before[1] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before[1]


@pytest.fixture(scope="session")
def init_params():
    """``init_params(model, seed)``: the params ``model.init`` draws from ``jax.random.key(seed)``,
    by one compiled program per model. Run op by op, a model's first init in a process compiles
    each of its ops on its own; one program is compiled once and reaches the persistent cache."""
    from ptq4vm_jax.models import image_shape

    programs = {}

    def init(model, seed: int) -> dict:
        if model not in programs:
            programs[model] = jax.jit(model.init)
        return programs[model](jax.random.key(seed), np.zeros(image_shape(model), np.float32))["params"]

    return init


@pytest.fixture
def fresh_programs():
    """Compiled calibration programs are shared by every config with the same program (learning
    rates are not part of it), and jax keeps what it traced; a test that patches what they trace
    (a spy, a poisoned update) traces its own and leaves none behind for later calibrations."""
    from ptq4vm_jax.calibrate import jlss

    compiled = jlss._compiled  # (the test may replace the module attribute by a spy)
    compiled.cache_clear()
    jax.clear_caches()
    yield
    compiled.cache_clear()
    jax.clear_caches()


@pytest.fixture
def fresh_forwards():
    """``quantized_apply`` keeps a compiled forward per (model, program, mode, gemm); a test that
    patches what a forward traces (a faked platform, a spy, a narrower GEMM threshold) traces its
    own and leaves none behind for later tests to run."""
    from ptq4vm_jax import api

    api._forward.cache_clear()
    yield
    api._forward.cache_clear()


@pytest.fixture(scope="session")
def host_devices_env():
    """``env(n, base=None)``: the environment (``base``, else this process's) for a Python
    subprocess on ``n`` CPU devices that compiles as the calling test does."""
    def env(n: int, base: dict | None = None) -> dict:
        base = dict(os.environ if base is None else base)
        flags = [base.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={n}"]
        flags += [f"--{k}={str(v).lower()}" for k, v in _fast_codegen_overrides().items()]
        return {**base, "XLA_FLAGS": " ".join(f for f in flags if f)}

    return env


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist orders files by their number of tests unless told not to; the order of
    # pytest_collection_modifyitems below is the one that balances the two workers.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files in ``_LONGEST_FILES`` order; within a file, the tests marked ``xla_optimized`` last,
    so that a file switches the compile setting (which drops the compiled programs) at most
    once and its other tests share what they compile."""
    rank = {name: i for i, name in enumerate(_LONGEST_FILES)}
    root = Path(str(config.rootpath))
    first_seen: dict[Path, int] = {}
    for item in items:
        first_seen.setdefault(item.path, len(first_seen))

    def key(item: pytest.Item) -> tuple[int, int, bool]:
        file_rank = rank.get(Path(str(item.path)).relative_to(root).as_posix(), len(rank))
        return file_rank, first_seen[item.path], item.get_closest_marker("xla_optimized") is not None

    items.sort(key=key)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """A test marked ``xla_optimized`` compiles with XLA's defaults, its fixtures' set-up and
    tear-down included; every other test with the test run's default. Compiled programs are
    told apart by ``_SETTING_KEY`` in jax's caches (or dropped when the setting changes)."""
    want = False if item.get_closest_marker("xla_optimized") is not None else _NO_OPT_DEFAULT
    if jax.config.values[_NO_OPT_FLAG] != want:
        if _SETTING_KEY is None:
            _clear_compiled_programs()
        else:
            _SETTING_KEY.set_global(want)
        jax.config.update(_NO_OPT_FLAG, want)
    yield


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def _map_count_limit() -> int | None:
    """How many mappings trigger a clear; None where /proc is not there."""
    try:
        return int(int(Path("/proc/sys/vm/max_map_count").read_text()) * _MAPS_CLEAR_FRACTION)
    except (OSError, ValueError):
        return None


def _map_count() -> int:
    with open("/proc/self/maps", "rb") as maps:
        return maps.read().count(b"\n")


_MAP_LIMIT = _map_count_limit()
# Tests between two counts: the kernel writes out every mapping to count them (milliseconds at
# the tens of thousands a worker reaches), while the limit leaves room for far more programs
# than this many tests compile (each holds a few mappings).
_MAP_CHECK_EVERY = 8
_tests_since_map_check = 0


def _clear_compiled_programs() -> None:
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _release_compiled_programs_when_maps_run_high():
    """After every ``_MAP_CHECK_EVERY``-th test, drop the XLA programs compiled so far if they
    hold too many mappings.

    Later tests recompile (or read from the session's cache) what they share.
    """
    global _tests_since_map_check
    yield
    _tests_since_map_check += 1
    if _MAP_LIMIT is None or _tests_since_map_check < _MAP_CHECK_EVERY:
        return
    _tests_since_map_check = 0
    if _map_count() > _MAP_LIMIT:
        _clear_compiled_programs()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs_per_module_without_proc():
    """Where mappings cannot be counted, drop compiled programs after every module."""
    yield
    if _MAP_LIMIT is None:
        _clear_compiled_programs()
