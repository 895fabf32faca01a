"""Disjoint per-process shares of a data source, for multi-host evaluation."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ptq4vm_jax.data.sources import is_array, is_pair, is_random_access, split_element


class _IndexView:
    """Random access to ``source`` at ``indices`` only (a per-process share, read lazily)."""

    def __init__(self, source: Any, indices: range) -> None:
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.source[self.indices[i]]


def process_share(source: Any, index: int, count: int, *, limit: int | None = None) -> Any:
    """Elements ``index, index + count, ...`` of the first ``limit`` of ``source``: disjoint shares
    that together cover it, one per process of a multi-host evaluation.

    Arrays, ``(images, labels)`` pairs and dicts of arrays are sliced; random-access sources
    (tfds, grain) become a lazy index view, so each host decodes only its own images; other
    iterables are filtered by position (their elements may be examples or whole batches).
    """
    if not 0 <= index < count:
        raise ValueError(f"process index {index} is not in [0, {count})")
    cut = slice(None, limit)
    if is_array(source):
        return source[cut][index::count]
    if is_pair(source) or isinstance(source, Mapping):
        images, labels = source if is_pair(source) else split_element(source)
        share = lambda a: None if a is None else a[cut][index::count]
        return (share(images), share(labels))
    if is_random_access(source):
        total = len(source) if limit is None else min(len(source), limit)
        return _IndexView(source, range(index, total, count))
    if isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
        return (e for i, e in enumerate(source) if (limit is None or i < limit) and i % count == index)
    return source  # eval_batches explains what is wrong with it
