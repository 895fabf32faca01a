"""MzeroMiko/VMamba ``VSSM`` state_dict -> our Flax VMamba tree.

Key names follow ``classification/models/vmamba.py`` with ``norm_layer="ln2d"`` (or "ln":
same keys), patch embed v2 (``patch_embed.{0,2,5,7}``), downsample v3
(``layers.{s}.downsample.{1,3}``) and the ``v05_noz`` SS2D. ``preprocess`` first does what the
official loader does: the legacy renames of ``VSSM._load_from_state_dict``, and it splits the
stacked per-direction tensors into one key per scan direction, ``...x_proj_weight[k]``, so
each maps onto its own ``x_proj_{k}``/``dt_proj_{k}`` Dense.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from convert.errors import CheckpointError
from convert.mapping import (
    FamilySpec,
    Rule,
    conv_rules,
    linear_rules,
    norm_rules,
    shape_of,
    strip_module_prefix,
)
from convert.skeletons import BLOCK, OUR_BLOCK, split_directions, vssm_overrides, vssm_rules

# The cross-scan's directions (row-major, column-major, both reversed): the leading axis of the
# official stacked tensors. ptq4vm_jax.models.vmamba.NUM_DIRECTIONS (tests check they agree).
NUM_DIRECTIONS = 4

# VSSM._load_from_state_dict: prefix renames, applied in this order.
_LEGACY_PREFIXES = (
    ("patch_embed.proj", "patch_embed.0"),
    ("patch_embed.norm", "patch_embed.2"),
)
_LEGACY_BLOCK = re.compile(r"^(layers\.\d+\.blocks\.\d+\.)(ln_1|self_attention)")
_LEGACY_TAIL = (("norm", "classifier.norm"), ("head", "classifier.head"))


def _rename(key: str) -> str:
    for old, new in _LEGACY_PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
    key = _LEGACY_BLOCK.sub(lambda m: m.group(1) + {"ln_1": "norm", "self_attention": "op"}[m.group(2)], key)
    for old, new in _LEGACY_TAIL:
        if key.startswith(old):
            key = new + key[len(old):]
    return key


def preprocess(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Legacy renames, then ``op.<stacked>`` (K, ...) -> ``op.<stacked>[k]`` for k < K."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        out.update(split_directions(_rename(strip_module_prefix(key)), value))
    return out


def linear2d_to_dense(weight: np.ndarray) -> np.ndarray:
    """``Linear2d`` weight, stored (out, in) or conv-style (out, in, 1, 1) -> Dense (in, out)."""
    if weight.ndim == 4 and weight.shape[2:] == (1, 1):
        weight = weight[:, :, 0, 0]
    if weight.ndim != 2:
        raise ValueError("a Linear2d weight must be (out, in) or (out, in, 1, 1)")
    return weight.T


def _per_direction(array: np.ndarray) -> np.ndarray:
    """Official ``A_logs`` (K*E, N) / ``Ds`` (K*E,) -> (K, E, N) / (K, E)."""
    if array.ndim not in (1, 2) or array.shape[0] % NUM_DIRECTIONS:
        raise ValueError(f"expected (K*E,) or (K*E, N) with K={NUM_DIRECTIONS}")
    return array.reshape(NUM_DIRECTIONS, -1, *array.shape[1:])


RULES: tuple[Rule, ...] = vssm_rules(
    *conv_rules("patch_embed.0", "patch_embed/conv1"),
    *norm_rules("patch_embed.2", "patch_embed/norm1"),
    *conv_rules("patch_embed.5", "patch_embed/conv2"),
    *norm_rules("patch_embed.7", "patch_embed/norm2"),
    *norm_rules(f"{BLOCK}norm2", f"{OUR_BLOCK}norm2"),
    *linear_rules(f"{BLOCK}mlp.fc1", f"{OUR_BLOCK}mlp/fc1", bias=True, transform=linear2d_to_dense),
    *linear_rules(f"{BLOCK}mlp.fc2", f"{OUR_BLOCK}mlp/fc2", bias=True, transform=linear2d_to_dense),
    *conv_rules("layers.{s}.downsample.1", "layers_{s}/downsample/conv"),
    *norm_rules("layers.{s}.downsample.3", "layers_{s}/downsample/norm"),
    linear=linear2d_to_dense,
    per_direction=_per_direction,
)


def infer_overrides(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``VMambaConfig`` sizes implied by the shapes (``img_size`` is not visible in them)."""
    sd = preprocess(state_dict)
    embed = shape_of(sd, "patch_embed.0.weight")
    found = vssm_overrides(sd, stem={"in_chans": embed[1]} if len(embed) == 4 else {}, in_proj_streams=1)
    dims = found.get("dims", ())
    if dims and dims == tuple(dims[0] * 2**s for s in range(len(dims))):  # as the official builder doubles
        found["dims"] = dims[0]
    return found


