"""The numbers behind ``ptq4vm report``: what a quantized checkpoint stores, what its float model
does on data, and how far apart the two are. Pure numbers (NumPy / JAX), no plotting.

Every array handed to the figures is returned as a plain list of Python floats, so that
``report.json`` holds exactly what was plotted (a float32 value survives the trip through a
Python float and JSON unchanged).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.qlinear import QuantizedLinear, unpack_weight
from ptq4vm_jax.api import quantized_apply
from ptq4vm_jax.calibrate.jlss import init_layer
from ptq4vm_jax.compare import compare_logits, paired_top1
from ptq4vm_jax.models import image_shape
from ptq4vm_jax.models.local_scan import parse_direction, scan_order
from ptq4vm_jax.models.local_vim import LocalVisionMamba
from ptq4vm_jax.models.local_vmamba import LocalVMamba, block_orders
from ptq4vm_jax.models.vim import VisionMamba
from ptq4vm_jax.models.vmamba import VMamba
from ptq4vm_jax.ops.cross_scan import grid_orders
from ptq4vm_jax.progress import progress_bar
from ptq4vm_jax.quant.config import path_str
from ptq4vm_jax.quant.init import minmax_weight_scale
from ptq4vm_jax.quant.layer import capture_dense, qlinear
from ptq4vm_jax.quant.params import Path, QuantizedParams, flatten_layers
from ptq4vm_jax.quant.quantizers import act_qmax
from ptq4vm_jax.trees import get_path

# VMamba's cross-scan directions (``ops.cross_scan.grid_orders``), by the suffix of x_proj_k / dt_proj_k.
VMAMBA_DIRECTIONS = ("row-major", "column-major", "reversed row-major", "reversed column-major")
_DIRECTION_SUFFIX = re.compile(r"^(?P<base>.+?)_(?P<dir>b|\d+)$")


# ----------------------------------------------------------------------------- token orders


@dataclasses.dataclass(frozen=True)
class TokenOrder:
    """How the token axis of one layer's input (its ``a_scale`` index) maps onto the image.

    ``cell``: for each index, the (row, col) of its patch on the token grid, or (-1, -1) for the
    class token or a padding cell (a windowed scan over a grid its window does not divide);
    ``class_index``: where the class token sits in this layer's order (None: the model has none);
    ``direction``: the scan order, in words; ``grid``: the token grid (H, W), or None where the
    layer's token axis is not the model's token sequence.
    """

    direction: str
    cell: np.ndarray | None
    class_index: int | None
    grid: tuple[int, int] | None

    def to_json(self) -> dict[str, Any]:
        return {"direction": self.direction, "class_token_index": self.class_index,
                "grid": None if self.grid is None else list(self.grid),
                "cell": None if self.cell is None else self.cell.tolist()}


def token_order(model: nn.Module, path: Path, length: int) -> TokenOrder:
    """The token order of the layer at ``path`` (with ``length`` token positions).

    Vim: the sequence is the patches in row-major order with the class token inserted at
    ``cls_position``; the backward branch (``x_proj_b``, ``dt_proj_b``) sees it flipped.
    VMamba: each stage's tokens in row-major order; ``x_proj_k`` / ``dt_proj_k`` see direction
    k of the cross-scan. LocalVim and LocalVMamba: ``x_proj_k`` / ``dt_proj_k`` see block
    direction k's scan order (padding cells included; LocalVMamba pads every direction to the
    longest), the other linears the row-major tokens. Any other model: the input order, no grid.
    """
    name = path[-1]
    if isinstance(model, VisionMamba) and length == model.cfg.seq_len:
        h, w = model.cfg.grid_size
        pos = model.cfg.cls_position
        rows, cols = np.divmod(np.arange(h * w), w)
        cell = np.stack([rows, cols], axis=1)
        cell = np.concatenate([cell[:pos], [[-1, -1]], cell[pos:]]).astype(np.int64)
        if name.endswith("_b"):
            return TokenOrder("backward (flipped sequence)", cell[::-1].copy(), length - 1 - pos, (h, w))
        return TokenOrder("forward", cell, pos, (h, w))
    if isinstance(model, VMamba) and path[0].startswith("layers_"):
        h, w = model.cfg.stage_hw[int(path[0].split("_")[1])]
        if length == h * w:
            k = 0
            m = _DIRECTION_SUFFIX.match(name)
            if m and m["base"] in ("x_proj", "dt_proj") and m["dir"].isdigit():
                k = int(m["dir"]) % len(VMAMBA_DIRECTIONS)
            cell = np.stack(np.divmod(grid_orders(h, w)[k], w), axis=1).astype(np.int64)  # (row, col)
            return TokenOrder(VMAMBA_DIRECTIONS[k], cell, None, (h, w))
    if isinstance(model, LocalVisionMamba) and path[0].startswith("layers_"):
        return _local_vim_order(model, path, length)
    if isinstance(model, LocalVMamba) and path[0].startswith("layers_") and len(path) > 1:
        s, b = (int(part.split("_")[1]) for part in path[:2])
        h, w = model.cfg.stage_hw[s]
        m = _DIRECTION_SUFFIX.match(name)
        if m and m["base"] in ("x_proj", "dt_proj") and m["dir"].isdigit():
            directions = model.cfg.block_directions(s, b)
            orders = block_orders(directions, h, w)[0]  # each direction padded to the longest
            k = int(m["dir"])
            if k < len(directions) and length == orders.shape[1]:
                return TokenOrder(_local_words(directions[k]), _cells(orders[k], h, w), None, (h, w))
        elif length == h * w:
            return TokenOrder("row-major", _cells(np.arange(h * w), h, w), None, (h, w))
    return TokenOrder("the layer's input order", None, None, None)


def _cells(order: np.ndarray, h: int, w: int) -> np.ndarray:
    """(row, col) of each row-major grid index in ``order``; (-1, -1) for padding (index >= h*w
    or < 0)."""
    order = np.asarray(order, np.int64)
    pad = (order < 0) | (order >= h * w)
    cell = np.stack(np.divmod(np.where(pad, 0, order), w), axis=1)
    cell[pad] = -1
    return cell


def _local_words(name: str) -> str:
    """A LocalMamba direction in words, with its official name: ``w2_flip`` -> "reversed 2x2
    windows (w2_flip)"."""
    d = parse_direction(name)
    kind = {"h": "row-major", "v": "column-major"}.get(d.kind) or f"{d.window}x{d.window} windows"
    return f"{'reversed ' if d.flip else ''}{kind} ({name})"


