"""Fixtures: random Vim params and their official (hustvl/Vim) state_dict, written by hand here."""

import jax
import numpy as np
import pytest

from ptq4vm_jax.checkpoint import abstract_params


def official_vim_state_dict(params: dict) -> dict[str, np.ndarray]:
    """Inverse of the converter, spelled out independently of convert/vim.py's table."""
    p = jax.tree.map(np.asarray, params)
    sd = {
        "patch_embed.proj.weight": p["patch_embed"]["proj"]["kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": p["patch_embed"]["proj"]["bias"],
        "cls_token": p["cls_token"],
        "pos_embed": p["pos_embed"],
        "norm_f.weight": p["norm_f"]["weight"],
        "head.weight": p["head"]["kernel"].T,
        "head.bias": p["head"]["bias"],
    }
    depth = sum(k.startswith("layers_") for k in p)
    for i in range(depth):
        mixer = p[f"layers_{i}"]["mixer"]
        pre = f"layers.{i}.mixer."
        sd[f"layers.{i}.norm.weight"] = p[f"layers_{i}"]["norm"]["weight"]
        for name in ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj"):
            sd[pre + name + ".weight"] = mixer[name]["kernel"].T
        for name in ("dt_proj", "dt_proj_b", "conv1d", "conv1d_b"):
            sd[pre + name + ".bias"] = mixer[name]["bias"]
        for name in ("conv1d", "conv1d_b"):
            sd[pre + name + ".weight"] = mixer[name]["kernel"].T[:, None, :]
        for name in ("A_log", "A_b_log", "D", "D_b"):
            sd[pre + name] = mixer[name]
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


@pytest.fixture(scope="session")
def vim_micro_params() -> dict:
    """Every leaf random, so a transposed or swapped tensor cannot pass unnoticed."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        abstract_params("vim_micro"))


@pytest.fixture(scope="session")
def vim_micro_official(vim_micro_params) -> dict[str, np.ndarray]:
    return official_vim_state_dict(vim_micro_params)