# The official yacs config (checkpoint["config"]) settings this port implements.
_SUPPORTED = {
    "SSM_FORWARDTYPE": ("v05_noz",),
    "NORM_LAYER": ("ln2d", "ln"),
    "DOWNSAMPLE": ("v3",),
    "PATCHEMBED": ("v2",),
    "PATCH_NORM": (True,),
    "POSEMBED": (False,),
    "GMLP": (False,),
    "SSM_ACT_LAYER": ("silu",),
    "MLP_ACT_LAYER": ("gelu",),
}


def config_overrides(official_config: Mapping[str, Any]) -> dict[str, Any]:
    """An official yacs config (``checkpoint["config"]``, read as nested dicts) -> ``VMambaConfig`` args.

    Settings this port does not implement (another ``SSM_FORWARDTYPE``, ``DOWNSAMPLE``, ...)
    raise instead of converting into a silently different model.
    """
    try:
        model = official_config["MODEL"]
        vssm = model["VSSM"]
    except (KeyError, TypeError):
        raise CheckpointError("not an official VMamba config: expected MODEL.VSSM entries") from None
    get = lambda k: vssm[k].lower() if isinstance(vssm[k], str) else vssm[k]
    bad = [f"MODEL.VSSM.{k}={get(k)!r} (supported: {', '.join(map(repr, ok))})"
           for k, ok in _SUPPORTED.items() if k in vssm and get(k) not in ok]
    if model.get("TYPE", "vssm") != "vssm":
        bad.append(f"MODEL.TYPE={model['TYPE']!r} (supported: 'vssm')")
    if bad:
        raise CheckpointError("this VMamba config uses settings the port does not implement: "
                              + "; ".join(bad))
    dt_rank = vssm.get("SSM_DT_RANK", "auto")
    overrides = {
        "patch_size": int(vssm["PATCH_SIZE"]),
        "in_chans": int(vssm["IN_CHANS"]),
        "depths": tuple(int(d) for d in vssm["DEPTHS"]),
        "dims": vssm["EMBED_DIM"] if isinstance(vssm["EMBED_DIM"], int) else tuple(vssm["EMBED_DIM"]),
        "ssm_d_state": int(vssm["SSM_D_STATE"]),
        "ssm_ratio": float(vssm["SSM_RATIO"]),
        "ssm_dt_rank": "auto" if dt_rank == "auto" else int(dt_rank),
        "ssm_conv": int(vssm["SSM_CONV"]),
        "ssm_conv_bias": bool(vssm["SSM_CONV_BIAS"]),
        "mlp_ratio": float(vssm["MLP_RATIO"]),
        "num_classes": int(model["NUM_CLASSES"]),
    }
    img = official_config.get("DATA", {}).get("IMG_SIZE")
    if img is not None:
        overrides["img_size"] = int(img)
    return overrides


def recorded_overrides(checkpoint: Any) -> dict[str, Any]:
    """``config_overrides`` of the training config an official checkpoint carries, ``{}`` without one."""
    config = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
    return config_overrides(config) if isinstance(config, Mapping) else {}


SPEC = FamilySpec(family="vmamba", rules=RULES, infer_overrides=infer_overrides, preprocess=preprocess,
                  recorded_overrides=recorded_overrides)
