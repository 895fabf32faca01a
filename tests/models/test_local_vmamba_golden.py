"""Parity of our Flax LocalVMamba with the official hunto/LocalMamba ``VSSM`` (golden logits).

``tests/data/local_vmamba_golden/`` holds official-format checkpoints of two reduced configs
and the official model's logits on them (run on the CPU, see the README there), and the
official ``local_vssm_tiny``/``local_vssm_small`` state-dict key -> shape lists.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from convert import CheckpointMismatchError, family_spec
from convert.mapping import map_state_dict
from ptq4vm_jax import create_model, load_torch_checkpoint
from ptq4vm_jax.checkpoint import abstract_params
from ptq4vm_jax.trees import flatten_tree

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "local_vmamba_golden"
META = json.loads((GOLDEN / "configs.json").read_text())["cases"]
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
VMAMBA_CHECKPOINT = GOLDEN.parent / "vmamba_golden" / "reduced_v2v.pth"


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


def logits(case: str, params: dict) -> np.ndarray:
    """Compiled at XLA's lowest optimisation level: the same function in a third of the time."""
    model = create_model("local_vmamba_tiny", **overrides(case))
    images = np.load(GOLDEN / f"{case}.npz")["images"].astype(np.float32)
    compiled = jax.jit(model.apply).lower({"params": params}, images).compile(FAST_COMPILE)
    return np.asarray(compiled({"params": params}, images))


@pytest.mark.parametrize("case", sorted(META))
def test_reduced_checkpoint_matches_official(case: str) -> None:
    """Official .pth ({'model': sd} and {'state_dict': sd}, read with the default key) ->
    converter -> logits equal to the official model's. The cases scan windows that pad their
    grid (w7 on 16/8/4/2-token sides, w2 on 7x7 and 1x1), flipped and not, in every stage."""
    assert META[case]["checkpoint_entry"] in ("model", "state_dict")
    params = load_torch_checkpoint(GOLDEN / f"{case}.pth", "local_vmamba_tiny", **overrides(case))
    assert_logits_close(logits(case, params), np.load(GOLDEN / f"{case}.npz")["logits"])


def test_golden_data_sees_every_direction_and_the_window_padding() -> None:
    """10% noise on any one parameter family (each scan direction's own included) moves the
    official logits by more than the 1e-4 tolerance, and so does leaving the padded cells out of
    the windowed scans: a port that got any of them wrong would fail the test above."""
    for case, meta in META.items():
        assert meta["drop_window_padding"] > 30 * 1e-4, case
        sens = meta["sensitivity"]
        for part in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"):
            assert {f"layers.blocks.op.{part}[{k}]" for k in range(4)} <= set(sens), (case, part)
        assert "layers.blocks.op.multi_scan.attn.channel_select.weight" in sens
        assert min(sens.values()) > 1.5e-4, (case, min(sens.items(), key=lambda kv: kv[1]))


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
