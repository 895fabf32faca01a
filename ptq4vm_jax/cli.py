"""``ptq4vm``: demo, convert, quantize, eval. Argument parsing and printing only."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets"
DTYPES = ("float32", "bfloat16")  # eval --dtype: the projections' compute dtype


class UsageError(SystemExit):
    """A mistake in the command line: ``main`` prints it as ``ptq4vm CMD: error: ...`` and the
    process exits with status 2, as argparse does for its own errors."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's kill, ``timeout``), handled as Ctrl-C is: the run stops where it is,
    the completed blocks stay in --resume, and ``main`` says so."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # (only there can it be set)
        yield
        return

    def stop(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Fixed-width table; cols are (key, header, format)."""
    cells = [[h for _, h, _ in cols]] + [
        [("-" if r.get(k) is None else format(r[k], f)) for k, _, f in cols] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    line = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(row, widths, strict=True)))
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _data_source(spec: str, data_dir: str | None, image_size: int, flag: str) -> Any:
    """``tfds:NAME:SPLIT`` (array_record data source, no TensorFlow) or ``digits:SPLIT`` (built in,
    made at the model's ``image_size``); ``flag`` names the option in errors."""
    kind, _, rest = spec.partition(":")
    if kind == "digits":
        from ptq4vm_jax.data import load_digits_dataset

        if rest not in ("train", "test"):
            raise UsageError(f"{flag} {spec}: give the split, digits:train or digits:test (calibrate on "
                             "train, evaluate on test)")
        return load_digits_dataset(rest, image_size=image_size)
    if kind == "tfds":
        name, _, split = rest.partition(":")
        if not name or not split:
            raise UsageError(f"{flag} {spec!r}: expected tfds:NAME:SPLIT, e.g. "
                             "tfds:imagenet2012:validation")
        if data_dir is not None and not Path(data_dir).expanduser().is_dir() and "://" not in data_dir:
            what = "is a file" if Path(data_dir).expanduser().exists() else "does not exist"
            raise UsageError(f"--data-dir {data_dir} {what}; give the directory that holds the prepared "
                             "tfds datasets (e.g. ~/tensorflow_datasets)")
        import tensorflow_datasets as tfds

        try:
            return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises many types; the user needs the path advice
            where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
            root = Path(where).expanduser()
            missing = "://" not in where and not (root / name.split("/")[0]).is_dir()
            # (tfds's own message for a missing local dataset blames the file format)
            cause = f"there is no prepared {name} under {root}" if missing else str(e)
            raise UsageError(
                f"could not open {spec} (data_dir={data_dir}): {cause}\nPrepare the dataset with tfds "
                "(array_record format) under --data-dir; nothing is downloaded at run time."
            ) from None
    raise UsageError(f"{flag} {spec!r}: unknown data spec; use tfds:NAME:SPLIT or digits:train|test")


def _overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``--model-arg embed_dim=64`` -> {"embed_dim": 64} (values parsed as Python literals)."""
    import ast

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--model-arg {pair!r}: expected KEY=VALUE, e.g. embed_dim=384")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _load_float(args: argparse.Namespace) -> tuple[str, dict[str, Any], Any]:
    """(model name, model overrides, float params) from --checkpoint or --params."""
    from ptq4vm_jax import load_params, load_torch_checkpoint

    if bool(args.checkpoint) == bool(args.params):
        also = (" (or, for eval, --quantized: a dir written by `ptq4vm quantize`)"
                if args.command == "eval" else "")
        raise UsageError("give exactly one of --checkpoint (official .pth/.safetensors) or --params "
                         f"(an Orbax dir written by `ptq4vm convert`){also}")
    if args.checkpoint:
        if not args.model:
            raise UsageError("--checkpoint needs --model (e.g. vim_tiny)")
        overrides = _overrides(args.model_arg)
        return args.model, overrides, load_torch_checkpoint(args.checkpoint, args.model,
                                                            key=args.key or "model", **overrides)
    if args.model_arg or args.key:
        raise UsageError("--model-arg and --key apply to --checkpoint; --params already records its "
                         "model's sizes and holds one set of weights")
    from ptq4vm_jax.checkpoint import QUANT_FORMAT, read_metadata

    if args.command != "eval" and (Path(args.params) / "metadata.json").is_file():
        try:
            held = read_metadata(args.params)
        except ValueError:
            held = {}
        if held.get("format") == QUANT_FORMAT:
            raise UsageError(f"--params {args.params} is a quantized checkpoint; {args.command} needs "
                             "the float model: --params DIR from `ptq4vm convert`, or --checkpoint X.pth")
    params, meta = load_params(args.params, model_name=args.model)
    return meta["model_name"], dict(meta.get("model_overrides") or {}), params


def _check_out(out: str, *, format: str, model: str | None, inputs: dict[str, str | None],
               announce: bool = True) -> None:
    """Refuse, before any long work, an --out that would fail or destroy something at the end:
    one of the run's inputs, a file, anything ``write_checkpoint`` would refuse to replace, or a
    place that cannot be written (tried: its parent is created and a file written there). A
    checkpoint it will replace is named (``announce``) once the model is known."""
    from ptq4vm_jax.checkpoint import check_replaceable, read_metadata

    target = Path(out).expanduser().absolute()
    for flag, path in inputs.items():
        if path and Path(path).expanduser().absolute() == target:
            raise UsageError(f"--out {out} is the same path as {flag}: writing the result would "
                             f"destroy {flag}; choose another --out")
    if target.exists() and not target.is_dir():
        raise UsageError(f"--out {out} is an existing file; give a directory path")
    if target.exists():
        check_replaceable(str(target), {"format": format, "model_name": model})
        if announce and model is not None and os.listdir(target):
            held = read_metadata(str(target))
            what = held.get("model_name", "?")
            if held.get("config"):
                c = held["config"]
                what += f" {c.get('method')} W{c.get('w_bits')}A{c.get('a_bits')}"
            print(f"note: --out {out} holds a checkpoint ({what}, written {held.get('created', '?')}); "
                  "it will be replaced at the end", file=sys.stderr)
    parent = target.parent  # the result is written beside --out first, then renamed into place
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, so no directory can be made under it")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create or write in {parent} ({e.strerror or e}); choose a "
                         "writable place") from None


def _check_resume(resume: str | None, paths: dict[str, str | None]) -> None:
    """--resume must be a directory of its own: not a file, not a checkpoint, not inside the
    output or an input (writing --out replaces its tree). (quantize_params checks that it is
    writable and holds no other files.)"""
    if not resume:
        return
    if Path(resume).exists() and not Path(resume).is_dir():
        raise UsageError(f"--resume {resume} is a file; give a directory for the resume state")
    if (Path(resume) / "metadata.json").exists():
        raise UsageError(f"--resume {resume} is a checkpoint directory; give the resume state a "
                         "directory of its own")
    where = Path(resume).expanduser().absolute()
    for flag, path in paths.items():
        if path and where.is_relative_to(Path(path).expanduser().absolute()):
            raise UsageError(f"--resume {resume} lies inside {flag} {path}; give the resume state a "
                             "directory of its own")


# ----------------------------------------------------------------------------- subcommands


def cmd_convert(args: argparse.Namespace) -> None:
    from ptq4vm_jax.checkpoint import FLOAT_FORMAT, convert_checkpoint

    _check_out(args.out, format=FLOAT_FORMAT, model=args.model, inputs={"--checkpoint": args.checkpoint})
    meta = convert_checkpoint(args.checkpoint, args.model, args.out, key=args.key,
                              **_overrides(args.model_arg))
    print(f"wrote {args.out}: {meta['model_name']} from {meta['source']} (sha256 {meta['source_sha256']})")


def _config(args: argparse.Namespace):
    from ptq4vm_jax import QuantConfig

    return QuantConfig(
        w_bits=args.w_bits, a_bits=args.a_bits, method=args.method, num_calib=args.num_calib,
        epochs=args.epochs, train_batch=args.train_batch, alpha=args.alpha,
        train_inner_proj=not args.official_inner_proj, act_grid=args.act_grid, loss=args.loss,
        loss_axis=args.loss_axis, revert_worse=not args.keep_learned,
        lr_w=args.lr_w, lr_a=args.lr_a, lr_s=args.lr_s,
    )


def cmd_quantize(args: argparse.Namespace) -> None:
    from ptq4vm_jax import create_model, quantize_params, save_quantized
    from ptq4vm_jax.checkpoint import QUANT_FORMAT
    from ptq4vm_jax.models import image_shape

    _check_out(args.out, format=QUANT_FORMAT, model=None, announce=False,
               inputs={"--params": args.params, "--checkpoint": args.checkpoint, "--resume": args.resume})
    _check_resume(args.resume, {"--out": args.out, "--params": args.params})
    name, overrides, params = _load_float(args)
    _check_out(args.out, format=QUANT_FORMAT, model=name, inputs={})  # now that the model is known
    size = image_shape(create_model(name, **overrides))[1]
    calib = _data_source(args.calib, args.data_dir, size, "--calib")
    if isinstance(calib, tuple):
        calib = calib[0]
    qp = quantize_params(params, calib, model=name, config=_config(args), model_overrides=overrides,
                         resume_dir=args.resume)
    save_quantized(args.out, qp)
    s = qp.summary
    print(_table(s["stages"], [("name", "block", "s"), ("loss_init", "loss (PTS init)", ".5f"),
                               ("loss_learned", "loss (learned)", ".5f"),
                               ("loss_final", "loss (kept)", ".5f"), ("seconds", "seconds", ".1f")]))
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
    print(f"calibrated {len(s['quantized_layers'])} linears in {s['calibration_seconds']:.1f}s; "
          f"wrote {args.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp

    from ptq4vm_jax import create_model, load_quantized, quantized_apply
    from ptq4vm_jax.data import eval_batches, process_share
    from ptq4vm_jax.distributed import data_parallel, lockstep, maybe_initialize_distributed
    from ptq4vm_jax.evaluate import evaluate
    from ptq4vm_jax.models import canonical_name, image_shape

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    maybe_initialize_distributed()
    if args.quantized and (args.checkpoint or args.params or args.model_arg or args.key):
        raise UsageError("--quantized carries its model: drop --checkpoint, --params, --model-arg "
                         "and --key")
    if not args.quantized and (args.mode or args.gemm):
        raise UsageError("--mode and --gemm choose how a --quantized model runs; a float model "
                         "(--params / --checkpoint) has neither")
    if args.gemm and args.mode != "int":
        raise UsageError(f"--gemm {args.gemm} picks the integer GEMM of --mode int; add --mode int (the "
                         "default fake mode runs no integer GEMM)")
    args.mode, args.gemm = args.mode or "fake", args.gemm or "auto"
    if args.quantized:
        qp = load_quantized(args.quantized)
        if args.model and canonical_name(args.model) != qp.model_name:
            raise UsageError(f"--quantized {args.quantized} holds {qp.model_name}, not {args.model}")
        if args.mode == "int" and qp.config.method == "per_token_dynamic":
            raise UsageError(f"--quantized {args.quantized} is per_token_dynamic: its activation scales "
                             "are computed at run time, so it has no integer mode; use --mode fake")
        model = qp.model(dtype=jnp.dtype(args.dtype))
        logits_fn = data_parallel(
            lambda q, x: quantized_apply(model, q, x, mode=args.mode, gemm=args.gemm), qp)
        what = (f"{qp.model_name} {qp.config.method} W{qp.config.w_bits}A{qp.config.a_bits}, "
                f"{args.mode} mode" + (f" ({args.gemm} GEMM)" if args.mode == "int" else ""))
    else:
        name, overrides, params = _load_float(args)
        model = create_model(name, **{**overrides, "dtype": jnp.dtype(args.dtype)})
        logits_fn = data_parallel(lambda p, x: model.apply({"params": p}, x), params)
        what = f"{name} float"
    shape = image_shape(model, args.batch_size)
    source = _data_source(args.data, args.data_dir, shape[1], "--data")
    if jax.process_count() == 1:
        batches = eval_batches(source, args.batch_size, image_size=shape[1])
        size = len(source[0]) if isinstance(source, tuple) else getattr(source, "__len__", lambda: None)()
        metrics = evaluate(logits_fn, batches, num_examples=args.limit, total=size)
    else:  # each host evaluates its own share; the counts are summed
        share = process_share(source, jax.process_index(), jax.process_count(), limit=args.limit)
        batches = lockstep(eval_batches(share, args.batch_size, image_size=shape[1], allow_empty=True),
                           shape)
        metrics = evaluate(logits_fn, batches, progress=jax.process_index() == 0, across_processes=True)
        print(f"process {jax.process_index()} of {jax.process_count()}: {metrics['local_n']} images")
    what += "" if args.dtype == "float32" else f", {args.dtype} projections"
    print(f"top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  (n={metrics['n']}; {what})")


# The Vim demo recipe: the official step count (~100 Adam steps per block) in mini-batches of 32
# so it fits a few CPU minutes, and learning rates 1e-4 (the official VMamba ones) because the
# micro model's activation steps are ~10x smaller than ImageNet Vim's, where 5e-4/1e-2 overshoot.
DEMO_RECIPE = dict(train_batch=32, epochs=12, lr_w=1e-4, lr_a=1e-4, lr_s=1e-4)


def cmd_demo(args: argparse.Namespace) -> None:
    import jax
    import numpy as np

    from ptq4vm_jax import (
        QuantConfig,
        create_model,
        load_params,
        quantize_params,
        quantized_apply,
        save_quantized,
    )
    from ptq4vm_jax.checkpoint import QUANT_FORMAT
    from ptq4vm_jax.data import load_digits_dataset
    from ptq4vm_jax.evaluate import compare_logits, paired_top1
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
    # VMamba's official recipe already learns at 1e-4 in mini-batches of 32, and runs in time.
    recipe = dict(DEMO_RECIPE) if model_family(args.model) == "vim" else {}
    if args.epochs is not None:
        recipe["epochs"] = args.epochs
    runs = [("RTN W8A8", QuantConfig(8, 8, method="rtn")),
            ("PTQ4VM W8A8", QuantConfig(8, 8, **recipe)),
            ("RTN W4A8", QuantConfig(4, 8, method="rtn")),
            ("PTQ4VM W4A8", QuantConfig(4, 8, **recipe))]
    out = Path(args.out).absolute() / args.model  # each model's demo has a directory of its own
    targets = {label: out / label.lower().replace(" ", "_") for label, _ in runs}
    for target in targets.values():  # before any calibration, not after the first
        _check_out(str(target), format=QUANT_FORMAT, model=args.model, inputs={}, announce=False)
    preds = {}
    for label, cfg in runs:
        print(f"== {label}", flush=True)
        t0 = time.perf_counter()
        qp = quantize_params(params, calib, model=args.model, config=cfg, progress=not args.quiet,
                             log=(lambda _: None) if args.quiet else print)
        seconds = time.perf_counter() - t0
        logits = np.asarray(jax.jit(lambda x, qp=qp: quantized_apply(model, qp, x))(test_x))
        cmp = compare_logits(fp_logits, logits)
        preds[label] = logits.argmax(-1)
        save_quantized(targets[label], qp)
        rows.append(dict(name=label, top1=100 * float(np.mean(logits.argmax(-1) == test_y)),
                         agreement=cmp["agreement"], kl=cmp["mean_kl"], seconds=seconds))
    described = recipe or f"official {model_family(args.model)}"
    print(f"\n{args.model} on the digits test split ({len(test_y)} images); calibration on the first "
          f"{runs[1][1].num_calib} train images; PTQ4VM recipe {described}")
    print(_table(rows, [("name", "model", "s"), ("top1", "top-1 %", ".2f"),
                        ("agreement", "agree w/ FP %", ".2f"), ("kl", "KL to FP", ".2e"),
                        ("seconds", "calib s", ".1f")]))
    for bits in ("W8A8", "W4A8"):
        pair = paired_top1(test_y, preds[f"PTQ4VM {bits}"], preds[f"RTN {bits}"])
        print(f"{bits} top-1, PTQ4VM vs RTN: PTQ4VM alone right on {pair['only_a']}, RTN alone right "
              f"on {pair['only_b']}; exact McNemar p = {pair['p_value']:.3f}")
    print(f"\nquantized checkpoints in {out}; total {time.perf_counter() - t_start:.0f}s")


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from ptq4vm_jax import __version__
    from ptq4vm_jax.quant.config import ACT_GRIDS, FAMILY_DEFAULTS, LOSS_AXES, LOSSES, METHODS
    from ptq4vm_jax.quant.integer import GEMM_BACKENDS
    from ptq4vm_jax.quant.layer import MODES

    def recipe(field: str) -> str:  # "(default: Vim 0.5, VMamba 0.65)": the family recipes
        vim, vmamba = (f"{v:.0e}".replace("e-0", "e-") if v < 0.1 else f"{v:g}"
                       for v in (FAMILY_DEFAULTS[f][field] for f in ("vim", "vmamba")))
        return f"(default: Vim {vim}, VMamba {vmamba})"

    p = argparse.ArgumentParser(prog="ptq4vm", description=__doc__)
    p.add_argument("--version", action="version", version=f"ptq4vm-jax {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="quantize the built-in micro model on digits and print a table")
    bundled = sorted(m.parent.name for m in ASSETS.glob("*/metadata.json"))
    d.add_argument("--model", default="vim_micro", choices=bundled, help="a bundled micro model")
    d.add_argument("--out", default="ptq4vm_demo_out",
                   help="where the quantized checkpoints go (in a directory named after the model)")
    d.add_argument("--epochs", type=int, default=None,
                   help="JLSS epochs over the 256 images (default: 12 in batches of 32 for Vim, the "
                        "official recipe for VMamba)")
    d.add_argument("--quiet", action="store_true", help="no progress bars or per-block log, only the table")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("convert", help="official .pth/.safetensors -> Orbax float params")
    c.add_argument("--model", required=True, help="e.g. vim_tiny, vim_small, vim_base, vmamba_tiny")
    c.add_argument("--checkpoint", required=True, help="official .pth/.safetensors (read without torch)")
    c.add_argument("--out", required=True, help="new Orbax directory for the float params")
    c.add_argument("--key", default="model", help="sub-dict of the checkpoint (model, model_ema)")
    c.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="official constructor size argument, e.g. embed_dim=384 (repeatable)")
    c.set_defaults(func=cmd_convert)

    def source_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", help="model name (required with --checkpoint)")
        sp.add_argument("--checkpoint", help="official .pth/.safetensors")
        sp.add_argument("--params", help="Orbax float params dir (ptq4vm convert)")
        sp.add_argument("--key", default=None, help="sub-dict of a --checkpoint (default: model)")
        sp.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                        help="official constructor size argument for --checkpoint (repeatable)")
        sp.add_argument("--data-dir", default=None, help="tfds data_dir")

    q = sub.add_parser("quantize", help="PTQ4VM-quantize a model and save an Orbax checkpoint")
    source_args(q)
    q.add_argument("--calib", default="tfds:imagenet2012:train",
                   help="calibration data: tfds:NAME:SPLIT (prepared under --data-dir) or digits:train|test "
                        "(default: tfds:imagenet2012:train)")
    q.add_argument("--num-calib", type=int, default=256, help="calibration images (default: 256)")
    q.add_argument("--w-bits", type=int, default=8, help="weight bits, 2..8 (default: 8)")
    q.add_argument("--a-bits", type=int, default=8, help="activation bits, 2..8 (default: 8)")
    q.add_argument("--method", default="ptq4vm", choices=METHODS,
                   help="ptq4vm (default: PTS + SmoothQuant init, then JLSS); pts_only (the "
                        "initialisation alone); rtn (min-max baseline); per_token_dynamic (baseline)")
    q.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the calibration set per block {recipe('epochs')}")
    q.add_argument("--train-batch", type=int, default=None,
                   help=f"JLSS mini-batch {recipe('train_batch')}")
    q.add_argument("--alpha", type=float, default=None,
                   help=f"SmoothQuant migration strength {recipe('alpha')}")
    q.add_argument("--act-grid", default="fixed", choices=ACT_GRIDS,
                   help="activation grid search: fixed (default, includes the full range) or "
                        "official (the released grid)")
    q.add_argument("--loss", default="cosine", choices=LOSSES,
                   help="block loss: cosine (the paper) or relative MSE")
    q.add_argument("--loss-axis", default="channel", choices=LOSS_AXES,
                   help="VMamba only: the axis of the cosine loss; width reproduces the released "
                        "VMamba code (cosine along the image width)")
    q.add_argument("--lr-w", type=float, default=None,
                   help=f"weight-step learning rate {recipe('lr_w')}")
    q.add_argument("--lr-a", type=float, default=None,
                   help=f"activation-step learning rate {recipe('lr_a')}")
    q.add_argument("--lr-s", type=float, default=None,
                   help=f"smoothing-scale learning rate {recipe('lr_s')}")
    q.add_argument("--official-inner-proj", action="store_true",
                   help="train only in_proj/out_proj like the released Vim code")
    q.add_argument("--keep-learned", action="store_true",
                   help="keep the learned scales of a block even where learning raised its loss, like "
                        "the released code (default: keep that block's initial scales)")
    q.add_argument("--resume", default=None, help="directory for per-block resume state")
    q.add_argument("--out", required=True, help="new Orbax directory for the quantized checkpoint")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="top-1/top-5 of a float or quantized model")
    source_args(e)
    e.add_argument("--quantized", help="Orbax dir written by `ptq4vm quantize` (instead of a float "
                                       "--checkpoint / --params)")
    e.add_argument("--mode", default=None, choices=MODES, help="for --quantized: fp32 fake-quant "
                                                                "(default) or integer arithmetic (not "
                                                                "for per_token_dynamic checkpoints)")
    e.add_argument("--gemm", default=None, choices=GEMM_BACKENDS,
                   help="integer GEMM of --mode int (auto: wgmma on Hopper, the Triton kernel on "
                        "other GPUs, XLA elsewhere; xla-bf16: XLA's bf16 dot on the integer codes, "
                        "exact; wgmma-1pass: Hopper, quantization inside the kernel, exact but "
                        "slower than wgmma on an H200; mixed: Hopper, wgmma for in_proj/out_proj "
                        "and xla-bf16 for x_proj/dt_proj)")
    e.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="compute dtype of the projections (norms, residual stream and scan stay "
                        "float32): bfloat16 is the float model's fast variant and, with --mode int, "
                        "the integer mode's (its activations reach the quantizers in bf16)")
    e.add_argument("--data", default="tfds:imagenet2012:validation",
                   help="evaluation data: tfds:NAME:SPLIT (prepared under --data-dir) or digits:train|test "
                        "(default: tfds:imagenet2012:validation)")
    e.add_argument("--batch-size", type=int, default=64,
                   help="images per step, split over the local devices (default: 64)")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    e.set_defaults(func=cmd_eval)
    return p


# Library wording in error messages -> the flags a command-line user has.
_CONFIG_FLAGS = ("w_bits|a_bits|num_calib|train_batch|epochs|alpha|lr_w|lr_a|lr_s|loss_axis|act_grid|loss|"
                 "method")
_CLI_WORDS = (
    (r"pass (?:num_images|QuantConfig\.num_calib)<=(\d+) \(a multiple of train_batch=(\d+)\)",
     r"pass --num-calib \1 (or fewer, a multiple of --train-batch \2)"),
    (r"pass (?:num_images|QuantConfig\.num_calib)<=(\d+)", r"pass --num-calib \1 (or fewer)"),
    # QuantConfig's own checks: "w_bits must be ...", "num_calib (24) must be a multiple of train_batch (16)"
    (rf"(?:^|(?<=of ))({_CONFIG_FLAGS})(?= must | \()", lambda m: "--" + m.group(1).replace("_", "-")),
    (r"(--[a-z-]+ must be [^;]*?) or None, got", r"\1, got"),
    (r"num_examples must be a positive integer or None", "--limit must be a positive integer"),
    (r"Pass key=<([^>]+)>", r"Pass --key <\1>"),
    (r"pass model_name='([\w.-]+)'", r"pass --model \1"),
    (r"load it with ptq4vm_jax\.checkpoint\.load_params", "give it as --params"),
    (r"load it with ptq4vm_jax\.checkpoint\.load_quantized", "give it as --quantized"),
    (r"\bresume_dir\b", "--resume"),
    (r"\bgemm='([\w-]+)'", r"--gemm \1"),
)


def _cli_words(message: str) -> str:
    import re

    for pattern, replacement in _CLI_WORDS:
        message = re.sub(pattern, replacement, message)
    return message


def _resume_hint(resume: str | None, action: str) -> str:
    if not resume:
        return "; rerun with --resume DIR to keep completed blocks across attempts"
    if not (Path(resume) / "state.npz").exists():
        return f"; no block had completed, so {resume} holds nothing to continue from"
    return (f"; the blocks completed so far are saved in {resume}: {action} with the same --resume to "
            "continue (it continues only the same run: other settings or params need a new --resume)")


def main(argv: list[str] | None = None) -> None:
    """Errors a user can act on print as one line; PTQ4VM_DEBUG=1 shows their tracebacks."""
    from ptq4vm_jax.calibrate.jlss import CalibrationError

    args = build_parser().parse_args(argv)

    def one_line(message, category, *rest, **kw):  # a user's warning, not a source location
        print(f"ptq4vm {args.command}: warning: {_cli_words(str(message))}", file=sys.stderr)

    try:
        with warnings.catch_warnings(), _sigterm_as_interrupt():
            warnings.showwarning = one_line
            args.func(args)
    except UsageError as e:
        print(f"ptq4vm {args.command}: error: {e}", file=sys.stderr)
        raise
    except (ValueError, TypeError, OSError) as e:
        if os.environ.get("PTQ4VM_DEBUG"):
            raise
        more = "" if isinstance(e, ValueError) else " (PTQ4VM_DEBUG=1 shows the traceback)"
        print(f"ptq4vm {args.command}: error: {_cli_words(str(e))}{more}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        if os.environ.get("PTQ4VM_DEBUG"):
            raise
        hint = _resume_hint(args.resume, "rerun") if args.command == "quantize" else ""  # (has --resume)
        killed = isinstance(e, Terminated)
        print(f"ptq4vm {args.command}: {'terminated (SIGTERM)' if killed else 'interrupted'}{hint}",
              file=sys.stderr)
        raise SystemExit(143 if killed else 130) from None  # (the shell's codes: 128 + the signal)
    except CalibrationError as e:
        if os.environ.get("PTQ4VM_DEBUG"):
            raise
        print(f"ptq4vm {args.command}: calibration failed: {e}"
              f"{_resume_hint(getattr(args, 'resume', None), 'after a transient fault, rerun')}",
              file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
