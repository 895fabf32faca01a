"""Small helpers for nested-dict parameter trees: paths as tuples of keys, or "/"-joined."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """``tree[path] = value``, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, f"{prefix}{name}/"))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_tree`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        set_path(tree, tuple(path.split("/")), value)
    return tree


def copy_tree(tree: Any) -> Any:
    """New dicts all the way down (leaves shared), so removing entries leaves the input intact."""
    return {k: copy_tree(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def prune_empty(tree: Any) -> Any:
    """Drop sub-dicts that are (or became) empty."""
    if not isinstance(tree, Mapping):
        return tree
    out = {k: prune_empty(v) for k, v in tree.items()}
    return {k: v for k, v in out.items() if not (isinstance(v, Mapping) and not v)}
