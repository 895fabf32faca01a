"""Seeded ablation of PTQ4VM's parts on the bundled micro models, with error bars and paired tests.

For each model, bit width, method and calibration draw (a seeded subset of the digits train
split), the model is calibrated and evaluated on the test split against the float model: top-1,
agreement with the float argmax, KL(float || quantized) and the cosine between the logit vectors.
Each finished cell is appended to ``cells.jsonl`` in ``--out`` as one JSON line, so a rerun of the
same command skips what is done (an interrupted run resumes). A rerun with another calibration
size, seed, epoch count or test limit is refused, since a mean over cells computed two ways would
mean nothing; another grid (models, bits, methods, draws) reuses the cells it shares.

Draws are shared by every method and bit width (draw ``d`` is the same images everywhere), so
methods can be compared draw by draw (paired over draws) and image by image (paired over images).
Calibration itself has no randomness: the same command gives the same numbers on the same machine.

    python experiments/ablation.py --out ablation_out          # the full grid
    python experiments/ablation.py --models vim_micro --bits W8A8 --methods rtn,pts --draws 2
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import scipy
import sklearn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import norm
from scipy.stats import t as student_t

from ptq4vm_jax import QuantConfig, create_model, load_params, quantize_params, quantized_apply
from ptq4vm_jax.assets import ASSETS
from ptq4vm_jax.cli.demo import demo_recipe
from ptq4vm_jax.compare import kl_per_row, paired_top1
from ptq4vm_jax.data import load_digits_dataset
from ptq4vm_jax.models import image_shape
from ptq4vm_jax.progress import progress_bar

ROOT = Path(__file__).resolve().parents[1]

MODELS = ("vim_micro", "vmamba_micro")
BITS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8), "W4A4": (4, 4)}
# name -> (QuantConfig.method, block loss of the learning, one-line description)
METHODS = {
    "rtn": ("rtn", None, "RTN: per-channel min-max weights, one static min-max activation range"),
    "dynamic": ("per_token_dynamic", None, "per-token dynamic activation ranges at run time, no smoothing"),
    "pts": ("pts_only", None, "PTS init only: per-token static steps + SmoothQuant sigma, no learning"),
    "jlss_cos": ("ptq4vm", "cosine", "PTS + JLSS, cosine block loss (the paper)"),
    "jlss_mse": ("ptq4vm", "mse", "PTS + JLSS, relative-MSE block loss"),
}
# (a, b): the comparisons the study is for; each test is of a against b.
PAIRS = (("jlss_cos", "pts"), ("jlss_mse", "pts"), ("pts", "rtn"), ("jlss_cos", "jlss_mse"))
METRICS = ("top1", "agreement", "kl", "cosine")
GRID_KEYS = ("models", "bits", "methods", "draws", "calib_size", "seed", "epochs", "limit")
# The settings a cell's numbers depend on: cells already in --out are reused only when they match.
CELL_KEYS = ("calib_size", "seed", "epochs", "limit")


# ----------------------------------------------------------------------------- statistics

def paired_t(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Two-sided paired t-test of mean(a - b) = 0 (Student's t with n - 1 degrees of freedom).

    Differences that are all equal leave no spread to test against: p is 1 when they are all
    zero and 0 otherwise (t = +-inf)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n = d.size
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {n}")
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        return {"n": n, "mean_diff": mean, "t": 0.0 if mean == 0 else math.copysign(math.inf, mean),
                "p_value": 1.0 if mean == 0 else 0.0}
    t = mean / (sd / math.sqrt(n))
    return {"n": n, "mean_diff": mean, "t": t, "p_value": float(2 * student_t.sf(abs(t), n - 1))}


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, np.float64)
    sx = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def signed_rank(a: Sequence[float], b: Sequence[float], exact_below: int = 21) -> dict[str, float]:
    """Two-sided Wilcoxon signed-rank test of a - b (zero differences dropped, ties averaged).

    ``w_plus`` is the rank sum of the positive differences. Fewer than ``exact_below`` non-zero
    differences: the exact p-value, enumerating all 2^n sign patterns of the observed ranks
    (with 5 draws the smallest possible p is 2/32 = 0.0625). Otherwise the normal approximation
    with the tie-corrected variance, no continuity correction."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    d = d[d != 0]
    n = d.size
    if n == 0:
        return {"n": 0, "w_plus": 0.0, "p_value": 1.0, "exact": True}
    r = _ranks(np.abs(d))
    w_plus = float(r[d > 0].sum())
    mean = r.sum() / 2
    if n < exact_below:
        signs = np.array(list(itertools.product((0.0, 1.0), repeat=n)))
        w_all = signs @ r
        extreme = np.abs(w_all - mean) >= abs(w_plus - mean) - 1e-9
        return {"n": n, "w_plus": w_plus, "p_value": float(extreme.mean()), "exact": True}
    var = float((r**2).sum()) / 4  # n(n+1)(2n+1)/24 without ties; exact under average-rank ties
    z = (w_plus - mean) / math.sqrt(var)
    return {"n": n, "w_plus": w_plus, "z": z, "p_value": float(2 * norm.sf(abs(z))), "exact": False}


