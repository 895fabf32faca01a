"""hustvl/Vim ``VisionMamba`` state_dict -> our Flax Vim tree.

Key names follow ``vim/models_mamba.py`` and ``mamba_ssm/modules/mamba_simple.py`` (bimamba
v2, ``conv_bias=True``, ``bias=False`` for in/out projections, RMSNorm without bias).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from convert.mapping import (
    FamilySpec,
    Rule,
    conv2d_to_hwio,
    depthwise_conv1d_to_taps,
    linear_to_dense,
    strip_module_prefix,
)

_MIXER = "layers.{i}.mixer."
_OURS = "layers_{i}/mixer/"

RULES: tuple[Rule, ...] = (
    Rule("patch_embed.proj.weight", "patch_embed/proj/kernel", conv2d_to_hwio),
    Rule("patch_embed.proj.bias", "patch_embed/proj/bias"),
    Rule("cls_token", "cls_token"),
    Rule("pos_embed", "pos_embed"),
    Rule("layers.{i}.norm.weight", "layers_{i}/norm/weight"),
    *(Rule(f"{_MIXER}{n}.weight", f"{_OURS}{n}/kernel", linear_to_dense)
      for n in ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj")),
    *(Rule(f"{_MIXER}{n}.bias", f"{_OURS}{n}/bias") for n in ("dt_proj", "dt_proj_b", "conv1d", "conv1d_b")),
    *(Rule(f"{_MIXER}{n}.weight", f"{_OURS}{n}/kernel", depthwise_conv1d_to_taps)
      for n in ("conv1d", "conv1d_b")),
    *(Rule(f"{_MIXER}{n}", f"{_OURS}{n}") for n in ("A_log", "A_b_log", "D", "D_b")),
    Rule("norm_f.weight", "norm_f/weight"),
    Rule("head.weight", "head/kernel", linear_to_dense),
    Rule("head.bias", "head/bias"),
)


def infer_overrides(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor sizes implied by the shapes; ``img_size`` assumes stride == patch_size."""
    sd = {strip_module_prefix(k): v for k, v in state_dict.items()}
    shape = lambda k: tuple(getattr(sd.get(k), "shape", ()))
    found: dict[str, Any] = {}
    proj = shape("patch_embed.proj.weight")
    if len(proj) == 4:
        found.update(embed_dim=proj[0], channels=proj[1], patch_size=proj[2])
        tokens = shape("pos_embed")
        grid = math.isqrt(tokens[1] - 1) if len(tokens) == 3 and tokens[1] > 1 else 0
        if grid * grid == tokens[1] - 1 > 0:
            found["img_size"] = grid * proj[2]
    layers = [int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))]
    if layers:
        found["depth"] = max(layers) + 1
    a_log = shape("layers.0.mixer.A_log")
    if len(a_log) == 2:
        found["d_state"] = a_log[1]
    head = shape("head.weight")
    if len(head) == 2:
        found["num_classes"] = head[0]
    return found


SPEC = FamilySpec(family="vim", rules=RULES, infer_overrides=infer_overrides)
