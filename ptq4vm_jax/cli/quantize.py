"""``ptq4vm quantize``: float model + calibration data -> a quantized Orbax checkpoint.

The flags are checked here, with flag names, before anything is loaded: the numbers' ranges, the
options that belong to one model family, and whether the calibration data holds --num-calib
images (a multiple of the calibration batch when the run learns)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from ptq4vm_jax.cli.dataspecs import data_dir_of, data_source, images_in
from ptq4vm_jax.cli.errors import UsageError
from ptq4vm_jax.cli.loading import load_float, warn_if_scan_interpreted
from ptq4vm_jax.cli.paths import check_out, check_resume
from ptq4vm_jax.cli.table import table
from ptq4vm_jax.quant.config import FAMILY_DEFAULTS, QuantConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_numbers(args: argparse.Namespace) -> None:
    """The numeric flags' ranges (QuantConfig's own rules, worded for the command line)."""
    for name in ("w_bits", "a_bits"):
        if not 2 <= getattr(args, name) <= 8:
            raise UsageError(f"{_flag(name)} must be an integer from 2 to 8, got {getattr(args, name)}")
    for name in ("num_calib", "train_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"{_flag(name)} must be a positive integer, got {value}")
    if args.epochs is not None and args.epochs < 0:
        raise UsageError(f"--epochs must be an integer >= 0, got {args.epochs}")
    if args.alpha is not None and not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha (SmoothQuant migration strength) must lie in [0, 1], got {args.alpha}")
    for name in ("lr_w", "lr_a", "lr_s"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{_flag(name)} must be a finite number > 0, got {value}")


def quant_config(args: argparse.Namespace) -> QuantConfig:
    """The ``QuantConfig`` the flags describe (``None`` fields: the family's recipe)."""
    check_numbers(args)
    return QuantConfig(
        w_bits=args.w_bits, a_bits=args.a_bits, method=args.method, num_calib=args.num_calib,
        epochs=args.epochs, train_batch=args.train_batch, alpha=args.alpha,
        train_inner_proj=not args.official_inner_proj, act_grid=args.act_grid, loss=args.loss,
        loss_axis=args.loss_axis, revert_worse=not args.keep_learned,
        lr_w=args.lr_w, lr_a=args.lr_a, lr_s=args.lr_s,
    )


def check_recipe(args: argparse.Namespace, family: str, available: int | None) -> None:
    """What depends on the model family and on the data: the family-only options, --num-calib a
    multiple of the calibration batch where the run learns, and enough calibration images."""
    if args.loss_axis == "width" and family != "vmamba":
        raise UsageError("--loss-axis width reproduces the released VMamba code only (its cosine along the "
                         "image width); leave the default --loss-axis channel for Vim")
    if args.official_inner_proj and family != "vim":
        raise UsageError("--official-inner-proj reproduces the released Vim code only, whose fused kernel "
                         f"keeps x_proj/dt_proj from learning; the released {family} code trains them: "
                         "drop the flag")
    recipe = FAMILY_DEFAULTS[family]
    epochs = recipe["epochs"] if args.epochs is None else args.epochs
    batch = min(recipe["train_batch"] if args.train_batch is None else args.train_batch, args.num_calib)
    learns = args.method == "ptq4vm" and epochs > 0
    if learns and args.num_calib % batch:
        raise UsageError(f"--num-calib ({args.num_calib}) must be a multiple of --train-batch ({batch}); "
                         "change one of them")
    if available is not None and available < args.num_calib:
        step = batch if learns else 1
        fit = (f"{available} (or fewer)" if available % step == 0 or available < step else
               f"{available // step * step} (or fewer, a multiple of --train-batch {step})")
        raise UsageError(f"--calib {args.calib} has only {available} images; pass --num-calib {fit} or a "
                         "larger dataset")


def resumed_note(summary: dict) -> str:
    """What part of the calibration time an earlier, interrupted run spent (its blocks restored
    from --resume), or "" when this run calibrated every block."""
    names = summary.get("resumed_stages") or []
    if not names:
        return ""
    which = (f"block {names[0]}" if len(names) == 1 else
             f"{len(names)} blocks, {names[0]} to {names[-1]},")
    return f" ({summary['calibration_seconds_this_run']:.1f}s in this run; {which} from --resume)"


def provenance(args: argparse.Namespace, params: Any, entry: str | None) -> dict[str, Any]:
    """Where a quantized checkpoint comes from, for its metadata: the float model (its path; for
    --checkpoint the file's sha256 and ``key``, the entry read, None for a bare state_dict, as
    ``ptq4vm convert`` records it; and ``params_sha256``: a sha256 of every parameter's
    ``array_digest`` by path, the same for those weights however they were stored) and the
    calibration data (the spec, its data_dir and the number of images)."""
    from ptq4vm_jax.checkpoint import file_sha256
    from ptq4vm_jax.checkpoint.store import tree_sha256

    if args.checkpoint:
        float_model = {"checkpoint": os.path.abspath(args.checkpoint), "sha256": file_sha256(args.checkpoint),
                       "key": entry}
    else:
        float_model = {"params": os.path.abspath(args.params)}
    float_model["params_sha256"] = tree_sha256(params)
    return {"float_model": float_model, "calib": args.calib, "num_calib": args.num_calib,
            "data_dir": data_dir_of(args.calib, args.data_dir)}


def cmd_quantize(args: argparse.Namespace) -> None:
    from ptq4vm_jax import create_model, quantize_params, save_quantized
    from ptq4vm_jax.checkpoint import QUANT_FORMAT
    from ptq4vm_jax.models import image_shape, model_family

    config = quant_config(args)
    check_out(args.out, format=QUANT_FORMAT, model=None, announce=False,
              inputs={"--params": args.params, "--checkpoint": args.checkpoint, "--resume": args.resume})
    check_resume(args.resume, {"--out": args.out, "--params": args.params})
    name, overrides, params, entry = load_float(args)
    origin = provenance(args, params, entry)  # (digests of what was just read)
    check_out(args.out, format=QUANT_FORMAT, model=name, inputs={})  # now that the model is known
    warn_if_scan_interpreted(args)
    overrides = {**overrides, "scan": args.scan}  # quantize_params calibrates with it, saves it not
    size = image_shape(create_model(name, **overrides))[1]
    calib = data_source(args.calib, args.data_dir, size, "--calib")
    check_recipe(args, model_family(name), images_in(calib))
    if isinstance(calib, tuple):
        calib = calib[0]
    qp = quantize_params(params, calib, model=name, config=config, model_overrides=overrides,
                         resume_dir=args.resume)
    save_quantized(args.out, qp, provenance=origin)
    s = qp.summary
    losses = ([("loss_init", "loss (PTS init)", ".5f"), ("loss_learned", "loss (learned)", ".5f"),
               ("loss_final", "loss (kept)", ".5f")] if qp.config.learns else
              [("loss_final", "loss", ".5f")])  # (no learning: one state, PTS or the method's own)
    print(table(s["stages"], [("name", "block", "s"), *losses, ("seconds", "seconds", ".1f")]))
    reverted = [st["name"] for st in s["stages"] if st.get("reverted")]
    if reverted:
        n, total = len(reverted), len(s["stages"])
        d = sum(st.get("loss_learned") is None or not math.isfinite(st["loss_learned"])
                for st in s["stages"] if st.get("reverted"))
        head = (f"learning raised the loss of {n} of {total} blocks" if d == 0 else
                f"learning diverged in {n} of {total} blocks" if d == n else
                f"learning diverged in {d} and raised the loss of {n - d} of {total} blocks")
        print(f"{head}, which kept their "
              f"initial scales ({', '.join(reverted[:5])}{', ...' if len(reverted) > 5 else ''}); lower "
              "--lr-w/--lr-a/--lr-s to let them learn, or pass --keep-learned to keep the learned scales")
    print(f"calibrated {len(s['quantized_layers'])} linears in {s['calibration_seconds']:.1f}s"
          f"{resumed_note(s)}; wrote {args.out}")
    if args.resume and Path(args.resume).is_dir():
        held = sum(f.stat().st_size for f in Path(args.resume).iterdir() if f.is_file())
        print(f"note: --resume {args.resume} ({held / 2**20:.1f} MB) holds the finished run, which this "
              "command would reuse; delete it when you no longer need it")
