"""Suite-wide settings and fixtures.

Two costs dominate the suite on a CPU: XLA compiles, and the memory mappings that compiled
programs keep. Both are handled here, once for every test module:

- Most tests run small programs once, where XLA's optimisation passes cost far more than they
  save: they compile with ``jax_disable_most_optimizations`` (LLVM at -O0, the same IEEE
  arithmetic, no fast math), and so do the processes they start. Tests marked ``xla_optimized``,
  whose time goes into running programs (calibration over hundreds of images, the demo),
  compile fully optimised, where the same programs run several times faster.

- A persistent compilation cache for the session (a fresh temporary directory, also given to
  the subprocesses the tests start through ``JAX_COMPILATION_CACHE_DIR``): a program compiled
  again, by a new ``jax.jit`` wrapper, after ``jax.clear_caches()`` or in another process, is
  read back instead of recompiled.
- Compiled programs are dropped only when the process holds many memory mappings. Every CPU
  executable maps its code; the suite compiles thousands of programs (interpret-mode kernels
  among them, large ones), and kept alive to the end they crashed XLA's CPU compiler late in
  the suite (SIGABRT, then SIGSEGV), as happens when ``vm.max_map_count`` is exhausted.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

# jax's switch for the fast-compiling, slow-running programs most tests want; its environment
# variable carries the choice to the processes tests start. A value the caller set is kept.
_NO_OPT_FLAG, _NO_OPT_ENV = "jax_disable_most_optimizations", "JAX_DISABLE_MOST_OPTIMIZATIONS"
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


_NO_OPT_DEFAULT = _fast_compiles_by_default()
_OWN_CACHE = _start_compilation_cache()


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist orders files by their number of tests unless told not to; the order of
    # pytest_collection_modifyitems below is the one that balances the two workers.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(_LONGEST_FILES)}
    root = Path(str(config.rootpath))

    def key(item: pytest.Item) -> int:
        return rank.get(Path(str(item.path)).relative_to(root).as_posix(), len(rank))

    items.sort(key=key)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """A test marked ``xla_optimized`` compiles fully optimised, its fixtures' set-up and
    tear-down included; every other test with the test run's default."""
    optimized = item.get_closest_marker("xla_optimized") is not None
    if optimized:
        jax.config.update(_NO_OPT_FLAG, False)
    try:
        yield
    finally:
        if optimized:
            jax.config.update(_NO_OPT_FLAG, _NO_OPT_DEFAULT)


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
        return sum(1 for _ in maps)


_MAP_LIMIT = _map_count_limit()


def _clear_compiled_programs() -> None:
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _release_compiled_programs_when_maps_run_high():
    """After a test, drop the XLA programs compiled so far if they hold too many mappings.

    Later tests recompile (or read from the session's cache) what they share.
    """
    yield
    if _MAP_LIMIT is not None and _map_count() > _MAP_LIMIT:
        _clear_compiled_programs()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs_per_module_without_proc():
    """Where mappings cannot be counted, drop compiled programs after every module."""
    yield
    if _MAP_LIMIT is None:
        _clear_compiled_programs()
