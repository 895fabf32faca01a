"""What a parameter tree must be to be stored or served: the model's shapes, finite values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import jax.numpy as jnp
import numpy as np

from ptq4vm_jax.errors import CheckpointError
from ptq4vm_jax.models import create_model, param_shapes
from ptq4vm_jax.trees import flatten_tree


def abstract_params(model_name: str, **overrides: Any) -> dict[str, Any]:
    """``ShapeDtypeStruct`` tree of ``create_model(model_name, **overrides)``'s params (no compute)."""
    return param_shapes(create_model(model_name, **overrides))


def tree_mismatches(tree: Mapping[str, Any], abstract: Mapping[str, Any], *,
                    dtypes: bool = True) -> list[str]:
    """Every leaf of ``tree`` (anything with .shape/.dtype) that differs from ``abstract``, by path;
    ``dtypes=False`` compares shapes only."""
    have, want = flatten_tree(tree), flatten_tree(abstract)
    problems = [f"missing {p} {tuple(np.shape(want[p]))}" for p in want if p not in have]
    problems += [f"unexpected {p} {tuple(np.shape(have[p]))}" for p in have if p not in want]
    for p in have.keys() & want.keys():
        got, exp = tuple(np.shape(have[p])), tuple(np.shape(want[p]))
        if dtypes:
            got_t, exp_t = np.dtype(have[p].dtype), np.dtype(want[p].dtype)
            if (got, got_t) != (exp, exp_t):
                problems.append(f"{p}: {got} {got_t}, expected {exp} {exp_t}")
        elif got != exp:
            problems.append(f"{p}: {got}, expected {exp}")
    return sorted(problems)


def raise_mismatch(what: str, problems: list[str], fix: str) -> NoReturn:
    """One ``CheckpointError`` listing (the first 25 of) ``problems``."""
    more = f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
    shown = "\n  ".join(problems[:25]) + more
    raise CheckpointError(f"{what}:\n  {shown}\n{fix}")


def nonfinite_report(arrays: Mapping[str, Any]) -> list[str]:
    """One line per floating-point array that holds NaN or inf, by name (others are skipped).

    Values are judged as float32, what our params hold: a wider value beyond its range counts
    as inf. Such params still run, so a checkpoint holding them would evaluate to garbage.
    """
    lines = []
    for name, value in arrays.items():
        array = np.asarray(value)
        if not jnp.issubdtype(array.dtype, jnp.floating):
            continue
        with np.errstate(over="ignore"):
            array = array.astype(np.float32, copy=False)
        if np.isfinite(array).all():
            continue
        nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        lines.append(f"{name}: {nan + inf} of {array.size} values ({nan} NaN, {inf} inf)")
    return lines


def raise_nonfinite(what: str, lines: list[str], fix: str) -> NoReturn:
    """One ``CheckpointError`` listing (the first 10 of) ``nonfinite_report``'s lines."""
    more = f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else ""
    raise CheckpointError(f"{what} (a model with them computes garbage):\n  " + "\n  ".join(lines[:10])
                          + f"{more}\n{fix}")


def refuse_nonfinite(path: str, tree: Mapping[str, Any]) -> None:
    """A loaded tree holding NaN or inf is refused: serving it would compute garbage."""
    bad = nonfinite_report(flatten_tree(tree))
    if bad:
        raise_nonfinite(f"{path} holds NaN or infinite parameters", bad,
                        "the checkpoint is damaged or was saved from a diverged run: re-create it")
