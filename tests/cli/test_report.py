"""``ptq4vm report``: figures, index.html and report.json of a quantized checkpoint, for the
bundled Vim (W8A8 learned, W4A8 PTS-only) and a one-block VMamba, and its refusals."""

import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ptq4vm_jax import load_quantized
from ptq4vm_jax.cli import main
from ptq4vm_jax.quant.params import flatten_layers

DATA = Path(__file__).parents[1] / "data"
W8 = DATA / "report" / "vim_micro_w8a8"  # PTQ4VM W8A8, layers_0 reverted (see its README)
W4 = DATA / "quantized_v1" / "vim_micro_w4a8_pts"  # PTS only, W4A8, on the same 8 calibration images
VMAMBA, VMAMBA_FLOAT = DATA / "report" / "vmamba_small_w8a8", DATA / "report" / "vmamba_small_float"
CALIB = 8  # their calibration images: the first 8 of digits:train


def _report(qdir, out, *more):
    main(["report", "--quantized", str(qdir), "--out", str(out), *more])
    return json.loads((out / "report.json").read_text())


def _check_page(out, report, least=4):
    """index.html shows every figure report.json lists, each a real, readable, non-blank PNG."""
    html = (out / "index.html").read_text()
    shown = re.findall(r"<img src='([^']+)'", html)
    assert shown == [f["file"] for f in report["figures"]] and len(shown) >= least
    for name in shown:
        with Image.open(out / name) as im:
            im.load()
            w, h = im.size
            pixels = np.asarray(im.convert("L"), np.float64)
        assert w >= 480 and h >= 320, (name, im.size)
        assert pixels.std() > 5.0, name  # not a blank canvas
    assert len(re.findall(r"<figcaption>[^<]+</figcaption>", html)) == len(shown)


@functools.cache
def _layers(qdir):
    return flatten_layers(load_quantized(qdir).qlayers)


