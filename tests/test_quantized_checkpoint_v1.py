"""Quantized checkpoints of format version 1 (written before per-array digests) still load and
compute what they computed when they were written (fixture: tests/data/quantized_v1/README.md)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

import ptq4vm_jax
from ptq4vm_jax.checkpoint import read_metadata
from ptq4vm_jax.quant.params import flatten_layers, nest_layers

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "quantized_v1", "vim_micro_w4a8_pts")


@pytest.fixture(scope="module")
def qparams() -> ptq4vm_jax.QuantizedParams:
    return ptq4vm_jax.load_quantized(FIXTURE)


def test_fixture_is_version_1() -> None:
    meta = read_metadata(FIXTURE)
    assert meta["format"] == "ptq4vm-jax/quantized" and meta["format_version"] == 1
    assert "array_sha256" not in meta


def _logits_bound(want: np.ndarray) -> float:
    return 1e-5 * float(np.abs(want).max())


@pytest.mark.xla_optimized  # logits written by the default compiler
@pytest.mark.parametrize("mode", ["fake", "int"])
def test_version_1_logits_reproduced(qparams: ptq4vm_jax.QuantizedParams, mode: str) -> None:
    images = np.load(os.path.join(FIXTURE, "images.npy"))
    want = np.load(os.path.join(FIXTURE, f"logits_{mode}.npy"))
    got = np.asarray(ptq4vm_jax.quantized_apply(None, qparams, images, mode=mode))
    # Bit for bit only on a CPU like the writer's: XLA's CPU code follows the host's vector
    # instructions, which moves float results by an ulp. One changed weight code moves these logits
    # by thousandths of their maximum, so 1e-5 of it still tells a changed checkpoint apart.
    np.testing.assert_allclose(got, want, rtol=0, atol=_logits_bound(want))
    assert qparams.model_name == "vim_micro" and qparams.config.w_bits == 4 and qparams.config.a_bits == 8


@pytest.mark.xla_optimized
def test_one_changed_weight_code_exceeds_the_bound(qparams: ptq4vm_jax.QuantizedParams) -> None:
    """The tolerance above is far below what a damaged checkpoint computes."""
    layers = flatten_layers(qparams.qlayers)
    path = sorted(layers)[4]
    codes = np.array(layers[path].w_int)
    codes.flat[5] ^= 1
    layers[path] = dataclasses.replace(layers[path], w_int=codes)
    changed = qparams.replace(qlayers=nest_layers(layers))
    images = np.load(os.path.join(FIXTURE, "images.npy"))
    want = np.load(os.path.join(FIXTURE, "logits_fake.npy"))
    got = np.asarray(ptq4vm_jax.quantized_apply(None, changed, images, mode="fake"))
    assert np.abs(got - want).max() > 100 * _logits_bound(want)
