"""Model names -> Flax modules, with timm-style size overrides."""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptq4vm_jax.choices import RUNTIME_CHOICES
from ptq4vm_jax.models.blockwise import Blockwise
from ptq4vm_jax.models.local_vim import SMALL_DIRECTIONS as LOCAL_VIM_SMALL_DIRECTIONS
from ptq4vm_jax.models.local_vim import TINY_DIRECTIONS as LOCAL_VIM_TINY_DIRECTIONS
from ptq4vm_jax.models.local_vim import (
    LocalVimConfig,
    LocalVisionMamba,
    local_vim_blockwise,
)
from ptq4vm_jax.models.local_vmamba import SMALL_DIRECTIONS as LOCAL_VMAMBA_SMALL_DIRECTIONS
from ptq4vm_jax.models.local_vmamba import (
    LocalVMamba,
    LocalVMambaConfig,
    local_vmamba_blockwise,
)
from ptq4vm_jax.models.vim import VimConfig, VisionMamba, vim_blockwise
from ptq4vm_jax.models.vmamba import VMamba, VMambaConfig, vmamba_blockwise
from ptq4vm_jax.trees import copy_tree

_VIM_ALIASES = {
    "vim_tiny": "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "vim_small": "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "vim_base": "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2",
}

# name -> (family, builder(**overrides) -> module)
_REGISTRY: dict[str, tuple[str, Callable[..., nn.Module]]] = {}


# model class -> its stem/stages/head view for block-wise calibration
_BLOCKWISE: dict[type, Callable[[Any], Blockwise]] = {}


def register(name: str, family: str, builder: Callable[..., nn.Module]) -> None:
    _REGISTRY[name] = (family, builder)


def register_blockwise(model_class: type, builder: Callable[[Any], Blockwise]) -> None:
    """``blockwise(model)`` of a ``model_class`` instance is ``builder(model)``."""
    _BLOCKWISE[model_class] = builder


def blockwise(model: nn.Module) -> Blockwise:
    """The model as stem -> stages -> head, the unit of block-wise calibration (JLSS)."""
    builder = _BLOCKWISE.get(type(model))
    if builder is None:
        raise TypeError(f"no block-wise calibration for {type(model).__name__}; models with one: "
                        f"{', '.join(sorted(c.__name__ for c in _BLOCKWISE))}")
    return builder(model)


def _builder(label: str, config_cls: type, module_cls: type,
             settle: Callable[[dict, Mapping, Mapping], None] | None = None,
             **defaults: Any) -> Callable[..., nn.Module]:
    """``build(**overrides)``: ``module_cls(config_cls(**defaults, **overrides))``, refusing a name
    ``config_cls`` lacks. ``settle(args, defaults, overrides)`` may adjust the merged arguments."""
    fields = {f.name for f in dataclasses.fields(config_cls)}

    def build(**overrides: Any) -> nn.Module:
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown {label} argument(s) {unknown}; accepted: {sorted(fields)}")
        args = {**defaults, **overrides}
        if settle is not None:
            settle(args, defaults, overrides)
        return module_cls(config_cls(**args))

    return build


def _vim(**defaults: Any) -> Callable[..., nn.Module]:
    return _builder("Vim", VimConfig, VisionMamba, **defaults)


register_blockwise(VisionMamba, vim_blockwise)
register("vim_tiny", "vim", _vim(embed_dim=192, depth=24))
register("vim_small", "vim", _vim(embed_dim=384, depth=24))
register("vim_base", "vim", _vim(embed_dim=768, depth=24))
# Small configs for tests and the built-in demo.
register("vim_micro", "vim", _vim(img_size=32, patch_size=4, stride=4, embed_dim=48, depth=4,
                                   d_state=16, num_classes=10))
register("vim_nano", "vim", _vim(img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2,
                                  d_state=8, num_classes=10))
for _short, _long in _VIM_ALIASES.items():
    _REGISTRY[_long] = _REGISTRY[_short]


