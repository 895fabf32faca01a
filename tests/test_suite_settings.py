"""The suite's compile settings (tests/conftest.py) reach the tests they are meant for."""

import os

import jax
import pytest

FLAG = "jax_disable_most_optimizations"


def _session_default() -> bool:
    return os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true", "t", "yes", "y", "on")


def test_tests_compile_with_the_sessions_fast_setting_and_pass_it_to_subprocesses():
    assert jax.config.values[FLAG] == _session_default()


@pytest.mark.xla_optimized
def test_a_test_marked_xla_optimized_compiles_fully_optimised():
    assert jax.config.values[FLAG] is False


def test_the_setting_is_restored_after_a_marked_test():
    assert jax.config.values[FLAG] == _session_default()
