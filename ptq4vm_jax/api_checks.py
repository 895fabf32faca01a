"""Input checks of the public API (``quantize_params``, ``quantized_apply``): bad input is
refused before any data is read or anything compiles, with what was wrong and what to do."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptq4vm_jax.checkpoint import nonfinite_report, tree_mismatches
from ptq4vm_jax.errors import ArgumentWarning
from ptq4vm_jax.models import canonical_name, model_family, param_shapes
from ptq4vm_jax.ops.scan import check_scan_backend
from ptq4vm_jax.quant.config import DEFAULT_RULES, QuantConfig, QuantRule, deciding_rule, path_str
from ptq4vm_jax.trees import flatten_tree

Path = tuple[str, ...]


def check_model_and_config(model: Any, config: Any) -> None:
    """``quantize_params`` takes a model's name and a ``QuantConfig``; say what to pass instead."""
    if isinstance(model, nn.Module):
        raise TypeError(f"quantize_params takes the model's name (model='vim_tiny', with model_overrides="
                        f"{{...}} for a resized one), not a {type(model).__name__} module: the name and "
                        "overrides are saved with the quantized params")
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}; e.g. "
                        "QuantConfig(w_bits=4, a_bits=8)" + (", or QuantConfig(**d) for a dict d"
                                                             if isinstance(config, Mapping) else ""))


def check_params(net: nn.Module, params: Any, name: str) -> None:
    """Shapes of ``params`` against the model's (before any data is read); every problem named."""
    if not isinstance(params, Mapping):
        loaded = (isinstance(params, tuple) and len(params) == 2 and isinstance(params[1], Mapping)
                  and "format" in params[1])
        hint = ("; load_params returns (params, metadata): params, meta = load_params(path)" if loaded
                else "")
        raise TypeError(f"params must be the param tree of {name} (a dict, e.g. variables['params']), "
                        f"got {type(params).__name__}{hint}")
    problems = tree_mismatches(params, param_shapes(net), dtypes=False)
    if not problems:
        flat = flatten_tree(params)
        dtypes = {p: getattr(v, "dtype", None) or np.asarray(v).dtype for p, v in flat.items()}
        integer = [f"{p} ({d})" for p, d in dtypes.items() if not jnp.issubdtype(d, jnp.floating)]
        if integer:
            raise TypeError(f"the params of {name} must be floating point; {len(integer)} are not: "
                            f"{', '.join(integer[:5])}. quantize_params needs the float model's weights "
                            "(e.g. from load_torch_checkpoint or load_params)")
        broken = nonfinite_report(flat)
        if broken:
            raise ValueError(f"the float params of {name} hold NaN/inf values ({'; '.join(broken[:5])}): "
                             "the checkpoint itself is broken, calibration cannot fix it")
        return
    if list(params) == ["params"]:
        raise ValueError(f"params for {name} are wrapped in {{'params': ...}}: pass variables['params']")
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    raise ValueError(
        f"params do not fit {name} ({len(problems)} problems):\n  " + "\n  ".join(problems[:12]) + more
        + "\nDid you pass the params of another model (see model= / model_overrides=; CLI: --model)?"
    )


def check_rules(rules: tuple[QuantRule, ...], linears: list[Path], name: str, params: Mapping) -> None:
    """A rule that decides no layer is a typo or is shadowed by an earlier rule; running anyway
    would quantize other layers than the user believes."""
    decided = {deciding_rule(p, rules) for p in linears}
    idle = [r for i, r in enumerate(rules) if i not in decided]
    if idle:
        examples = ", ".join(path_str(p) for p in linears[:3])
        linear_params = {path_str(p) + "/" for p in linears}
        others = [k for k in flatten_tree(params) if not any(k.startswith(p) for p in linear_params)]
        hits = sorted({k for r in idle for k in others  # (a parameter, or the module holding it)
                       if re.search(r.pattern, k) or re.search(r.pattern, k.rsplit("/", 1)[0])})
        hint = (f". They match parameters that are not linear layers ({', '.join(hits[:3])}): only "
                "linear (nn.Dense) layers are quantized; norms, convolutions, A_log/D and the scan "
                "stay float" if hits else "")
        family = model_family(name)
        foreign = [f for f, own in DEFAULT_RULES.items() if f != family and any(r in own for r in idle)]
        if foreign:
            hint += (f". DEFAULT_RULES[{foreign[0]!r}] are for {foreign[0]} models; {name} needs "
                     f"DEFAULT_RULES[{family!r}]")
        raise ValueError(
            f"quantization rule(s) {idle} decide no linear layer of {name}: no layer path matches "
            f"them, or an earlier rule matches first. Layer paths look like {examples} (first "
            f"match wins, in order: {[r.pattern for r in rules]}); fix or drop those rules{hint}"
        )



def model_for_qparams(model: nn.Module | str | None, qparams: Any, scan: str | None = None) -> nn.Module:
    """The module ``quantized_apply`` runs: ``model`` (None: built from ``qparams``; a name: must
    be the qparams' model; a module: must have the qparams' config up to its compute dtype and
    scan backend, which are runtime choices), with its scan backend set to ``scan`` unless None."""
    if model is None or isinstance(model, str):
        if isinstance(model, str) and canonical_name(model) != qparams.model_name:
            raise ValueError(f"qparams were made for {qparams.model_name}, not {model}")
        model = qparams.model()
    elif getattr(model, "cfg", None) is not None:
        made_for = qparams.model().cfg
        if type(model.cfg) is type(made_for):
            made_for = dataclasses.replace(made_for, dtype=model.cfg.dtype, scan=model.cfg.scan)
        if model.cfg != made_for:
            if type(model.cfg) is type(made_for):
                pairs = [(f.name, getattr(model.cfg, f.name), getattr(made_for, f.name))
                         for f in dataclasses.fields(made_for)]
                differ = "has " + ", ".join(f"{k}={got!r} (qparams: {want!r})" for k, got, want in pairs
                                            if got != want)
            else:
                differ = f"is a {type(model).__name__}"
            raise ValueError(f"qparams were made for {qparams.model_name} ({type(made_for).__name__}), but "
                             f"the model passed {differ}; pass model=None to build the model the qparams "
                             "describe")
    if scan is not None:
        model = model.clone(cfg=dataclasses.replace(model.cfg, scan=check_scan_backend(scan)))
    return model


def check_eval_images(model: nn.Module, images: Any) -> None:
    """The model's own image checks, run before the compiled forward, where they see values:
    NaN/inf pixels are refused (quantization would turn them into ordinary codes and confident
    logits), and a batch with no negative value, which looks like raw pixels rather than
    normalised images, is warned about, as calibration does."""
    model.check_images(images)
    try:
        raw = bool(jnp.min(images) >= 0)
    except jax.errors.ConcretizationTypeError:  # inside a caller's jit: values unknown
        return
    if raw:
        warnings.warn(ArgumentWarning(
            f"every pixel value is >= 0 (max {float(jnp.max(images)):.3g}): these look like raw pixels "
            "(0..1 or 0..255), not normalised images; normalise them as the model was trained (ImageNet: "
            "ptq4vm_jax.data.imagenet_eval_preprocess)", argument="images"), stacklevel=3)