def _local_vim_order(model: LocalVisionMamba, path: Path, length: int) -> TokenOrder:
    """LocalVim: in_proj/out_proj see the row-major sequence (with the middle class token, if
    any); x_proj_k/dt_proj_k see direction k's scan order (padded for windows), with the class
    token put back at ``cls_position``."""
    c = model.cfg
    h, w = c.grid_size
    pos = c.cls_position if c.cls_token else None
    layer = int(path[0].split("_")[1])
    m = _DIRECTION_SUFFIX.match(path[-1])
    if m and m["base"] in ("x_proj", "dt_proj") and m["dir"].isdigit() and layer < len(c.directions):
        directions = c.directions[layer]
        if int(m["dir"]) >= len(directions):
            return TokenOrder("the layer's input order", None, None, None)
        name = directions[int(m["dir"])]
        order, words = scan_order(name, h, w), _local_words(name)
    else:
        order, words = np.arange(h * w), "row-major"
    cell = _cells(order, h, w)
    if pos is not None:
        cell = np.concatenate([cell[:pos], [[-1, -1]], cell[pos:]])
    if len(cell) != length:
        return TokenOrder("the layer's input order", None, None, None)
    return TokenOrder(words, cell, pos, (h, w))


def on_grid(values: Sequence[float], order: TokenOrder) -> np.ndarray | None:
    """Per-token values laid out on the token grid (NaN where no token lands: none here, as
    every patch appears once); None without a grid. The class token is left out."""
    if order.grid is None or order.cell is None:
        return None
    out = np.full(order.grid, np.nan)
    keep = order.cell[:, 0] >= 0
    out[order.cell[keep, 0], order.cell[keep, 1]] = np.asarray(values, np.float64)[keep]
    return out


# ----------------------------------------------------------------------------- which layers


