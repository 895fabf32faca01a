"""scikit-learn's 8x8 digits as a tiny offline image-classification task (the demo's data)."""

from __future__ import annotations

import functools

import numpy as np

# Per-channel statistics of the 32 px digits train split after scaling pixels to [0, 1] and the
# bilinear upsampling below (computed with ``_digits_pixels``; pinned by a test).
DIGITS_MEAN = 0.3051
DIGITS_STD = 0.3238


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear weights, half-pixel centres, edges clamped."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), hi] += frac
    return m


def _digits_split_mask(labels: np.ndarray) -> np.ndarray:
    """True for test examples: every 5th example of each class in dataset order (20%)."""
    rank = np.zeros(labels.shape[0], int)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(idx.size)
    return rank % 5 == 4


@functools.cache
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, read once per process: (images (1797, 8, 8) / 16 in [0, 1],
    labels (1797,) int32), read-only."""
    from sklearn.datasets import load_digits  # (here: only the digits data needs scikit-learn)

    digits = load_digits()
    images, labels = digits.images / 16.0, np.asarray(digits.target, np.int32)
    for a in (images, labels):
        a.flags.writeable = False
    return images, labels


def _digits_pixels(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if int(image_size) != image_size or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8 (digits are 8x8), got {image_size!r}")
    images, labels = _raw_digits()
    keep = _digits_split_mask(labels) == (split == "test")
    m = _bilinear_matrix(8, image_size)
    return m @ images[keep] @ m.T, labels[keep]  # rows, then columns


def load_digits_dataset(split: str = "train", *, image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as a tiny offline image-classification task.

    Pixels /16 -> [0, 1], bilinear upsampling to ``image_size`` (pure numpy, deterministic),
    replicated to 3 channels, normalised with ``DIGITS_MEAN`` / ``DIGITS_STD``. Split: every 5th
    example of each class (dataset order) is test, the rest train (1442 / 355), fixed forever.
    Returns ``(images (N, S, S, 3) float32, labels (N,) int32)``.
    """
    pixels, labels = _digits_pixels(split, image_size)
    x = ((pixels - DIGITS_MEAN) / DIGITS_STD).astype(np.float32)
    return np.repeat(x[..., None], 3, axis=-1), labels
