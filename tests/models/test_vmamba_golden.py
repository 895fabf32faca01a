"""Parity of our Flax VMamba with the official MzeroMiko/VMamba ``VSSM`` (golden logits).

``tests/data/vmamba_golden/`` holds logits of the official PyTorch model run on the CPU (see
the README there). Reduced configs ship an official-format checkpoint (``model``,
``model_ema``, yacs ``config``); full-size models ship only the input and logits, and their
weights are regenerated here by ``official_state_dict`` (the function that produced them).
Names and shapes below are written out from the official ``VSSM``, independently of
``convert.vmamba``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from convert import CheckpointMismatchError, family_spec, read_checkpoint
from convert.mapping import map_state_dict
from convert.vmamba import config_overrides, infer_overrides
from ptq4vm_jax import create_model, load_torch_checkpoint
from ptq4vm_jax.checkpoint import abstract_params
from ptq4vm_jax.models.vmamba import (
    NUM_DIRECTIONS,
    Downsample,
    VMamba,
    VMambaConfig,
    VSSBlock,
    vmamba_blockwise,
)
from ptq4vm_jax.trees import flatten_tree, unflatten_tree

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "vmamba_golden"
META = json.loads((GOLDEN / "configs.json").read_text())
# Which registered model each reduced case overrides (its own sizes come from the yacs config).
REDUCED_BASE = {"reduced_v2v": "vmamba_tiny", "reduced_v2": "vmambav2_tiny_224"}
FULL_SIZE = ("vmamba_tiny", "vmamba_small", "vmamba_base")


def assert_logits_close(ours: np.ndarray, ref: np.ndarray) -> None:
    err, scale = float(np.abs(np.asarray(ours) - ref).max()), float(np.abs(ref).max())
    assert np.asarray(ours).shape == ref.shape
    assert err <= 1e-4 * scale, f"max|dlogits| {err:.3e} > 1e-4 * max|ref| ({scale:.3e})"


def official_shapes(cfg: VMambaConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the official ``VSSM(...).state_dict()`` (norm_layer="ln2d") with its shape."""
    dims, k = cfg.stage_dims, NUM_DIRECTIONS
    s = cfg.patch_size // 2 + 1
    shapes = {
        "patch_embed.0.weight": (dims[0] // 2, cfg.in_chans, s, s), "patch_embed.0.bias": (dims[0] // 2,),
        "patch_embed.2.weight": (dims[0] // 2,), "patch_embed.2.bias": (dims[0] // 2,),
        "patch_embed.5.weight": (dims[0], dims[0] // 2, s, s), "patch_embed.5.bias": (dims[0],),
        "patch_embed.7.weight": (dims[0],), "patch_embed.7.bias": (dims[0],),
    }
    for i, (dim, depth) in enumerate(zip(dims, cfg.depths, strict=True)):
        e, r, n, h = cfg.d_inner(dim), cfg.dt_rank(dim), cfg.ssm_d_state, cfg.mlp_hidden(dim)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            shapes.update({
                p + "norm.weight": (dim,), p + "norm.bias": (dim,),
                p + "op.x_proj_weight": (k, r + 2 * n, e),
                p + "op.A_logs": (k * e, n), p + "op.Ds": (k * e,),
                p + "op.dt_projs_weight": (k, e, r), p + "op.dt_projs_bias": (k, e),
                p + "op.out_norm.weight": (e,), p + "op.out_norm.bias": (e,),
                p + "op.in_proj.weight": (e, dim),
                p + "op.conv2d.weight": (e, 1, cfg.ssm_conv, cfg.ssm_conv),
                **({p + "op.conv2d.bias": (e,)} if cfg.ssm_conv_bias else {}),
                p + "op.out_proj.weight": (dim, e),
                p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
                p + "mlp.fc1.weight": (h, dim), p + "mlp.fc1.bias": (h,),
                p + "mlp.fc2.weight": (dim, h), p + "mlp.fc2.bias": (dim,),
            })
        if i + 1 < len(dims):
            p = f"layers.{i}.downsample."
            shapes.update({
                p + "1.weight": (dims[i + 1], dim, 3, 3), p + "1.bias": (dims[i + 1],),
                p + "3.weight": (dims[i + 1],), p + "3.bias": (dims[i + 1],),
            })
    shapes.update({
        "classifier.norm.weight": (dims[-1],), "classifier.norm.bias": (dims[-1],),
        "classifier.head.weight": (cfg.num_classes, dims[-1]), "classifier.head.bias": (cfg.num_classes,),
    })
    return shapes


_NORMS = ("norm", "norm2", "out_norm", "patch_embed.2", "patch_embed.7", "downsample.3")


def _draw(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Trained-like scales, nothing trivial: LN weights != 1, biases != 0, Ds != 1, A_logs perturbed."""
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)
    module, leaf = name.rsplit(".", 1)
    if leaf == "A_logs":
        a = torch.arange(1, shape[1] + 1, dtype=torch.float32)
        return torch.log(a).expand(shape) + 0.5 * randn(*shape)
    if leaf == "Ds":
        return 1.0 + 0.5 * randn(*shape)
    if leaf == "dt_projs_bias":  # softplus(bias) log-uniform in [1e-3, 0.1], as the official init
        u = torch.rand(*shape, generator=g, dtype=torch.float32)
        dt = torch.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        return dt + torch.log(-torch.expm1(-dt))
    if module.endswith(_NORMS) and leaf == "weight":
        return 1.0 + 0.3 * randn(*shape)
    if len(shape) == 1:
        return 0.2 * randn(*shape)
    fan_in = shape[-1] if leaf in ("x_proj_weight", "dt_projs_weight") else math.prod(shape[1:])
    return randn(*shape) / math.sqrt(fan_in)


def official_state_dict(cfg: VMambaConfig, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights for ``cfg`` (same values on every run of torch 2.13 CPU)."""
    g = torch.Generator().manual_seed(seed)
    return {name: _draw(name, shape, g).contiguous() for name, shape in official_shapes(cfg).items()}


def official_images(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """NHWC normalised-image-like inputs, rounded through float16 so they can be stored small."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).half().float()


def blockwise_forward(model: VMamba, params: dict, images: np.ndarray) -> jax.Array:
    """The model as block-wise calibration runs it: stem, each stage alone (jitted), head."""
    bw = vmamba_blockwise(model)
    x = jax.jit(bw.embed)(params, images)
    applies: dict[nn.Module, object] = {}  # one compile per distinct block/downsample shape
    for stage in bw.stages:
        subtree = params[stage.path[0]][stage.path[1]]
        x = applies.setdefault(stage.module, jax.jit(stage.module.apply))({"params": subtree}, x)
    return jax.jit(bw.classify)(params, x)


@pytest.mark.parametrize("case", sorted(REDUCED_BASE))
@pytest.mark.slow
def test_reduced_checkpoint_matches_official(case: str) -> None:
    """Official .pth -> torch-free reader -> yacs config -> converter -> logits, for both
    weight sets; then one block and one downsample alone on an H=5, W=7 grid, where a
    transposed cross-scan/merge would show (square grids cannot tell H from W)."""
    path = GOLDEN / f"{case}.pth"
    overrides = config_overrides(read_checkpoint(path)["config"])
    generated_with = {k: tuple(v) if isinstance(v, list) else v for k, v in META[case]["overrides"].items()}
    assert {k: overrides[k] for k in generated_with} == generated_with
    model = create_model(REDUCED_BASE[case], **overrides)
    io = np.load(GOLDEN / f"{case}.npz")
    apply = jax.jit(model.apply)
    for key in ("model", "model_ema"):
        params = load_torch_checkpoint(path, REDUCED_BASE[case], key=key, **overrides)
        assert_logits_close(apply({"params": params}, io["images"]), io[f"logits_{key}"])

    cfg, stage = model.cfg, load_torch_checkpoint(path, REDUCED_BASE[case], **overrides)["layers_1"]
    assert io["block_input"].shape[1:3] == (5, 7)
    # Jitted: one program each instead of one per op.
    block = jax.jit(VSSBlock(cfg, cfg.stage_dims[1]).apply)({"params": stage["blocks_0"]}, io["block_input"])
    assert_logits_close(block, io["block_output"])
    down = jax.jit(Downsample(cfg, cfg.stage_dims[2]).apply)({"params": stage["downsample"]},
                                                             io["block_input"])
    assert_logits_close(down, io["downsample_output"])


@pytest.mark.slow  # 224 px, official depths
@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_matches_official(name: str) -> None:
    meta = META["full_size"]
    model = create_model(name)
    state_dict = official_state_dict(model.cfg, meta["seeds"][name])
    sums = [float(sum(t.double().sum() for t in state_dict.values())),
            float(sum(t.double().abs().sum() for t in state_dict.values()))]
    assert np.allclose(sums, meta["weight_sums"][name], rtol=1e-9, atol=0), (
        f"regenerated {name} weights differ from the ones the golden logits were made with "
        f"(sums {sums} vs {meta['weight_sums'][name]}): has torch's CPU RNG stream changed?"
    )
    spec = family_spec("vmamba")
    expected = {p: tuple(s.shape) for p, s in flatten_tree(abstract_params(name)).items()}
    mapped, mismatch = map_state_dict(spec.preprocess({k: v.numpy() for k, v in state_dict.items()}),
                                      spec.rules, expected)
    assert not mismatch, mismatch.describe()
    io = np.load(GOLDEN / "full_size.npz")
    images = io["images"].astype(np.float32)
    assert_logits_close(blockwise_forward(model, unflatten_tree(mapped), images), io[f"logits_{name}"])


@pytest.mark.parametrize("name", [*FULL_SIZE, "vmambav2_tiny_224", "vmambav2_small_224", "vmambav2_base_224"])
def test_sizes_are_read_off_official_shapes(name: str) -> None:
    """What a size-mismatch hint is built from: every registered model is recognised."""
    cfg = create_model(name).cfg
    shapes_only = {k: np.broadcast_to(np.float32(0), s) for k, s in official_shapes(cfg).items()}
    inferred = infer_overrides(shapes_only)
    assert inferred == {k: getattr(cfg, k) for k in inferred}
    assert set(inferred) == {"in_chans", "depths", "dims", "ssm_ratio", "ssm_d_state", "ssm_dt_rank",
                             "ssm_conv", "ssm_conv_bias", "mlp_ratio", "num_classes"}


def test_wrong_model_for_a_checkpoint_is_explained() -> None:
    overrides = config_overrides(read_checkpoint(GOLDEN / "reduced_v2v.pth")["config"])
    with pytest.raises(CheckpointMismatchError) as err:
        load_torch_checkpoint(GOLDEN / "reduced_v2.pth", "vmamba_tiny", **overrides)
    msg = str(err.value)
    assert "layers_0/blocks_0/op/in_proj/kernel" in msg and "the model expects (16, 16)" in msg
    hint = msg[msg.index("hint: the shapes and the checkpoint's training args say"):]
    assert all(f in hint for f in ("ssm_ratio=2.0", "ssm_d_state=2", "mlp_ratio=3.0", "num_classes=7"))


@pytest.mark.parametrize("case", sorted(REDUCED_BASE))
@pytest.mark.parametrize("family", ["x_proj", "dt_proj", "A_logs"])
def test_golden_logits_catch_a_mixup_of_scan_directions(case: str, family: str) -> None:
    """The goldens are sensitive enough: exchanging one family's params of scan direction k and
    k+1 (in the first block) moves the model's logits by well over the parity tolerance, so a
    model that feeds a direction another's params cannot pass the tests above. Measured against
    the model's own logits with the params in place (the parity tests compare those with the
    official ones): a model that reads one direction's params for all would move nothing. (``Ds``
    is left out: the merge sums the directions, so their D·u terms add up to the same whatever
    direction holds which D.)"""
    path = GOLDEN / f"{case}.pth"
    overrides = config_overrides(read_checkpoint(path)["config"])
    model = create_model(REDUCED_BASE[case], **overrides)
    io = np.load(GOLDEN / f"{case}.npz")
    ref = io["logits_model"]
    params = load_torch_checkpoint(path, REDUCED_BASE[case], **overrides)
    apply = jax.jit(model.apply)
    base = np.asarray(apply({"params": params}, io["images"]))
    op = params["layers_0"]["blocks_0"]["op"]
    for k in range(NUM_DIRECTIONS):
        j = (k + 1) % NUM_DIRECTIONS
        if family == "A_logs":  # stacked: one row per direction
            order = list(range(NUM_DIRECTIONS))
            order[k], order[j] = j, k
            swapped = {family: np.asarray(op[family])[order]}
        else:
            swapped = {f"{family}_{k}": op[f"{family}_{j}"], f"{family}_{j}": op[f"{family}_{k}"]}
        block = {**params["layers_0"]["blocks_0"], "op": {**op, **swapped}}
        layer = {**params["layers_0"], "blocks_0": block}
        ours = np.asarray(apply({"params": {**params, "layers_0": layer}}, io["images"]))
        err = float(np.abs(ours - base).max())
        assert err > 10 * 1e-4 * float(np.abs(ref).max()), (family, k, j, err)
