"""Train a micro model (default ``vim_micro``) on the built-in digits data and save it.

The quantization demo and tests need a float model whose accuracy means something, without
downloads: this script makes one in a few CPU minutes, deterministically (fixed seeds, fixed
split). Writes ``<out>/<model>/`` (params via ``ptq4vm_jax.checkpoint.save_params``) and
``<out>/<model>/train_log.txt``.

    python experiments/train_micro.py --model vim_micro
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ptq4vm_jax import create_model
from ptq4vm_jax.checkpoint import save_params
from ptq4vm_jax.data import eval_batches, load_digits_dataset
from ptq4vm_jax.evaluate import evaluate
from ptq4vm_jax.models import image_shape

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "ptq4vm_jax" / "assets"


def input_spec(model: nn.Module) -> tuple[int, int, int]:
    """(image size, channels, classes) from the model's config, whatever the family."""
    _, size, _, channels = image_shape(model)
    return size, channels, model.cfg.num_classes


def random_shift(key: jax.Array, images: jax.Array, max_shift: int) -> jax.Array:
    """Translate each image by up to ``max_shift`` pixels (edge padding): cheap augmentation."""
    if max_shift == 0:
        return images
    b, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), mode="edge")
    offs = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1]))
    return jax.vmap(crop)(padded, offs)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, num_classes: int,
                    label_smoothing: float, max_shift: int) -> Callable:
    def loss_fn(params, images, labels):
        logits = model.apply({"params": params}, images)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean()

    @jax.jit
    def step(params, opt_state, images, labels, key):
        images = random_shift(key, images, max_shift)
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vim_micro")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=int, default=2)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--max-shift", type=int, default=2, help="random translation, pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="stop early (smoke runs)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes <out>/<model>/")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model = create_model(args.model)
    size, channels, classes = input_spec(model)
    if channels != 3:
        raise ValueError(f"the digits data has 3 channels; {args.model} expects {channels}")
    x_train, y_train = load_digits_dataset("train", image_size=size)
    x_test, y_test = load_digits_dataset("test", image_size=size)
    if classes < 10:
        raise ValueError(f"{args.model} has {classes} classes; the digits need 10")

    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    epochs = math.ceil(total / steps_per_epoch)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, min(steps_per_epoch * args.warmup_epochs, total // 2), total,
        end_value=args.lr * 1e-2,
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=args.weight_decay))
    key = jax.random.key(args.seed)
    key, init_key = jax.random.split(key)
    params = jax.jit(model.init)(init_key, jnp.zeros((1, size, size, channels)))["params"]
    opt_state = tx.init(params)
    step = make_train_step(model, tx, classes, args.label_smoothing, args.max_shift)
    logits_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))

    out_dir = (args.out / args.model).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cli_args = sys.argv[1:] if argv is None else argv
    log_lines = [
        " ".join(["command: python experiments/train_micro.py", *cli_args]),
        f"versions: python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
        f"optax {optax.__version__}, numpy {np.__version__}; backend {jax.default_backend()}, "
        f"{os.cpu_count()} CPU cores (wall times depend on machine load)",
        f"model: {args.model} ({n_params} params), input {size}x{size}x{channels}, {classes} classes",
        f"data: digits train {len(x_train)}, test {len(x_test)}; batch {args.batch_size}, "
        f"{steps_per_epoch} steps/epoch, {total} steps ({epochs} epochs)",
        f"optimizer: AdamW lr {args.lr} (warmup {args.warmup_epochs} ep + cosine), "
        f"wd {args.weight_decay}, clip 1.0, label smoothing {args.label_smoothing}, "
        f"shift +-{args.max_shift}px, seed {args.seed}",
        "epoch  train_loss  test_top1  wall_s",
    ]
    for line in log_lines:
        print(line, flush=True)

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    test_top1 = float("nan")
    for epoch in range(1, epochs + 1):
        perm = rng.permutation(len(x_train))
        losses = []
        for s in range(min(steps_per_epoch, total - (epoch - 1) * steps_per_epoch)):
            # Wrap around so every step has a full batch: one compiled shape.
            idx = np.take(perm, np.arange(s * args.batch_size, (s + 1) * args.batch_size), mode="wrap")
            key, sub = jax.random.split(key)
            params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx], sub)
            losses.append(loss)
        mean_loss = float(np.mean(jax.device_get(losses)))
        if epoch % 5 == 0 or epoch == epochs:
            test_top1 = evaluate(
                functools.partial(logits_fn, params),
                eval_batches((x_test, y_test), 128, image_size=size, channels=channels),
                progress=False,
            )["top1"]
            acc = f"{test_top1:9.2f}"
        else:
            acc = f"{'-':>9}"
        line = f"{epoch:5d}  {mean_loss:10.4f}  {acc}  {time.perf_counter() - t0:7.1f}"
        print(line, flush=True)
        log_lines.append(line)

    result = {"test_top1": test_top1, "steps": total, "seed": args.seed, "epochs": epochs,
              "train_seconds": round(time.perf_counter() - t0, 1)}
    log_lines.append(f"final: test top-1 {test_top1:.2f}% on {len(x_test)} images, "
                     f"{total} steps, {result['train_seconds']} s")
    # An asset directory holds the checkpoint, its training log (rewritten here) and notes such as
    # a README (kept): set aside while the checkpoint is replaced, which refuses other files.
    (out_dir / "train_log.txt").unlink(missing_ok=True)
    notes = {p: p.read_bytes() for p in out_dir.glob("*") if p.is_file() and p.name != "metadata.json"}
    for path in notes:
        path.unlink()
    try:
        save_params(out_dir, params, model_name=args.model,
                    extra={**result, "dataset": "sklearn digits (ptq4vm_jax.data.load_digits_dataset)"})
    finally:
        for path, data in notes.items():
            path.write_bytes(data)
    (out_dir / "train_log.txt").write_text("\n".join(log_lines) + "\n")
    print(log_lines[-1])
    print(f"saved to {out_dir}")
    return result


if __name__ == "__main__":
    main()
