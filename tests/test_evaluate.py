import importlib.util
import io
import math
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ptq4vm_jax import create_model
from ptq4vm_jax.checkpoint import load_params
from ptq4vm_jax.compare import compare_logits, kl_per_row, paired_top1
from ptq4vm_jax.data import eval_batches, load_digits_dataset
from ptq4vm_jax.evaluate import evaluate


def one_hot_logits(pred, classes=10):
    return np.eye(classes, dtype=np.float32)[pred]


def test_evaluate_counts_only_masked_rows():
    # Images carry the predicted class in their first pixel; padding rows would predict 0.
    labels = np.array([1, 2, 3, 4, 5, 6, 7])
    preds = np.array([1, 2, 0, 4, 0, 6, 7])  # 5 of 7 right
    x = np.zeros((7, 2, 2, 3), np.float32)
    x[:, 0, 0, 0] = preds
    fn = lambda images: one_hot_logits(images[:, 0, 0, 0].astype(int))
    out = evaluate(fn, eval_batches((x, labels), 4, image_size=2), progress=False)
    assert out["n"] == 7
    assert out["top1"] == pytest.approx(100 * 5 / 7)


def test_top5_and_plain_two_tuples():
    logits = np.tile(np.arange(10, dtype=np.float32)[::-1], (4, 1))  # ranking 0, 1, 2, ...
    labels = np.array([0, 4, 5, 9])
    out = evaluate(lambda _: logits, [(np.zeros(4), labels)], progress=False)
    assert out["top1"] == 25.0 and out["top5"] == 50.0 and out["n"] == 4


def test_fewer_than_five_classes_top5_is_top_all():
    logits = np.array([[0.0, 1.0, 2.0]])
    out = evaluate(lambda _: logits, [(None, np.array([0]))], progress=False)
    assert out["top1"] == 0.0 and out["top5"] == 100.0


def test_num_examples_caps_evaluation():
    labels = np.zeros(6, int)
    preds = np.array([0, 0, 0, 1, 1, 1])
    batches = [(preds[:4], labels[:4]), (preds[4:], labels[4:])]
    out = evaluate(lambda p: one_hot_logits(p), batches, num_examples=3, progress=False)
    assert out == {"top1": 100.0, "top5": 100.0, "n": 3}


def test_progress_in_a_log_is_a_few_plain_lines(capsys):
    """stderr captured (not a terminal, as under a scheduler): whole lines, no carriage returns."""
    evaluate(lambda p: one_hot_logits(p), [(np.array([1]), np.array([1]))], progress=True)
    err = capsys.readouterr().err
    assert "top1=100.00" in err and "\r" not in err and err.count("\n") == 1
    batches = [(np.array([1, 1]), np.array([1, 1]))] * 50
    evaluate(lambda p: one_hot_logits(p), batches, progress=True, total=100)  # the data's size known
    err = capsys.readouterr().err
    assert "\r" not in err and len(err.splitlines()) == 10  # one per tenth, for 50 batches
    assert err.splitlines()[-1].startswith("eval: 100/100 img (100%)")
    evaluate(lambda p: one_hot_logits(p), batches, progress=True, total=100, num_examples=4)
    assert "eval: 4/4 img (100%)" in capsys.readouterr().err  # the cap, when smaller, is the total
    evaluate(lambda p: one_hot_logits(p), batches, progress=False)
    assert capsys.readouterr().err == ""


class _Terminal(io.StringIO):
    """A stream that says it is a terminal, so progress draws a tqdm bar into it."""

    def isatty(self):
        return True