def _vmamba(**defaults: Any) -> Callable[..., nn.Module]:
    return _builder("VMamba", VMambaConfig, VMamba, **defaults)


register_blockwise(VMamba, vmamba_blockwise)
# VMamba v2: vmamba_{tiny,small,base} are the vmambav2v_*_224 configs PTQ4VM quantizes.
register("vmamba_tiny", "vmamba", _vmamba(depths=(2, 2, 8, 2), dims=96))
register("vmamba_small", "vmamba", _vmamba(depths=(2, 2, 20, 2), dims=96))
register("vmamba_base", "vmamba", _vmamba(depths=(2, 2, 20, 2), dims=128))
register("vmambav2_tiny_224", "vmamba", _vmamba(depths=(2, 2, 5, 2), dims=96, ssm_ratio=2.0))
register("vmambav2_small_224", "vmamba", _vmamba(depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0))
register("vmambav2_base_224", "vmamba", _vmamba(depths=(2, 2, 15, 2), dims=128, ssm_ratio=2.0))
register("vmamba_micro", "vmamba", _vmamba(img_size=32, depths=(1, 1, 2, 1), dims=16, num_classes=10))
# Official config files, builder functions and MODEL.NAMEs -> our names.
_VMAMBA_ALIASES = {
    **{f"vmambav2v_{s}_224": f"vmamba_{s}" for s in ("tiny", "small", "base")},
    "vmamba_tiny_s1l8": "vmamba_tiny", "vmamba_small_s1l20": "vmamba_small",
    "vmamba_base_s1l20": "vmamba_base", "vmamba_tiny_s2l5": "vmambav2_tiny_224",
    "vmamba_small_s2l15": "vmambav2_small_224", "vmamba_base_s2l15": "vmambav2_base_224",
    "vssm1_tiny_0230s": "vmamba_tiny", "vssm1_small_0229s": "vmamba_small", "vssm1_base_0229s": "vmamba_base",
    "vssm1_tiny_0230": "vmambav2_tiny_224", "vssm1_small_0229": "vmambav2_small_224",
    "vssm1_base_0229": "vmambav2_base_224",
}


def _local_vim_depth(args: dict, defaults: Mapping, overrides: Mapping) -> None:
    """A depth without directions takes the first ``depth`` of the listed ones, as the official
    constructor does (layer i takes the builder's directions[i])."""
    if "depth" in overrides and "directions" not in overrides:
        depth, listed = args["depth"], defaults["directions"]
        if isinstance(depth, int) and depth > len(listed):
            raise ValueError(f"depth {depth} is more than the {len(listed)} layers whose scan "
                             "directions this model lists; pass directions= for every layer")
        if isinstance(depth, int) and depth > 0:
            args["directions"] = listed[:depth]


def _local_vim(**defaults: Any) -> Callable[..., nn.Module]:
    return _builder("LocalVim", LocalVimConfig, LocalVisionMamba, _local_vim_depth, **defaults)


def _local_vmamba(**defaults: Any) -> Callable[..., nn.Module]:
    return _builder("LocalVMamba", LocalVMambaConfig, LocalVMamba, **defaults)


register_blockwise(LocalVisionMamba, local_vim_blockwise)
register("local_vim_tiny", "local_vim", _local_vim(embed_dim=192, directions=LOCAL_VIM_TINY_DIRECTIONS))
register("local_vim_small", "local_vim", _local_vim(embed_dim=384, directions=LOCAL_VIM_SMALL_DIRECTIONS))
register("local_vim_tiny_midcls", "local_vim",
         _local_vim(embed_dim=192, directions=LOCAL_VIM_TINY_DIRECTIONS, rope=False, cls_token=True))
_LOCAL_VIM_ALIASES = {"local_vim_tiny_middle_cls_token": "local_vim_tiny_midcls"}

register_blockwise(LocalVMamba, local_vmamba_blockwise)
register("local_vmamba_tiny", "local_vmamba", _local_vmamba())
register("local_vmamba_small", "local_vmamba",
         _local_vmamba(depths=(2, 2, 27, 2), directions=LOCAL_VMAMBA_SMALL_DIRECTIONS))
