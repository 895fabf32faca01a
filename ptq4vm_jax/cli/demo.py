"""``ptq4vm demo``: quantize a bundled micro model on the built-in digits, RTN against PTQ4VM (PTS
alone with ``--epochs 0``) at W8A8 and W4A8, and print a table against the float model."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ptq4vm_jax.assets import ASSETS
from ptq4vm_jax.cli.paths import check_out
from ptq4vm_jax.cli.table import table

if TYPE_CHECKING:
    from ptq4vm_jax.quant.config import QuantConfig


# The Vim demo recipe: the official step count (about 100 Adam steps per block) in mini-batches
# of 32 so that it runs in minutes on a CPU, and learning rates 1e-4 (the official VMamba ones)
# because the micro model's activation steps are an order of magnitude smaller than ImageNet
# Vim's, where 5e-4/1e-2 overshoot.
DEMO_RECIPE = dict(train_batch=32, epochs=12, lr_w=1e-4, lr_a=1e-4, lr_s=1e-4)


def demo_recipe(model: str, epochs: int | None) -> dict:
    """The PTQ4VM settings the demo overrides: ``DEMO_RECIPE`` for Vim (VMamba's official recipe
    already learns at 1e-4 in mini-batches of 32, and runs in time), ``epochs`` if given."""
    from ptq4vm_jax.models import model_family

    recipe = dict(DEMO_RECIPE) if model_family(model) == "vim" else {}
    return recipe if epochs is None else {**recipe, "epochs": epochs}


def demo_runs(model: str, epochs: int | None) -> list[tuple[str, QuantConfig]]:
    """(label, QuantConfig) of each quantized model in the table, in order. ``epochs=0`` runs
    PTQ4VM's initialisation alone (PTS + SmoothQuant), labelled PTS: named as what ran."""
    from ptq4vm_jax import QuantConfig  # (not at the top: `ptq4vm --help` loads no jax)

    if epochs == 0:
        method, recipe = "PTS", dict(method="pts_only")
    else:
        method, recipe = "PTQ4VM", demo_recipe(model, epochs)
    return [("RTN W8A8", QuantConfig(8, 8, method="rtn")),
            (f"{method} W8A8", QuantConfig(8, 8, **recipe)),
            ("RTN W4A8", QuantConfig(4, 8, method="rtn")),
            (f"{method} W4A8", QuantConfig(4, 8, **recipe))]


def cmd_demo(args: argparse.Namespace) -> None:
    import jax
    import numpy as np

    from ptq4vm_jax import (
        create_model,
        load_params,
        quantize_params,
        quantized_apply,
        save_quantized,
    )
    from ptq4vm_jax.checkpoint import QUANT_FORMAT
    from ptq4vm_jax.checkpoint.store import tree_sha256
    from ptq4vm_jax.compare import compare_logits, paired_top1
    from ptq4vm_jax.data import load_digits_dataset
    from ptq4vm_jax.models import image_shape, model_family

    t_start = time.perf_counter()
    params, _ = load_params(ASSETS / args.model, model_name=args.model)
    model = create_model(args.model)
    size = image_shape(model)[1]
    calib, _ = load_digits_dataset("train", image_size=size)
    test_x, test_y = load_digits_dataset("test", image_size=size)
    fp_logits = np.asarray(jax.jit(lambda x: model.apply({"params": params}, x))(test_x))
    rows = [dict(name="float32", top1=100 * float(np.mean(fp_logits.argmax(-1) == test_y)),
                 agreement=100.0, kl=0.0)]
    runs = demo_runs(args.model, args.epochs)
    method = runs[1][0].split()[0]
    out = Path(args.out).absolute() / args.model  # each model's demo has a directory of its own
    targets = {label: out / label.lower().replace(" ", "_") for label, _ in runs}
    for target in targets.values():  # before any calibration, not after the first
        check_out(str(target), format=QUANT_FORMAT, model=args.model, inputs={}, announce=False)
    replaced = [t.name for t in targets.values() if t.is_dir() and any(t.iterdir())]
    if replaced:  # one line, not check_out's note per checkpoint: rerunning the demo is routine
        print(f"note: {out} holds checkpoints ({', '.join(replaced)}); the demo replaces them",
              file=sys.stderr)
    preds = {}
    for label, cfg in runs:
        print(f"== {label}", flush=True)
        t0 = time.perf_counter()
        qp = quantize_params(params, calib, model=args.model, config=cfg, progress=not args.quiet,
                             log=(lambda _: None) if args.quiet else print)
        seconds = time.perf_counter() - t0
        logits = np.asarray(quantized_apply(model, qp, test_x))  # one program per bit width
        cmp = compare_logits(fp_logits, logits)
        preds[label] = logits.argmax(-1)
        save_quantized(targets[label], qp, provenance={
            "float_model": {"params": str(ASSETS / args.model), "params_sha256": tree_sha256(params)},
            "calib": "digits:train", "num_calib": qp.config.num_calib, "data_dir": None})
        rows.append(dict(name=label, top1=100 * float(np.mean(logits.argmax(-1) == test_y)),
                         agreement=cmp["agreement"], kl=cmp["mean_kl"], seconds=seconds))
    recipe = demo_recipe(args.model, args.epochs)
    described = ("PTS: PTQ4VM's initialisation, no JLSS (--epochs 0)" if method == "PTS"
                 else f"PTQ4VM recipe {recipe or f'official {model_family(args.model)}'}")
    print(f"\n{args.model} on the digits test split ({len(test_y)} images); calibration on the first "
          f"{runs[1][1].num_calib} train images; {described}")
    print(table(rows, [("name", "model", "s"), ("top1", "top-1 %", ".2f"),
                       ("agreement", "agree w/ FP %", ".2f"), ("kl", "KL to FP", ".2e"),
                       ("seconds", "calib s", ".1f")]))
    for bits in ("W8A8", "W4A8"):
        pair = paired_top1(test_y, preds[f"{method} {bits}"], preds[f"RTN {bits}"])
        print(f"{bits} top-1, {method} vs RTN: {method} alone right on {pair['only_a']}, RTN alone right "
              f"on {pair['only_b']}; exact McNemar p = {pair['p_value']:.3f}")
    print(f"\nquantized checkpoints in {out}; total {time.perf_counter() - t_start:.0f}s")
