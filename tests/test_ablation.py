"""``experiments/ablation.py``: its machinery on a tiny grid (outputs, resume, refusal of other cell
settings, reuse of cells by another grid), a real cell reproduced by a rerun, and its paired tests
against scipy and hand-computed values."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--models", "vim_micro", "--bits", "W4A8", "--methods", "rtn,pts,jlss_cos", "--draws", "2",
        "--calib-size", "8", "--limit", "24"]


def load_ablation():
    if "ablation" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ablation", ROOT / "experiments" / "ablation.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["ablation"] = module
        spec.loader.exec_module(module)
    return sys.modules["ablation"]


ab = load_ablation()


class FakeRun:
    """Stands in for ``ModelRun`` in the machinery tests: logits that are a deterministic function
    of the draw's images and the method, instead of a calibration (the last test runs a real one)."""

    calls: list = []

    def __init__(self, name: str, limit: int | None) -> None:
        self.name = name
        self.test_y = ab.test_labels(limit)
        self.fp_logits = np.random.default_rng(7).normal(size=(self.test_y.size, 10))

    def cell(self, bits: str, method: str, draw: int, settings: dict) -> dict:
        FakeRun.calls.append((bits, method, draw))
        idx = ab.draw_indices(settings["seed"], draw, 1442, settings["calib_size"])
        noise = list(ab.METHODS).index(method) + 1 + int(idx.sum()) % 7
        logits = self.fp_logits + np.random.default_rng(noise).normal(scale=0.5, size=self.fp_logits.shape)
        preds = logits.argmax(-1)
        kl = ab.kl_per_row(self.fp_logits, logits)
        return {"model": self.name, "bits": bits, "method": method, "draw": draw,
                "top1": 100 * float(np.mean(preds == self.test_y)),
                "agreement": 100 * float(np.mean(preds == self.fp_logits.argmax(-1))), "kl": float(kl.mean()),
                "cosine": float(ab.logit_cosine(self.fp_logits, logits).mean()), "seconds": 0.0,
                "reverted_blocks": 0, "calib_first_indices": idx[:5].tolist(),
                "preds": preds.tolist(), "image_kl": kl.tolist()}


@pytest.fixture
def fake_runs(monkeypatch):
    monkeypatch.setattr(ab, "ModelRun", FakeRun)
    monkeypatch.setattr(ab, "_RUNS", {})
    FakeRun.calls = []
    return FakeRun.calls


@pytest.fixture
def tiny_run(tmp_path, fake_runs, capsys):
    out = tmp_path / "out"
    argv = [*ARGS, "--out", str(out)]
    summary = ab.main(argv)
    return out, argv, summary | {"printed": capsys.readouterr().out}


def test_tiny_grid_writes_every_output(tiny_run):
    out, argv, summary = tiny_run
    names = ("settings.json", "cells.jsonl", "results.csv", "summary.json", "table.md", "ablation_kl.png")
    for name in names:
        assert (out / name).is_file(), name
    assert "| vim_micro | W4A8 | jlss_cos vs pts | 2 |" in (out / "table.md").read_text()
    lines = (out / "cells.jsonl").read_text().splitlines()
    assert len(lines) == 6  # 1 model x 1 bit width x 3 methods x 2 draws
    cells = [json.loads(line) for line in lines]
    assert {(c["method"], c["draw"]) for c in cells} == {(m, d) for m in ("rtn", "pts", "jlss_cos")
                                                          for d in (0, 1)}
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 4 and csv_rows[0].startswith("model,bits,method,draws,top1_mean")
    rows = {r["method"]: r for r in summary["rows"]}
    rtn = [c["kl"] for c in cells if c["method"] == "rtn"]
    assert rows["rtn"]["draws"] == 2 and np.isclose(rows["rtn"]["kl_mean"], np.mean(rtn))
    assert np.isclose(rows["rtn"]["kl_std"], np.std(rtn, ddof=1))
    # the pairs run on both sides: JLSS vs PTS-only and PTS-only vs RTN, not cosine vs MSE
    pairs = [(t["a"], t["b"]) for t in summary["paired_tests"]]
    assert pairs == [("jlss_cos", "pts"), ("pts", "rtn")]
    test = summary["paired_tests"][1]
    pts = [c["kl"] for c in cells if c["method"] == "pts"]
    assert np.isclose(test["draw_t"]["mean_diff"], np.mean(pts) - np.mean(rtn))
    assert len(test["mcnemar_p"]) == 2 and test["images"] == 24
    settings = json.loads((out / "settings.json").read_text())
    assert settings["grid"]["draws"] == 2 and settings["cells"]["calib_size"] == 8
    env = settings["runs"][0]["env"]
    assert env["command"].endswith(" ".join(argv)) and env["jax"] and env["machine"]["cpus"]
    import matplotlib.image

    png = matplotlib.image.imread(out / "ablation_kl.png")
    assert png.shape[0] >= 320 and png.shape[1] >= 480 and png[..., :3].std() > 0.01
    printed = summary["printed"]
    assert "0 cells done" in printed and "[6/6] vim_micro W4A8 jlss_cos draw 1" in printed
    assert "6/6 cells" in printed and "jlss_cos vs pts" in printed and "KL to FP" in printed