# An untrained micro config for tests: two stages (8x8 and 4x4 grids at 32 px) whose w3 scans pad.
register("local_vmamba_micro", "local_vmamba", _local_vmamba(
    img_size=32, depths=(1, 1), dims=16, ssm_d_state=4, num_classes=10,
    directions=(("h", "v_flip", "w3", "w2_flip"), ("h_flip", "v", "w3_flip", "w2"))))
_VMAMBA_ALIASES.update({"local_vssm_tiny": "local_vmamba_tiny", "local_vssm_small": "local_vmamba_small"})


def canonical_name(name: str) -> str:
    """Official long names map to our short ones; unknown names raise with the list and a close match.

    Names are exact (no case folding), so one spelling reaches each checkpoint's metadata.
    """
    if not isinstance(name, str):
        raise ValueError(f"a model name must be a string such as 'vim_tiny', got {name!r}")
    for short, long in _VIM_ALIASES.items():
        if name == long:
            return short
    if name in _VMAMBA_ALIASES:
        return _VMAMBA_ALIASES[name]
    if name in _LOCAL_VIM_ALIASES:
        return _LOCAL_VIM_ALIASES[name]
    if name not in _REGISTRY:
        known = list_models()
        spellings = {n.lower(): n for n in (*_REGISTRY, *_VMAMBA_ALIASES, *_LOCAL_VIM_ALIASES)}
        close = difflib.get_close_matches(name.lower(), spellings, n=1, cutoff=0.8)
        guess = ""
        if close:
            spelled = spellings[close[0]]
            short = canonical_name(spelled)
            same = f", i.e. {short}" if short != spelled else ""
            case = " Names are case-sensitive." if close[0] == name.lower() else ""
            guess = f" (did you mean {spelled!r}{same}?{case})"
        raise ValueError(f"unknown model name {name!r}{guess}; known models: {', '.join(known)}")
    return name


def model_family(name: str) -> str:
    return _REGISTRY[canonical_name(name)][0]


def model_label(name: str, overrides: Mapping[str, Any] | None = None) -> str:
    """A model as output names it: its name, with the sizes that differ from the named model's
    (``vim_tiny (depth=4, embed_dim=48)``), so a resized model is never shown as the stock one;
    the ``RUNTIME_CHOICES`` are not sizes and are left out."""
    stock = create_model(name).cfg
    sizes = {k: v for k, v in (overrides or {}).items()
             if k not in RUNTIME_CHOICES and getattr(stock, k, not v) != v}
    if not sizes:
        return name
    return f"{name} ({', '.join(f'{k}={v!r}' for k, v in sorted(sizes.items()))})"


def list_models() -> list[str]:
    return sorted(n for n in _REGISTRY if n not in _VIM_ALIASES.values())


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a model by name; ``overrides`` are the official constructor's size arguments, plus
    the ``RUNTIME_CHOICES``: ``dtype`` (the projections' compute dtype) and ``scan`` (the scan
    backend: "auto", "ref", "pallas", "fused"; ``ptq4vm_jax.choices.SCAN_BACKENDS``)."""
    return _REGISTRY[canonical_name(name)][1](**overrides)


def image_shape(model: nn.Module, batch: int = 1) -> tuple[int, int, int, int]:
    """NHWC input shape the model was built for."""
    cfg = model.cfg
    return (batch, cfg.img_size, cfg.img_size, cfg.channels)


def param_shapes(model: nn.Module) -> dict[str, Any]:
    """``jax.ShapeDtypeStruct`` tree of ``model``'s params, as ``model.init`` makes them (no compute).

    Traced once per distinct model and kept (a full-size model takes seconds to trace, and every
    checkpoint check asks for it); each call returns its own dicts around the shared leaves.
    """
    return copy_tree(_traced_param_shapes(model))


@functools.lru_cache(maxsize=32)
def _traced_param_shapes(model: nn.Module) -> dict[str, Any]:
    images = jax.ShapeDtypeStruct(image_shape(model), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]
