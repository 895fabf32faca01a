"""LocalMamba's scan orders (hunto/LocalMamba ``MultiScan``) as integer index arrays.

A direction name is ``h`` (row-major), ``v`` (column-major) or ``wK`` (K×K windows taken
window by window in row order, row-major inside each window), optionally followed by
``_flip`` (the whole sequence reversed, padding included). Tokens live on an H×W grid and are
numbered row-major (``i * W + j``), the order patch embedding produces them in.

Padding (verified in the official ``local_scan``/``local_reverse``): when K does not divide H
or W, the grid is zero-padded at the bottom and on the right to ``ceil(H/K)*K`` ×
``ceil(W/K)*K`` *before* ordering and flipping, and the padded cells stay in the scanned
sequence (they are zero tokens the scan still runs over). The reverse drops them. ``h`` and
``v`` never pad.

The official reverse of ``v`` rearranges ``(h w) -> (w h)`` with h=H, w=W, which undoes the
``(w h)`` scan only when H == W; :func:`reverse_order` follows the official code, and
:func:`inverse_order` is the true inverse. The two agree on every square grid and on every
direction other than ``v``/``v_flip``.

Everything here is plain numpy and static: callers gather with the arrays (``jnp.take``) under
``jit`` and the orders become constants.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

__all__ = [
    "Direction",
    "parse_direction",
    "padded_grid",
    "scan_length",
    "scan_order",
    "inverse_order",
    "reverse_order",
]

_NAME = re.compile(r"^(h|v|w([1-9][0-9]*))(_flip)?$")


@dataclasses.dataclass(frozen=True)
class Direction:
    """A parsed direction: ``kind`` is "h", "v" or "w"; ``window`` is K for "w", else 0."""

    name: str
    kind: str
    window: int
    flip: bool


def parse_direction(name: str) -> Direction:
    """Parse ``h``, ``v``, ``wK`` (K ≥ 1), each optionally suffixed ``_flip``.

    The official parser reads any name starting with ``w`` as ``int(name[1:].split('_')[0])``
    and any name ending in ``flip`` as flipped; every name it accepts and its builders use is
    accepted here, and anything else is refused instead of guessed.
    """
    m = _NAME.match(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(
            f"unknown scan direction {name!r}: expected 'h', 'v' or 'wK' (K a positive int), "
            "optionally followed by '_flip', e.g. 'h_flip', 'w7'"
        )
    kind = "w" if m.group(2) else m.group(1)
    return Direction(name=name, kind=kind, window=int(m.group(2) or 0), flip=bool(m.group(3)))


def _direction(direction: str | Direction) -> Direction:
    return direction if isinstance(direction, Direction) else parse_direction(direction)


def _check_grid(h: int, w: int) -> None:
    for label, v in (("h", h), ("w", w)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"grid {label} must be a positive int, got {v!r}")


def padded_grid(direction: str | Direction, h: int, w: int) -> tuple[int, int]:
    """The grid the direction scans: (h, w) for h/v, both rounded up to multiples of K for wK."""
    d = _direction(direction)
    _check_grid(h, w)
    if d.kind != "w":
        return (h, w)
    k = d.window
    return (-(-h // k) * k, -(-w // k) * k)


def scan_length(direction: str | Direction, h: int, w: int) -> int:
    """Length of the scanned sequence (padding cells included)."""
    hp, wp = padded_grid(direction, h, w)
    return hp * wp


def scan_order(direction: str | Direction, h: int, w: int, pad_index: int = -1) -> np.ndarray:
    """``order[t]`` = row-major grid index of the token at sequence position t.

    Padding cells get ``pad_index`` (default -1; pass ``h * w`` to gather from the tokens with
    one zero token appended). Shape ``(scan_length(direction, h, w),)``, dtype int32.
    """
    d = _direction(direction)
    hp, wp = padded_grid(d, h, w)
    rows, cols = np.meshgrid(np.arange(hp), np.arange(wp), indexing="ij")
    index = np.where((rows < h) & (cols < w), rows * w + cols, pad_index)  # (hp, wp)
    if d.kind == "h":
        seq = index.reshape(-1)
    elif d.kind == "v":
        seq = index.T.reshape(-1)
    else:
        k = d.window
        # (Hg, K, Wg, K) -> (Hg, Wg, K, K): windows in row order, row-major inside each.
        seq = index.reshape(hp // k, k, wp // k, k).transpose(0, 2, 1, 3).reshape(-1)
    if d.flip:
        seq = seq[::-1]
    return np.ascontiguousarray(seq, dtype=np.int32)


def inverse_order(direction: str | Direction, h: int, w: int) -> np.ndarray:
    """``inv[p]`` = sequence position of grid cell p (row-major); shape ``(h * w,)``, int32.

    ``seq[inv]`` puts a scanned sequence back in row-major order and drops the padding cells.
    """
    order = scan_order(direction, h, w)
    inv = np.empty(h * w, dtype=np.int32)
    real = order >= 0
    inv[order[real]] = np.nonzero(real)[0]
    return inv


def reverse_order(direction: str | Direction, h: int, w: int) -> np.ndarray:
    """The official ``MultiScan.reverse`` as a gather: ``out[p] = seq[rev[p]]``; shape (h*w,).

    Equal to :func:`inverse_order` except for ``v``/``v_flip`` on a non-square grid, where the
    official code transposes the sequence as if it were H×W row-major (see the module doc).
    """
    d = _direction(direction)
    if d.kind != "v" or h == w:
        return inverse_order(d, h, w)
    _check_grid(h, w)
    positions = np.arange(h * w, dtype=np.int32)
    if d.flip:
        positions = positions[::-1]
    # 'b d (h w) -> b d (w h)': output (j', i') reads input (i', j') of an H×W row-major view.
    return np.ascontiguousarray(positions.reshape(h, w).T.reshape(-1), dtype=np.int32)
