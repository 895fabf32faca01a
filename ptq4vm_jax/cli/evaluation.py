"""``ptq4vm eval``: top-1/top-5 of a float or quantized model, data-parallel over the local
devices and, under a multi-process launch, over hosts."""

from __future__ import annotations

import argparse
import sys

from ptq4vm_jax.choices import PALLAS_GEMMS
from ptq4vm_jax.cli.dataspecs import data_dir_of, data_source, images_in
from ptq4vm_jax.cli.errors import UsageError
from ptq4vm_jax.cli.loading import check_quantized_dir, load_float, warn_if_scan_interpreted

DTYPES = ("float32", "bfloat16")  # --dtype: the projections' compute dtype


def check_flags(args: argparse.Namespace) -> None:
    """Which flags go together, and the numbers' ranges, before anything is loaded."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be a positive integer, got {args.limit}")
    if args.quantized and (args.checkpoint or args.params or args.model_arg or args.key):
        raise UsageError("--quantized carries its model: drop --checkpoint, --params, --model-arg "
                         "and --key")
    if not args.quantized and (args.mode or args.gemm):
        raise UsageError("--mode and --gemm choose how a --quantized model runs; a float model "
                         "(--params / --checkpoint) has neither")
    if args.gemm and args.mode != "int":
        raise UsageError(f"--gemm {args.gemm} picks the integer GEMM of --mode int; add --mode int (the "
                         "default fake mode runs no integer GEMM)")


def warn_if_interpreted(args: argparse.Namespace) -> None:
    """A Pallas GEMM off the GPU runs in the Pallas interpreter: exact, but far too slow for a
    dataset. Said once here; the library's own warning about it (``argument == "gemm"``) is
    then left out by ``main``."""
    from ptq4vm_jax import gpu  # (jax: not loaded for the parser)

    if args.mode == "int" and args.gemm in PALLAS_GEMMS and gpu.interpret_kernels():
        print(f"ptq4vm eval: warning: --gemm {args.gemm} off the GPU runs its kernel in the Pallas "
              "interpreter: the same integers, slowly; meant for testing (--gemm auto or xla is the fast "
              "path here)",
              file=sys.stderr)
        args.warned_about = {*getattr(args, "warned_about", ()), "gemm"}


def warn_if_calibration_data(args: argparse.Namespace) -> None:
    """Evaluating on the data a checkpoint was calibrated on (its metadata's provenance) measures
    images its scales were fitted to: said once, since the top-1 then overstates the accuracy."""
    from ptq4vm_jax.checkpoint import read_metadata

    origin = read_metadata(args.quantized).get("provenance") or {}
    if origin.get("calib") == args.data and origin.get("data_dir") == data_dir_of(args.data, args.data_dir):
        print(f"ptq4vm eval: warning: --data {args.data} is the data --quantized {args.quantized} was "
              f"calibrated on ({origin.get('num_calib')} of its images): its top-1 there overstates the "
              "accuracy on unseen images", file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp

    from ptq4vm_jax import create_model, load_quantized, quantized_apply
    from ptq4vm_jax.data import eval_batches, process_share
    from ptq4vm_jax.distributed import data_parallel, lockstep, maybe_initialize_distributed
    from ptq4vm_jax.evaluate import evaluate
    from ptq4vm_jax.models import canonical_name, image_shape, model_label

    check_flags(args)
    maybe_initialize_distributed()
    args.mode, args.gemm = args.mode or "fake", args.gemm or "auto"
    warn_if_scan_interpreted(args)
    if args.quantized:
        check_quantized_dir(args.quantized)
        qp = load_quantized(args.quantized)
        if args.model and canonical_name(args.model) != qp.model_name:
            raise UsageError(f"--quantized {args.quantized} holds {qp.model_name}, not {args.model}")
        if args.mode == "int" and qp.config.dynamic_activations:
            raise UsageError(f"--quantized {args.quantized} is per_token_dynamic: its activation scales "
                             "are computed at run time, so it has no integer mode; use --mode fake")
        warn_if_interpreted(args)
        warn_if_calibration_data(args)
        model = qp.model(dtype=jnp.dtype(args.dtype), scan=args.scan)
        logits_fn = data_parallel(
            lambda q, x: quantized_apply(model, q, x, mode=args.mode, gemm=args.gemm), qp)
        what = (f"{model_label(qp.model_name, dict(qp.model_overrides))} {qp.config.method} "
                f"W{qp.config.w_bits}A{qp.config.a_bits}, "
                f"{args.mode} mode" + (f" ({args.gemm} GEMM)" if args.mode == "int" else ""))
    else:
        name, overrides, params, _ = load_float(args)
        model = create_model(name, **{**overrides, "dtype": jnp.dtype(args.dtype), "scan": args.scan})
        logits_fn = data_parallel(lambda p, x: model.apply({"params": p}, x), params)
        what = f"{model_label(name, overrides)} float"
    shape = image_shape(model, args.batch_size)
    source = data_source(args.data, args.data_dir, shape[1], "--data")
    if jax.process_count() == 1:  # a batch larger than what is evaluated would only be padding
        batch = max(1, min([args.batch_size, *(n for n in (args.limit, images_in(source)) if n is not None)]))
        batches = eval_batches(source, batch, image_size=shape[1])
        metrics = evaluate(logits_fn, batches, num_examples=args.limit, total=images_in(source))
    else:  # each host evaluates its own share; the counts are summed
        share = process_share(source, jax.process_index(), jax.process_count(), limit=args.limit)
        batches = lockstep(eval_batches(share, args.batch_size, image_size=shape[1], allow_empty=True),
                           shape)
        metrics = evaluate(logits_fn, batches, progress=jax.process_index() == 0, across_processes=True)
        print(f"process {jax.process_index()} of {jax.process_count()}: {metrics['local_n']} images")
    what += "" if args.dtype == "float32" else f", {args.dtype} projections"
    what += "" if args.scan == "auto" else f", scan {args.scan}"
    print(f"top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  (n={metrics['n']}; {what})")
