"""The float-params format: a model's float parameter tree, named by model and overrides."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ptq4vm_jax.checkpoint.checks import abstract_params, raise_mismatch, refuse_nonfinite, tree_mismatches
from ptq4vm_jax.checkpoint.store import (
    ARRAY_DIGESTS,
    FLOAT_FORMAT,
    model_from_metadata,
    read_metadata,
    require_format,
    restore_tree,
    write_checkpoint,
)
from ptq4vm_jax.errors import CheckpointError
from ptq4vm_jax.models import canonical_name
from ptq4vm_jax.quant.params import QuantizedParams

# 1: no per-array digests; 2: ``array_sha256`` in the sealed metadata, verified at load.
FLOAT_FORMAT_VERSION = 2


def save_params(path: str | os.PathLike, params: Mapping[str, Any], *, model_name: str,
                model_overrides: Mapping[str, Any] | None = None, source: str | None = None,
                source_sha256: str | None = None, extra: Mapping[str, Any] | None = None,
                overwrite: bool = True) -> dict[str, Any]:
    """Save float params of ``create_model(model_name, **model_overrides)``; returns the metadata."""
    name, overrides = canonical_name(model_name), dict(model_overrides or {})
    if isinstance(params, QuantizedParams):
        raise TypeError("save_params saves float params; a QuantizedParams is saved with save_quantized")
    params = jax.tree.map(np.asarray, dict(params))
    problems = tree_mismatches(params, abstract_params(name, **overrides))
    if problems:
        raise_mismatch(f"params do not match {name} {overrides or ''}".rstrip(), problems,
                       "pass the model_name/model_overrides these params were built with")
    metadata = {"format": FLOAT_FORMAT, "format_version": FLOAT_FORMAT_VERSION, "model_name": name,
                "model_overrides": overrides, "source": source, "source_sha256": source_sha256,
                "extra": dict(extra or {})}
    return write_checkpoint(path, params, metadata, overwrite=overwrite)


def load_params(
    path: str | os.PathLike, *, model_name: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Float params (numpy float32 tree) and metadata; checks format, model name, shapes and digests."""
    path = os.path.abspath(os.fspath(path))
    meta = read_metadata(path)
    require_format(meta, path, format=FLOAT_FORMAT, version=FLOAT_FORMAT_VERSION, loader="load_params",
                   sealed_from=2)
    held, _, abstract = model_from_metadata(meta, path)
    if model_name is not None and canonical_name(model_name) != held:
        raise CheckpointError(f"{path} holds {held}, you asked for {canonical_name(model_name)}; pass "
                              f"model_name={held!r} or convert a {canonical_name(model_name)} checkpoint",
                              argument="model_name")
    params = restore_tree(path, abstract, meta.get(ARRAY_DIGESTS))
    refuse_nonfinite(path, params)
    return params, meta
