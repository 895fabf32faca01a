"""MzeroMiko/VMamba ``VSSM`` state_dict -> our Flax VMamba tree.

Key names follow ``classification/models/vmamba.py`` with ``norm_layer="ln2d"`` (or "ln":
same keys), patch embed v2 (``patch_embed.{0,2,5,7}``), downsample v3
(``layers.{s}.downsample.{1,3}``) and the ``v05_noz`` SS2D. ``preprocess`` first does what the
official loader does: the legacy renames of ``VSSM._load_from_state_dict``, and it splits the
stacked per-direction tensors into one key per scan direction, ``...x_proj_weight[k]``, so
each maps onto its own ``x_proj_{k}``/``dt_proj_{k}`` Dense.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from convert.errors import CheckpointError
from convert.mapping import FamilySpec, Rule, conv2d_to_hwio, linear_to_dense, strip_module_prefix

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
_STACKED = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias")


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
        key = _rename(strip_module_prefix(key))
        stacked = key.rsplit(".", 1)[-1] in _STACKED and ".op." in key
        if stacked and isinstance(value, np.ndarray) and value.ndim >= 1:
            out.update({f"{key}[{k}]": value[k] for k in range(value.shape[0])})
        else:
            out[key] = value
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


_OP, _OUR_OP = "layers.{s}.blocks.{j}.op.", "layers_{s}/blocks_{j}/op/"
_BLOCK, _OUR_BLOCK = "layers.{s}.blocks.{j}.", "layers_{s}/blocks_{j}/"
_FCS = ("fc1", "fc2")


def _norm(official: str, ours: str) -> tuple[Rule, Rule]:
    return Rule(f"{official}.weight", f"{ours}/scale"), Rule(f"{official}.bias", f"{ours}/bias")


def _conv(official: str, ours: str) -> tuple[Rule, Rule]:
    weight = Rule(f"{official}.weight", f"{ours}/kernel", conv2d_to_hwio)
    return weight, Rule(f"{official}.bias", f"{ours}/bias")


RULES: tuple[Rule, ...] = (
    *_conv("patch_embed.0", "patch_embed/conv1"),
    *_norm("patch_embed.2", "patch_embed/norm1"),
    *_conv("patch_embed.5", "patch_embed/conv2"),
    *_norm("patch_embed.7", "patch_embed/norm2"),
    *_norm(f"{_BLOCK}norm", f"{_OUR_BLOCK}norm"),
    *_norm(f"{_BLOCK}norm2", f"{_OUR_BLOCK}norm2"),
    *_norm(f"{_OP}out_norm", f"{_OUR_OP}out_norm"),
    Rule(f"{_OP}in_proj.weight", f"{_OUR_OP}in_proj/kernel", linear2d_to_dense),
    Rule(f"{_OP}out_proj.weight", f"{_OUR_OP}out_proj/kernel", linear2d_to_dense),
    *_conv(f"{_OP}conv2d", f"{_OUR_OP}conv2d"),
    Rule(f"{_OP}x_proj_weight[{{k}}]", f"{_OUR_OP}x_proj_{{k}}/kernel", linear_to_dense),
    Rule(f"{_OP}dt_projs_weight[{{k}}]", f"{_OUR_OP}dt_proj_{{k}}/kernel", linear_to_dense),
    Rule(f"{_OP}dt_projs_bias[{{k}}]", f"{_OUR_OP}dt_proj_{{k}}/bias"),
    Rule(f"{_OP}A_logs", f"{_OUR_OP}A_logs", _per_direction),
    Rule(f"{_OP}Ds", f"{_OUR_OP}Ds", _per_direction),
    *(Rule(f"{_BLOCK}mlp.{fc}.weight", f"{_OUR_BLOCK}mlp/{fc}/kernel", linear2d_to_dense) for fc in _FCS),
    *(Rule(f"{_BLOCK}mlp.{fc}.bias", f"{_OUR_BLOCK}mlp/{fc}/bias") for fc in _FCS),
    *_conv("layers.{s}.downsample.1", "layers_{s}/downsample/conv"),
    *_norm("layers.{s}.downsample.3", "layers_{s}/downsample/norm"),
    *_norm("classifier.norm", "norm"),
    Rule("classifier.head.weight", "head/kernel", linear_to_dense),
    Rule("classifier.head.bias", "head/bias"),
)


def infer_overrides(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``VMambaConfig`` sizes implied by the shapes (``img_size`` is not visible in them)."""
    sd = preprocess(state_dict)
    shape = lambda k: tuple(getattr(sd.get(k), "shape", ()))
    found: dict[str, Any] = {}
    embed = shape("patch_embed.0.weight")
    if len(embed) == 4:
        found["in_chans"] = embed[1]
    blocks: dict[int, int] = {}
    for key in sd:
        if m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key):
            s, j = int(m.group(1)), int(m.group(2))
            blocks[s] = max(blocks.get(s, 0), j + 1)
    if blocks:
        found["depths"] = tuple(blocks.get(s, 0) for s in range(max(blocks) + 1))
        widths = [shape(f"layers.{s}.blocks.0.norm.weight") for s in range(len(found["depths"]))]
        if all(len(w) == 1 for w in widths):
            dims = tuple(w[0] for w in widths)
            found["dims"] = dims[0] if dims == tuple(dims[0] * 2**s for s in range(len(dims))) else dims
            op = "layers.0.blocks.0.op."
            in_proj, a_logs = shape(op + "in_proj.weight"), shape(op + "A_logs")
            if in_proj:
                found["ssm_ratio"] = in_proj[0] / dims[0]
            if len(a_logs) == 2:
                found["ssm_d_state"] = a_logs[1]
            dt = shape(op + "dt_projs_weight[0]")
            if len(dt) == 2:
                found["ssm_dt_rank"] = "auto" if dt[1] == math.ceil(dims[0] / 16) else dt[1]
            fc1 = shape("layers.0.blocks.0.mlp.fc1.weight")
            if len(fc1) == 2:
                found["mlp_ratio"] = fc1[0] / dims[0]
            conv = shape(op + "conv2d.weight")
            if len(conv) == 4:
                found["ssm_conv"] = conv[-1]
                found["ssm_conv_bias"] = op + "conv2d.bias" in sd
    head = shape("classifier.head.weight")
    if len(head) == 2:
        found["num_classes"] = head[0]
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