def test_progress_on_a_terminal_is_a_bar(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    batches = [(np.array([1, 1]), np.array([1, 1]))] * 3
    evaluate(lambda p: one_hot_logits(p), batches, progress=True, total=6)
    assert "\r" in term.getvalue() and "6/6" in term.getvalue()  # redrawn in place by tqdm


def _running_top1_batches(hits_per_batch, size=3):
    """Batches of ``size`` images of which the first ``hits`` are predicted right, and the
    running top-1 (as printed) after each image count, so every printed line can be checked."""
    batches, running, hits, n = [], {}, 0, 0
    for h in hits_per_batch:
        labels = np.arange(size) % 10
        preds = np.where(np.arange(size) < h, labels, (labels + 1) % 10)
        batches.append((preds, labels))
        hits, n = hits + h, n + size
        running[n] = f"{100.0 * hits / n:.2f}"
    return batches, running


HITS = [3, 0, 2, 1, 3, 0, 0, 2, 3, 1]  # a running top-1 that changes after every batch


def test_each_progress_line_shows_the_top1_of_its_own_count(capsys):
    """In a log, every line's top1 is that of the images counted on it, the last one the result."""
    batches, running = _running_top1_batches(HITS)
    out = evaluate(lambda p: one_hot_logits(p), batches, progress=True, total=30)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10
    for line in lines:
        count = int(line.split()[1].split("/")[0])
        assert line.endswith(f" top1={running[count]}"), (line, running[count])
    assert lines[-1].startswith("eval: 30/30 img (100%)")
    assert lines[-1].endswith(f" top1={out['top1']:.2f}")
    batches, running = _running_top1_batches(HITS[:7])  # unknown total: only the closing line
    out = evaluate(lambda p: one_hot_logits(p), batches, progress=True)
    assert capsys.readouterr().err.splitlines()[-1].endswith(f" top1={out['top1']:.2f}")


def test_each_bar_drawn_on_a_terminal_shows_the_top1_of_its_own_count(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    batches, running = _running_top1_batches(HITS[:4])

    def slow(p):  # past tqdm's minimum interval between redraws, so every update draws
        time.sleep(0.12)
        return one_hot_logits(p)

    out = evaluate(slow, batches, progress=True, total=12)
    drawn = re.findall(r"(\d+)/12 [^\r\n]*top1=([\d.]+)", term.getvalue())
    assert len(drawn) >= 4
    assert all(top1 == running[int(count)] for count, top1 in drawn), (drawn, running)
    assert drawn[-1] == ("12", f"{out['top1']:.2f}")


def test_evaluate_errors():
    with pytest.raises(ValueError, match=r"returned shape \(3,\) for a batch of 3 labels"):
        evaluate(lambda _: np.zeros(3), [(None, np.zeros(3))], progress=False)
    with pytest.raises(ValueError, match="no examples were evaluated"):
        evaluate(lambda _: np.zeros((2, 3)), [], progress=False)
    with pytest.raises(ValueError, match="got 1 items"):
        evaluate(lambda _: np.zeros((2, 3)), [(np.zeros(2),)], progress=False)
    with pytest.raises(ValueError, match="num_examples must be a positive integer"):
        evaluate(lambda _: np.zeros((2, 3)), [], num_examples=0, progress=False)


def test_labels_that_would_silently_count_as_wrong_are_refused():
    fn = lambda images: one_hot_logits(np.zeros(len(images), int))
    x, y = np.zeros((4, 2, 2, 3), np.float32), np.array([0, 1, 2, 3])
    for labels, message in ((np.eye(10)[y], r"labels of shape \(4, 10\) look one-hot.*labels\.argmax\(-1\)"),
                            (y + 0.5, r"labels must be integer class indices, got dtype float64"),
                            (y.astype(str), r"labels must be integer class indices, got dtype <U"),
                            (y > 1, r"labels must be integer class indices, got dtype bool"),
                            (y - 1, r"labels hold -1; class indices start at 0.*imagenet2012's test split")):
        with pytest.raises(ValueError, match="batch #0: " + message):
            evaluate(fn, [(x, labels)], progress=False)
        with pytest.raises(ValueError, match="eval data: " + message):
            next(eval_batches((x, labels), 4, image_size=2))
    assert evaluate(fn, [(x, y.astype(np.float32))], progress=False)["top1"] == 25.0  # whole numbers
    with pytest.raises(ValueError, match=r"batch #1: 4 images but 3 labels; give one class index per image"):
        evaluate(fn, [(x, y), (x, y[:3])], progress=False)
    with pytest.raises(ValueError, match=r"batch #0: mask has 3 entries for 4 labels"):
        evaluate(fn, [(x, y, np.ones(3, bool))], progress=False)
    with pytest.warns(UserWarning, match="batch #0: label 12 but the model has 10 classes"):
        assert evaluate(fn, [(x, y + 9)], progress=False)["top1"] == 0.0


def test_batches_in_the_wrong_form_are_explained():
    fn = lambda images: one_hot_logits(np.zeros(len(images), int))
    x, y = np.zeros((4, 2, 2, 3), np.float32), np.array([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"batch #0 is a dict \(keys \['image', 'label'\]\).*eval_batches"):
        evaluate(fn, [{"image": x, "label": y}], progress=False)
    with pytest.raises(ValueError, match=r"got 4 items \(a single \(images, labels\) pair must be wrapped"):
        evaluate(fn, (x, y), progress=False)


def test_nonfinite_logits_are_refused_unless_masked_out():
    def logits_fn(images):
        out = np.zeros((images.shape[0], 3))
        out[images[:, 0] < 0] = np.nan  # rows of negative images break
        return out

    x = np.array([[1.0], [1.0], [-1.0], [1.0]])
    y = np.zeros(4, int)
    with pytest.raises(ValueError, match=r"NaN/inf logits for 1 image\(s\) \(example #\[2\]\)"):
        evaluate(logits_fn, [(x[:2], y[:2]), (x[2:], y[2:])] * 2, progress=False)
    # A broken padding row (mask False) is not an image and does not count.
    ok = evaluate(logits_fn, [(x, y, np.array([True, True, False, True]))], progress=False)
    assert ok["n"] == 3 and ok["top1"] == 100.0


def test_compare_logits_agreement_and_kl():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(8, 5))
    same = compare_logits(ref, ref)
    assert same["agreement"] == 100.0 and same["mean_kl"] == pytest.approx(0.0, abs=1e-12)
    # Shifting all logits of a row changes nothing; flipping the sign moves every argmax.
    assert compare_logits(ref, ref + 3.0)["mean_kl"] == pytest.approx(0.0, abs=1e-12)
    assert compare_logits(ref, -ref)["agreement"] == 0.0
    # Two classes, one row: KL([.5,.5] || softmax([0, log 3])) = .5 log(.5/.25) + .5 log(.5/.75).
    kl = compare_logits(np.zeros((1, 2)), np.array([[0.0, np.log(3.0)]]))["mean_kl"]
    assert kl == pytest.approx(0.5 * np.log(2.0) + 0.5 * np.log(2 / 3))


def test_compare_logits_mask_and_errors():
    ref = np.array([[1.0, 0.0], [1.0, 0.0]])
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert compare_logits(ref, q)["agreement"] == 50.0
    assert compare_logits(ref, q, mask=[True, False])["agreement"] == 100.0
    with pytest.raises(ValueError, match="one shape"):
        compare_logits(ref, q[:1])
    with pytest.raises(ValueError, match="mask has 3 entries for 2 rows"):
        compare_logits(ref, q, mask=[True, True, False])
    with pytest.raises(ValueError, match="no rows"):
        compare_logits(ref, q, mask=[False, False])
    with pytest.raises(ValueError, match="non-finite"):
        compare_logits(ref, q * np.nan)


def test_kl_per_row_by_hand_and_its_mean_is_compare_logits_kl():
    ref = np.array([[0.0, 0.0], [1.0, 0.0]])
    q = np.array([[0.0, 0.0], [0.0, 1.0]])
    kl = kl_per_row(ref, q)
    p = 1 / (1 + np.exp(-1))  # softmax([1, 0])[0]
    assert kl.shape == (2,) and kl[0] == 0
    assert kl[1] == pytest.approx(p * np.log(p / (1 - p)) + (1 - p) * np.log((1 - p) / p))
    assert compare_logits(ref, q)["mean_kl"] == pytest.approx(kl.mean())
    with pytest.raises(ValueError, match="one shape"):
        kl_per_row(ref, q[:1])  # one row would broadcast against both
    with pytest.raises(ValueError, match="kl_per_row got non-finite"):
        kl_per_row(ref, q + np.inf)


# ------------------------------------------------------------------ micro models end to end

REPO = Path(__file__).resolve().parents[1]


def _digits_top1(model_name, params):
    model = create_model(model_name)
    fwd = jax.jit(lambda x: model.apply({"params": params}, x))
    x, y = load_digits_dataset("test", image_size=model.cfg.img_size)
    return evaluate(fwd, eval_batches((x, y), 128, image_size=model.cfg.img_size), progress=False)


def test_paired_top1_counts_discordant_images_and_exact_p():
    y = np.array([0, 1, 2, 3, 4, 5])
    a = np.array([0, 1, 9, 9, 4, 9])  # right on 0, 1, 4
    b = np.array([0, 9, 2, 3, 9, 9])  # right on 0, 2, 3
    r = paired_top1(y, a, b)
    assert (r["only_a"], r["only_b"]) == (2, 2)  # images 1, 4 vs 2, 3; 0 and 5 carry nothing
    assert r["p_value"] == 1.0
    # 1 vs 2 (the demo's W4A8 case): 2 * (C(3,0) + C(3,1)) / 2^3 = 1.0 exactly
    assert paired_top1([0, 1, 2], [0, 9, 9], [9, 1, 2])["p_value"] == 1.0
    # 0 vs 6: 2 / 2^6; 1 vs 9: 2 * (1 + 10) / 2^10
    six = np.arange(6)
    assert paired_top1(six, six + 1, six)["p_value"] == pytest.approx(2 / 64)
    ten = np.arange(10)
    assert paired_top1(ten, np.r_[0, ten[1:] + 1], np.r_[1, ten[1:]])["p_value"] == pytest.approx(22 / 1024)
    assert paired_top1(ten, ten, ten) == {"only_a": 0, "only_b": 0, "p_value": 1.0}
    # ImageNet scale (n > 1024 overflowed a float 2^n): 1000 vs 1200 of 2200, against the normal
    # approximation with continuity correction, z = (|1000 - 1100| - 0.5) / sqrt(2200 / 4)
    y = np.zeros(50_000, int)
    a, b = y.copy(), y.copy()
    a[:1200], b[1200:2200] = 1, 1  # a wrong on the first 1200 (b right), b wrong on the next 1000
    r = paired_top1(y, a, b)
    z = (100 - 0.5) / np.sqrt(2200 / 4)
    normal = math.erfc(z / math.sqrt(2))
    assert (r["only_a"], r["only_b"]) == (1000, 1200)
    assert r["p_value"] == pytest.approx(normal, rel=0.02) and 1e-6 < r["p_value"] < 1e-4


def test_paired_top1_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same non-zero number of images"):
        paired_top1([0, 1], [0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="same non-zero number"):
        paired_top1([], [], [])
    y = np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"preds_b of shape \(3, 4\) look one-hot .*preds_b\.argmax\(-1\)"):
        paired_top1(y, y, np.eye(4)[y])  # logits instead of predictions
    with pytest.raises(ValueError, match="paired_top1: labels must be integer class indices"):
        paired_top1(y + 0.5, y, y)
    with pytest.raises(ValueError, match=r"paired_top1: preds_a hold -1; class indices start at 0$"):
        paired_top1(y, y - 1, y)  # predictions get no hint about unlabelled splits


@pytest.mark.slow
@pytest.mark.xla_optimized  # the whole test split through the model
def test_bundled_vim_micro_reaches_its_logged_accuracy():
    params, meta = load_params(REPO / "ptq4vm_jax" / "assets" / "vim_micro", model_name="vim_micro")
    out = _digits_top1("vim_micro", params)
    assert out["n"] == 355
    assert out["top1"] == pytest.approx(meta["extra"]["test_top1"], abs=0.3)
    assert out["top1"] >= 95.0


@pytest.mark.slow
def test_train_micro_script_trains_saves_and_logs(tmp_path):
    spec = importlib.util.spec_from_file_location("train_micro", REPO / "experiments" / "train_micro.py")
    train_micro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_micro)
    result = train_micro.main(["--model", "vim_nano", "--batch-size", "16", "--max-steps", "2",
                               "--out", str(tmp_path)])
    assert result["steps"] == 2 and result["epochs"] == 1
    params, meta = load_params(tmp_path / "vim_nano", model_name="vim_nano")
    assert meta["extra"]["test_top1"] == result["test_top1"]
    assert _digits_top1("vim_nano", params)["top1"] == pytest.approx(result["test_top1"])
    log = (tmp_path / "vim_nano" / "train_log.txt").read_text()
    assert "command: python experiments/train_micro.py --model vim_nano" in log
    assert "final: test top-1" in log and "jax " in log
    # Rerun into it, as the assets are regenerated: the checkpoint and log replaced, notes kept.
    (tmp_path / "vim_nano" / "README.md").write_text("notes")
    train_micro.main(["--model", "vim_nano", "--batch-size", "16", "--max-steps", "1",
                      "--out", str(tmp_path)])
    assert (tmp_path / "vim_nano" / "README.md").read_text() == "notes"
    assert load_params(tmp_path / "vim_nano")[1]["extra"]["steps"] == 1
