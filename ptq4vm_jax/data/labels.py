"""Labels and predictions as integer class indices, refused where they would silently count wrong."""

from __future__ import annotations

from typing import Any

import numpy as np


def class_labels(labels: Any, where: str, what: str = "labels") -> np.ndarray:
    """Labels (or predictions: ``what``) as integer class indices (N,). One-hot rows, fractions,
    strings, booleans or negative values would each count as wrong answers, silently."""
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] > 1:
        raise ValueError(f"{where}: {what} of shape {arr.shape} look one-hot (or per-class scores); pass "
                         f"one class index per image, e.g. {what}.argmax(-1)")
    arr = arr.reshape(-1)
    if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all():
        arr = arr.astype(np.int64)  # whole numbers stored as floats
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{where}: {what} must be integer class indices, got dtype {arr.dtype} "
                         f"(first values {arr[:3].tolist()}); map them to 0..num_classes-1")
    if arr.size and arr.min() < 0:
        unlabelled = (" (a split without labels, such as imagenet2012's test split, marks them -1: "
                      "evaluate on a labelled split such as validation)") if what == "labels" else ""
        raise ValueError(f"{where}: {what} hold {arr.min()}; class indices start at 0{unlabelled}")
    return arr.astype(np.int64)
