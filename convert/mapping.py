"""Table-driven mapping of an official state_dict onto our Flax parameter tree.

A model family is a ``FamilySpec``: rules pairing an official key template with one of our
param paths (``{i}`` fields are layer indices) and a layout transform. One table serves both
directions, so a missing param can be reported under the official key it should have come
from.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

_FLOAT_DTYPES = frozenset(np.dtype(d) for d in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16))
_FIELD = re.compile(r"\{(\w+)\}")
_LIST_LIMIT = 25  # lines per section of a mismatch report


def identity(array: np.ndarray) -> np.ndarray:
    return array


def linear_to_dense(weight: np.ndarray) -> np.ndarray:
    """``nn.Linear`` weight (out, in) -> Flax ``Dense`` kernel (in, out)."""
    if weight.ndim != 2:
        raise ValueError("a Linear weight must be 2-D (out, in)")
    return weight.T


def conv2d_to_hwio(weight: np.ndarray) -> np.ndarray:
    """``nn.Conv2d`` weight (out, in, kh, kw) -> Flax ``Conv`` kernel (kh, kw, in, out)."""
    if weight.ndim != 4:
        raise ValueError("a Conv2d weight must be 4-D (out, in, kh, kw)")
    return weight.transpose(2, 3, 1, 0)


def depthwise_conv1d_to_taps(weight: np.ndarray) -> np.ndarray:
    """Depthwise ``nn.Conv1d`` weight (channels, 1, k) -> (k, channels)."""
    if weight.ndim != 3 or weight.shape[1] != 1:
        raise ValueError("a depthwise Conv1d weight must be (channels, 1, k)")
    return weight[:, 0, :].T


Transform = Callable[[np.ndarray], np.ndarray]


@functools.cache
def _template_regex(template: str) -> re.Pattern[str]:
    parts = _FIELD.split(template)  # literal, field, literal, field, ...
    pattern = "".join(re.escape(p) if k % 2 == 0 else rf"(?P<{p}>\d+)" for k, p in enumerate(parts))
    return re.compile(pattern)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Official key template <-> our ``/``-separated param path, plus the layout transform."""

    official: str
    ours: str
    transform: Transform = identity

    def to_ours(self, key: str) -> str | None:
        m = _template_regex(self.official).fullmatch(key)
        return None if m is None else self.ours.format(**m.groupdict())

    def to_official(self, path: str) -> str | None:
        m = _template_regex(self.ours).fullmatch(path)
        return None if m is None else self.official.format(**m.groupdict())


def norm_rules(official: str, ours: str) -> tuple[Rule, Rule]:
    """A torch LayerNorm (weight, bias) -> a Flax LayerNorm (scale, bias)."""
    return Rule(f"{official}.weight", f"{ours}/scale"), Rule(f"{official}.bias", f"{ours}/bias")


def conv_rules(official: str, ours: str) -> tuple[Rule, Rule]:
    """A torch Conv2d with bias -> a Flax Conv."""
    weight = Rule(f"{official}.weight", f"{ours}/kernel", conv2d_to_hwio)
    return weight, Rule(f"{official}.bias", f"{ours}/bias")


