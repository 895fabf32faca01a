"""The README's first command: `ptq4vm demo` on the bundled vim_micro, with the issue's criteria.

The demo runs in-process with its recipe at ``DEMO_EPOCHS`` epoch instead of its 12: the same
code path (both bit widths, RTN and PTQ4VM, the table, the paired test, the checkpoints) at a
twelfth of the learning steps, and the criteria below hold there already.
"""

import math
import re

import pytest

from ptq4vm_jax import load_quantized
from ptq4vm_jax.cli import main

DEMO_EPOCHS = 1
# The demo's time goes into calibrating and evaluating, not compiling.
pytestmark = pytest.mark.xla_optimized


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["demo", "--out", str(out), "--quiet", "--epochs", str(DEMO_EPOCHS)])
    text = buf.getvalue()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^(float32|RTN W\dA\d|PTQ4VM W\dA\d)\s+([\d.]+)\s+([\d.]+)\s+([\d.e+-]+)", line)
        if m:
            rows[m.group(1)] = dict(top1=float(m.group(2)), agree=float(m.group(3)), kl=float(m.group(4)))
    return out, rows, text


@pytest.mark.slow  # needs the whole demo run
def test_demo_prints_every_row_and_saves_checkpoints(demo):
    out, rows, _ = demo
    assert set(rows) == {"float32", "RTN W8A8", "PTQ4VM W8A8", "RTN W4A8", "PTQ4VM W4A8"}
    for name in ("rtn_w8a8", "ptq4vm_w8a8", "rtn_w4a8", "ptq4vm_w4a8"):
        assert (out / "vim_micro" / name / "metadata.json").exists()


def test_demo_refuses_an_unusable_out_before_calibrating(tmp_path, capsys):
    (tmp_path / "vim_micro" / "ptq4vm_w4a8").mkdir(parents=True)
    (tmp_path / "vim_micro" / "ptq4vm_w4a8" / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path), "--quiet"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "ptq4vm_w4a8 exists and is not a ptq4vm-jax checkpoint" in captured.err
    assert "==" not in captured.out  # no run started


@pytest.mark.slow  # needs the whole demo run
def test_float_model_is_accurate(demo):
    assert demo[1]["float32"]["top1"] >= 95.0


@pytest.mark.slow  # needs the whole demo run
def test_ptq4vm_w8a8_keeps_the_float_model(demo):
    rows = demo[1]
    assert abs(rows["PTQ4VM W8A8"]["top1"] - rows["float32"]["top1"]) <= 0.5
    assert rows["PTQ4VM W8A8"]["agree"] >= 99.0


@pytest.mark.slow  # needs the whole demo run
def test_ptq4vm_w4a8_beats_round_to_nearest(demo):
    """On KL to the float logits; its agreement with the float predictions is not one image worse.

    Top-1 is not compared: on 355 test images one image is 0.28 points, and the two W4A8 models
    differ from the float one by a handful of borderline images, so the top-1 order is decided by
    single images. So is agreement, which can move by one image either way with float-ulp changes
    of the initialisation. KL resolves the difference: RTN's single 8-bit activation range is
    nearly lossless on a model without activation outliers, but its 4-bit weights are not.
    """
    rows = demo[1]
    assert rows["PTQ4VM W4A8"]["kl"] < 0.5 * rows["RTN W4A8"]["kl"]
    one_image = 100 / 355
    assert rows["PTQ4VM W4A8"]["agree"] >= rows["RTN W4A8"]["agree"] - one_image - 1e-6


@pytest.mark.slow  # needs the whole demo run
def test_demo_reports_a_paired_top1_test_consistent_with_its_table(demo):
    _, rows, text = demo
    for bits in ("W8A8", "W4A8"):
        m = re.search(rf"^{bits} top-1, PTQ4VM vs RTN: PTQ4VM alone right on (\d+), RTN alone right "
                      rf"on (\d+); exact McNemar p = ([\d.]+)$", text, re.M)
        assert m, f"no paired test line for {bits}"
        only_ptq, only_rtn, p = int(m.group(1)), int(m.group(2)), float(m.group(3))
        gap = rows[f"PTQ4VM {bits}"]["top1"] - rows[f"RTN {bits}"]["top1"]
        assert gap == pytest.approx(100 * (only_ptq - only_rtn) / 355, abs=0.01)
        # exact two-sided McNemar: twice the binomial(n, 1/2) tail at the smaller count, at most 1
        n = only_ptq + only_rtn
        tail = sum(math.comb(n, i) for i in range(min(only_ptq, only_rtn) + 1)) / 2**n
        assert p == pytest.approx(min(1.0, 2 * tail), abs=5e-4)  # printed with 3 decimals


@pytest.mark.slow  # needs the whole demo run
def test_jlss_lowers_every_block_loss_on_the_micro_model(demo):
    out = demo[0]
    for name in ("ptq4vm_w8a8", "ptq4vm_w4a8"):
        stages = load_quantized(out / "vim_micro" / name).summary["stages"]
        assert len(stages) == 4
        for s in stages:
            assert s["loss_final"] < s["loss_init"], (name, s)


@pytest.mark.parametrize("model", ["vim_micro", "vmamba_micro"])
def test_demo_with_no_learning_names_what_it_runs(model):
    """``--epochs 0`` runs PTQ4VM's initialisation alone: its rows and checkpoints say PTS, and
    resolving its configs warns of no learning rate it never used."""
    import warnings

    from ptq4vm_jax.cli.demo import demo_runs
    from ptq4vm_jax.models import model_family

    runs = demo_runs(model, 0)
    assert [label for label, _ in runs] == ["RTN W8A8", "PTS W8A8", "RTN W4A8", "PTS W4A8"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [cfg.resolve(model_family(model)).method for _, cfg in runs] == ["rtn", "pts_only"] * 2
    learned = demo_runs(model, None)
    assert [label for label, _ in learned] == ["RTN W8A8", "PTQ4VM W8A8", "RTN W4A8", "PTQ4VM W4A8"]
    assert all(cfg.resolve(model_family(model)).learns for _, cfg in learned[1::2])
