"""How two models' outputs on the same images differ: argmax agreement and KL between their
logits, and an exact paired test of their top-1."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np

from ptq4vm_jax.data import class_labels


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)  # the largest logit at 0: exp cannot overflow
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _logit_pair(ref_logits: Any, logits: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both logit arrays in float64, checked to be (rows, classes) of one shape (broadcasting a
    single row against many would compare the wrong rows without a word)."""
    ref = np.asarray(ref_logits, np.float64)
    q = np.asarray(logits, np.float64)
    if ref.shape != q.shape or ref.ndim != 2:
        raise ValueError(
            f"ref_logits and logits must both be (rows, classes) of one shape; got {ref.shape} "
            f"and {q.shape}"
        )
    return ref, q


def _require_finite(ref: np.ndarray, q: np.ndarray, who: str) -> None:
    if not (np.isfinite(ref).all() and np.isfinite(q).all()):
        raise ValueError(f"{who} got non-finite logits (NaN/inf)")


def _kl_rows(ref: np.ndarray, q: np.ndarray) -> np.ndarray:
    log_p, log_q = _log_softmax(ref), _log_softmax(q)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def kl_per_row(ref_logits: Any, logits: Any) -> np.ndarray:
    """KL(softmax(ref) || softmax(logits)) of each row, in nats, computed in float64.

    Raises ValueError when the two are not (rows, classes) of one shape or hold NaN/inf.
    """
    ref, q = _logit_pair(ref_logits, logits)
    _require_finite(ref, q, "kl_per_row")
    return _kl_rows(ref, q)


def compare_logits(ref_logits: Any, logits: Any, mask: Any = None) -> dict[str, float]:
    """How closely quantized logits follow the float ones, beyond accuracy.

    ``agreement``: percent of rows whose argmax matches the reference; ``mean_kl``: mean over
    rows of ``kl_per_row``. ``mask`` selects rows (e.g. the padding mask of the last batch);
    only the selected rows need be finite.
    """
    ref, q = _logit_pair(ref_logits, logits)
    if mask is not None:
        keep = np.asarray(mask, bool).reshape(-1)
        if keep.shape[0] != ref.shape[0]:
            raise ValueError(f"mask has {keep.shape[0]} entries for {ref.shape[0]} rows")
        ref, q = ref[keep], q[keep]
    if ref.shape[0] == 0:
        raise ValueError("compare_logits got no rows to compare")
    _require_finite(ref, q, "compare_logits")
    agree = ref.argmax(axis=-1) == q.argmax(axis=-1)
    return {"agreement": 100.0 * float(agree.mean()), "mean_kl": float(_kl_rows(ref, q).mean())}


def paired_top1(labels: Any, preds_a: Any, preds_b: Any) -> dict[str, float]:
    """Whether two models' top-1 on the same images differ by more than chance.

    Only the images one model gets right and the other wrong (``only_a``, ``only_b``) carry
    evidence; ``p_value`` is the exact two-sided McNemar (sign) test on them. Small test sets
    (the digits split: one image is 0.28 points) need it before reading a top-1 gap as a win.
    """
    y = class_labels(labels, "paired_top1")
    a = class_labels(preds_a, "paired_top1", "preds_a")
    b = class_labels(preds_b, "paired_top1", "preds_b")
    if not (y.shape == a.shape == b.shape) or y.size == 0:
        raise ValueError(
            f"labels and both prediction arrays must hold the same non-zero number of images; "
            f"got {y.size}, {a.size}, {b.size}"
        )
    right_a, right_b = a == y, b == y
    only_a = int(np.sum(right_a & ~right_b))
    only_b = int(np.sum(right_b & ~right_a))
    n = only_a + only_b
    term = tail = 1  # C(n, 0); exact integers, so ImageNet's thousands of discordant images are fine
    for i in range(min(only_a, only_b)):
        term = term * (n - i) // (i + 1)
        tail += term
    return {"only_a": only_a, "only_b": only_b, "p_value": min(1.0, float(Fraction(2 * tail, 2**n)))}