def select_layers(paths: Sequence[Path], pattern: str) -> list[Path]:
    """The layers whose '/'-joined path the regex ``pattern`` matches (``re.search``); a pattern
    that matches none raises ValueError naming a few layers."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"--layers {pattern!r} is not a valid regex: {e}") from None
    chosen = [p for p in paths if rx.search(path_str(p))]
    if not chosen:
        names = [path_str(p) for p in paths]
        shown = ", ".join(names[:4] + (["...", names[-1]] if len(names) > 5 else names[4:]))
        raise ValueError(f"--layers {pattern!r} matches none of the {len(names)} quantized layers "
                         f"({shown}); give a regex over these paths, e.g. 'out_proj$'")
    return chosen


def default_layers(model: nn.Module, qlayers: Mapping[Path, QuantizedLinear]) -> list[Path]:
    """The layers the report profiles when ``--layers`` is not given.

    The last block's ``out_proj`` (the paper's Figure 1 profiles an out_proj late in Vim-Ti) among
    the blocks with the most token positions (VMamba's later stages have few tokens), and in
    VMamba and the LocalMamba families also that block's per-direction ``x_proj_k`` (each sees
    its own scan order). Where no
    layer is an out_proj: the first quantized layer.
    """
    outs = {p: layer.a_scale.shape[0] for p, layer in qlayers.items() if p[-1] == "out_proj"}
    if not outs:
        return [next(iter(qlayers))]
    # among the out_projs only: a padded windowed scan makes x_proj_k longer than the grid
    most = max(outs.values())
    outs = [p for p, n in outs.items() if n == most]
    last = sorted(outs, key=_natural_key)[-1]
    chosen = [last]
    if isinstance(model, (VMamba, LocalVisionMamba, LocalVMamba)):
        chosen += [p for p in qlayers if p[:-1] == last[:-1] and re.fullmatch(r"x_proj_\d+", p[-1])]
    return chosen


def call_order(model: nn.Module, qparams: QuantizedParams) -> list[Path]:
    """The quantized layers in the order the model calls them (an abstract, shape-only forward)."""
    paths = set(flatten_layers(qparams.qlayers))
    called: list[Path] = []

    def run(qp: QuantizedParams, images: jax.Array) -> jax.Array:
        with capture_dense(paths, called=called):
            return quantized_apply(model, qp, images)

    jax.eval_shape(run, qparams, jax.ShapeDtypeStruct(image_shape(model), jnp.float32))
    seen = list(dict.fromkeys(called))  # first calls, in order
    return [*seen, *sorted(paths - set(seen), key=_natural_key)]


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for part in path for t in re.split(r"(\d+)", part)]


def direction_groups(paths: Sequence[Path]) -> dict[str, list[Path]]:
    """Layers that differ only by a direction suffix (Vim's ``x_proj`` / ``x_proj_b``, VMamba's
    ``x_proj_0..3``), by '/'-joined parent path and base name; only groups of two or more."""
    groups: dict[str, list[Path]] = {}
    for p in paths:
        m = _DIRECTION_SUFFIX.match(p[-1])
        base = m["base"] if m and m["base"] in ("x_proj", "dt_proj") else p[-1]
        groups.setdefault(path_str(p[:-1] + (base,)), []).append(p)
    return {k: sorted(v, key=_natural_key) for k, v in groups.items() if len(v) > 1}


# ----------------------------------------------------------------------------- data-free numbers


def floats(a: Any) -> list[float]:
    """An array as a list of Python floats (exact for float32 values)."""
    return np.asarray(a, np.float64).reshape(-1).tolist()


def sqnr_db(signal: float, noise: float) -> float | None:
    """10 log10(signal / noise); None where either is zero (no error, or no signal, to measure)."""
    if noise <= 0.0 or signal <= 0.0:
        return None
    return float(10.0 * np.log10(signal / noise))


def effective_kernel(layer: QuantizedLinear) -> np.ndarray:
    """The float kernel the quantized layer stands for: Ŵ[k, n] = w_int[k, n] s_w[n] / σ[k]
    (the layer computes (x/σ) Ŵσ, so Ŵ is what it multiplies the unsmoothed input by)."""
    codes = np.asarray(unpack_weight(layer.w_int, layer.w_bits, layer.in_features), np.float64)
    return codes * np.asarray(layer.w_scale, np.float64) / np.asarray(layer.smooth, np.float64)[:, None]


def weight_sqnr(layer: QuantizedLinear, kernel: Any) -> float | None:
    """SQNR (dB) of the layer's quantized weight against the float kernel it was made from."""
    w = np.asarray(kernel, np.float64)
    return sqnr_db(float(np.sum(w * w)), float(np.sum((effective_kernel(layer) - w) ** 2)))


