"""Small helpers for nested-dict parameter trees."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def copy_tree(tree: Any) -> Any:
    """New dicts all the way down (leaves shared), so removing entries leaves the input intact."""
    return {k: copy_tree(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def prune_empty(tree: Any) -> Any:
    """Drop sub-dicts that are (or became) empty."""
    if not isinstance(tree, Mapping):
        return tree
    out = {k: prune_empty(v) for k, v in tree.items()}
    return {k: v for k, v in out.items() if not (isinstance(v, Mapping) and not v)}
