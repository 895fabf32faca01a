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

from collections.abc import Mapping
from typing import Any

import numpy as np

from convert.mapping import (
    FamilySpec,
    Rule,
    conv_rules,
    linear_rules,
    linear_to_dense,
    norm_rules,
    shape_of,
    strip_module_prefixes,
)
from convert.skeletons import OUR_SS2D, SS2D, split_directions, vssm_overrides, vssm_rules

_PER_DIRECTION = ("A_logs", "Ds")


def preprocess(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``op.<stacked>`` (K, ...) -> ``op.<stacked>[k]``; ``op.A_logs``/``op.Ds`` -> (K, E, ...)."""
    sd = strip_module_prefixes(state_dict)
    out: dict[str, Any] = {}
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        if module.endswith(".op") and leaf in _PER_DIRECTION and isinstance(value, np.ndarray):
            stacked = sd.get(f"{module}.x_proj_weight")
            k = stacked.shape[0] if isinstance(stacked, np.ndarray) and stacked.ndim == 3 else 0
            fits = k and value.ndim in (1, 2) and value.shape[0] % k == 0
            out[key] = value.reshape(k, -1, *value.shape[1:]) if fits else value
        else:
            out.update(split_directions(key, value))
    return out


_GATE, _OUR_GATE = f"{SS2D}multi_scan.attn.", f"{OUR_SS2D}attn/"

RULES: tuple[Rule, ...] = vssm_rules(
    *conv_rules("patch_embed.0", "patch_embed/proj"),
    *norm_rules("patch_embed.2", "patch_embed/norm"),
    *norm_rules(f"{_GATE}norm", f"{_OUR_GATE}norm"),
    *linear_rules(f"{_GATE}global_reduce", f"{_OUR_GATE}global_reduce", bias=True),
    *linear_rules(f"{_GATE}channel_select", f"{_OUR_GATE}channel_select", bias=True),
    *norm_rules("layers.{s}.downsample.norm", "layers_{s}/downsample/norm"),
    *linear_rules("layers.{s}.downsample.reduction", "layers_{s}/downsample/reduction", bias=False),
    linear=linear_to_dense,
)


def infer_overrides(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``LocalVMambaConfig`` sizes implied by the shapes (not ``img_size`` nor the directions,
    which shapes do not show)."""
    sd = preprocess(state_dict)
    embed = shape_of(sd, "patch_embed.0.weight")
    stem = {"in_chans": embed[1], "patch_size": embed[2]} if len(embed) == 4 else {}
    return vssm_overrides(sd, stem=stem, in_proj_streams=2)  # in_proj gives x and the gate z


SPEC = FamilySpec(family="local_vmamba", rules=RULES, infer_overrides=infer_overrides, preprocess=preprocess)
