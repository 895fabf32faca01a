"""``ptq4vm report``: PNG figures, ``index.html`` and ``report.json`` of what a quantized
checkpoint's calibration learned (per-token steps, σ, block losses) and where its error is
(per-layer SQNR; with --data, the logits against the float model's).

Everything the user typed is checked before the data pass: the checkpoint, the --out directory
(never an input, never a file, never someone else's files: only a previous report there is
replaced), the --layers regex against the checkpoint's layers, the float model against the
checkpoint's model."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from ptq4vm_jax.assets import ASSETS, bundled_models
from ptq4vm_jax.cli.dataspecs import data_source
from ptq4vm_jax.cli.errors import UsageError
from ptq4vm_jax.cli.loading import format_of
from ptq4vm_jax.dirs import listing, nearest_existing, probe_writable
from ptq4vm_jax.held_signals import signals_held

LIMIT, BATCH = 256, 64  # --limit and --batch-size by default
WHERE_FROM = "a directory written by `ptq4vm quantize` or `ptq4vm demo`"


def check_flags(args: argparse.Namespace) -> None:
    """Flag combinations; fills in --limit and --batch-size, which only apply with --data."""
    given = [flag for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size))
             if value is not None]
    if given and not args.data:
        raise UsageError(f"{' and '.join(given)} choose the images of --data, and there is no --data; add "
                         "--data or drop them")
    args.limit = LIMIT if args.limit is None else args.limit
    args.batch_size = BATCH if args.batch_size is None else args.batch_size
    if args.limit < 1:
        raise UsageError(f"--limit must be a positive integer, got {args.limit}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.params and args.checkpoint:
        raise UsageError("give at most one float model: --params (an Orbax dir from `ptq4vm convert`) or "
                         "--checkpoint (an official .pth/.safetensors)")
    if args.key and not args.checkpoint:
        raise UsageError("--key picks the state dict inside a --checkpoint file; drop it or add --checkpoint")


def check_quantized(quantized: str) -> dict[str, Any]:
    """--quantized must be a quantized checkpoint directory (its metadata is returned); the demo's
    parent directory, float params or any other directory are named as what they are."""
    from ptq4vm_jax.checkpoint import FLOAT_FORMAT, QUANT_FORMAT

    where = Path(quantized)
    if not where.exists():
        raise UsageError(f"--quantized {quantized} does not exist; give {WHERE_FROM}")
    if not where.is_dir():
        raise UsageError(f"--quantized {quantized} is a file, not a quantized checkpoint; give {WHERE_FROM}")
    held = format_of(str(where))
    if not held:
        inside = sorted(d.name for d in where.iterdir() if (d / "metadata.json").is_file())
        hint = f" (it holds checkpoints: {', '.join(inside[:4])}{', ...' if len(inside) > 4 else ''})" \
            if inside else ""
        raise UsageError(f"--quantized {quantized} is not a quantized checkpoint: it has no readable "
                         f"metadata.json{hint}; give {WHERE_FROM}")
    if held.get("format") == FLOAT_FORMAT:
        raise UsageError(f"--quantized {quantized} holds float params ({held.get('model_name', '?')}), not "
                         "a quantized checkpoint; quantize it first with `ptq4vm quantize` (it can then be "
                         "the report's --params)")
    if held.get("format") != QUANT_FORMAT:
        raise UsageError(f"--quantized {quantized} holds {held.get('format')!r}, not a quantized "
                         f"checkpoint; give {WHERE_FROM}")
    return held


def check_report_out(out: str, inputs: dict[str, str | None]) -> list[str]:
    """Refuse an --out that is (or lies inside) an input, is a file, or holds files other than
    a previous report; returns the previous report's files, which will be replaced. Whether it
    can be written is tried without leaving anything behind."""
    from ptq4vm_jax.report import NUMBERS, REPORT_FORMAT, report_files

    target = Path(out).resolve()  # resolved: a symlink or ".." must not hide an input
    for flag, path in inputs.items():
        if not path:
            continue
        given = Path(path).resolve()
        if target == given or target.is_relative_to(given):
            how = "the same path as" if target == given else "inside"
            raise UsageError(f"--out {out} is {how} {flag} {path}: the report must not write into its "
                             "inputs; choose another --out")
    if target.exists() and not target.is_dir():
        raise UsageError(f"--out {out} is an existing file; give a directory for the report")
    previous: list[str] = []
    if target.is_dir() and os.listdir(target):
        try:
            held = json.loads((target / NUMBERS).read_text())
        except (OSError, ValueError):
            held = None
        if not isinstance(held, dict) or held.get("format") != REPORT_FORMAT:
            raise UsageError(f"--out {out} holds other files ({listing(os.listdir(target))}) and no report; "
                             "give a new or empty directory (only a previous report there is replaced)")
        previous = [f for f in report_files(held) if (target / f).is_file() and Path(f).name == f]
    existing = nearest_existing(target)
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, so no directory can be made under it")
    try:
        probe_writable(target)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create or write it ({e.strerror or e}); choose a writable "
                         "place") from None
    return previous


def publish(staging: Path, out: Path, previous: list[str], files: list[str]) -> None:
    """Move a finished report's ``files`` from ``staging`` into ``out``, replacing the earlier
    report's files (``previous``); other files in ``out`` stay. ``out`` is made here, and only here."""
    out.mkdir(parents=True, exist_ok=True)
    for name in set(previous) - set(files):
        (out / name).unlink(missing_ok=True)
    for name in files:
        os.replace(staging / name, out / name)