def test_resume_skips_done_cells_and_redoes_a_cut_off_one(tiny_run, fake_runs, capsys):
    out, argv, _ = tiny_run
    path = out / "cells.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    last = json.loads(lines[-1])
    path.write_text("".join(lines[:-1]) + lines[-1][:40])  # a write cut short by a kill
    fake_runs.clear()
    ab.main(argv)
    assert "5 cells done" in capsys.readouterr().out
    assert fake_runs == [(last["bits"], last["method"], last["draw"])]
    assert [json.loads(line) for line in path.read_text().splitlines()][-1] == last
    fake_runs.clear()
    ab.main(argv)
    assert fake_runs == [] and "6 cells done in" in capsys.readouterr().out
    runs = json.loads((out / "settings.json").read_text())["runs"]
    assert [r["cells_run"] for r in runs] == [6, 1, 0]


def test_resume_refuses_other_cell_settings_and_reuses_cells_of_another_grid(tiny_run, fake_runs, capsys):
    out, argv, _ = tiny_run
    with pytest.raises(SystemExit, match=r"other settings \(seed: saved 0, now 1\).*or give a new --out"):
        ab.main([*argv, "--seed", "1"])
    with pytest.raises(SystemExit, match="calib_size: saved 8, now 16"):
        ab.main([*argv, "--calib-size", "16"])
    with pytest.raises(SystemExit, match="epochs: saved"):
        ab.main([*argv, "--epochs", "3"])
    fake_runs.clear()
    summary = ab.main([*argv, "--draws", "3", "--methods", "rtn,pts"])  # a third draw of two methods
    assert sorted(fake_runs) == [("W4A8", "pts", 2), ("W4A8", "rtn", 2)]
    assert [(r["method"], r["draws"]) for r in summary["rows"]] == [("rtn", 3), ("pts", 3)]
    assert "6 cells done in" in capsys.readouterr().out
    fake_runs.clear()
    summary = ab.main([*argv, "--draws", "4", "--summary-only"])
    assert fake_runs == [] and summary["cells_done"] == 8 and summary["cells_expected"] == 12
    assert "8 cells done in" in capsys.readouterr().out


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="--methods: unknown"):
        ab.parse_args(["--methods", "rtn,jlss"])
    with pytest.raises(SystemExit, match="--epochs must be an integer"):
        ab.parse_args(["--epochs", "vim_micro=x"])
    with pytest.raises(SystemExit, match="--epochs names 'vim'"):
        ab.parse_args(["--epochs", "vim=3"])
    assert ab.parse_args(["--epochs", "vim_micro=3", "--models", "vim_micro"]).epochs == {
        "vim_micro": 3, "vmamba_micro": None}


def test_draws_are_seeded_distinct_subsets():
    a = ab.draw_indices(0, 0, 1442, 256)
    assert np.array_equal(a, ab.draw_indices(0, 0, 1442, 256))
    assert len(set(a.tolist())) == 256 and a.max() < 1442
    assert not np.array_equal(np.sort(a), np.sort(ab.draw_indices(0, 1, 1442, 256)))
    assert not np.array_equal(a, ab.draw_indices(1, 0, 1442, 256))