def minmax_weight_step(layer: QuantizedLinear, kernel: Any) -> list[float]:
    """Per output channel, the step that would cover the smoothed float kernel W·diag(σ) without
    clipping (max |W̃| / qmax, calibration's own min-max rule): the reference for ``w_scale``."""
    return floats(minmax_weight_scale(kernel, layer.smooth, layer.w_bits))


def block_losses(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The calibration summary's per-block losses: at the PTS initialisation, after learning
    (None without learning or where it diverged), the one kept, and whether the block reverted."""
    return [{"block": st["name"], "loss_init": st["loss_init"], "loss_learned": st.get("loss_learned"),
             "loss_final": st["loss_final"], "reverted": bool(st.get("reverted"))}
            for st in summary.get("stages", [])]


def stage_of(path: Path, blocks: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The calibration block a layer belongs to (its summary entry), if any."""
    name = path_str(path)
    for b in blocks:
        if name.startswith(b["block"] + "/"):
            return b
    return None


# ----------------------------------------------------------------------------- data pass


def _per_example(x: jax.Array) -> jax.Array:
    """Sum over every axis but the first (the batch): one number per image."""
    return jnp.sum(x.astype(jnp.float32).reshape(x.shape[0], -1), axis=1)


@dataclasses.dataclass
class DataPass:
    """What the float and the quantized model did on the images: both models' logits, labels,
    per-layer power sums (float output; error of the layer's output inside the quantized model;
    error of the layer alone on the float input) and the float inputs of the chosen layers."""

    fp_logits: np.ndarray
    q_logits: np.ndarray
    labels: np.ndarray
    signal: dict[Path, float]
    noise_model: dict[Path, float]
    noise_alone: dict[Path, float]
    inputs: dict[Path, np.ndarray]


def data_pass(model: nn.Module, qparams: QuantizedParams, float_params: Any,
              batches: Iterable[tuple[Any, Any, Any]], chosen: Sequence[Path], *,
              limit: int | None = None, progress: bool = True) -> DataPass:
    """Run the float and the quantized model (fake-quant, as calibration saw it) over
    ``(images, labels, mask)`` batches, at most ``limit`` images."""
    qlayers = flatten_layers(qparams.qlayers)
    paths = set(qlayers)
    keep = tuple(chosen)

    @jax.jit
    def step(fparams: Any, qp: QuantizedParams, images: jax.Array) -> tuple:
        f_in: dict = {}
        f_out: dict = {}
        with capture_dense(paths, inputs=f_in, outputs=f_out):
            fp_logits = model.apply({"params": fparams}, images)
        q_out: dict = {}
        with capture_dense(paths, outputs=q_out):
            q_logits = quantized_apply(model, qp, images)
        layers = flatten_layers(qp.qlayers)
        sums = {}
        for p in paths:
            y = f_out[p].astype(jnp.float32)
            alone = qlinear(f_in[p], layers[p], qp.config, "fake").astype(jnp.float32)
            sums[p] = (_per_example(y * y), _per_example(jnp.square(q_out[p] - y)),
                       _per_example(jnp.square(alone - y)))
        return fp_logits, q_logits, sums, {p: f_in[p] for p in keep}

    fp, q, ys = [], [], []
    signal = dict.fromkeys(paths, 0.0)
    noise_model = dict.fromkeys(paths, 0.0)
    noise_alone = dict.fromkeys(paths, 0.0)
    inputs: dict[Path, list] = {p: [] for p in keep}
    n = 0
    bar = progress_bar(limit, "report", unit="img", enabled=progress)
    try:
        for images, labels, mask in batches:
            mask = np.asarray(mask, bool)
            if limit is not None:
                mask = mask & (np.cumsum(mask) <= limit - n)
            if not mask.any():
                break
            f_logits, qu_logits, sums, ins = jax.device_get(step(float_params, qparams, jnp.asarray(images)))
            fp.append(np.asarray(f_logits)[mask])
            q.append(np.asarray(qu_logits)[mask])
            ys.append(np.asarray(labels)[mask])
            for p, (s, e_model, e_alone) in sums.items():
                signal[p] += float(np.sum(np.asarray(s, np.float64)[mask]))
                noise_model[p] += float(np.sum(np.asarray(e_model, np.float64)[mask]))
                noise_alone[p] += float(np.sum(np.asarray(e_alone, np.float64)[mask]))
            for p in keep:
                inputs[p].append(np.asarray(ins[p])[mask])
            n += int(mask.sum())
            bar.update(int(mask.sum()))
            if limit is not None and n >= limit:
                break
    finally:
        bar.close()
    if n == 0:
        raise ValueError("the data held no images to report on")
    return DataPass(np.concatenate(fp), np.concatenate(q), np.concatenate(ys), signal, noise_model,
                    noise_alone, {p: np.concatenate(v) for p, v in inputs.items()})


def logit_metrics(dp: DataPass) -> dict[str, Any]:
    """Top-1 of both models, agreement and KL of the quantized logits to the float ones, and the
    paired test of the two models' top-1 (``ptq4vm_jax.compare``)."""
    cmp = compare_logits(dp.fp_logits, dp.q_logits)
    fp_pred, q_pred = dp.fp_logits.argmax(-1), dp.q_logits.argmax(-1)
    pair = paired_top1(dp.labels, q_pred, fp_pred)
    return {"images": int(dp.labels.shape[0]),
            "float_top1": 100.0 * float(np.mean(fp_pred == dp.labels)),
            "quantized_top1": 100.0 * float(np.mean(q_pred == dp.labels)),
            "agreement": cmp["agreement"], "mean_kl": cmp["mean_kl"],
            "only_quantized_right": pair["only_a"], "only_float_right": pair["only_b"],
            "mcnemar_p": pair["p_value"]}


def activation_profile(x: np.ndarray, layer: QuantizedLinear) -> dict[str, list[float]]:
    """Per token position, what the PTS step sizes were fitted to and what they cover.

    ``x``: the layer's float input (N, L, C). ``min``/``max``: the range of x/σ over images and
    channels (the statistic PTS's grid search shrinks); ``absmax``: max |x| before smoothing (the
    paper's Figure 1); ``q_lo``/``q_hi``: the range the stored quantizer represents,
    [-z s, (qmax - z) s].
    """
    x = np.asarray(x, np.float32)
    x = x.reshape(x.shape[0], -1, x.shape[-1]) if x.ndim != 3 else x
    xs = x / np.asarray(layer.smooth, np.float32)
    s = np.asarray(layer.a_scale, np.float64)
    z = np.asarray(layer.a_zero, np.float64)
    qmax = act_qmax(layer.a_bits)
    return {"min": floats(xs.min(axis=(0, 2))), "max": floats(xs.max(axis=(0, 2))),
            "absmax": floats(np.abs(x).max(axis=(0, 2))),
            "q_lo": floats(-z * s), "q_hi": floats((qmax - z) * s)}


def recomputed_init(qparams: QuantizedParams, float_params: Any, path: Path,
                    x: np.ndarray) -> dict[str, list[float]]:
    """The PTS / SmoothQuant initialisation of one layer, recomputed by calibration's own
    ``init_layer`` from the float input ``x`` (N, L, C): σ, a_scale, a_zero, w_scale. On the
    calibration images this is the state calibration started from; on other images, an estimate
    of it (the checkpoint does not store the initial state)."""
    dense = get_path(float_params, path)
    x = np.asarray(x, np.float32)
    x = x.reshape(x.shape[0], -1, x.shape[-1]) if x.ndim != 3 else x
    st = init_layer(dense["kernel"], dense.get("bias"), jnp.asarray(x), qparams.config)
    return {"smooth": floats(st.smooth), "a_scale": floats(st.a_scale), "a_zero": floats(st.a_zero),
            "w_scale": floats(st.w_scale)}
