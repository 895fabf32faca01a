"""Quantized checkpoints of format version 1 (written before per-array digests) still load and
compute what they computed when they were written (fixture: tests/data/quantized_v1/README.md)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import ptq4vm_jax
from ptq4vm_jax.checkpoint import read_metadata

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "quantized_v1", "vim_micro_w4a8_pts")


@pytest.fixture(scope="module")
def qparams() -> ptq4vm_jax.QuantizedParams:
    return ptq4vm_jax.load_quantized(FIXTURE)


def test_fixture_is_version_1() -> None:
    meta = read_metadata(FIXTURE)
    assert meta["format"] == "ptq4vm-jax/quantized" and meta["format_version"] == 1
    assert "array_sha256" not in meta


@pytest.mark.xla_optimized  # logits written by the default compiler, compared bit for bit
@pytest.mark.parametrize("mode", ["fake", "int"])
def test_version_1_logits_reproduced_exactly(qparams: ptq4vm_jax.QuantizedParams, mode: str) -> None:
    images = np.load(os.path.join(FIXTURE, "images.npy"))
    want = np.load(os.path.join(FIXTURE, f"logits_{mode}.npy"))
    got = np.asarray(ptq4vm_jax.quantized_apply(None, qparams, images, mode=mode))
    np.testing.assert_array_equal(got, want)
    assert qparams.model_name == "vim_micro" and qparams.config.w_bits == 4 and qparams.config.a_bits == 8
