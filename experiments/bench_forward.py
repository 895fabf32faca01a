"""Forward throughput of the float Vim models: images/s per model, dtype and batch size.

    python experiments/bench_forward.py                                   # tiny+small, batch 1 and 8
    python experiments/bench_forward.py --models vim_base --batch-sizes 1 --dtypes fp32
    python experiments/bench_forward.py --models vim_tiny vim_small vim_base --batch-sizes 64 256

Each (model, dtype, batch) is one ``jax.jit(model.apply)``; compile and one warm-up call per
input set are excluded; then ``--repeats`` timed calls rotate over ``--input-sets`` random
batches (so no cache holds the one input), each ended by ``block_until_ready``; the table
gives the median. ``bf16`` is ``create_model(name, dtype=jnp.bfloat16)``: projections compute
in bf16, norms, residual and scan stay fp32. Weights are random (values do not change the work).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptq4vm_jax import create_model

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def random_params(model: nn.Module, image_shape: tuple[int, ...], seed: int) -> dict:
    """Param tree of the right shapes without running (and compiling) ``model.init``."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(image_shape, jnp.float32))
    leaves, treedef = jax.tree.flatten(abstract["params"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves, strict=True)]
    )


def time_forward(
    model_name: str, dtype: str, batch: int, repeats: int, input_sets: int, seed: int
) -> dict[str, float]:
    """Seconds to compile, and the median seconds of one forward call after warm-up."""
    model = create_model(model_name, dtype=DTYPES[dtype])
    c = model.cfg
    shape = (batch, c.img_size, c.img_size, c.channels)
    params = random_params(model, shape, seed)
    keys = jax.random.split(jax.random.key(seed + 1), input_sets)
    images = [jax.random.normal(k, shape, jnp.float32) for k in keys]
    forward = jax.jit(model.apply)
    t0 = time.perf_counter()
    compiled = forward.lower({"params": params}, images[0]).compile()
    compile_s = time.perf_counter() - t0
    for x in images:
        logits = compiled({"params": params}, x).block_until_ready()
    if not bool(jnp.all(jnp.isfinite(logits))):
        raise FloatingPointError(f"{model_name} {dtype} batch {batch}: non-finite logits")
    samples = []
    for i in range(repeats):
        x = images[i % input_sets]
        t = time.perf_counter()
        compiled({"params": params}, x).block_until_ready()
        samples.append(time.perf_counter() - t)
    return {"compile_s": compile_s, "median_s": statistics.median(samples)}


def header() -> str:
    dev = jax.devices()[0]
    return (
        f"device: {dev.device_kind} ({dev.platform}, {jax.device_count()} device(s), "
        f"{os.cpu_count()} host CPUs) | jax {jax.__version__} | "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vim_tiny", "vim_small"],
                   help="registry names (vim_tiny, vim_small, vim_base, ...)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (median reported)")
    p.add_argument("--input-sets", type=int, default=3, help="random input batches the calls rotate over")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.input_sets < 1:
        p.error("--batch-sizes, --repeats and --input-sets must all be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(header())
    print(f"repeats={args.repeats} input_sets={args.input_sets} (median of timed calls; compile and "
          "warm-up excluded)\n")
    print("| model | dtype | batch | compile s | ms / batch | images/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.models:
        for dtype in args.dtypes:
            for batch in args.batch_sizes:
                r = time_forward(name, dtype, batch, args.repeats, args.input_sets, args.seed)
                print(f"| {name} | {dtype} | {batch} | {r['compile_s']:.1f} | {1e3 * r['median_s']:.1f} | "
                      f"{batch / r['median_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
