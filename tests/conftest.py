"""Suite-wide fixtures."""

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop the XLA programs a test module compiled once it ends.

    The whole suite runs in one process and compiles thousands of programs (interpret-mode
    kernels among them, large ones); kept alive to the end, they crashed XLA's CPU compiler
    late in the suite (2026-11-28: SIGABRT, then SIGSEGV, both in tests/test_int_mode.py, which
    passes on its own). Later modules recompile what they share, at a small cost.
    """
    yield
    jax.clear_caches()
    gc.collect()
