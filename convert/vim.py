"""hustvl/Vim ``VisionMamba`` state_dict -> our Flax Vim tree.

Key names follow ``vim/models_mamba.py`` and ``mamba_ssm/modules/mamba_simple.py`` (bimamba
v2, ``conv_bias=True``, ``bias=False`` for in/out projections, RMSNorm without bias).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from convert.mapping import (
    FamilySpec,
    Rule,
    depthwise_conv1d_to_taps,
    linear_to_dense,
    shape_of,
    strip_module_prefixes,
)
from convert.skeletons import vision_mamba_overrides, vision_mamba_rules

_MIXER = "layers.{i}.mixer."
_OURS = "layers_{i}/mixer/"

RULES: tuple[Rule, ...] = vision_mamba_rules(
    *(Rule(f"{_MIXER}{n}.weight", f"{_OURS}{n}/kernel", linear_to_dense)
      for n in ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj")),
    *(Rule(f"{_MIXER}{n}.bias", f"{_OURS}{n}/bias") for n in ("dt_proj", "dt_proj_b", "conv1d", "conv1d_b")),
    *(Rule(f"{_MIXER}{n}.weight", f"{_OURS}{n}/kernel", depthwise_conv1d_to_taps)
      for n in ("conv1d", "conv1d_b")),
    *(Rule(f"{_MIXER}{n}", f"{_OURS}{n}") for n in ("A_log", "A_b_log", "D", "D_b")),
)


def infer_overrides(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor sizes implied by the shapes; ``img_size`` assumes stride == patch_size."""
    sd = strip_module_prefixes(state_dict)
    return vision_mamba_overrides(sd, class_tokens=1, a_log=shape_of(sd, "layers.0.mixer.A_log"))


def recorded_overrides(checkpoint: Any) -> dict[str, Any]:
    """Sizes in the official training args (``checkpoint["args"]``): ``input_size`` and, where the
    model name spells one (``..._patch16_stride8_224_...``), the stride.

    A name without a stride is not read as stride == patch: names are not always that precise.
    """
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    get = args.get if isinstance(args, Mapping) else lambda key: getattr(args, key, None)
    found: dict[str, Any] = {}
    if type(size := get("input_size")) is int:
        found["img_size"] = size
    if isinstance(name := get("model"), str) and (m := re.search(r"(?:^|_)stride(\d+)(?:_|$)", name)):
        found["stride"] = int(m.group(1))
    return found


def _grid(img_size: int, patch: int, stride: int) -> int:
    return (img_size - patch) // stride + 1 if img_size >= patch else 0


def settle_sizes(inferred: dict[str, Any], recorded: Mapping[str, Any], cfg: Any
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Image size and stride behind ``pos_embed``'s token grid, which fits many (img, stride) pairs.

    ``infer_overrides`` assumes stride == patch; the recorded ``input_size`` / stride decide,
    else the requested model's pair if it fits the grid, else both official options are named.
    """
    patch, img = inferred.get("patch_size"), inferred.get("img_size")
    if patch is None or img is None or img == patch:  # a 1x1 grid fits any stride
        return inferred, []
    grid = img // patch
    sizes = dict(inferred)
    rec_img, rec_stride = recorded.get("img_size"), recorded.get("stride")
    if rec_img is not None:
        fitting = [s for s in range(1, rec_img) if _grid(rec_img, patch, s) == grid]
        if fitting:
            exact = [s for s in fitting if (rec_img - patch) % s == 0]
            stride = next((s for s in (rec_stride, cfg.stride) if s in fitting), (exact or fitting)[0])
            sizes.update(img_size=rec_img, stride=stride)
            return sizes, []
    if rec_stride is not None:
        sizes.update(img_size=(grid - 1) * rec_stride + patch, stride=rec_stride)
        return sizes, []
    if cfg.patch_size == patch and _grid(cfg.img_size, patch, cfg.stride) == grid:
        sizes.update(img_size=cfg.img_size, stride=cfg.stride)
        return sizes, []
    del sizes["img_size"]
    options = [{"img_size": img, "stride": patch}]
    if patch % 2 == 0:
        options.append({"img_size": (grid - 1) * (patch // 2) + patch, "stride": patch // 2})
    return sizes, options


SPEC = FamilySpec(family="vim", rules=RULES, infer_overrides=infer_overrides,
                  recorded_overrides=recorded_overrides, settle_sizes=settle_sizes)
