"""LocalMamba scan orders against orders written out by hand with explicit loops."""

import numpy as np
import pytest

from ptq4vm_jax.models.local_scan import (
    inverse_order,
    padded_grid,
    parse_direction,
    reverse_order,
    scan_length,
    scan_order,
)


def _by_loops(kind: str, k: int, flip: bool, h: int, w: int) -> list[int]:
    """The sequence of grid indices (-1 for padding), built cell by cell."""
    seq = []
    if kind == "h":
        seq = [i * w + j for i in range(h) for j in range(w)]
    elif kind == "v":
        seq = [i * w + j for j in range(w) for i in range(h)]
    else:
        hg, wg = -(-h // k), -(-w // k)
        for wi in range(hg):
            for wj in range(wg):
                for a in range(k):
                    for b in range(k):
                        i, j = wi * k + a, wj * k + b
                        seq.append(i * w + j if i < h and j < w else -1)
    return seq[::-1] if flip else seq


GRIDS = [(1, 1), (2, 3), (3, 3), (4, 4), (5, 3), (7, 7), (14, 14)]
NAMES = ["h", "h_flip", "v", "v_flip", "w1", "w2", "w2_flip", "w3", "w7", "w7_flip"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("grid", GRIDS)
def test_orders_match_hand_written_loops(name, grid):
    h, w = grid
    d = parse_direction(name)
    want = np.array(_by_loops(d.kind, d.window, d.flip, h, w))
    got = scan_order(name, h, w)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32 and scan_length(name, h, w) == len(want)
    # the inverse puts every real token back and skips the padding
    tokens = np.arange(h * w) * 10 + 7
    seq = np.where(got >= 0, tokens[got], 0)
    np.testing.assert_array_equal(seq[inverse_order(name, h, w)], tokens)
    # pad_index lets a caller gather from the tokens with one zero appended
    padded = np.append(tokens, 0)[scan_order(name, h, w, pad_index=h * w)]
    np.testing.assert_array_equal(padded, seq)
    if h == w or d.kind != "v":
        np.testing.assert_array_equal(reverse_order(name, h, w), inverse_order(name, h, w))


def test_padding_rounds_up_and_stays_in_the_sequence():
    assert padded_grid("w2", 3, 3) == (4, 4) and scan_length("w2_flip", 3, 3) == 16
    assert padded_grid("w7", 14, 14) == (14, 14) and padded_grid("h", 3, 5) == (3, 5)
    order = scan_order("w2", 3, 3)
    # first window holds cells (0,0) (0,1) (1,0) (1,1); the second window's right column is pad
    np.testing.assert_array_equal(order[:8], [0, 1, 3, 4, 2, -1, 5, -1])
    assert (order == -1).sum() == 7
    # flipping reverses the padded sequence: it starts with the bottom-right padding cell
    assert scan_order("w2_flip", 3, 3)[0] == -1


def test_official_v_reverse_on_a_non_square_grid_is_a_transpose_not_the_inverse():
    h, w = 2, 3
    seq = np.arange(h * w)
    # the official 'b d (h w) -> b d (w h)' on the scanned sequence, written out by hand
    want = [seq[i * w + j] for j in range(w) for i in range(h)]
    np.testing.assert_array_equal(reverse_order("v", h, w), want)
    assert not np.array_equal(reverse_order("v", h, w), inverse_order("v", h, w))
    flipped = seq[::-1]
    want_flip = [flipped[i * w + j] for j in range(w) for i in range(h)]
    np.testing.assert_array_equal(reverse_order("v_flip", h, w), want_flip)


@pytest.mark.parametrize("bad", ["", "x", "H", "w", "w0", "w07", "h_flipp", "flip", "w2flip", 3])
def test_unknown_direction_names_are_refused(bad):
    with pytest.raises(ValueError, match="unknown scan direction"):
        parse_direction(bad)


def test_parse_direction_fields():
    d = parse_direction("w7_flip")
    assert (d.kind, d.window, d.flip) == ("w", 7, True)
    for name, fields in (("v", ("v", 0, False)), ("h_flip", ("h", 0, True)), ("w2", ("w", 2, False))):
        d = parse_direction(name)
        assert (d.name, d.kind, d.window, d.flip) == (name, *fields)
    with pytest.raises(ValueError, match="grid h must be a positive int"):
        scan_order("h", 0, 3)
