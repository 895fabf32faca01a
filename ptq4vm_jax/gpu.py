"""Whether the programs traced now compile for a GPU, and for which: the one place the library
reads the platform. It decides what the ``"auto"`` backends pick and whether a Pallas kernel runs
compiled (GPU) or in the Pallas interpreter (elsewhere, for tests and parity checks); every other
backend choice is an explicit argument."""

from __future__ import annotations

import jax


def on_gpu() -> bool:
    """Whether jax's default backend, for which programs are traced and compiled, is a GPU."""
    return jax.default_backend() == "gpu"


def interpret_kernels() -> bool:
    """Whether a Pallas kernel must run in the interpreter: everywhere but on a GPU."""
    return not on_gpu()


def is_hopper() -> bool:
    """Whether the default device is an sm_90 GPU (H100/H200), the one wgmma runs on."""
    return on_gpu() and getattr(jax.devices()[0], "compute_capability", None) == "9.0"
