"""Calibration wall time of PTQ4VM (PTS init + JLSS) per block and in total.

The official recipe for Vim-T is 256 images, 100 full-batch steps per block:

    python experiments/bench_calibration.py --model vim_tiny --num-calib 256 --epochs 100

Weights and images are random (the work does not depend on their values). The first block
includes compilation of the training step, which every later block of the same shape reuses;
the table says so.
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Sequence

import jax
import numpy as np

import ptq4vm_jax as pq
from ptq4vm_jax.models import image_shape


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vim_tiny")
    ap.add_argument("--num-calib", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--depth", type=int, default=None, help="fewer blocks for a reduced run (Vim)")
    args = ap.parse_args(argv)
    try:
        family = pq.models.model_family(args.model)
    except ValueError as err:
        ap.error(f"--model: {err}")
    if args.depth is not None and family != "vim":
        ap.error("--depth is a Vim size; VMamba stages are set by the model name")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    family = pq.models.model_family(args.model)
    overrides = {} if args.depth is None else {"depth": args.depth}
    started = time.perf_counter()
    model = pq.create_model(args.model, **overrides)
    shape = image_shape(model, args.num_calib)
    images = np.asarray(jax.random.normal(jax.random.key(0), shape), np.float32)
    print(f"set-up: {args.num_calib} random images in {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    params = jax.block_until_ready(jax.jit(model.init)(jax.random.key(1), images[:1])["params"])
    # Printed as they happen, so that a run stopped by a time limit still shows where time went.
    print(f"set-up: model.init (compile + run) in {time.perf_counter() - started:.1f} s", flush=True)
    cfg = pq.QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, num_calib=args.num_calib,
                         epochs=args.epochs, train_batch=args.train_batch)
    compiles: list[float] = []  # XLA compilations inside quantize_params (seconds each)

    def on_event(event: str, secs: float, **_) -> None:
        if event.endswith("backend_compile_duration"):
            compiles.append(secs)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    t0 = time.perf_counter()
    qp = pq.quantize_params(params, images, model=args.model, config=cfg, model_overrides=overrides,
                            progress=True, log=lambda m: print(m, flush=True))
    jax.block_until_ready(qp.qlayers)
    total = time.perf_counter() - t0
    resolved = cfg.resolve(family)
    steps = resolved.epochs * (args.num_calib // resolved.train_batch)

    dev = jax.devices()[0]
    print(f"# {args.model} {overrides or ''} W{args.w_bits}A{args.a_bits}, {args.num_calib} images, "
          f"{steps} steps/block | device {dev.device_kind} ({dev.platform}) x{jax.local_device_count()}"
          f" | jax {jax.__version__} | {datetime.date.today()}")
    print("| block | loss init | loss final | seconds |")
    print("|---|---:|---:|---:|")
    stages = qp.summary["stages"]
    for i, s in enumerate(stages):
        note = " (incl. compile)" if i == 0 else ""
        print(f"| {s['name']}{note} | {s['loss_init']:.5f} | {s['loss_final']:.5f} | {s['seconds']:.2f} |")
    print(f"| **total** (incl. embedding, finalisation) | | | {total:.1f} |")
    print(f"XLA compilations during quantize_params: {len(compiles)}, {sum(compiles):.1f} s in all")
    if len(stages) > 1:
        print(f"steady-state seconds per block: {np.median([s['seconds'] for s in stages[1:]]):.2f}")


if __name__ == "__main__":
    main()
