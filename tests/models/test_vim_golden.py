"""Parity of our Flax Vim with the official hustvl/Vim ``VisionMamba`` (golden logits).

The golden logits in ``tests/data/vim_golden/`` come from the official PyTorch model run
on the CPU (see the README there). Reduced configs ship their official-format checkpoint;
full-size models ship only inputs and logits, and the weights are regenerated here by
``official_random_state_dict`` (the same function produced them for the official model).
"""

from __future__ import annotations

import argparse
import json
import math
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ptq4vm_jax import create_model, load_torch_checkpoint
from ptq4vm_jax.models.vim import VimBlock

# Official constructor sizes of the registered full-size models.
OFFICIAL_SIZES: dict[str, dict[str, int]] = {
    name: dict(img_size=224, patch_size=16, stride=16, embed_dim=dim, depth=24, d_state=16,
               num_classes=1000, channels=3)
    for name, dim in (("vim_tiny", 192), ("vim_small", 384), ("vim_base", 768))
}


def official_random_state_dict(model_name: str, seed: int = 0, **overrides: int) -> dict[str, torch.Tensor]:
    """Official-keyed fp32 weights where every parameter is random and non-trivial.

    Norm weights, biases, ``D`` and ``A_log`` are all moved off their init values so that a
    mix-up between any two of them shows in the logits; scales keep activations O(1) so the
    logits are neither saturated nor constant. Deterministic for a given torch version.
    """
    s = {**OFFICIAL_SIZES[model_name], **overrides}
    d, c, p, n, depth = s["embed_dim"], s["channels"], s["patch_size"], s["d_state"], s["depth"]
    e, r, k = 2 * d, math.ceil(d / 16), 4
    grid = (s["img_size"] - p) // s["stride"] + 1
    g = torch.Generator().manual_seed(seed)
    normal = lambda *shape, std: torch.randn(*shape, generator=g) * std
    uniform = lambda *shape, lo, hi: torch.rand(*shape, generator=g) * (hi - lo) + lo

    def dt_bias() -> torch.Tensor:
        dt = torch.exp(uniform(e, lo=math.log(1e-2), hi=math.log(0.5)))
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus (Mamba init, wider dt range)

    sd = {
        "cls_token": normal(1, 1, d, std=0.5),
        "pos_embed": normal(1, grid * grid + 1, d, std=0.2),
        "patch_embed.proj.weight": normal(d, c, p, p, std=(c * p * p) ** -0.5),
        "patch_embed.proj.bias": uniform(d, lo=-0.2, hi=0.2),
        "head.weight": normal(s["num_classes"], d, std=d**-0.5),
        "head.bias": uniform(s["num_classes"], lo=-0.2, hi=0.2),
        "norm_f.weight": uniform(d, lo=0.5, hi=1.5),
    }
    for i in range(depth):
        m = f"layers.{i}.mixer."
        sd[f"layers.{i}.norm.weight"] = uniform(d, lo=0.5, hi=1.5)
        sd[m + "in_proj.weight"] = normal(2 * e, d, std=d**-0.5)
        sd[m + "out_proj.weight"] = normal(d, e, std=e**-0.5)
        for b in ("", "_b"):
            sd[m + f"conv1d{b}.weight"] = uniform(e, 1, k, lo=-k**-0.5, hi=k**-0.5)
            sd[m + f"conv1d{b}.bias"] = uniform(e, lo=-0.5, hi=0.5)
            sd[m + f"x_proj{b}.weight"] = normal(r + 2 * n, e, std=e**-0.5)
            sd[m + f"dt_proj{b}.weight"] = uniform(e, r, lo=-r**-0.5, hi=r**-0.5)
            sd[m + f"dt_proj{b}.bias"] = dt_bias()
            sd[m + f"D{b}"] = uniform(e, lo=0.5, hi=1.5)
        for a in ("A_log", "A_b_log"):
            sd[m + a] = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1) + normal(
                e, n, std=0.2
            )
    return sd


GOLDEN = Path(__file__).resolve().parents[1] / "data" / "vim_golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
RTOL = 1e-4  # max |Δlogits| relative to max |official logits|, fp32 on the CPU


def _relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape, f"logits shape {ours.shape}, official {ref.shape}"
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _our_logits(path: Path, model_name: str, images: np.ndarray, **overrides: int) -> np.ndarray:
    params = load_torch_checkpoint(path, model_name, **overrides)
    model = create_model(model_name, **overrides)
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(images)))