def logit_cosine(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row's float and quantized logit vectors."""
    a = np.asarray(ref_logits, np.float64)
    b = np.asarray(logits, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# ----------------------------------------------------------------------------- settings

def parse_list(text: str, choices: Sequence[str], flag: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in choices]
    if bad or not items:
        raise SystemExit(f"{flag}: unknown {bad or 'empty list'}; choose a comma-separated list from "
                         f"{', '.join(choices)}")
    if len(set(items)) != len(items):
        raise SystemExit(f"{flag}: {text!r} names an entry twice")
    return items


def parse_epochs(text: str | None) -> dict[str, int | None]:
    """``N`` (every model) or ``model=N,model=N``; None keeps a model's recipe."""
    out: dict[str, int | None] = {m: None for m in MODELS}
    if text is None:
        return out
    try:
        if "=" not in text:
            return {m: int(text) for m in MODELS}
        for part in text.split(","):
            name, value = part.split("=")
            if name.strip() not in out:
                raise SystemExit(f"--epochs names {name.strip()!r}; the models are {', '.join(MODELS)}")
            out[name.strip()] = int(value)
    except ValueError:
        raise SystemExit("--epochs must be an integer or model=N,model=N (e.g. vim_micro=6,"
                         f"vmamba_micro=12), got {text!r}") from None
    if any(v is not None and v < 1 for v in out.values()):
        raise SystemExit(f"--epochs must be >= 1 (a method without learning is 'pts'), got {text!r}")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--bits", default=",".join(BITS), help=f"comma-separated, from {', '.join(BITS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--draws", type=int, default=5, help="calibration draws per cell (default 5)")
    p.add_argument("--calib-size", type=int, default=256, help="calibration images per draw (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draws (default 0)")
    p.add_argument("--epochs", default=None,
                   help="JLSS epochs per block, N or model=N,...: default each model's demo recipe "
                        "(vim_micro 12 epochs of batch 32, vmamba_micro the official 50)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--out", default="ablation_out", help="output directory (default ablation_out)")
    p.add_argument("--summary-only", action="store_true",
                   help="run no cell: write the tables and plot of the grid's cells already in --out")
    p.add_argument("--quiet", action="store_true", help="no per-cell lines or progress")
    args = p.parse_args(argv)
    args.models = parse_list(args.models, MODELS, "--models")
    args.bits = parse_list(args.bits, list(BITS), "--bits")
    args.methods = parse_list(args.methods, list(METHODS), "--methods")
    args.epochs = parse_epochs(args.epochs)
    if args.draws < 1:
        raise SystemExit(f"--draws must be >= 1, got {args.draws}")
    if args.calib_size < 1:
        raise SystemExit(f"--calib-size must be >= 1, got {args.calib_size}")
    if args.limit is not None and args.limit < 2:
        raise SystemExit(f"--limit must be >= 2 test images, got {args.limit}")
    return args


def grid_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k.replace("-", "_")) for k in GRID_KEYS}


def environment(argv: Sequence[str]) -> dict[str, Any]:
    """What produced the numbers: the command, versions, machine and code revision."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "command": " ".join(["python", "experiments/ablation.py", *argv]),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "machine": {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
                    "jax_backend": jax.default_backend()},
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def prepare_out(out: Path, grid: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """Create ``out`` with ``settings.json``, or check that the cells already in it were computed
    with the same ``CELL_KEYS`` settings. The grid itself (models, bits, methods, draws) may grow
    or shrink between runs: a cell's numbers do not depend on it, so done cells are reused."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file; give a directory (new, or one this script wrote)")
    path = out / "settings.json"
    cell = {k: grid[k] for k in CELL_KEYS}
    if path.exists():
        saved = json.loads(path.read_text())
        diff = [f"{k}: saved {saved['cells'].get(k)!r}, now {cell[k]!r}" for k in CELL_KEYS
                if saved["cells"].get(k) != cell[k]]
        if diff:
            raise SystemExit(f"{out} holds cells computed with other settings ({'; '.join(diff)}); rerun "
                             f"with the saved ones (as in: {saved['runs'][-1]['env']['command']}) to resume, "
                             "or give a new --out")
        first = saved["runs"][0]["env"]
        if first["machine"] != env["machine"] or first["jax"] != env["jax"]:
            print(f"note: {out} holds cells computed on {first['machine']['cpu']} with jax {first['jax']}; "
                  f"this run is on {env['machine']['cpu']} with jax {env['jax']} (floats may differ)",
                  file=sys.stderr)
    else:
        if out.exists() and any(out.iterdir()):
            raise SystemExit(f"--out {out} exists and is not an ablation output (no settings.json); give a "
                             "new or empty directory")
        out.mkdir(parents=True, exist_ok=True)
        saved = {"cells": cell, "runs": []}
    saved["grid"] = grid
    saved["runs"].append({"env": env, "grid": grid})
    write_json_atomic(path, saved)
    return saved


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- cells

def cell_key(model: str, bits: str, method: str, draw: int) -> tuple[str, str, str, int]:
    return (model, bits, method, int(draw))


def load_cells(path: Path) -> dict[tuple, dict]:
    """Finished cells by key; a last line cut short by an interruption is ignored (rerun)."""
    cells: dict[tuple, dict] = {}
    if not path.exists():
        return cells
    lines = path.read_text().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the unterminated tail of a killed write
                break
            raise SystemExit(f"{path}: line {i + 1} is not JSON; the file is damaged, move it away") from None
        cells[cell_key(rec["model"], rec["bits"], rec["method"], rec["draw"])] = rec
    return cells


def append_cell(path: Path, rec: dict) -> None:
    """One line in one write, synced to disk: a crash leaves whole lines and at most a cut-off
    tail, which is dropped here before the next line is appended."""
    data = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
    if path.exists():
        whole = path.read_bytes().rfind(b"\n") + 1
        if whole != path.stat().st_size:
            os.truncate(path, whole)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_labels(limit: int | None) -> np.ndarray:
    """The digits test split's labels (the same for every image size)."""
    return load_digits_dataset("test", image_size=8)[1][:limit]


def draw_indices(seed: int, draw: int, n_train: int, size: int) -> np.ndarray:
    """Draw ``draw``'s calibration images: ``size`` distinct train indices, seeded by (seed, draw)."""
    if size > n_train:
        raise SystemExit(f"--calib-size {size} exceeds the {n_train} train images")
    return np.random.default_rng([seed, draw]).choice(n_train, size, replace=False)


def quant_config(method: str, bits: str, model: str, calib_size: int, epochs: int | None) -> QuantConfig:
    """The ``QuantConfig`` of one cell: JLSS with the demo's recipe (``epochs`` overriding its
    epoch count), the other methods with the library's defaults."""
    qmethod, loss, _ = METHODS[method]
    w, a = BITS[bits]
    if qmethod != "ptq4vm":
        return QuantConfig(w, a, method=qmethod, num_calib=calib_size)
    recipe = demo_recipe(model, epochs)  # as `ptq4vm demo` does
    if "train_batch" in recipe:
        recipe["train_batch"] = min(recipe["train_batch"], calib_size)
    return QuantConfig(w, a, method=qmethod, loss=loss, num_calib=calib_size, **recipe)


class ModelRun:
    """One model's float params, test split and float logits, loaded once."""

    def __init__(self, name: str, limit: int | None) -> None:
        self.name = name
        self.params, _ = load_params(ASSETS / name, model_name=name)
        self.model = create_model(name)
        size = image_shape(self.model)[1]
        self.train_x, _ = load_digits_dataset("train", image_size=size)
        self.test_x, self.test_y = load_digits_dataset("test", image_size=size)
        if limit is not None:
            self.test_x, self.test_y = self.test_x[:limit], self.test_y[:limit]
        forward = jax.jit(lambda x: self.model.apply({"params": self.params}, x))
        self.fp_logits = np.asarray(forward(self.test_x))
        # quantized_apply compiles once per bit width, shared by every method and draw
        self.forward_q = lambda qp, x: quantized_apply(self.model, qp, x)

    def cell(self, bits: str, method: str, draw: int, settings: dict) -> dict:
        idx = draw_indices(settings["seed"], draw, len(self.train_x), settings["calib_size"])
        cfg = quant_config(method, bits, self.name, settings["calib_size"], settings["epochs"][self.name])
        t0 = time.perf_counter()
        qp = quantize_params(self.params, self.train_x[idx], model=self.name, config=cfg, progress=False,
                             log=lambda _: None)
        seconds = time.perf_counter() - t0
        info = json.loads(qp.info)
        qp = dataclasses.replace(qp, info="{}")  # (a static field: per-run text would recompile)
        logits = np.asarray(self.forward_q(qp, self.test_x))
        if not np.isfinite(logits).all():
            raise RuntimeError(f"{self.name} {bits} {method} draw {draw}: non-finite logits")
        preds = logits.argmax(-1)
        kl = kl_per_row(self.fp_logits, logits)
        reverted = sum(bool(s.get("reverted")) for s in info.get("stages", []))
        return {
            "model": self.name, "bits": bits, "method": method, "draw": int(draw),
            "top1": 100 * float(np.mean(preds == self.test_y)),
            "agreement": 100 * float(np.mean(preds == self.fp_logits.argmax(-1))),
            "kl": float(kl.mean()),
            "cosine": float(logit_cosine(self.fp_logits, logits).mean()),
            "seconds": seconds,
            "reverted_blocks": reverted,
            "calib_first_indices": idx[:5].tolist(),
            "preds": preds.astype(int).tolist(),
            "image_kl": kl.tolist(),
        }


_RUNS: dict[tuple[str, int | None], ModelRun] = {}


def model_run(name: str, limit: int | None) -> ModelRun:
    """The loaded model, kept for the process: its compiled evaluation serves every later run."""
    if (name, limit) not in _RUNS:
        _RUNS[name, limit] = ModelRun(name, limit)
    return _RUNS[name, limit]


# ----------------------------------------------------------------------------- summary

def summarize(cells: dict[tuple, dict], grid: dict) -> list[dict]:
    """Mean and standard deviation (ddof=1) over the draws done, per (model, bits, method)."""
    rows = []
    for model, bits, method in itertools.product(grid["models"], grid["bits"], grid["methods"]):
        recs = [cells[k] for d in range(grid["draws"]) if (k := cell_key(model, bits, method, d)) in cells]
        if not recs:
            continue
        row: dict[str, Any] = {"model": model, "bits": bits, "method": method, "draws": len(recs)}
        for m in (*METRICS, "seconds"):
            v = np.array([r[m] for r in recs], np.float64)
            row[f"{m}_mean"] = float(v.mean())
            row[f"{m}_std"] = float(v.std(ddof=1)) if v.size > 1 else float("nan")
        row["reverted_blocks_mean"] = float(np.mean([r["reverted_blocks"] for r in recs]))
        rows.append(row)
    return rows


def paired_tests(cells: dict[tuple, dict], grid: dict, labels: dict[str, np.ndarray]) -> list[dict]:
    """For each pair of PAIRS run on both sides over the same draws, per model and bit width:
    over draws, a paired t-test and an exact signed-rank test of the per-draw mean KL; over
    images, a signed-rank test of each image's KL averaged over the draws, and exact McNemar
    tests of top-1 per draw (discordant counts summed, p-values listed)."""
    out = []
    for model, bits, (a, b) in itertools.product(grid["models"], grid["bits"], PAIRS):
        draws = [d for d in range(grid["draws"])
                 if cell_key(model, bits, a, d) in cells and cell_key(model, bits, b, d) in cells]
        if not draws:
            continue
        ca = [cells[cell_key(model, bits, a, d)] for d in draws]
        cb = [cells[cell_key(model, bits, b, d)] for d in draws]
        kl_a = [c["kl"] for c in ca]
        kl_b = [c["kl"] for c in cb]
        img_a = np.mean([c["image_kl"] for c in ca], axis=0)
        img_b = np.mean([c["image_kl"] for c in cb], axis=0)
        mc = [paired_top1(labels[model], np.array(x["preds"]), np.array(y["preds"]))
              for x, y in zip(ca, cb, strict=True)]
        rec = {
            "model": model, "bits": bits, "a": a, "b": b, "draws": len(draws),
            "kl_ratio": float(np.mean(kl_a) / np.mean(kl_b)) if np.mean(kl_b) > 0 else float("nan"),
            "draws_a_lower_kl": int(sum(x < y for x, y in zip(kl_a, kl_b, strict=True))),
            "top1_diff": float(np.mean([x["top1"] - y["top1"] for x, y in zip(ca, cb, strict=True)])),
            "draw_t": paired_t(kl_a, kl_b) if len(draws) > 1 else None,
            "draw_signed_rank": signed_rank(kl_a, kl_b),
            "image_signed_rank": signed_rank(img_a, img_b),
            "images_a_lower_kl": int(np.sum(img_a < img_b)),
            "images": int(img_a.size),
            "mcnemar_only_a": int(sum(m["only_a"] for m in mc)),
            "mcnemar_only_b": int(sum(m["only_b"] for m in mc)),
            "mcnemar_p": [m["p_value"] for m in mc],
        }
        out.append(rec)
    return out


def fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.0e}"


def table_text(rows: list[dict]) -> str:
    header = (f"{'model':<13} {'bits':<5} {'method':<9} {'n':>2}  {'top-1 %':>13}  {'agree %':>13}  "
              f"{'KL to FP':>19}  {'logit cos':>17}  {'calib s':>6}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['model']:<13} {r['bits']:<5} {r['method']:<9} {r['draws']:>2}  "
            f"{r['top1_mean']:6.2f} ± {r['top1_std']:4.2f}  "
            f"{r['agreement_mean']:6.2f} ± {r['agreement_std']:4.2f}  "
            f"{r['kl_mean']:.2e} ± {r['kl_std']:.1e}  {r['cosine_mean']:.5f} ± {r['cosine_std']:.0e}  "
            f"{r['seconds_mean']:6.1f}")
    return "\n".join(lines)


def tests_text(tests: list[dict]) -> str:
    header = (f"{'model':<13} {'bits':<5} {'a vs b':<19} {'n':>2} {'KL a/b':>6} {'a<b':>4} {'t p':>7} "
              f"{'SR p':>6}  {'img a<b':>8} {'img SR p':>8}  {'top1 a-b':>8} {'McN a|b':>8}")
    lines = [header, "-" * len(header)]
    for t in tests:
        lines.append(
            f"{t['model']:<13} {t['bits']:<5} {t['a'] + ' vs ' + t['b']:<19} {t['draws']:>2} "
            f"{t['kl_ratio']:6.2f} {t['draws_a_lower_kl']:>4} "
            f"{fmt_p(t['draw_t']['p_value'] if t['draw_t'] else None):>7} "
            f"{fmt_p(t['draw_signed_rank']['p_value']):>6}  "
            f"{t['images_a_lower_kl']:>4}/{t['images']:<3} {fmt_p(t['image_signed_rank']['p_value']):>8}  "
            f"{t['top1_diff']:+8.2f} {str(t['mcnemar_only_a']) + '|' + str(t['mcnemar_only_b']):>8}")
    return "\n".join(lines)


def markdown(rows: list[dict], tests: list[dict]) -> str:
    """The summary and the paired tests as Markdown tables (for EXPERIMENTS.md)."""
    out = ["| model | bits | method | draws | top-1 % | agreement % | KL to float | logit cosine | calib s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['bits']} | {r['method']} | {r['draws']} | "
                   f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f} | {r['agreement_mean']:.2f} ± "
                   f"{r['agreement_std']:.2f} | {r['kl_mean']:.2e} ± {r['kl_std']:.1e} | "
                   f"{r['cosine_mean']:.5f} ± {r['cosine_std']:.1e} | {r['seconds_mean']:.0f} |")
    if tests:
        out += ["", "| model | bits | a vs b | draws | KL a/b | draws a lower | paired t p | signed-rank p "
                "| images a lower | images signed-rank p | top-1 a−b | McNemar only a / only b "
                "| McNemar p per draw |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in tests:
            mc = t["mcnemar_p"]
            t_p = fmt_p(t["draw_t"]["p_value"] if t["draw_t"] else None)
            out.append(
                f"| {t['model']} | {t['bits']} | {t['a']} vs {t['b']} | {t['draws']} | {t['kl_ratio']:.2f} | "
                f"{t['draws_a_lower_kl']}/{t['draws']} | {t_p} | "
                f"{fmt_p(t['draw_signed_rank']['p_value'])} | {t['images_a_lower_kl']}/{t['images']} | "
                f"{fmt_p(t['image_signed_rank']['p_value'])} | {t['top1_diff']:+.2f} | "
                f"{t['mcnemar_only_a']} / {t['mcnemar_only_b']} | {fmt_p(min(mc))}–{fmt_p(max(mc))} |")
    return "\n".join(out) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot(path: Path, rows: list[dict], grid: dict, cells: dict[tuple, dict]) -> None:
    """KL to the float model per method and bit width, one panel per model, log scale: bars of
    the mean, error bars of one standard deviation over the draws, a dot per draw. Drawn on a
    Figure of its own (no pyplot): the process's matplotlib backend is left as it was."""
    models = [m for m in grid["models"] if any(r["model"] == m for r in rows)]
    if not models:
        return
    fig = Figure(figsize=(6.4 * len(models), 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(models), squeeze=False)
    width = 0.8 / len(grid["methods"])
    for ax, model in zip(axes[0], models, strict=True):
        for i, method in enumerate(grid["methods"]):
            xs, ys, es = [], [], []
            for j, bits in enumerate(grid["bits"]):
                r = next((r for r in rows if (r["model"], r["bits"], r["method"]) == (model, bits, method)),
                         None)
                if r is None:
                    continue
                xs.append(j + (i - (len(grid["methods"]) - 1) / 2) * width)
                ys.append(r["kl_mean"])
                keys = [cell_key(model, bits, method, d) for d in range(grid["draws"])]
                kls = [cells[k]["kl"] for k in keys if k in cells]
                ax.plot([xs[-1]] * len(kls), kls, "k.", markersize=3, zorder=3)
                es.append(0.0 if math.isnan(r["kl_std"]) else r["kl_std"])
            # a log axis cannot draw an error bar down to zero or below
            lower = [min(e, 0.95 * y) for e, y in zip(es, ys, strict=True)]
            ax.bar(xs, ys, width, yerr=[lower, es], capsize=2, label=method)
        ax.set_yscale("log")
        ax.set_xticks(range(len(grid["bits"])), grid["bits"])
        ax.set_xlabel("bit width")
        ax.set_ylabel("KL(float || quantized), nats per image")
        n = max((r["draws"] for r in rows if r["model"] == model), default=0)
        ax.set_title(f"{model}: mean ± std over {n} calibration draws (dots: draws)")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name("tmp_" + path.name)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def write_outputs(out: Path, settings: dict, cells: dict[tuple, dict], labels: dict[str, np.ndarray],
                  quiet: bool = False) -> dict:
    grid = settings["grid"]
    rows = summarize(cells, grid)
    tests = paired_tests(cells, grid, labels)
    expected = len(grid["models"]) * len(grid["bits"]) * len(grid["methods"]) * grid["draws"]
    done = sum(r["draws"] for r in rows)
    write_csv(out / "results.csv", rows)
    (out / "table.md").write_text(markdown(rows, tests))
    summary = {"settings": settings, "cells_done": done, "cells_expected": expected,
               "methods": {m: METHODS[m][2] for m in grid["methods"]}, "rows": rows, "paired_tests": tests}
    write_json_atomic(out / "summary.json", summary)
    plot(out / "ablation_kl.png", rows, grid, cells)
    if not quiet:
        print(f"\n{done}/{expected} cells; mean ± std over draws (std with ddof=1)")
        print(table_text(rows))
        if tests:
            print("\nPaired tests (a vs b): KL a/b = ratio of mean KLs; a<b = draws where a's KL is lower; "
                  "t p / SR p = paired t / exact signed-rank over draws on per-draw KL; img: images whose "
                  "draw-averaged KL is lower under a, and its signed-rank p; McN a|b = images only a | only "
                  "b gets right, summed over draws")
            print(tests_text(tests))
        print(f"\nwritten: {out / 'results.csv'}, {out / 'summary.json'}, {out / 'table.md'}, "
              f"{out / 'ablation_kl.png'}")
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    grid = grid_settings(args)
    settings = prepare_out(out, grid, environment(argv))
    cells_path = out / "cells.jsonl"
    cells = load_cells(cells_path)
    # draw-major: an interrupted run has every (model, bits, method) at nearly the same count
    todo = [cell_key(m, b, meth, d) for d in range(args.draws) for m in args.models for b in args.bits
            for meth in args.methods if cell_key(m, b, meth, d) not in cells]
    if not args.quiet:
        print(f"{len(cells)} cells done in {out}, {len(todo)} to run"
              f"{' (not run: --summary-only)' if args.summary_only and todo else ''}", flush=True)
    if args.summary_only:
        todo = []
    bar = progress_bar(len(todo), "ablation", unit="cell", enabled=not args.quiet and bool(todo))
    t_start = time.perf_counter()
    try:
        for i, key in enumerate(todo):
            model, bits, method, draw = key
            rec = model_run(model, args.limit).cell(bits, method, draw, grid)
            append_cell(cells_path, rec)
            cells[key] = rec
            bar.update(1)
            if not args.quiet:
                elapsed = time.perf_counter() - t_start
                print(f"[{i + 1}/{len(todo)}] {model} {bits} {method} draw {draw}: top-1 {rec['top1']:.2f} "
                      f"agree {rec['agreement']:.2f} KL {rec['kl']:.2e} ({rec['seconds']:.1f}s calib; "
                      f"{elapsed / 60:.1f} min so far)", flush=True)
    finally:
        bar.close()
    settings["runs"][-1].update(seconds=round(time.perf_counter() - t_start, 1), cells_run=len(todo))
    write_json_atomic(out / "settings.json", settings)
    labels = {model: test_labels(args.limit) for model in args.models}
    summary = write_outputs(out, settings, cells, labels, args.quiet)
    return summary


if __name__ == "__main__":
    main()