def _stored(qdir, name):
    return _layers(qdir)[tuple(name.split("/"))]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The Vim reports the tests read: W8A8 without data (into a directory holding an earlier
    report and a file of the user's), W8A8 on 64 test images, W4A8 on the calibration images."""
    root = tmp_path_factory.mktemp("reports")
    earlier = root / "w8"
    earlier.mkdir()
    (earlier / "report.json").write_text(json.dumps({"format": "ptq4vm-jax/report", "figures": [
        {"file": "pts_old.png"}, {"file": "../outside.png"}]}))
    for name in ("pts_old.png", "index.html", "notes.txt"):
        (earlier / name).write_text(name)
    (root / "outside.png").write_text("not the report's")
    out = {}
    for tag, qdir, more in (
            ("w8", W8, []),
            ("w8_data", W8, ["--data", "digits:test", "--limit", "64",
                             "--layers", r"layers_3/mixer/(out_proj|x_proj(_b)?)$"]),
            ("w4_data", W4, ["--data", "digits:train", "--limit", str(CALIB)])):
        main(["report", "--quantized", str(qdir), "--out", str(root / tag), *more])
        out[tag] = (root / tag, json.loads((root / tag / "report.json").read_text()))
    return out


@pytest.mark.slow  # shares the reports fixture: three reports with data
def test_report_without_data_shows_what_the_checkpoint_stores(reports):
    out, report = reports["w8"]
    _check_page(out, report)
    assert report["metrics"] is None and report["data"] is None
    assert "bundled vim_micro" in report["float_params"]
    layer = report["layers"]["layers_3/mixer/out_proj"]  # the default: the last block's out_proj
    assert list(report["layers"]) == ["layers_3/mixer/out_proj"]
    stored = _stored(W8, "layers_3/mixer/out_proj")
    np.testing.assert_array_equal(np.asarray(layer["a_scale"], np.float32), np.asarray(stored.a_scale))
    np.testing.assert_array_equal(np.asarray(layer["a_zero"]), np.asarray(stored.a_zero))
    np.testing.assert_array_equal(np.asarray(layer["smooth"], np.float32), np.asarray(stored.smooth))
    np.testing.assert_array_equal(np.asarray(layer["w_scale"], np.float32), np.asarray(stored.w_scale))
    assert len(layer["w_minmax"]) == len(layer["w_scale"]) == 48
    assert layer["order"]["class_token_index"] == 32  # 8x8 patches, the class token in the middle
    assert layer["state"] == "after JLSS"
    summary = json.loads((W8 / "metadata.json").read_text())["calibration"]["stages"]
    blocks = report["block_loss"]["blocks"]
    assert [b["block"] for b in blocks] == [s["name"] for s in summary] == [f"layers_{i}" for i in range(4)]
    for key in ("loss_init", "loss_learned", "loss_final", "reverted"):
        assert [b[key] for b in blocks] == [s[key] for s in summary]
    assert [b["reverted"] for b in blocks] == [True, False, False, False]
    err = report["layer_error"]
    assert err["output_sqnr_db"] is None and len(err["layers"]) == 24
    assert err["layers"][:6] == [f"layers_0/mixer/{n}" for n in  # the order the model calls them
                                 ("in_proj", "x_proj", "dt_proj", "x_proj_b", "dt_proj_b", "out_proj")]
    assert all(25.0 < v < 80.0 for v in err["weight_sqnr_db"])  # 8-bit weights: ~6 dB per bit


@pytest.mark.slow  # shares the reports fixture: three reports with data
def test_an_earlier_report_is_replaced_and_nothing_else_touched(reports, capsys):
    out, report = reports["w8"]
    assert not (out / "pts_old.png").exists()  # the earlier report's figure
    assert (out / "notes.txt").read_text() == "notes.txt"  # the user's file
    assert (out.parent / "outside.png").read_text() == "not the report's"  # listed, but not in --out
    assert (out / "index.html").read_text().startswith("<!DOCTYPE html>")


@pytest.mark.slow  # shares the reports fixture: three reports with data
def test_report_with_data_compares_with_the_float_model(reports):
    out, report = reports["w8_data"]
    _check_page(out, report, least=11)  # 3 profiles, 3 σ, 3 w_scale, x_proj/x_proj_b, loss, error
    m = report["metrics"]
    assert m["images"] == report["data"]["images"] == 64
    assert 90.0 <= m["float_top1"] <= 100.0 and 90.0 <= m["agreement"] <= 100.0 and 0.0 <= m["mean_kl"] < 0.1
    entry = report["layers"]["layers_3/mixer/out_proj"]
    stored = _stored(W8, "layers_3/mixer/out_proj")
    np.testing.assert_array_equal(np.asarray(entry["a_scale"], np.float32), np.asarray(stored.a_scale))
    rng = entry["float_range"]
    assert len(rng["min"]) == 65 and all(a < b for a, b in zip(rng["min"], rng["max"], strict=True))
    assert len(entry["init"]["smooth"]) == len(entry["smooth"])
    back = report["layers"]["layers_3/mixer/x_proj_b"]["order"]
    assert back["class_token_index"] == 64 - 32  # the backward branch sees the sequence flipped
    assert report["directions"] == {"layers_3/mixer/x_proj": ["layers_3/mixer/x_proj",
                                                              "layers_3/mixer/x_proj_b"]}
    err = report["layer_error"]
    for key in ("output_sqnr_db", "alone_sqnr_db"):
        assert all(np.isfinite(v) and 0.0 < v < 80.0 for v in err[key]), key
    # a layer's own error is at most what reaches its output through the quantized model (+ slack)
    assert np.mean(err["alone_sqnr_db"]) >= np.mean(err["output_sqnr_db"]) - 1.0


@pytest.mark.slow  # shares the reports fixture: three reports with data
def test_w4_report_recomputes_the_stored_init_on_the_calibration_images(reports):
    """A PTS-only checkpoint stores its initialisation: recomputed on the calibration images it
    comes back; and 4-bit weights lose more than 8-bit ones of the same model."""
    out, report = reports["w4_data"]
    _check_page(out, report)
    entry = report["layers"]["layers_3/mixer/out_proj"]
    assert entry["state"] == "PTS init, no learning"
    np.testing.assert_allclose(entry["init"]["smooth"], entry["smooth"], rtol=1e-5)
    np.testing.assert_allclose(entry["init"]["a_scale"], entry["a_scale"], rtol=1e-4)
    np.testing.assert_array_equal(entry["init"]["a_zero"], entry["a_zero"])
    np.testing.assert_allclose(entry["init"]["w_scale"], entry["w_scale"], rtol=1e-5)
    # the grid search never picks a step above the min-max one (its largest candidate)
    assert all(s <= m * (1 + 1e-6) for s, m in zip(entry["w_scale"], entry["w_minmax"], strict=True))
    assert report["block_loss"]["blocks"][0]["loss_learned"] is None
    w8, w4 = reports["w8_data"][1]["layer_error"], report["layer_error"]
    assert all(a > b for a, b in zip(w8["weight_sqnr_db"], w4["weight_sqnr_db"], strict=True))
    assert np.mean(w8["weight_sqnr_db"]) > np.mean(w4["weight_sqnr_db"]) + 12.0  # ~6 dB per bit
    assert np.mean(w8["output_sqnr_db"]) > np.mean(w4["output_sqnr_db"])


def test_vmamba_report_shows_each_scan_direction(tmp_path):
    out = tmp_path / "r"
    main(["report", "--quantized", str(VMAMBA), "--out", str(out), "--params", str(VMAMBA_FLOAT)])
    report = json.loads((out / "report.json").read_text())
    _check_page(out, report, least=6)  # out_proj's profile, σ and w_scale, the directions, loss, error
    names = [f"layers_0/blocks_0/op/x_proj_{k}" for k in range(4)]
    assert list(report["layers"]) == ["layers_0/blocks_0/op/out_proj", *names]
    assert report["directions"] == {"layers_0/blocks_0/op/x_proj": names}
    assert [f["file"] for f in report["figures"]] == [
        "pts_layers_0_blocks_0_op_out_proj.png", "smooth_layers_0_blocks_0_op_out_proj.png",
        "wstep_layers_0_blocks_0_op_out_proj.png", "directions_layers_0_blocks_0_op_x_proj.png",
        "block_loss.png", "layer_error.png"]
    for k, name in enumerate(names):
        entry = report["layers"][name]
        stored = _stored(VMAMBA, name)
        np.testing.assert_array_equal(np.asarray(entry["a_scale"], np.float32), np.asarray(stored.a_scale))
        assert entry["order"]["direction"] == ("row-major", "column-major", "reversed row-major",
                                               "reversed column-major")[k]
        assert entry["order"]["class_token_index"] is None and entry["order"]["grid"] == [4, 4]
        a, grid = entry["a_scale"], np.asarray(entry["a_scale_on_grid"])
        for r in range(4):
            for c in range(4):  # token (r, c) of the 4x4 grid, in direction k's scan order
                index = {0: 4 * r + c, 1: 4 * c + r, 2: 15 - (4 * r + c), 3: 15 - (4 * c + r)}[k]
                assert grid[r, c] == a[index]
    assert report["block_loss"]["blocks"][0]["block"] == "layers_0/blocks_0"
    assert len(report["layer_error"]["layers"]) == 12


def test_bad_inputs_are_refused_in_one_line(tmp_path, capsys):
    def refused(args, message):
        with pytest.raises(SystemExit) as e:
            main(["report", *args])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err

    q = str(W8)
    refused(["--quantized", str(DATA / "report"), "--out", str(tmp_path / "a")],
            "is not a quantized checkpoint: it has no readable metadata.json (it holds checkpoints: "
            "vim_micro_w8a8, vmamba_small_float, vmamba_small_w8a8)")
    refused(["--quantized", str(VMAMBA_FLOAT), "--out", str(tmp_path / "a")], "holds float params")
    refused(["--quantized", q, "--out", str(tmp_path / "a"), "--layers", "fc9"],
            "--layers 'fc9' matches none of the 24 quantized layers (layers_0/mixer/dt_proj, ")
    refused(["--quantized", q, "--out", str(tmp_path / "a"), "--layers", "(out"], "is not a valid regex")
    refused(["--quantized", q, "--out", str(tmp_path / "a"), "--params", str(VMAMBA_FLOAT)],
            f"holds vmamba_micro, but --quantized {q} holds vim_micro")
    refused(["--quantized", q, "--out", q], f"--out {q} is the same path as --quantized")
    refused(["--quantized", q, "--out", q + "/figs"], "is inside --quantized")
    (tmp_path / "file").write_text("x")
    refused(["--quantized", q, "--out", str(tmp_path / "file")], "is an existing file")
    refused(["--quantized", q, "--out", str(tmp_path)], "holds other files (file) and no report")
    refused(["--quantized", str(VMAMBA), "--out", str(tmp_path / "a"), "--data", "digits:test"],
            "--data compares the quantized model with the float one")
    refused(["--quantized", q, "--out", str(tmp_path / "a"), "--limit", "10", "--batch-size", "5"],
            "--limit and --batch-size choose the images of --data, and there is no --data; add --data or "
            "drop them")
    assert not (tmp_path / "a").exists() and (tmp_path / "file").read_text() == "x"
    assert sorted(p.name for p in Path(q).iterdir()) == ["metadata.json", "params"]


def test_a_figure_is_laid_out_and_drawn_once_as_matplotlib_would_save_it(tmp_path, monkeypatch):
    """The report's figures execute their constrained layout once and draw once; the PNG is the
    one matplotlib's own ``savefig`` writes (which draws twice: once only to lay out)."""
    from matplotlib.figure import Figure

    from ptq4vm_jax.report import figures

    def make() -> Figure:
        fig = Figure(figsize=(6, 4), dpi=figures.DPI, layout="constrained")
        top, bottom = fig.subplots(2, 1, sharex=True)
        top.plot(np.arange(20), np.sin(np.arange(20)), label="a curve")
        top.set_title("a title long enough to need the margins")
        top.legend()
        bottom.step(np.arange(20), np.arange(20) ** 2, where="mid")
        bottom.set_ylabel("a y label")
        bottom.set_xlabel("token position")
        return fig

    make().savefig(tmp_path / "matplotlib.png", dpi=figures.DPI, facecolor="white")
    draws = []
    draw = Figure.draw
    monkeypatch.setattr(Figure, "draw", lambda self, renderer: (draws.append(1), draw(self, renderer))[1])
    figures._save(make(), tmp_path / "ours.png")
    assert len(draws) == 1
    assert (tmp_path / "ours.png").read_bytes() == (tmp_path / "matplotlib.png").read_bytes()


def test_an_interrupted_or_failed_report_leaves_the_earlier_one(tmp_path, capsys, monkeypatch):
    """The new report is made beside --out and moved in whole, so a Ctrl-C or an error in the
    middle leaves the earlier report as it was and nothing of the new one, not even its directory."""
    import ptq4vm_jax.report

    out = tmp_path / "rep"
    out.mkdir()
    earlier = {"report.json": json.dumps({"format": "ptq4vm-jax/report", "figures": [{"file": "old.png"}]}),
               "index.html": "earlier", "old.png": "earlier figure", "notes.txt": "mine"}
    for name, text in earlier.items():
        (out / name).write_text(text)

    for stop, code in ((KeyboardInterrupt, 130), (OSError(28, "No space left on device"), 2)):
        def half_written(qp, staging, stop=stop, **kwargs):
            (Path(staging) / "index.html").write_text("half of a new report")
            (Path(staging) / "pts_new.png").write_text("half")
            raise stop

        monkeypatch.setattr(ptq4vm_jax.report, "make_report", half_written)
        with pytest.raises(SystemExit) as e:
            main(["report", "--quantized", str(W8), "--out", str(out)])
        assert e.value.code == code
        assert {p.name: p.read_text() for p in out.iterdir()} == earlier
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"], "a staging directory was left"
    assert "replaced once the new one is complete" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):  # a new --out, and its parent, are made only at the end
        main(["report", "--quantized", str(W8), "--out", str(tmp_path / "new" / "rep")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"], "new directories were left"


def test_a_symlinked_out_is_staged_beside_where_it_points(tmp_path, monkeypatch):
    """The new report is made beside the directory a symlinked --out points to, on that disk:
    beside the link it could lie on another file system, where the final move would fail."""
    import ptq4vm_jax.report

    real = tmp_path / "elsewhere" / "rep"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    staged = []

    def stop(qp, staging, **kwargs):
        staged.append(Path(staging))
        raise KeyboardInterrupt

    monkeypatch.setattr(ptq4vm_jax.report, "make_report", stop)
    with pytest.raises(SystemExit):
        main(["report", "--quantized", str(W8), "--out", str(tmp_path / "link")])
    assert staged[0].parent == real.parent and not staged[0].exists()


def test_report_out_through_a_symlink_into_an_input_is_refused(tmp_path, capsys):
    """Paths are compared resolved: a link, or "..", does not hide that --out is inside an input."""
    import shutil

    q = tmp_path / "q"
    shutil.copytree(W8, q)
    (tmp_path / "link").symlink_to(q)
    for out in (tmp_path / "link" / "figs", tmp_path / "other" / ".." / "q" / "figs"):
        with pytest.raises(SystemExit) as e:
            main(["report", "--quantized", str(q), "--out", str(out)])
        assert e.value.code == 2 and "is inside --quantized" in capsys.readouterr().err
    assert sorted(p.name for p in q.iterdir()) == ["metadata.json", "params"]
    assert not (tmp_path / "other").exists()


def test_a_float_model_other_than_the_checkpoints_source_is_refused(tmp_path, capsys):
    """The float model a report compares with must be the one the checkpoint was quantized from:
    the float parameters the checkpoint keeps (norms, embeddings, the scans' A and D) must match.
    Another model of the same architecture would make every comparison meaningless."""
    from ptq4vm_jax import load_params, save_params

    params, meta = load_params(Path(__file__).parents[2] / "ptq4vm_jax" / "assets" / "vim_micro")
    params["norm_f"]["weight"] = np.asarray(params["norm_f"]["weight"]) * 1.01
    save_params(tmp_path / "other", params, model_name=meta["model_name"])
    with pytest.raises(SystemExit) as e:
        main(["report", "--quantized", str(W8), "--out", str(tmp_path / "r"), "--params",
              str(tmp_path / "other")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert ("the float params are not those this checkpoint was quantized from: 1 of the 43 float parameters "
            "it keeps differ (norm_f/weight); pass the float model it was quantized from "
            "(float_params: --params or --checkpoint on the command line)") in err, err
    assert not (tmp_path / "r").exists()


def test_the_float_model_check_compares_in_the_stored_dtype_and_misses_nothing():
    """A checkpoint quantized from bf16 params keeps them in bf16: the float32 originals match
    it; a float tree lacking the kept parameters does not."""
    import jax
    import ml_dtypes

    from ptq4vm_jax import load_params
    from ptq4vm_jax.errors import ArgumentError
    from ptq4vm_jax.report.build import check_float_params

    qp = load_quantized(W8)
    params, _ = load_params(Path(__file__).parents[2] / "ptq4vm_jax" / "assets" / "vim_micro")
    check_float_params(qp, params)
    as_bf16 = qp.replace(params=jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), qp.params))
    check_float_params(as_bf16, params)
    with pytest.raises(ArgumentError, match=r"43 of the 43 float parameters it keeps differ"):
        check_float_params(qp, {"unrelated": np.zeros(3)})