def check_float_model(args: argparse.Namespace, held: dict[str, Any]) -> None:
    """Before anything is loaded: a --params directory must hold the float params of the
    checkpoint's model (``held``: its metadata) at the same sizes, and --data needs a float model."""
    from ptq4vm_jax.checkpoint import QUANT_FORMAT

    name, overrides = held.get("model_name"), dict(held.get("model_overrides") or {})
    if args.params:
        given = format_of(args.params)
        if given.get("format") == QUANT_FORMAT:
            raise UsageError(f"--params {args.params} is a quantized checkpoint; the report compares against "
                             "the float model: --params DIR from `ptq4vm convert`, or --checkpoint X.pth")
        if given.get("model_name") and given["model_name"] != name:
            raise UsageError(f"--params {args.params} holds {given['model_name']}, but --quantized "
                             f"{args.quantized} holds {name}; give the float model it was made from")
        if given and dict(given.get("model_overrides") or {}) != overrides:
            raise UsageError(f"--params {args.params} is {name} with sizes "
                             f"{given.get('model_overrides') or {}}, but --quantized {args.quantized} has "
                             f"{overrides or 'the default sizes'}; give the float model it was made from")
    bundled = name in bundled_models() and not overrides
    if args.data and not (args.params or args.checkpoint or bundled):
        raise UsageError(f"--data compares the quantized model with the float one: pass the float {name} "
                         "as --params DIR or --checkpoint X.pth")


def float_model(args: argparse.Namespace, qp: Any) -> tuple[Any, str | None]:
    """(float params, where they came from) for the checkpoint's model: --params, --checkpoint, or
    the bundled asset of a bundled micro model; (None, None) when there is none."""
    from ptq4vm_jax import load_params, load_torch_checkpoint

    overrides = dict(qp.model_overrides)
    if args.checkpoint:
        params = load_torch_checkpoint(args.checkpoint, qp.model_name, key=args.key, **overrides)
        return params, args.checkpoint
    if args.params:
        params, _ = load_params(args.params, model_name=qp.model_name)
        return params, args.params
    if qp.model_name in bundled_models() and not overrides:
        params, _ = load_params(ASSETS / qp.model_name, model_name=qp.model_name)
        return params, f"the bundled {qp.model_name} (ptq4vm_jax/assets/{qp.model_name})"
    return None, None


def cmd_report(args: argparse.Namespace) -> None:
    from ptq4vm_jax import load_quantized
    from ptq4vm_jax.data import eval_batches
    from ptq4vm_jax.models import image_shape
    from ptq4vm_jax.report import make_report, report_files
    from ptq4vm_jax.report.stats import select_layers

    check_flags(args)
    held = check_quantized(args.quantized)
    previous = check_report_out(args.out, {"--quantized": args.quantized, "--params": args.params,
                                           "--checkpoint": args.checkpoint})
    if args.layers and held.get("layers"):  # against the layers the metadata lists, before reading arrays
        try:
            select_layers([tuple(name.split("/")) for name in sorted(held.get("layers", {}))], args.layers)
        except ValueError as e:
            raise UsageError(str(e)) from None
    check_float_model(args, held)
    qp = load_quantized(args.quantized)
    params, float_source = float_model(args, qp)
    batches = None
    if args.data:
        size = image_shape(qp.model())[1]
        source = data_source(args.data, args.data_dir, size, "--data")
        batches = eval_batches(source, min(args.batch_size, args.limit), image_size=size)
    out = Path(args.out)
    if previous:
        print(f"note: --out {args.out} holds an earlier report; its {len(previous)} files are replaced "
              "once the new one is complete", file=sys.stderr)
    # Made beside --out (beside its nearest existing parent while --out is new; beside where a
    # symlinked --out points, on its disk) and moved in whole: an interrupted or failed run leaves
    # the earlier report, and no new directories.
    staging = nearest_existing(out.resolve().parent) / f".{out.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        report = make_report(qp, staging, layers=args.layers, float_params=params, float_source=float_source,
                             batches=batches, data_spec=args.data, limit=args.limit,
                             source=str(args.quantized))
        with signals_held():  # the moves complete, so no mix of two reports is left
            publish(staging, out, previous, report_files(report))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if report["metrics"]:
        m = report["metrics"]
        print(f"on {m['images']} images of {args.data}: top-1 {m['quantized_top1']:.2f} (float "
              f"{m['float_top1']:.2f}), agreement {m['agreement']:.2f}%, KL {m['mean_kl']:.2e}")
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"wrote {len(report['figures'])} figures, index.html and report.json to {args.out}")
