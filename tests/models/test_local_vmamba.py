"""LocalVMamba's names, config checks and per-block scan orders (no compiled code)."""

from __future__ import annotations

import numpy as np
import pytest

from ptq4vm_jax.models import canonical_name, create_model, model_family
from ptq4vm_jax.models.local_vmamba import SMALL_DIRECTIONS, TINY_DIRECTIONS, block_orders


def test_names_aliases_and_the_official_builders_directions() -> None:
    assert canonical_name("local_vssm_tiny") == "local_vmamba_tiny"
    assert canonical_name("local_vssm_small") == "local_vmamba_small"
    assert model_family("local_vssm_small") == "local_vmamba"
    tiny, small = create_model("local_vssm_tiny").cfg, create_model("local_vmamba_small").cfg
    assert (tiny.depths, tiny.dims, tiny.ssm_d_state, tiny.ssm_ratio) == ((2, 2, 9, 2), (96, 192, 384, 768),
                                                                        16, 2.0)
    assert (small.depths, small.dims) == ((2, 2, 27, 2), (96, 192, 384, 768))
    assert tiny.directions == TINY_DIRECTIONS and small.directions == SMALL_DIRECTIONS
    assert len(TINY_DIRECTIONS) == 15 and len(SMALL_DIRECTIONS) == 33
    assert all(len(block) == 4 for block in TINY_DIRECTIONS + SMALL_DIRECTIONS)
    assert TINY_DIRECTIONS[-1] == ("h_flip", "v", "w7", "w7_flip")  # the official list's last entry
    assert SMALL_DIRECTIONS[0] == ("h", "v", "v_flip", "w7_flip")
    assert tiny.stage_hw == ((56, 56), (28, 28), (14, 14), (7, 7))
    two_stages = create_model("local_vmamba_tiny", dims=8, depths=(1, 1), directions=(("h",), ("v",)))
    assert two_stages.cfg.dims == (8, 16)  # an int width doubles per stage, as officially


@pytest.mark.parametrize("overrides, message", [
    (dict(depths=(1, 1, 2, 1)),
     r"directions has 15 entries but depths \(1, 1, 2, 1\) has 5 blocks: pass directions="),
    (dict(depths=(1,), directions=(("h", "diag"),)), r"unknown scan direction 'diag'"),
    (dict(depths=(1,), directions=((),)), r"a non-empty tuple of scan names for every block"),
    (dict(dims=(96, 192)), r"dims \(96, 192\) needs one width per stage"),
    (dict(ssm_conv=4), r"ssm_conv must be an odd kernel size"),
])
def test_bad_configs_are_refused_with_what_to_do(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_model("local_vmamba_tiny", **overrides)


def test_block_orders_pad_every_direction_to_the_longest() -> None:
    """LocalVMamba-T's last stage: w2 on the 7x7 grid scans an 8x8 padded grid (64 cells, 15 of
    them padding, marked 49); h and v are padded at their end to the same 64; the reverses
    gather each direction's output back to row-major order."""
    orders, reverses = block_orders(("h_flip", "v", "w2_flip", "w7"), 7, 7)
    assert orders.shape == (4, 64) and reverses.shape == (4, 49)
    assert list(orders[0, :49]) == list(range(48, -1, -1)) and (orders[0, 49:] == 49).all()
    assert list(orders[1, :8]) == [0, 7, 14, 21, 28, 35, 42, 1]
    assert list(orders[2, :8]) == [49, 49, 49, 48, 49, 49, 47, 46]  # flipped: the corner window first
    assert (orders[2] == 49).sum() == 15 and sorted(orders[2][orders[2] < 49]) == list(range(49))
    assert list(orders[3]) == [*range(49), *[49] * 15]
    for order, reverse in zip(orders, reverses, strict=True):
        np.testing.assert_array_equal(order[reverse], np.arange(49))
