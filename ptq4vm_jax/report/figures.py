"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no
global backend state: safe in a library and in tests).

Each function takes the JSON-ready numbers of one figure (what ``report.json`` holds under the
figure's key) and writes one PNG, so that every figure shows exactly the numbers reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
CLASS_COLOR = "tab:red"


def _save(fig: Figure, path: Path) -> None:
    """Write the PNG with one draw. ``savefig`` first draws the whole figure without rendering
    only to run the layout engine; ``Figure.draw`` runs the engine itself, so printing on the
    Agg canvas directly gives the same image from one draw."""
    fig.set_facecolor("white")
    FigureCanvasAgg(fig).print_png(path)


def _mark_class_token(axes: Sequence[Any], index: int | None) -> None:
    """A vertical line at the class token on every axis, labelled once."""
    if index is None:
        return
    for i, ax in enumerate(axes):
        ax.axvline(index, color=CLASS_COLOR, linestyle=":", linewidth=1.5,
                   label=f"class token (position {index})" if i == 0 else None)


def _positions(values: Sequence[float]) -> np.ndarray:
    return np.arange(len(values))


def profile(entry: Mapping[str, Any], path: Path) -> None:
    """One layer's PTS profile: the float per-token range (with data), a_scale and a_zero per
    token position, the class token marked."""
    order = entry["order"]
    data = entry.get("float_range")
    init = entry.get("init")
    rows = 3 if data else 2
    fig = Figure(figsize=(9, 2.4 * rows + 0.9), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True)
    t = _positions(entry["a_scale"])
    k = 0
    if data:
        ax = axes[0]
        ax.fill_between(t, data["min"], data["max"], step="mid", alpha=0.35, color="tab:blue",
                        label=f"float x/σ, min..max over {entry['images']} images × channels")
        ax.step(t, data["q_lo"], where="mid", color="black", linewidth=1,
                label="quantizer range [-z·s, (qmax-z)·s]")
        ax.step(t, data["q_hi"], where="mid", color="black", linewidth=1)
        ax.set_ylabel("x/σ (activation units)")
        ax.set_title("float activation range per token and the range the quantizer covers", fontsize=10)
        k = 1
    ax = axes[k]
    ax.step(t, entry["a_scale"], where="mid", color="tab:green", label="a_scale (stored)")
    if init:
        ax.step(t, init["a_scale"], where="mid", color="tab:gray", linestyle="--",
                label="initialisation, recomputed on --data")
    ax.set_ylabel("a_scale (x/σ units per code)")
    ax.set_title("per-token activation step size", fontsize=10)
    ax = axes[k + 1]
    ax.step(t, entry["a_zero"], where="mid", color="tab:purple", label="a_zero (stored)")
    if init:
        ax.step(t, init["a_zero"], where="mid", color="tab:gray", linestyle="--",
                label="initialisation, recomputed on --data")
    ax.set_ylabel(f"a_zero (code, 0..{2 ** entry['a_bits'] - 1})")
    ax.set_title("per-token zero point", fontsize=10)
    ax.set_xlabel(f"token position (index of a_scale; order: {order['direction']})")
    _mark_class_token(axes, order["class_token_index"])
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best", framealpha=0.8)
    fig.suptitle(f"{entry['name']}: per-token static activation quantizer (PTS), {entry['what']}")
    _save(fig, path)


def directions(entries: Sequence[Mapping[str, Any]], title: str, path: Path) -> None:
    """Per-direction profiles of sibling layers (VMamba's x_proj_0..3, Vim's x_proj / x_proj_b):
    a_scale along each one's scan order, and where a token grid is known, a_scale laid out on
    the image's token grid (the same token, seen by each direction)."""
    grids = [e.get("a_scale_on_grid") for e in entries]
    with_grid = all(g is not None for g in grids)
    n = len(entries)
    fig = Figure(figsize=(max(9.0, 2.7 * n), 7.5 if with_grid else 4.5), dpi=DPI, layout="constrained")
    spec = fig.add_gridspec(2 if with_grid else 1, n)
    ax = fig.add_subplot(spec[0, :])
    for e in entries:
        ax.plot(_positions(e["a_scale"]), e["a_scale"], linewidth=1.2,
                label=f"{e['name'].rsplit('/', 1)[-1]} ({e['order']['direction']})")
        ci = e["order"]["class_token_index"]
        if ci is not None:
            ax.plot([ci], [e["a_scale"][ci]], "o", color=CLASS_COLOR, markersize=6)
    if any(e["order"]["class_token_index"] is not None for e in entries):
        ax.plot([], [], "o", color=CLASS_COLOR, label="class token")
    ax.set_xlabel("position in the layer's own scan order (index of a_scale)")
    ax.set_ylabel("a_scale (x/σ units per code)")
    ax.set_title("per-token step size along each direction's scan order", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if with_grid:
        arrays = [np.asarray(g, np.float64) for g in grids]
        lo = min(float(np.nanmin(a)) for a in arrays)
        hi = max(float(np.nanmax(a)) for a in arrays)
        image = None
        for i, (e, a) in enumerate(zip(entries, arrays, strict=True)):
            sub = fig.add_subplot(spec[1, i])
            image = sub.imshow(a, vmin=lo, vmax=hi, cmap="viridis", interpolation="nearest")
            sub.set_title(e["order"]["direction"], fontsize=9)
            sub.set_xlabel("token column")
            if i == 0:
                sub.set_ylabel("token row")
        fig.colorbar(image, ax=fig.axes[1:], label="a_scale (x/σ units per code)", shrink=0.9)
    fig.suptitle(title)
    _save(fig, path)


def smooth(entry: Mapping[str, Any], path: Path) -> None:
    """σ per input channel: the stored one and, with data, the SmoothQuant initialisation
    recomputed from the float activations, and their ratio."""
    init = entry.get("init")
    fig = Figure(figsize=(9, 6.2 if init else 4.2), dpi=DPI, layout="constrained")
    axes = fig.subplots(2 if init else 1, 1, sharex=True, squeeze=False)[:, 0]
    c = _positions(entry["smooth"])
    ax = axes[0]
    ax.semilogy(c, entry["smooth"], ".-", color="tab:green", linewidth=1, markersize=3,
                label=f"σ stored ({entry['state']})")
    if init:
        ax.semilogy(c, init["smooth"], "--", color="tab:gray", linewidth=1,
                    label="SmoothQuant init, recomputed on --data")
    ax.set_ylabel("σ (smoothing scale, ratio)")
    ax.set_title("smoothing scale per input channel (the input is divided by σ, the weight row "
                 "multiplied)", fontsize=10)
    if init:
        ratio = np.asarray(entry["smooth"], np.float64) / np.asarray(init["smooth"], np.float64)
        axes[1].plot(c, ratio, ".-", color="tab:orange", linewidth=1, markersize=3)
        axes[1].axhline(1.0, color="black", linewidth=0.8)
        axes[1].set_ylabel("σ stored / σ init (ratio)")
        axes[1].set_title("stored / init (1 = unchanged; learning and, off the calibration images, the "
                          "data move it)", fontsize=10)
    axes[-1].set_xlabel("input channel")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best", framealpha=0.8)
    fig.suptitle(f"{entry['name']}: σ, {entry['what']}")
    _save(fig, path)


def weight_step(entry: Mapping[str, Any], path: Path) -> None:
    """The weight step w_scale per output channel: stored, the min-max step of the smoothed float
    kernel (no clipping) and, with data, the PTS initialisation recomputed."""
    n = _positions(entry["w_scale"])
    minmax = entry.get("w_minmax")
    fig = Figure(figsize=(9, 6.5 if minmax is not None else 4.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(2 if minmax is not None else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    ax.semilogy(n, entry["w_scale"], ".-", color="tab:green", linewidth=1, markersize=3,
                label=f"w_scale stored ({entry['state']})")
    if entry.get("w_minmax") is not None:
        ax.semilogy(n, entry["w_minmax"], ":", color="black", linewidth=1,
                    label="min-max step of the float kernel·σ (no clipping)")
    if entry.get("init"):
        ax.semilogy(n, entry["init"]["w_scale"], "--", color="tab:gray", linewidth=1,
                    label="initialisation, recomputed on --data")
    ax.set_ylabel("w_scale (weight units per code)")
    ax.legend(fontsize=8, loc="best", framealpha=0.8)
    if minmax is not None:
        ref = np.asarray(minmax, np.float64)
        axes[1].plot(n, np.asarray(entry["w_scale"]) / ref, ".-", color="tab:green", linewidth=1,
                     markersize=3, label="stored / min-max")
        if entry.get("init"):
            axes[1].plot(n, np.asarray(entry["init"]["w_scale"]) / ref, "--", color="tab:gray",
                         linewidth=1, label="initialisation / min-max")
        axes[1].axhline(1.0, color="black", linewidth=0.8)
        axes[1].set_ylabel("step / min-max step (ratio)")
        axes[1].set_title("below 1: the channel's largest weights are clipped", fontsize=10)
        axes[1].legend(fontsize=8, loc="best", framealpha=0.8)
    axes[-1].set_xlabel("output channel")
    for a in axes:
        a.grid(alpha=0.3, which="both")
    fig.suptitle(f"{entry['name']}: weight step per output channel ({entry['w_bits']}-bit codes), "
                 f"{entry['what']}")
    _save(fig, path)


def block_loss(numbers: Mapping[str, Any], path: Path) -> None:
    """Per-block calibration loss at the PTS initialisation and after learning; reverted blocks
    (learning raised the loss, the initial scales kept) marked."""
    blocks = numbers["blocks"]
    names = [b["block"] for b in blocks]
    x = np.arange(len(blocks))
    init = np.array([b["loss_init"] for b in blocks], np.float64)
    learned = np.array([np.nan if b["loss_learned"] is None else b["loss_learned"] for b in blocks])
    final = np.array([b["loss_final"] for b in blocks], np.float64)
    fig = Figure(figsize=(max(8.0, 0.45 * len(blocks) + 3), 5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(x, init, "o-", color="tab:blue", label="at PTS initialisation")
    if np.isfinite(learned).any():
        ax.plot(x, learned, "^--", color="tab:orange", label="after learning (JLSS)")
    reverted = np.array([b["reverted"] for b in blocks], bool)
    if reverted.any():
        ax.plot(x[reverted], final[reverted], "s", markersize=11, markerfacecolor="none",
                markeredgecolor="tab:red", markeredgewidth=2,
                label="reverted: learning raised the loss, initial scales kept")
    values = np.concatenate([init, learned[np.isfinite(learned)]])
    if values.size and np.all(values > 0):
        ax.set_yscale("log")
    tilt = len(blocks) > 6
    ax.set_xticks(x, names, rotation=45 if tilt else 0, ha="right" if tilt else "center", fontsize=8)
    ax.set_xlabel("calibration block")
    what = "1 - cosine over channels" if numbers["loss"] == "cosine" else "relative MSE"
    ax.set_ylabel(f"block loss ({what}; dimensionless)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"per-block calibration loss, {numbers['what']}")
    _save(fig, path)


def layer_error(numbers: Mapping[str, Any], path: Path) -> None:
    """SQNR (dB) of every quantized linear: its weight, its output inside the quantized model,
    and its output alone on the float input; higher is better."""
    names = numbers["layers"]
    series = [(key, label, color) for key, label, color in (
        ("weight_sqnr_db", "weight: quantized vs float kernel", "tab:blue"),
        ("output_sqnr_db", "output inside the quantized model vs float model (error accumulated)",
         "tab:orange"),
        ("alone_sqnr_db", "output of the layer alone on the float input", "tab:green"),
    ) if numbers.get(key) is not None]
    n = len(names)
    width = 0.8 / len(series)
    fig = Figure(figsize=(min(48.0, max(9.0, 0.14 * n * len(series) + 3)), 5.5), dpi=DPI,
                 layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(n)
    for i, (key, label, color) in enumerate(series):
        values = [np.nan if v is None or not math.isfinite(v) else v for v in numbers[key]]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label, color=color)
    ax.set_xticks(x, names, rotation=90, fontsize=7 if n > 30 else 8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("quantized linear (module path)")
    ax.set_ylabel("SQNR (dB; higher is better)")
    ax.grid(alpha=0.3, axis="y")
    fig.legend(fontsize=8, loc="outside upper center", ncols=len(series))
    ax.set_title(f"per-layer quantization error, {numbers['what']}")
    _save(fig, path)