def _our_logits_block_by_block(path: Path, model_name: str, images: np.ndarray) -> np.ndarray:
    """``model.apply`` taken apart as its ``__call__`` runs it: embed, each block, classify.

    The blocks of a model share their shapes, so one compiled block serves all 24; compiling
    the whole unrolled model instead costs several times the rest of the test.
    """
    params = load_torch_checkpoint(path, model_name)
    model = create_model(model_name)
    carry = jax.jit(partial(model.apply, method="embed"))({"params": params}, jnp.asarray(images))
    block = jax.jit(VimBlock(model.cfg).apply)
    for i in range(model.cfg.depth):
        carry = block({"params": params[f"layers_{i}"]}, *carry)
    return np.asarray(jax.jit(partial(model.apply, method="classify"))({"params": params}, *carry))


@pytest.mark.parametrize("case", MANIFEST["reduced"], ids=lambda c: c["name"])
def test_reduced_official_checkpoint_matches_official_logits(case):
    # Official long names: also covers the alias path of the registry and the loader.
    ours = _our_logits(GOLDEN / case["checkpoint"], case["official_name"],
                       np.load(GOLDEN / case["inputs"]), **case["overrides"])
    err = _relative_error(ours, np.load(GOLDEN / case["logits"]))
    assert err <= RTOL, f"{case['name']}: max |Δlogits| / max |ref| = {err:.2e} > {RTOL:.0e}"


@pytest.mark.slow  # 224 px, depth 24
@pytest.mark.parametrize("case", MANIFEST["full_size"], ids=lambda c: c["model_name"])
def test_full_size_matches_official_logits(case, tmp_path):
    state_dict = official_random_state_dict(case["model_name"], seed=case["seed"])
    want = case["weights"]
    got_sum = float(sum(t.double().sum() for t in state_dict.values()))
    got_abs = float(sum(t.double().abs().sum() for t in state_dict.values()))
    assert sum(t.numel() for t in state_dict.values()) == want["num_params"]
    # torch's vectorised log can differ by one float32 ulp between CPU instruction sets (log(7) on
    # AVX2, in every A_log row), which moves these sums by a few 1e-9 relative and the logits by
    # far less than RTOL; a changed RNG stream or function moves them by about 1e-3.
    assert math.isclose(got_sum, want["sum"], rel_tol=1e-7) and math.isclose(
        got_abs, want["abs_sum"], rel_tol=1e-7
    ), (
        "official_random_state_dict no longer reproduces the weights the golden logits were made "
        f"with (sum {got_sum} vs {want['sum']}, abs sum {got_abs} vs {want['abs_sum']}): the torch "
        "RNG stream or the function changed; regenerate tests/data/vim_golden (see its README)"
    )
    path = tmp_path / "checkpoint.pth"
    args = argparse.Namespace(model=case["official_name"], input_size=224, nb_classes=1000)
    torch.save({"model": state_dict, "args": args, "epoch": 1}, path)
    del state_dict
    ours = _our_logits_block_by_block(path, case["model_name"], np.load(GOLDEN / case["inputs"]))
    err = _relative_error(ours, np.load(GOLDEN / case["logits"]))
    assert err <= RTOL, f"{case['model_name']}: max |Δlogits| / max |ref| = {err:.2e} > {RTOL:.0e}"


@pytest.mark.parametrize("swap", [("A_log", "A_b_log"), ("D", "D_b"), ("dt_proj", "dt_proj_b")])
def test_golden_logits_catch_a_forward_backward_mixup(swap):
    """The goldens are sensitive enough: exchanging the two scan directions' params fails parity."""
    case = MANIFEST["reduced"][0]
    params = load_torch_checkpoint(GOLDEN / case["checkpoint"], case["model_name"], **case["overrides"])
    mixer = params["layers_0"]["mixer"]
    a, b = swap
    params["layers_0"]["mixer"] = {**mixer, a: mixer[b], b: mixer[a]}
    model = create_model(case["model_name"], **case["overrides"])
    ours = np.asarray(jax.jit(model.apply)({"params": params}, np.load(GOLDEN / case["inputs"])))
    assert _relative_error(ours, np.load(GOLDEN / case["logits"])) > 10 * RTOL