def test_append_cell_drops_a_cut_off_tail(tmp_path):
    path = tmp_path / "cells.jsonl"
    rec = {"model": "m", "bits": "W8A8", "method": "rtn", "draw": 0}
    ab.append_cell(path, rec)
    path.write_text(path.read_text() + '{"model": "m", "bi')
    assert list(ab.load_cells(path)) == [("m", "W8A8", "rtn", 0)]
    ab.append_cell(path, rec | {"draw": 1})
    assert list(ab.load_cells(path)) == [("m", "W8A8", "rtn", 0), ("m", "W8A8", "rtn", 1)]


def test_paired_tests_match_scipy_and_hand_values():
    from scipy import stats

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=6), rng.normal(size=6)
    ours = ab.paired_t(a, b)
    ref = stats.ttest_rel(a, b)
    assert np.isclose(ours["t"], ref.statistic) and np.isclose(ours["p_value"], ref.pvalue)
    # hand: d = (1, 2, 3); mean 2, sd 1, t = 2 / (1 / sqrt 3) = 2 sqrt 3 with 2 degrees of freedom
    hand = ab.paired_t([2, 4, 6], [1, 2, 3])
    assert np.isclose(hand["t"], 2 * np.sqrt(3))
    assert np.isclose(hand["p_value"], 1 - 2 * np.sqrt(3) / np.sqrt(2 + 12))  # t_2 has a closed form
    assert ab.paired_t([1, 2], [1, 2])["p_value"] == 1.0

    # exact signed rank: 5 positive differences, the most extreme of 32 sign patterns at each end
    assert ab.signed_rank([1, 2, 3, 4, 5], [0] * 5) == {"n": 5, "w_plus": 15.0, "p_value": 2 / 32,
                                                        "exact": True}
    # d = (-1, 2, 3, -4, 5, 6): W+ = 2 + 3 + 5 + 6 = 16 of 21; patterns with |W+ - 10.5| >= 5.5
    x, y = rng.normal(size=9), rng.normal(size=9)
    assert np.isclose(ab.signed_rank(x, y)["p_value"], stats.wilcoxon(x, y, method="exact").pvalue)
    assert np.isclose(ab.signed_rank([-1, 2, 3, -4, 5, 6], [0] * 6)["p_value"],
                      stats.wilcoxon([-1, 2, 3, -4, 5, 6], method="exact").pvalue)
    # the normal approximation on many images, with ties and zero differences
    u = np.round(rng.normal(size=300), 1)
    v = np.round(rng.normal(0.1, 1, size=300), 1)
    ours = ab.signed_rank(u, v)
    ref = stats.wilcoxon(u, v, method="approx", correction=False, zero_method="wilcox")
    assert not ours["exact"] and np.isclose(ours["p_value"], ref.pvalue, rtol=1e-6)

    # McNemar: only a right on 4, only b right on 1 -> 2 * (1 + 5) / 32
    labels = np.zeros(10, int)
    pa = np.array([0, 0, 0, 0, 1, 0, 0, 0, 1, 1])
    pb = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1])
    m = ab.paired_top1(labels, pa, pb)
    assert (m["only_a"], m["only_b"]) == (4, 1) and np.isclose(m["p_value"], 12 / 32)


def test_logit_cosine_by_hand():
    """(The per-image KL is ``ptq4vm_jax.compare.kl_per_row``, checked by hand in test_evaluate.py.)"""
    cos = ab.logit_cosine(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[2.0, 0.0], [1.0, -1.0]]))
    assert np.allclose(cos, [1.0, 0.0])


@pytest.mark.slow  # a real calibration and evaluation, twice
def test_a_real_cell_is_reproduced_by_a_rerun():
    """One real calibration (RTN, 8 images) of the bundled model, evaluated, then done again."""
    run = ab.ModelRun("vim_micro", 16)
    grid = {"seed": 0, "calib_size": 8, "epochs": {"vim_micro": None}}
    first = run.cell("W4A8", "rtn", 1, grid)
    assert first["calib_first_indices"] == ab.draw_indices(0, 1, 1442, 8)[:5].tolist()
    assert len(first["preds"]) == 16 and 0 < first["kl"] < 1 and first["top1"] >= 50
    assert first["agreement"] == 100 * np.mean(np.array(first["preds"]) == run.fp_logits.argmax(-1))
    again = run.cell("W4A8", "rtn", 1, grid)
    for key in ("top1", "agreement", "kl", "cosine", "preds", "image_kl"):
        assert again[key] == first[key], key
