"""Parity of our Flax LocalVMamba with the official hunto/LocalMamba ``VSSM`` (golden logits).

``tests/data/local_vmamba_golden/`` holds official-format checkpoints of two reduced configs
and the official model's logits on them (run on the CPU, see the README there), and the
official ``local_vssm_tiny``/``local_vssm_small`` state-dict key -> shape lists.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
import pytest

from convert import CheckpointMismatchError, family_spec
from convert.mapping import map_state_dict
from ptq4vm_jax import create_model, load_torch_checkpoint
from ptq4vm_jax.checkpoint import abstract_params
from ptq4vm_jax.models import local_vmamba
from ptq4vm_jax.models.local_scan import scan_order
from ptq4vm_jax.trees import flatten_tree

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "local_vmamba_golden"
META = json.loads((GOLDEN / "configs.json").read_text())["cases"]
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
VMAMBA_CHECKPOINT = GOLDEN.parent / "vmamba_golden" / "reduced_v2v.pth"
BLOCK_ORDERS = local_vmamba.block_orders  # the model's own, before any test replaces it


def overrides(case: str) -> dict:
    """The official constructor arguments of a case as ``create_model`` overrides."""
    kw = META[case]["official_kwargs"]
    same = ("patch_size", "in_chans", "num_classes", "ssm_d_state", "ssm_ratio", "ssm_dt_rank", "ssm_conv",
            "ssm_conv_bias")
    return {**{k: kw[k] for k in same}, "img_size": META[case]["img_size"], "depths": tuple(kw["depths"]),
            "dims": tuple(kw["dims"]), "directions": tuple(map(tuple, kw["directions"]))}


def assert_logits_close(ours: np.ndarray, ref: np.ndarray) -> None:
    ours = np.asarray(ours)
    err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    assert ours.shape == ref.shape
    assert err <= 1e-4 * scale, f"max|dlogits| {err:.3e} > 1e-4 * max|ref| ({scale:.3e})"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def forward(case: str, params: dict) -> Callable[[dict], np.ndarray]:
    """The model on the case's images, compiled once at XLA's lowest optimisation level (the same
    function in a third of the time): params -> logits, for any params of the shapes given."""
    model = create_model("local_vmamba_tiny", **overrides(case))
    images = np.load(GOLDEN / f"{case}.npz")["images"].astype(np.float32)
    compiled = jax.jit(model.apply).lower({"params": params}, images).compile(FAST_COMPILE)
    return lambda p: np.asarray(compiled({"params": p}, images))


def logits(case: str, params: dict) -> np.ndarray:
    return forward(case, params)(params)


@pytest.mark.parametrize("case", sorted(META))
def test_reduced_checkpoint_matches_official(case: str) -> None:
    """Official .pth ({'model': sd} and {'state_dict': sd}, read with the default key) ->
    converter -> logits equal to the official model's. The cases scan windows that pad their
    grid (w7 on 16/8/4/2-token sides, w2 on 7x7 and 1x1), flipped and not, in every stage."""
    assert META[case]["checkpoint_entry"] in ("model", "state_dict")
    params = load_torch_checkpoint(GOLDEN / f"{case}.pth", "local_vmamba_tiny", **overrides(case))
    assert_logits_close(logits(case, params), np.load(GOLDEN / f"{case}.npz")["logits"])


def exchange_directions(params: dict, family: str, k: int, j: int) -> dict:
    """``params`` with scan directions k and j exchanging their ``family`` params in every block's
    SS2D (``x_proj_{i}``/``dt_proj_{i}`` are one module per direction, ``A_logs``/``Ds`` one row)."""
    out = dict(params)
    for name, layer in params.items():
        if not name.startswith("layers_"):
            continue
        out[name] = dict(layer)
        for block_name, block in layer.items():
            if not block_name.startswith("blocks_"):
                continue
            op = dict(block["op"])
            if family in ("A_logs", "Ds"):
                stacked = np.array(op[family])
                stacked[[k, j]] = stacked[[j, k]]
                op[family] = stacked
            else:
                op[f"{family}_{k}"], op[f"{family}_{j}"] = op[f"{family}_{j}"], op[f"{family}_{k}"]
            out[name][block_name] = {**block, "op": op}
    return out


@pytest.mark.parametrize("case", sorted(META))
def test_golden_logits_catch_a_mixup_of_scan_directions(case: str) -> None:
    """The goldens see every direction's own params: exchanging one family's params of scan
    directions k and k+1 (x_proj, dt_proj, A_logs or Ds, in every block) moves the model's logits
    by well over the parity tolerance, so a model that feeds a direction another's params cannot
    pass the test above. Every block at once, as a port's mix-up would be (in the last stages'
    1x1 and 2x2 grids the directions scan nearly the same sequence, so one such block alone shows
    little). Measured against the model's own logits with the params in place (the parity test
    compares those with the official ones): a model that reads one direction's params for all
    would move nothing."""
    params = load_torch_checkpoint(GOLDEN / f"{case}.pth", "local_vmamba_tiny", **overrides(case))
    run = forward(case, params)
    base = run(params)
    bound = 10 * 1e-4 * float(np.abs(np.load(GOLDEN / f"{case}.npz")["logits"]).max())
    num_directions = {len(d) for d in META[case]["official_kwargs"]["directions"]}
    assert num_directions == {4}, num_directions  # the families' keys below are built for 4
    for family in ("x_proj", "dt_proj", "A_logs", "Ds"):
        for k in range(4):
            j = (k + 1) % 4
            moved = float(np.abs(run(exchange_directions(params, family, k, j)) - base).max())
            assert moved > bound, (family, k, j, moved, bound)


def orders_without_padding(directions: Sequence[str], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """``block_orders`` with the padding cells of the windowed scans left out of the sequences
    (each direction's order without them, end-padded as before, its reverse re-derived)."""
    padded, _ = BLOCK_ORDERS(directions, h, w)
    orders = [o[o != h * w] for o in (scan_order(d, h, w, pad_index=h * w) for d in directions)]
    return (np.stack([np.pad(o, (0, padded.shape[1] - len(o)), constant_values=h * w) for o in orders]),
            np.stack([np.argsort(o) for o in orders]))


@pytest.mark.parametrize("case", sorted(META))
def test_golden_logits_see_the_window_padding(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The goldens see that the zero cells padding a window's grid stay in the scan: the model
    with them left out moves its logits by well over the parity tolerance, so a port that dropped
    them cannot pass the test above. That variant changes the logits as much as the official code
    did with the padding left out (``drop_window_padding``, the change relative to max|logits|,
    recorded by the generator) up to twice the tolerance, which shows it is the same variant."""
    params = load_torch_checkpoint(GOLDEN / f"{case}.pth", "local_vmamba_tiny", **overrides(case))
    ref = np.load(GOLDEN / f"{case}.npz")["logits"]
    base = logits(case, params)
    monkeypatch.setattr(local_vmamba, "block_orders", orders_without_padding)
    moved = float(np.abs(logits(case, params) - base).max()) / float(np.abs(ref).max())
    assert moved > 10 * 1e-4, moved
    assert abs(moved - META[case]["drop_window_padding"]) <= 2e-4, (moved, META[case]["drop_window_padding"])


@pytest.mark.parametrize("name", ["local_vmamba_tiny", "local_vmamba_small"])
def test_full_size_shapes_match_the_official_state_dict(name: str) -> None:
    """Every key of the official builder's state_dict maps onto our tree with the right shape."""
    official = json.loads((GOLDEN / "official_shapes.json").read_text())[name.replace("vmamba", "vssm")]
    zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in official.items()}
    expected = {p: tuple(s.shape) for p, s in flatten_tree(abstract_params(name)).items()}
    spec = family_spec("local_vmamba")
    _, mismatch = map_state_dict(spec.preprocess(zeros), spec.rules, expected)
    assert not mismatch, mismatch.describe()
    assert sum(np.prod(s) for s in expected.values()) == sum(np.prod(s) for s in official.values())
    inferred = spec.infer_overrides(zeros)
    cfg = create_model(name).cfg
    assert inferred == {k: getattr(cfg, k) for k in inferred}
    assert len(inferred) == 10


def test_vmamba_checkpoint_given_as_local_vmamba_names_its_family() -> None:
    with pytest.raises(CheckpointMismatchError, match="those of a vmamba checkpoint, not a local_vmamba one"):
        load_torch_checkpoint(VMAMBA_CHECKPOINT, "local_vmamba_micro")


def test_local_vmamba_checkpoint_given_as_vmamba_names_its_family() -> None:
    with pytest.raises(CheckpointMismatchError, match="those of a local_vmamba checkpoint, not a vmamba one"):
        load_torch_checkpoint(GOLDEN / "reduced_64.pth", "vmamba_micro")


def test_wrong_sizes_are_explained() -> None:
    with pytest.raises(CheckpointMismatchError) as err:
        load_torch_checkpoint(GOLDEN / "reduced_64.pth", "local_vmamba_tiny")
    hint = str(err.value).split("hint: ")[-1]
    assert "dims=(16, 24, 32, 40)" in hint and "depths=(1, 1, 2, 1)" in hint and "num_classes=10" in hint
