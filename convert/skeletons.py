"""The keys and size inference of the two official skeletons that pairs of families share:
``VisionMamba`` (Vim, LocalVim) and ``VSSM`` (VMamba, LocalVMamba).

Each family's converter adds its own keys (mixer, stem, MLP, downsample, gate) around these and
its own sizes; the skeletons' parts are written once here so the pairs cannot drift apart.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from convert.mapping import (
    Rule,
    Transform,
    conv_rules,
    identity,
    linear_rules,
    linear_to_dense,
    norm_rules,
    shape_of,
)

_LAYER = re.compile(r"layers\.(\d+)\.")
_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")

# ----------------------------------------------------------------------------- VisionMamba


def vision_mamba_rules(*mixer: Rule) -> tuple[Rule, ...]:
    """The ``VisionMamba`` keys around a family's ``mixer`` rules: patch embed, class token,
    position embedding, each layer's RMSNorm (no bias), the final RMSNorm and the head."""
    return (
        *conv_rules("patch_embed.proj", "patch_embed/proj"),
        Rule("cls_token", "cls_token"),
        Rule("pos_embed", "pos_embed"),
        Rule("layers.{i}.norm.weight", "layers_{i}/norm/weight"),
        *mixer,
        Rule("norm_f.weight", "norm_f/weight"),
        *linear_rules("head", "head", bias=True),
    )


def vision_mamba_overrides(sd: Mapping[str, Any], class_tokens: int, a_log: tuple[int, ...],
                           variant: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Sizes a ``VisionMamba`` state_dict's shapes imply (keys without ``module.``), in the order a
    hint lists them: the patch embed's (``img_size`` assuming stride == patch_size, the position
    embedding holding ``class_tokens`` besides the patches), the ``variant`` switches (where a stem
    is present), depth, d_state off one mixer's ``a_log`` shape (E, N), num_classes."""
    found: dict[str, Any] = {}
    proj = shape_of(sd, "patch_embed.proj.weight")
    if len(proj) == 4:
        found.update(embed_dim=proj[0], channels=proj[1], patch_size=proj[2])
        tokens = shape_of(sd, "pos_embed")
        patches = tokens[1] - class_tokens if len(tokens) == 3 else 0
        grid = math.isqrt(patches) if patches > 0 else 0
        if grid and grid * grid == patches:
            found["img_size"] = grid * proj[2]
    if proj or "pos_embed" in sd:
        found.update(variant or {})
    layers = [int(m.group(1)) for k in sd if (m := _LAYER.match(k))]
    if layers:
        found["depth"] = max(layers) + 1
    if len(a_log) == 2:
        found["d_state"] = a_log[1]
    head = shape_of(sd, "head.weight")
    if len(head) == 2:
        found["num_classes"] = head[0]
    return found


# ----------------------------------------------------------------------------- VSSM

BLOCK, OUR_BLOCK = "layers.{s}.blocks.{j}.", "layers_{s}/blocks_{j}/"
SS2D, OUR_SS2D = f"{BLOCK}op.", f"{OUR_BLOCK}op/"
# An SS2D's tensors stacked over its scan directions (leading axis K).
STACKED = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias")


def split_directions(key: str, value: Any) -> dict[str, Any]:
    """An SS2D's stacked ``...op.<STACKED>`` (K, ...) -> ``...op.<STACKED>[k]`` for k < K, one key per
    scan direction, so each maps onto its own ``x_proj_{k}``/``dt_proj_{k}``; any other entry as is."""
    module, _, leaf = key.rpartition(".")
    if module.endswith(".op") and leaf in STACKED and isinstance(value, np.ndarray) and value.ndim >= 1:
        return {f"{key}[{k}]": value[k] for k in range(value.shape[0])}
    return {key: value}


def vssm_rules(*family: Rule, linear: Transform, per_direction: Transform = identity) -> tuple[Rule, ...]:
    """The ``VSSM`` keys around a family's own (stem, MLP, downsample, gate): each block's norm and
    SS2D (``linear`` converts in_proj/out_proj weights, ``per_direction`` the A_logs/Ds), the
    classifier's norm and head."""
    return (
        *family,
        *norm_rules(f"{BLOCK}norm", f"{OUR_BLOCK}norm"),
        *linear_rules(f"{SS2D}in_proj", f"{OUR_SS2D}in_proj", bias=False, transform=linear),
        *conv_rules(f"{SS2D}conv2d", f"{OUR_SS2D}conv2d"),
        Rule(f"{SS2D}x_proj_weight[{{k}}]", f"{OUR_SS2D}x_proj_{{k}}/kernel", linear_to_dense),
        Rule(f"{SS2D}dt_projs_weight[{{k}}]", f"{OUR_SS2D}dt_proj_{{k}}/kernel", linear_to_dense),
        Rule(f"{SS2D}dt_projs_bias[{{k}}]", f"{OUR_SS2D}dt_proj_{{k}}/bias"),
        Rule(f"{SS2D}A_logs", f"{OUR_SS2D}A_logs", per_direction),
        Rule(f"{SS2D}Ds", f"{OUR_SS2D}Ds", per_direction),
        *norm_rules(f"{SS2D}out_norm", f"{OUR_SS2D}out_norm"),
        *linear_rules(f"{SS2D}out_proj", f"{OUR_SS2D}out_proj", bias=False, transform=linear),
        *norm_rules("classifier.norm", "norm"),
        *linear_rules("classifier.head", "head", bias=True),
    )


def vssm_overrides(sd: Mapping[str, Any], stem: Mapping[str, Any], in_proj_streams: int) -> dict[str, Any]:
    """``stem``'s sizes, then those a preprocessed ``VSSM`` state_dict's shapes imply: depths, dims
    (one per stage), ssm_ratio (in_proj gives ``in_proj_streams`` x d_inner outputs), ssm_d_state,
    ssm_dt_rank, mlp_ratio (where the blocks have an MLP), ssm_conv, ssm_conv_bias, num_classes."""
    found = dict(stem)
    shape = lambda k: shape_of(sd, k)
    blocks: dict[int, int] = {}
    for key in sd:
        if m := _BLOCK.match(key):
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
            if in_proj:
                found["ssm_ratio"] = in_proj[0] / in_proj_streams / dims[0]
            if len(a_logs) >= 2:  # (K*E, N) as stored, (K, E, N) once split per direction
                found["ssm_d_state"] = a_logs[-1]
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