def linear_rules(official: str, ours: str, bias: bool, transform: Transform = linear_to_dense
                 ) -> tuple[Rule, ...]:
    """A torch Linear (``transform`` turns its weight into a kernel) -> a Flax Dense."""
    weight = Rule(f"{official}.weight", f"{ours}/kernel", transform)
    return (weight, Rule(f"{official}.bias", f"{ours}/bias")) if bias else (weight,)


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """How one model family's official checkpoints map onto our tree.

    ``infer_overrides`` reads constructor sizes (``embed_dim``, ``depth``, ...) off the
    state_dict's shapes so a mismatch can say which model the checkpoint is. ``preprocess``
    rewrites the state_dict before the rules apply (legacy renames, splitting stacked tensors).
    ``recorded_overrides`` reads the constructor arguments a checkpoint records beside its
    weights (VMamba: its yacs config; Vim: its training args), ``{}`` if none, and refuses
    settings the port does not implement; a converted model must agree with them.
    ``settle_sizes(inferred, recorded, cfg)`` resolves what the shapes alone leave open (Vim:
    image size vs stride behind a token count) from the recorded args or, failing those, the
    requested model's ``cfg``; it returns the settled sizes and, if still open, the alternative
    override sets to name in a hint.
    """

    family: str
    rules: tuple[Rule, ...]
    infer_overrides: Callable[[Mapping[str, Any]], dict[str, Any]]
    preprocess: Callable[[Mapping[str, Any]], Mapping[str, Any]] = dict
    recorded_overrides: Callable[[Any], dict[str, Any]] | None = None
    settle_sizes: Callable[[dict[str, Any], Mapping[str, Any], Any],
                           tuple[dict[str, Any], list[dict[str, Any]]]] | None = None


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """Everything wrong between a state_dict and the expected tree, by name."""

    missing: tuple[tuple[str, str | None], ...] = ()  # (our path, official key)
    unexpected: tuple[tuple[str, str | None], ...] = ()  # (official key, our path or None)
    wrong: tuple[str, ...] = ()  # one line each: key -> path, shapes / dtype

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong)

    def describe(self) -> str:
        def section(title: str, lines: list[str]) -> list[str]:
            if not lines:
                return []
            more = [f"    ... and {len(lines) - _LIST_LIMIT} more"] if len(lines) > _LIST_LIMIT else []
            return [f"  {title} ({len(lines)}):", *(f"    {ln}" for ln in lines[:_LIST_LIMIT]), *more]

        missing = [f"{path}  (official key {key})" if key else path for path, key in self.missing]
        unexpected = [f"{key}  (-> {path}, not in this model)" if path else f"{key}  (no rule maps this key)"
                      for key, path in self.unexpected]
        return "\n".join(
            section("missing: model parameters the checkpoint does not provide", missing)
            + section("unexpected: checkpoint keys the model has no place for", unexpected)
            + section("shape/dtype mismatch", list(self.wrong))
        )


def strip_module_prefix(key: str) -> str:
    """``DistributedDataParallel`` checkpoints prefix every key with ``module.``."""
    return key[len("module."):] if key.startswith("module.") else key


def strip_module_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state_dict with every key's ``module.`` prefix stripped."""
    return {strip_module_prefix(k): v for k, v in state_dict.items()}


def shape_of(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
    """The shape of ``state_dict[key]``; ``()`` where the key is absent or not an array."""
    return tuple(getattr(state_dict.get(key), "shape", ()))


def map_state_dict(
    state_dict: Mapping[str, Any], rules: tuple[Rule, ...], expected: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, np.ndarray], Mismatch]:
    """Official ``state_dict`` -> ``{our path: float32 array}`` for the paths in ``expected``.

    Returns the mapped arrays and every problem found; the caller decides how to report.
    """
    mapped: dict[str, np.ndarray] = {}
    unexpected: list[tuple[str, str | None]] = []
    wrong: list[str] = []
    seen: set[str] = set()
    for key, value in state_dict.items():
        name = strip_module_prefix(key)
        rule, path = next(((r, p) for r in rules if (p := r.to_ours(name)) is not None), (None, None))
        if rule is None or path not in expected or path in seen:
            unexpected.append((key, path))
            continue
        seen.add(path)
        want = tuple(expected[path])
        if not isinstance(value, np.ndarray) or value.dtype not in _FLOAT_DTYPES:
            kind = f"dtype {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
            wrong.append(f"{key} -> {path}: {kind}, expected a floating-point tensor")
            continue
        try:
            array = rule.transform(value)
        except ValueError as e:
            wrong.append(f"{key} -> {path}: official shape {value.shape} cannot be converted ({e}); "
                         f"the model expects {want}")
            continue
        if array.shape != want:
            wrong.append(f"{key} {value.shape} -> {path} {array.shape}, the model expects {want}")
            continue
        with np.errstate(over="ignore"):  # out-of-range float64 values become inf: the caller refuses those
            mapped[path] = np.ascontiguousarray(array, dtype=np.float32)
    missing = [(path, _official_key(rules, path)) for path in expected if path not in seen]
    return mapped, Mismatch(tuple(missing), tuple(unexpected), tuple(wrong))


def _official_key(rules: tuple[Rule, ...], path: str) -> str | None:
    return next((k for r in rules if (k := r.to_official(path)) is not None), None)
