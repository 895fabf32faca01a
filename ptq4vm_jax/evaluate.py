"""Top-1 / top-5 accuracy of a model over padded batches of a labelled set (comparing two
models' outputs is ``ptq4vm_jax.compare``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from ptq4vm_jax.data import class_labels
from ptq4vm_jax.progress import progress_bar


def _topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Whether each label is among its row's k largest logits (ties resolved by index)."""
    topk = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return (topk == labels[:, None]).any(axis=-1)


def evaluate(
    logits_fn: Callable[[Any], Any],
    batches: Iterable[tuple[Any, ...]],
    *,
    num_examples: int | None = None,
    progress: bool = True,
    across_processes: bool = False,
    total: int | None = None,
) -> dict[str, float]:
    """Accuracy of ``logits_fn(images) -> (B, classes)`` over ``(images, labels[, mask])`` batches.

    ``mask`` (from ``ptq4vm_jax.data.eval_batches``) drops the padding rows of the last batch.
    ``num_examples``, when given, is a cap: evaluation stops after that many real examples.
    ``total`` (the data's size, when known) and the cap set the progress total (``progress``: a
    bar on a terminal, a line per tenth in a log; ``ptq4vm_jax.progress``). Returns
    ``top1``/``top5`` in percent (top-5 is top-``classes`` when there are fewer than 5 classes)
    and ``n``, the number of examples counted; with ``across_processes`` the counts of every
    process are summed first (multi-host evaluation, each process having evaluated its own
    share) and ``local_n`` is this process's count.

    Raises ValueError for a malformed batch (its index named), logits of the wrong shape or with
    NaN/inf (the examples named), and when no example was counted.
    """
    if num_examples is not None and (int(num_examples) != num_examples or num_examples < 1):
        raise ValueError(f"num_examples must be a positive integer or None, got {num_examples!r}")
    hits1 = hits5 = n = nonfinite = 0
    warned = False
    known = [t for t in (num_examples, total) if t is not None]
    bar = progress_bar(min(known) if known else None, "eval", unit="img", enabled=progress)
    try:
        for k, batch in enumerate(batches):
            images, labels, mask = _split_batch(batch, k, batches)
            logits = np.asarray(logits_fn(images), np.float32)
            if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"logits_fn returned shape {logits.shape} for a batch of {labels.shape[0]} "
                    "labels; expected (batch, num_classes)"
                )
            beyond = labels[mask] >= logits.shape[1]
            if beyond.any() and not warned:  # (a warning: tests run small models on ImageNet labels)
                warnings.warn(
                    f"batch #{k}: label {labels[mask][beyond].max()} but the model has {logits.shape[1]} "
                    "classes, so such images always count as wrong; the labels belong to another label "
                    "set, or the model was built with another num_classes", stacklevel=2)
                warned = True
            if num_examples is not None:
                mask = mask & (np.cumsum(mask) <= num_examples - n)
            broken = ~np.isfinite(logits).all(axis=1) & mask
            nonfinite += int(broken.sum())
            if nonfinite and not across_processes:  # (other processes would wait in the gather)
                raise ValueError(_nonfinite_message(nonfinite, n + np.flatnonzero(broken)))
            k = min(5, logits.shape[1])
            hits1 += int((_topk_hits(logits, labels, 1) & mask).sum())
            hits5 += int((_topk_hits(logits, labels, k) & mask).sum())
            seen = int(mask.sum())
            n += seen
            bar.set_postfix(top1=f"{100.0 * hits1 / max(n, 1):.2f}")  # before the update that draws it
            bar.update(seen)
            if num_examples is not None and n >= num_examples:
                break
    finally:
        bar.close()
    local_n = n
    if across_processes:
        from jax.experimental import multihost_utils

        totals = multihost_utils.process_allgather(
            np.array([hits1, hits5, n, nonfinite], np.int64)).reshape(-1, 4)
        hits1, hits5, n, nonfinite = (int(v) for v in totals.sum(axis=0))
        if nonfinite:
            raise ValueError(_nonfinite_message(nonfinite, None))
    if n == 0:
        raise ValueError("no examples were evaluated: the batches were empty or fully masked")
    metrics = {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n, "n": n}
    return metrics | ({"local_n": local_n} if across_processes else {})


def _split_batch(batch: Any, k: int, batches: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    """One batch -> (images, integer labels, mask), checked against each other."""
    if isinstance(batch, Mapping):
        raise ValueError(f"batch #{k} is a dict (keys {sorted(map(str, batch))}); batches are (images, "
                         "labels[, mask]) tuples: ptq4vm_jax.data.eval_batches(source, batch_size, "
                         "image_size=...) makes them from dicts with 'image' and 'label'")
    if len(batch) not in (2, 3):
        single = (" (a single (images, labels) pair must be wrapped in a list: [(images, labels)])"
                  if isinstance(batches, tuple) and len(batches) == 2 else "")
        raise ValueError(
            f"each batch must be (images, labels) or (images, labels, mask); got "
            f"{len(batch)} items{single}"
        )
    labels = class_labels(batch[1], f"batch #{k}")
    count = np.shape(batch[0])[0] if np.ndim(batch[0]) else None
    if count is not None and count != labels.shape[0]:
        raise ValueError(f"batch #{k}: {count} images but {labels.shape[0]} labels; give one class index "
                         "per image")
    mask = np.ones(labels.shape[0], bool) if len(batch) == 2 else np.asarray(batch[2], bool).reshape(-1)
    if mask.shape != labels.shape:
        raise ValueError(f"batch #{k}: mask has {mask.shape[0]} entries for {labels.shape[0]} labels")
    return batch[0], labels, mask


def _nonfinite_message(count: int, where: np.ndarray | None) -> str:
    at = "" if where is None else f" (example #{where[:10].tolist()})"
    return (f"the model returned NaN/inf logits for {count} image(s){at}: an accuracy over them would "
            "be meaningless. Check the weights (a non-finite value in the checkpoint) and the "
            "images' preprocessing")

