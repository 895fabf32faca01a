"""A whole report: numbers (``stats``), figures (``figures``), ``index.html`` (``html``) and
``report.json``, written into a directory the caller has prepared."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ptq4vm_jax.errors import ArgumentError
from ptq4vm_jax.models import model_label
from ptq4vm_jax.quant.config import path_str
from ptq4vm_jax.quant.params import QuantizedParams, flatten_layers
from ptq4vm_jax.report import figures, html, stats
from ptq4vm_jax.trees import flatten_tree, get_path

REPORT_FORMAT = "ptq4vm-jax/report"
REPORT_VERSION = 1
INDEX, NUMBERS = "index.html", "report.json"


def _file_name(prefix: str, name: str) -> str:
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"


def check_float_params(qparams: QuantizedParams, float_params: Any) -> None:
    """Raise ``ArgumentError`` unless ``float_params`` are those ``qparams`` were quantized from.

    A quantized checkpoint keeps, unchanged, every float parameter outside its quantized linears
    (embeddings, norms, convolutions, the scans' A and D, ...); another model of the same
    architecture differs there, and a report against it would compare two different networks."""
    kept, given = flatten_tree(qparams.params), flatten_tree(float_params)

    def same(path: str, value: Any) -> bool:  # compared in the stored dtype (a bf16 model keeps bf16)
        if path not in given or np.shape(given[path]) != np.shape(value):
            return False
        stored = np.asarray(value)
        return np.array_equal(np.asarray(given[path]).astype(stored.dtype), stored)

    differ = [path for path, value in sorted(kept.items()) if not same(path, value)]
    if differ:
        shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
        raise ArgumentError(f"the float params are not those this checkpoint was quantized from: "
                            f"{len(differ)} of the {len(kept)} float parameters it keeps differ ({shown}); "
                            "pass the float model it was quantized from", argument="float_params")


def _state(path: tuple[str, ...], cfg: Any, blocks: list[dict[str, Any]]) -> str:
    """What the stored scales of a layer are, in words."""
    block = stats.stage_of(path, blocks)
    if not cfg.learns:
        return "PTS init, no learning" if cfg.smooths else f"{cfg.method}: min-max, no learning"
    if block is None:
        return "initialised outside the calibration blocks, not learned"
    if block["reverted"]:
        return "PTS init kept: learning raised this block's loss"
    return "after JLSS"


@dataclass
class _Page:
    """What the sections of a report add to: its numbers, figures and notes, and where it goes."""

    out: Path
    what: str  # the model and its quantization, in words
    report: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def figure(self, file: str, title: str, caption: str, key: str) -> None:
        self.report["figures"].append({"file": file, "title": title, "caption": caption, "numbers": key})


def make_report(
    qparams: QuantizedParams,
    out_dir: str | Path,
    *,
    layers: str | None = None,
    float_params: Any = None,
    float_source: str | None = None,
    batches: Iterable[tuple[Any, Any, Any]] | None = None,
    data_spec: str | None = None,
    limit: int | None = None,
    source: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compute the report of ``qparams`` and write its PNGs, ``index.html`` and ``report.json``
    into the existing directory ``out_dir``; returns what ``report.json`` holds.

    ``layers``: a regex over the quantized layers' paths choosing the profiled layers (default:
    ``stats.default_layers``). ``float_params``: the float model's params (weight error; needed
    with ``batches``), those ``qparams`` were quantized from (checked: ``check_float_params``).
    ``batches``: ``(images, labels, mask)`` batches (``data.eval_batches``), at most ``limit``
    images, for the data figures and the logit metrics. ``float_source``, ``data_spec`` and
    ``source`` (the checkpoint's path) are recorded as given.
    """
    if batches is not None and float_params is None:
        raise ValueError("a report on data needs the float model's params, to compare against")
    if float_params is not None:
        check_float_params(qparams, float_params)
    model = qparams.model()
    cfg = qparams.config
    stored = flatten_layers(qparams.qlayers)
    qlayers = {p: stored[p] for p in stats.call_order(model, qparams)}
    chosen = stats.select_layers(list(qlayers), layers) if layers else stats.default_layers(model, qlayers)
    label = model_label(qparams.model_name, dict(qparams.model_overrides))
    blocks = stats.block_losses(qparams.summary)

    dp = None
    if batches is not None:
        log(f"running the float and the quantized {qparams.model_name} on {data_spec}")
        dp = stats.data_pass(model, qparams, float_params, batches, chosen, limit=limit, progress=progress)

    page = _Page(Path(out_dir), f"{label} {cfg.method} W{cfg.w_bits}A{cfg.a_bits}", {
        "format": REPORT_FORMAT, "version": REPORT_VERSION,
        "checkpoint": {"path": source, "model_name": qparams.model_name,
                       "model_overrides": dict(qparams.model_overrides), "method": cfg.method,
                       "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
                       "calibration_images": qparams.summary.get("num_calib")},
        "float_params": float_source,
        "data": None if dp is None else {"spec": data_spec, "images": int(dp.labels.shape[0])},
        "metrics": None if dp is None else stats.logit_metrics(dp),
        "layers": {}, "directions": {}, "block_loss": None, "layer_error": None, "figures": [],
    })
    page.report["notes"] = page.notes
    _layer_sections(page, qparams, qlayers, chosen, blocks, float_params, dp, grouped_only=not layers)
    if not cfg.dynamic_activations:
        _direction_sections(page, chosen)
    _block_loss_section(page, cfg, blocks)
    _layer_error_section(page, qlayers, float_params, dp)

    report = page.report
    (page.out / NUMBERS).write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    data_text = f"{data_spec}, {report['data']['images']} images" if dp else "none (pass --data)"
    header = {"title": f"PTQ4VM report: {page.what}",
              "lines": [f"checkpoint: {source or '(in memory)'}; calibrated on "
                        f"{report['checkpoint']['calibration_images']} images",
                        f"float model: {float_source or 'not given'}; data: {data_text}"]}
    (page.out / INDEX).write_text(html.render(header, report["metrics"], report["figures"], page.notes))
    return report


def _layer_sections(page: _Page, qparams: QuantizedParams, qlayers: Mapping, chosen: list,
                    blocks: list[dict[str, Any]], float_params: Any, dp: Any, grouped_only: bool) -> None:
    """Per chosen layer: its numbers, and the PTS profile, σ and weight-step figures."""
    model, cfg = qparams.model(), qparams.config
    profiled = not cfg.dynamic_activations
    if not profiled:
        page.notes.append("per_token_dynamic computes its activation scales from each input at run time: "
                          "there is no stored per-token profile to show")
    if not cfg.smooths:
        page.notes.append(f"{cfg.method} does not smooth (σ = 1 everywhere): no σ figures")
    # By default, sibling directions (VMamba's x_proj_k) are shown together in one figure only;
    # layers named by ``layers`` get figures of their own as well.
    grouped = {q for g in stats.direction_groups(chosen).values() for q in g} if grouped_only else set()
    first = "PTS" if cfg.smooths else "min-max"
    recomputed = ("recomputed on the --data images by calibration's own init_layer (the checkpoint "
                  "does not store it; exact only on the calibration images)")
    for p in chosen:
        layer = qlayers[p]
        name = path_str(p)
        order = stats.token_order(model, p, int(layer.a_scale.shape[0]))
        entry: dict[str, Any] = {
            "name": name, "what": page.what, "a_bits": layer.a_bits, "w_bits": layer.w_bits,
            "order": order.to_json(), "w_scale": stats.floats(layer.w_scale),
            "w_minmax": (None if float_params is None else
                         stats.minmax_weight_step(layer, get_path(float_params, p)["kernel"])),
            "a_scale": stats.floats(layer.a_scale), "a_zero": stats.floats(layer.a_zero),
            "smooth": stats.floats(layer.smooth), "state": _state(p, cfg, blocks),
            "images": None if dp is None else int(dp.labels.shape[0]), "float_range": None, "init": None,
        }
        grid = stats.on_grid(entry["a_scale"], order)
        entry["a_scale_on_grid"] = None if grid is None else [
            [None if v != v else v for v in row] for row in grid.tolist()]  # (NaN: no token there)
        if dp is not None:
            entry["float_range"] = stats.activation_profile(dp.inputs[p], layer)
            if profiled:
                entry["init"] = stats.recomputed_init(qparams, float_params, p, dp.inputs[p])
        page.report["layers"][name] = entry
        if p in grouped:
            continue
        init_text = f" Dashed: the {first} initialisation, {recomputed}." if entry["init"] else ""
        if profiled:
            cls = order.class_index
            cls_text = f"; red dotted: the class token (position {cls})" if cls is not None else ""
            file = _file_name("pts", name)
            figures.profile(entry, page.out / file)
            data_text = (f" Blue: the float x/σ's min..max over the {entry['images']} images and all "
                         "channels (what PTS fits); black: the range the quantizer covers (beyond: clipped)."
                         if dp is not None else " Pass --data to see the float range they were fitted to.")
            page.figure(file, f"PTS profile: {name}",
                        f"The stored step size a_scale and zero point a_zero per token position of {name}'s "
                        f"input (order: {order.direction}){cls_text}.{data_text}{init_text}",
                        f"layers/{name}")
        if cfg.smooths:
            file = _file_name("smooth", name)
            figures.smooth(entry, page.out / file)
            smooth_init = (f" Dashed: the SmoothQuant initialisation, {recomputed}; below, stored / init."
                           if entry["init"] else " Pass --data to compare it with the SmoothQuant "
                           "initialisation (recomputed: the checkpoint does not store it).")
            page.figure(file, f"σ per input channel: {name}",
                        f"The smoothing scale σ of {name} per input channel as stored ({entry['state']})."
                        f"{smooth_init}", f"layers/{name}")
        file = _file_name("wstep", name)
        figures.weight_step(entry, page.out / file)
        minmax_text = (" Dotted: the min-max step max|Wσ|/qmax of the float kernel (no clipping); a "
                       "stored step below it clips that channel's largest weights."
                       if entry["w_minmax"] is not None else "")
        page.figure(file, f"Weight step per output channel: {name}",
                    f"The weight step w_scale of {name} per output channel as stored ({entry['state']})."
                    f"{minmax_text}{init_text}", f"layers/{name}")


def _direction_sections(page: _Page, chosen: list) -> None:
    """One figure per group of sibling scan directions: their a_scale, each in its own order."""
    for group, members in stats.direction_groups(chosen).items():
        entries = [page.report["layers"][path_str(p)] for p in members]
        file = _file_name("directions", group)
        figures.directions(entries, f"{group}: a_scale per scan direction, {page.what}", page.out / file)
        page.report["directions"][group] = [path_str(p) for p in members]
        grid_text = (" Below, each direction's a_scale placed back on the token grid: the same image "
                     "position gets a different step in each direction."
                     if all(e["a_scale_on_grid"] is not None for e in entries) else "")
        page.figure(file, f"Per-direction profiles: {group}",
                    f"a_scale of {', '.join(e['name'].rsplit('/', 1)[-1] for e in entries)} along each "
                    f"one's own scan order.{grid_text}", f"directions/{group}")


def _block_loss_section(page: _Page, cfg: Any, blocks: list[dict[str, Any]]) -> None:
    """The calibration loss of each block, at the initialisation and after learning."""
    if not blocks:
        page.notes.append("the checkpoint's calibration summary has no per-block losses")
        return
    numbers = {"loss": cfg.loss, "what": page.what, "blocks": blocks}
    page.report["block_loss"] = numbers
    figures.block_loss(numbers, page.out / "block_loss.png")
    reverted = [b["block"] for b in blocks if b["reverted"]]
    learn_text = ("" if not cfg.learns else
                  f" Triangles: after learning; {len(reverted)} of {len(blocks)} blocks reverted "
                  "(learning raised their loss, so they kept their initial scales; squared in red).")
    page.figure("block_loss.png", "Per-block calibration loss",
                f"The block loss ({'1 - cosine over channels' if cfg.loss == 'cosine' else 'relative MSE'}"
                f") of each calibration block on the {page.report['checkpoint']['calibration_images']} "
                f"calibration images, from the checkpoint's calibration summary. Circles: at the PTS "
                f"initialisation.{learn_text}", "block_loss")


def _layer_error_section(page: _Page, qlayers: Mapping, float_params: Any, dp: Any) -> None:
    """The SQNR of every quantized linear: its weight, and its output on the data."""
    if float_params is None:
        page.notes.append("no float model given (--params / --checkpoint): no per-layer error figure")
        return
    numbers = {"what": page.what, "layers": [path_str(p) for p in qlayers],
               "weight_sqnr_db": [stats.weight_sqnr(qlayers[p], get_path(float_params, p)["kernel"])
                                  for p in qlayers],
               "output_sqnr_db": None, "alone_sqnr_db": None}
    if dp is not None:
        numbers["output_sqnr_db"] = [stats.sqnr_db(dp.signal[p], dp.noise_model[p]) for p in qlayers]
        numbers["alone_sqnr_db"] = [stats.sqnr_db(dp.signal[p], dp.noise_alone[p]) for p in qlayers]
    page.report["layer_error"] = numbers
    figures.layer_error(numbers, page.out / "layer_error.png")
    data_text = (f" Orange: each layer's output in the quantized model against the float model's, on "
                 f"the {page.report['data']['images']} --data images (errors of earlier layers included); "
                 "green: the layer alone, fed the float model's input (its own error)."
                 if dp is not None else " Pass --data for the SQNR of each layer's output on images.")
    page.figure("layer_error.png", "Per-layer quantization error (SQNR)",
                "SQNR = 10 log10(Σ float² / Σ (quantized - float)²) in dB, per quantized linear; blue: "
                f"the dequantized weight (w_int s_w / σ) against the float kernel.{data_text}", "layer_error")


def report_files(report: Mapping[str, Any]) -> list[str]:
    """Every file a report wrote (what a later report in the same directory may replace)."""
    return [INDEX, NUMBERS, *(f["file"] for f in report.get("figures", []))]
