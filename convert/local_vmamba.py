"""hunto/LocalMamba LocalVMamba ``VSSM`` state_dict -> our Flax LocalVMamba tree.

Key names follow ``classification/lib/models/local_vmamba.py``: ``patch_embed.{0,2}`` (conv,
LN), blocks ``layers.{s}.blocks.{j}.{norm,op.*}`` with the channel gate under
``op.multi_scan.attn``, ``layers.{s}.downsample.{norm,reduction}`` (``PatchMerging2D``) and
``classifier.{norm,head}``. ``preprocess`` splits the stacked per-direction tensors into one
key per direction (``...x_proj_weight[k]``) and reshapes ``A_logs`` (K*E, N) / ``Ds`` (K*E,)
to (K, E, ...), K being that block's direction count (the leading axis of its
``x_proj_weight``), since blocks may scan in different numbers of directions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from convert.mapping import FamilySpec, Rule, conv2d_to_hwio, linear_to_dense, strip_module_prefix

_STACKED = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias")
_PER_DIRECTION = ("A_logs", "Ds")


def preprocess(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``op.<stacked>`` (K, ...) -> ``op.<stacked>[k]``; ``op.A_logs``/``op.Ds`` -> (K, E, ...)."""
    sd = {strip_module_prefix(k): v for k, v in state_dict.items()}
    out: dict[str, Any] = {}
    for key, value in sd.items():
        module, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        if not (module.endswith(".op") and isinstance(value, np.ndarray)):
            out[key] = value
        elif leaf in _STACKED and value.ndim >= 1:
            out.update({f"{key}[{k}]": value[k] for k in range(value.shape[0])})
        elif leaf in _PER_DIRECTION:
            stacked = sd.get(f"{module}.x_proj_weight")
            k = stacked.shape[0] if isinstance(stacked, np.ndarray) and stacked.ndim == 3 else 0
            fits = k and value.ndim in (1, 2) and value.shape[0] % k == 0
            out[key] = value.reshape(k, -1, *value.shape[1:]) if fits else value
        else:
            out[key] = value
    return out


_OP, _OUR_OP = "layers.{s}.blocks.{j}.op.", "layers_{s}/blocks_{j}/op/"


def _norm(official: str, ours: str) -> tuple[Rule, Rule]:
    return Rule(f"{official}.weight", f"{ours}/scale"), Rule(f"{official}.bias", f"{ours}/bias")


def _linear(official: str, ours: str, bias: bool) -> tuple[Rule, ...]:
    weight = Rule(f"{official}.weight", f"{ours}/kernel", linear_to_dense)
    return (weight, Rule(f"{official}.bias", f"{ours}/bias")) if bias else (weight,)


def _conv(official: str, ours: str) -> tuple[Rule, Rule]:
    weight = Rule(f"{official}.weight", f"{ours}/kernel", conv2d_to_hwio)
    return weight, Rule(f"{official}.bias", f"{ours}/bias")


RULES: tuple[Rule, ...] = (
    *_conv("patch_embed.0", "patch_embed/proj"),
    *_norm("patch_embed.2", "patch_embed/norm"),
    *_norm("layers.{s}.blocks.{j}.norm", "layers_{s}/blocks_{j}/norm"),
    *_linear(f"{_OP}in_proj", f"{_OUR_OP}in_proj", bias=False),
    *_conv(f"{_OP}conv2d", f"{_OUR_OP}conv2d"),
    Rule(f"{_OP}x_proj_weight[{{k}}]", f"{_OUR_OP}x_proj_{{k}}/kernel", linear_to_dense),
    Rule(f"{_OP}dt_projs_weight[{{k}}]", f"{_OUR_OP}dt_proj_{{k}}/kernel", linear_to_dense),
    Rule(f"{_OP}dt_projs_bias[{{k}}]", f"{_OUR_OP}dt_proj_{{k}}/bias"),
    Rule(f"{_OP}A_logs", f"{_OUR_OP}A_logs"),
    Rule(f"{_OP}Ds", f"{_OUR_OP}Ds"),
    *_norm(f"{_OP}out_norm", f"{_OUR_OP}out_norm"),
    *_linear(f"{_OP}out_proj", f"{_OUR_OP}out_proj", bias=False),
    *_norm(f"{_OP}multi_scan.attn.norm", f"{_OUR_OP}attn/norm"),
    *_linear(f"{_OP}multi_scan.attn.global_reduce", f"{_OUR_OP}attn/global_reduce", bias=True),
    *_linear(f"{_OP}multi_scan.attn.channel_select", f"{_OUR_OP}attn/channel_select", bias=True),
    *_norm("layers.{s}.downsample.norm", "layers_{s}/downsample/norm"),
    *_linear("layers.{s}.downsample.reduction", "layers_{s}/downsample/reduction", bias=False),
    *_norm("classifier.norm", "norm"),
    *_linear("classifier.head", "head", bias=True),
)


def infer_overrides(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``LocalVMambaConfig`` sizes implied by the shapes (not ``img_size`` nor the directions,
    which shapes do not show)."""
    sd = preprocess(state_dict)
    shape = lambda k: tuple(getattr(sd.get(k), "shape", ()))
    found: dict[str, Any] = {}
    embed = shape("patch_embed.0.weight")
    if len(embed) == 4:
        found["in_chans"], found["patch_size"] = embed[1], embed[2]
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
            found["dims"] = dims
            op = "layers.0.blocks.0.op."
            in_proj, a_logs = shape(op + "in_proj.weight"), shape(op + "A_logs")
            if len(in_proj) == 2:
                found["ssm_ratio"] = in_proj[0] / 2 / dims[0]
            if a_logs:
                found["ssm_d_state"] = a_logs[-1]
            dt = shape(op + "dt_projs_weight[0]")
            if len(dt) == 2:
                found["ssm_dt_rank"] = "auto" if dt[1] == math.ceil(dims[0] / 16) else dt[1]
            conv = shape(op + "conv2d.weight")
            if len(conv) == 4:
                found["ssm_conv"] = conv[-1]
                found["ssm_conv_bias"] = op + "conv2d.bias" in sd
    head = shape("classifier.head.weight")
    if len(head) == 2:
        found["num_classes"] = head[0]
    return found


SPEC = FamilySpec(family="local_vmamba", rules=RULES, infer_overrides=infer_overrides, preprocess=preprocess)
