"""Block-wise calibration: PTS initialisation, then JLSS (docs/method.md §4-§6).

Two chains of activations flow through the model one stage at a time: the float chain
gives each stage's input for statistics and its target output; the quantized chain gives
the input the stage learns on. Each stage's state (sigma, weight steps, activation steps)
is initialised on the float input, learned with AdamW against the block loss (1 - cosine by
default, ``QuantConfig.loss``), then the quantized chain is pushed through the learned stage.
State is saved after every stage.

Compiled programs are keyed on what they compute: the block forwards and learning steps on
``QuantConfig.program`` (activation quantizer, loss, which layers learn), the initialisation on
whether it smooths and its grid. Bit widths, learning rates, alpha, grid_p, weight decay and
clipping are traced values (the optimizer's through ``optax.inject_hyperparams``), so a new value
of those compiles nothing, and PTS, RTN and PTQ4VM share the block forwards.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ptq4vm_jax.calibrate.report import CalibrationError, StageReport
from ptq4vm_jax.calibrate.resume import ResumeStore
from ptq4vm_jax.models.blockwise import Blockwise, Stage
from ptq4vm_jax.progress import progress_bar
from ptq4vm_jax.quant import init as qinit
from ptq4vm_jax.quant.config import QuantConfig, QuantProgram
from ptq4vm_jax.quant.layer import TrainLinear, capture_dense, intercept_dense
from ptq4vm_jax.quant.params import Path, flatten_layers, nest_layers
from ptq4vm_jax.trees import get_path

__all__ = ["CalibrationError", "StageReport", "calibrate_blockwise", "flatten_layers", "init_layer",
           "make_optimizer", "nest_layers"]

#: The learned fields of a layer and their optimizer group (one learning rate each).
TRAIN_KEYS = {"smooth": "s", "w_scale": "w", "a_scale": "a"}
#: What the resume state keeps of a layer (the float weights come from the params again).
RESUMED_KEYS = ("smooth", "w_scale", "a_scale", "a_zero")


def take(tree: Any, start: int, size: int) -> Any:
    """Rows [start, start + size) of every leaf (the batch axis)."""
    return jax.tree_util.tree_map(lambda a: a[start : start + size], tree)


def batch_size(tree: Any) -> int:
    return jax.tree_util.tree_leaves(tree)[0].shape[0]


def chunked(fn: Callable, carry: Any, chunk: int) -> Any:
    """Apply ``fn`` to the leading (batch) axis of ``carry`` in pieces of ``chunk``."""
    outs = [fn(take(carry, i, chunk)) for i in range(0, batch_size(carry), chunk)]
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *outs)


def cosine_loss(target: jax.Array, out: jax.Array, axis: int) -> jax.Array:
    """Mean over everything else of 1 - cos(target, out) along ``axis``.

    As torch's ``cosine_similarity`` (eps=1e-8): the product of squared norms is clamped before
    the square root, so an all-zero quantized row has a finite gradient instead of NaN.
    """
    t = target.astype(jnp.float32)
    o = out.astype(jnp.float32)
    dot = jnp.sum(t * o, axis=axis)
    denom = jnp.sqrt(jnp.maximum(jnp.sum(t * t, axis=axis) * jnp.sum(o * o, axis=axis), 1e-16))
    return jnp.mean(1.0 - dot / denom)


def relative_mse_loss(target: jax.Array, out: jax.Array, axis: int) -> jax.Array:
    """mean |target - out|^2 / mean |target|^2: unlike the cosine, it sees the output's scale."""
    del axis
    t = target.astype(jnp.float32)
    return jnp.mean(jnp.square(t - out.astype(jnp.float32))) / jnp.maximum(jnp.mean(t * t), 1e-30)


LOSSES = {"cosine": cosine_loss, "mse": relative_mse_loss}


# ----------------------------------------------------------------------------- initialisation


def init_layer(kernel: jax.Array, bias: jax.Array | None, x: jax.Array, cfg: QuantConfig) -> TrainLinear:
    """Train-form state of one linear from its float input ``x`` (N, L, C) (docs/method.md §4.2, §5)."""
    alpha = 0.0 if cfg.alpha is None else cfg.alpha  # (unused by the methods that do not smooth)
    arrays, finite = _init_layer(kernel, bias, x, jnp.float32(alpha), jnp.float32(cfg.grid_p),
                                 cfg.w_bits, cfg.a_bits, smooths=cfg.smooths, act_grid=cfg.act_grid)
    for k, ok in jax.device_get(finite).items():
        if not ok:
            raise CalibrationError(f"non-finite {k} while initialising a layer (input has NaN/inf?)")
    return TrainLinear(**arrays, w_bits=cfg.w_bits, a_bits=cfg.a_bits)


@functools.partial(jax.jit, static_argnames=("smooths", "act_grid"))
def _init_layer(kernel, bias, x, alpha, grid_p, w_bits, a_bits, *, smooths: bool, act_grid: str):
    """One compiled program per layer shape and kind of initialisation, for every bit width
    (eagerly, each small op would compile on its own)."""
    kernel = kernel.astype(jnp.float32)
    x = x.astype(jnp.float32).reshape(-1, x.shape[-2], x.shape[-1])
    if smooths:  # PTS: SmoothQuant scales, then the grid searches
        absmax = jnp.max(jnp.abs(x), axis=(0, 1))
        smooth = qinit.smoothing_scale(absmax, kernel, alpha)
        w_scale = qinit.init_weight_scale(kernel, smooth, w_bits, p=grid_p)
        a_scale, a_zero = qinit.init_act_scale(x, smooth, a_bits, grid=act_grid, p=grid_p)
    else:
        smooth = jnp.ones((kernel.shape[0],), jnp.float32)
        w_scale = qinit.minmax_weight_scale(kernel, smooth, w_bits)
        a_scale, a_zero = qinit.minmax_act_scale_per_tensor(x, smooth, a_bits)
    arrays = dict(kernel=kernel, smooth=smooth, w_scale=w_scale, a_scale=a_scale,
                  a_zero=a_zero.astype(jnp.int32), bias=None if bias is None else bias.astype(jnp.float32))
    return arrays, {k: jnp.all(jnp.isfinite(v)) for k, v in arrays.items() if v is not None}


def trainable_mask(rel_path: Path, cfg: QuantConfig | QuantProgram) -> bool:
    """Released Vim code trains only in_proj/out_proj (docs/method.md §6.4); ``train_inner_proj``
    fixes that."""
    if cfg.train_inner_proj:
        return True
    return not rel_path[-1].startswith(("x_proj", "dt_proj"))


def split_state(layers: Mapping[Path, TrainLinear], cfg: QuantConfig | QuantProgram) -> tuple[dict, dict]:
    """(learned arrays {path: {name: array}}, the layers): the optimizer sees only the former."""
    train = {path: {k: getattr(st, k) for k in TRAIN_KEYS} if trainable_mask(path, cfg) else {}
             for path, st in layers.items()}
    return train, dict(layers)


def merge_state(train: Mapping, frozen: Mapping[Path, TrainLinear]) -> dict[Path, TrainLinear]:
    return {p: dataclasses.replace(st, **train.get(p, {})) for p, st in frozen.items()}


def optimizer_hyperparams(cfg: QuantConfig) -> dict[str, float]:
    """The optimizer's values, given to :func:`make_optimizer` (and held in its state)."""
    return dict(lr_w=cfg.lr_w, lr_a=cfg.lr_a, lr_s=cfg.lr_s, weight_decay=cfg.weight_decay,
                grad_clip=cfg.grad_clip)


def _optimizer(lr_w: Any, lr_a: Any, lr_s: Any, weight_decay: Any,
               grad_clip: Any) -> optax.GradientTransformation:
    """The JLSS optimizer; every value is a hyperparameter in its state (``inject_hyperparams``),
    so ``update`` reads them from there and one compiled step serves every value."""
    adamw = lambda lr: optax.inject_hyperparams(optax.adamw)(
        learning_rate=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    labels = lambda tree: {p: {k: TRAIN_KEYS[k] for k in st} for p, st in tree.items()}
    inner = optax.chain(
        optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=grad_clip),
        optax.multi_transform({"w": adamw(lr_w), "a": adamw(lr_a), "s": adamw(lr_s)}, labels),
    )
    # GradScaler semantics (docs/method.md §6.2): a step whose gradients are not finite is skipped.
    return optax.apply_if_finite(inner, max_consecutive_errors=10**9)


def make_optimizer(cfg: QuantConfig) -> optax.GradientTransformation:
    """AdamW per group (σ, weight steps, activation steps) after global-norm clipping
    (docs/method.md §6.2)."""
    return _optimizer(**optimizer_hyperparams(cfg))


# ----------------------------------------------------------------------------- compiled pieces


@functools.cache
def _compiled(stage_module: Any, output: Callable, program: QuantProgram, axis: int):
    """Jitted forward/step functions, shared by every stage with an equal module and program."""
    stage = Stage(path=(), module=stage_module, output=output)
    # The values passed here only build the update's structure: it reads them from the state.
    optimizer = _optimizer(*(0.0,) * 5)
    block_loss = LOSSES[program.loss]

    def qforward(state, params, carry):
        # Frozen layers of the released Vim recipe pass gradients as float layers (docs/method.md §6.4).
        frozen = frozenset(p for p in state if not trainable_mask(p, program))
        # The scan backend is the stage module's config (one choice for evaluation and calibration).
        with intercept_dense(nest_layers(state), program, "fake", float_backward=frozen):
            return stage.apply(params, carry)

    def loss_fn(train, frozen, params, carry, target):
        out = qforward(merge_state(train, frozen), params, carry)
        return block_loss(target, output(out), axis)

    @jax.jit
    def step(train, opt_state, frozen, params, carry, target):
        loss, grads = jax.value_and_grad(loss_fn)(train, frozen, params, carry, target)
        updates, opt_state = optimizer.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, loss

    return dict(
        step=step,
        opt_init=jax.jit(lambda train, hparams: _optimizer(**hparams).init(train)),  # one program
        qforward=jax.jit(qforward),
        loss=jax.jit(lambda state, params, carry, target: block_loss(
            target, output(qforward(state, params, carry)), axis)),
        **_compiled_float(stage_module),
    )


@functools.cache
def _compiled_float(stage_module: Any):
    """The float forwards do not depend on the config: one compilation serves every run."""
    stage = Stage(path=(), module=stage_module, output=lambda out: out)

    @functools.partial(jax.jit, static_argnums=2)
    def fp_forward_capture(params, carry, paths):
        store: dict = {}
        with capture_dense(set(paths), inputs=store):
            out = stage.apply(params, carry)
        return out, {p: store[p] for p in paths}

    @jax.jit
    def fp_forward(params, carry):
        return stage.apply(params, carry)

    return dict(fp_forward=fp_forward, fp_capture=fp_forward_capture)


# ----------------------------------------------------------------------------- the loop


def calibrate_blockwise(
    bw: Blockwise,
    params: Mapping,
    images: jax.Array,
    quant_paths: list[Path],
    cfg: QuantConfig,
    *,
    loss_axis: int = -1,
    resume: ResumeStore | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[dict[Path, TrainLinear], list[StageReport]]:
    """Returns the train-form state of every quantized layer (absolute paths) and a report."""
    chunk = cfg.train_batch
    layers: dict[Path, TrainLinear] = {}
    reports: list[StageReport] = []
    start = 0
    if resume is not None and resume.exists():
        start, layers, fp_carry, q_carry, reports = resume.load()
        layers = with_float_weights(layers, params, cfg)
        fp_carry, q_carry = (_batch_sharded_like(images, c) for c in (fp_carry, q_carry))
        last = "/".join(bw.stages[start - 1].path) if start else "the embedding"
        log(f"resuming after stage {start} of {len(bw.stages)} ({last}; {len(reports)} calibrated "
            f"blocks done) from {resume.directory}")
    else:
        if resume is not None and (resume.directory / "progress.json").exists():
            log(f"{resume.directory} has progress.json but no state.npz (deleted?): starting afresh")
        embed = jax.jit(bw.embed)  # one program, not one per op of the stem
        fp_carry = chunked(lambda im: embed(params, im), images, chunk)
        q_carry = fp_carry

    for idx in range(start, len(bw.stages)):
        stage = bw.stages[idx]
        name = "/".join(stage.path)
        t0 = time.perf_counter()
        n = len(stage.path)
        rel = sorted(p[n:] for p in quant_paths if p[:n] == stage.path)
        fns = _compiled(stage.module, stage.output, cfg.program, loss_axis)
        sparams = get_path(params, stage.path)
        if not rel:  # nothing to quantize here (e.g. a VMamba downsample): both chains go through
            forward = functools.partial(fns["fp_forward"], sparams)
            fp_carry = chunked(forward, fp_carry, chunk)
            q_carry = chunked(forward, q_carry, chunk)
            _check_finite(fp_carry, name, "float chain")
        else:
            state, fp_carry, q_carry, losses = _calibrate_stage(fns, sparams, tuple(rel), fp_carry, q_carry,
                                                                stage.output, cfg, name, progress, log)
            for p, st in state.items():
                layers[stage.path + p] = st
            reports.append(StageReport(name, seconds=time.perf_counter() - t0, **losses))
        if resume is not None:
            resume.save(idx + 1, resumed_arrays(layers), fp_carry, q_carry, reports)
        if rel and progress:
            r = reports[-1]
            log(f"{name}: loss {r.loss_init:.5f} -> {r.loss_final:.5f} ({r.seconds:.1f}s)")
    return layers, reports


def _calibrate_stage(fns: Mapping[str, Callable], sparams: Mapping, rel: tuple[Path, ...], fp_carry: Any,
                     q_carry: Any, output: Callable, cfg: QuantConfig, name: str, progress: bool,
                     log: Callable[[str], None]) -> tuple[dict[Path, TrainLinear], Any, Any, dict[str, Any]]:
    """One block with quantized linears ``rel`` (paths in the block): initialise them on the float
    chain's inputs, learn (where ``cfg`` learns), and run both chains through the block. Returns
    (their states, the float chain, the quantized chain, the block's losses for ``StageReport``)."""
    chunk = cfg.train_batch
    # Float pass: target + float inputs of every quantized linear (docs/method.md §5: init on FP inputs).
    fp_out, captured = _capture(fns["fp_capture"], sparams, fp_carry, rel, chunk)
    _check_finite(fp_out, name, "float chain")
    target = output(fp_out)
    state = {}
    for p in rel:
        dense = get_path(sparams, p)
        try:
            state[p] = init_layer(dense["kernel"], dense.get("bias"), captured[p], cfg)
        except CalibrationError as e:
            raise CalibrationError(f"stage {name}, layer {'/'.join(p)}: {e}") from None
    del captured

    loss_init = _full_loss(fns["loss"], state, sparams, q_carry, target, chunk)
    loss_final, loss_learned, reverted = loss_init, None, False
    if cfg.learns:
        learned, diverged = _learn(fns, state, sparams, q_carry, target, cfg, name, progress)
        if learned is not None:
            loss_learned = _full_loss(fns["loss"], learned, sparams, q_carry, target, chunk)
        reverted = cfg.revert_worse and (learned is None or not loss_learned <= loss_init)
        if reverted:
            why = diverged or f"learning raised the block loss {loss_init:.4g} -> {loss_learned:.4g}"
            log(f"{name}: {why}; kept the initial scales (revert_worse; lower the learning rates "
                "to learn here)")
        else:
            state, loss_final = learned, loss_learned
    q_carry = chunked(functools.partial(fns["qforward"], state, sparams), q_carry, chunk)
    _check_finite(q_carry, name, "quantized chain")
    losses = dict(loss_init=loss_init, loss_final=loss_final, loss_learned=loss_learned, reverted=reverted)
    return state, fp_out, q_carry, losses


def resumed_arrays(layers: Mapping[Path, TrainLinear]) -> dict[Path, dict[str, jax.Array]]:
    """What the resume state keeps of each layer (``RESUMED_KEYS``)."""
    return {path: {k: getattr(st, k) for k in RESUMED_KEYS} for path, st in layers.items()}


def with_float_weights(layers: Mapping[Path, Mapping[str, jax.Array]], params: Mapping,
                       cfg: QuantConfig) -> dict[Path, TrainLinear]:
    """Put back the float kernel (and bias) that the resume store leaves out, as ``init_layer``
    holds them, so resumed states are the train form every later use expects."""
    out = {}
    for path, st in layers.items():
        dense = get_path(params, path)
        bias = dense.get("bias")
        out[path] = TrainLinear(kernel=dense["kernel"].astype(jnp.float32),
                                bias=None if bias is None else bias.astype(jnp.float32),
                                **{k: st[k] for k in RESUMED_KEYS}, w_bits=cfg.w_bits, a_bits=cfg.a_bits)
    return out


def _batch_sharded_like(images: Any, carry: Any) -> Any:
    """Loaded chains are on one device; shard their batch axis over the images' mesh, like a
    fresh chain computed from the (data-sharded) images, so the run goes on data-parallel."""
    sharding = getattr(images, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return carry
    batch = sharding.spec[0] if sharding.spec else None
    return jax.device_put(carry, NamedSharding(sharding.mesh, PartitionSpec(batch)))


def _capture(fp_capture, sparams, carry, rel, chunk):
    outs, caps = [], []
    for i in range(0, batch_size(carry), chunk):
        out, cap = fp_capture(sparams, take(carry, i, chunk), rel)
        outs.append(out)
        caps.append(cap)
    cat = lambda *xs: jnp.concatenate(xs, axis=0)
    return jax.tree_util.tree_map(cat, *outs), {p: cat(*[c[p] for c in caps]) for p in rel}


def _full_loss(loss, state, sparams, q_carry, target, chunk) -> float:
    n = target.shape[0]
    total = 0.0
    for i in range(0, n, chunk):
        piece_loss = loss(state, sparams, take(q_carry, i, chunk), target[i : i + chunk])
        total += float(piece_loss) * min(chunk, n - i)
    return total / n


def _learn(fns, state, sparams, q_carry, target, cfg, name, progress):
    """(learned state, None), or (None, why) when the loss became non-finite and
    ``cfg.revert_worse`` lets the block keep its initial scales."""
    train, frozen = split_state(state, cfg)
    opt_state = fns["opt_init"](train, optimizer_hyperparams(cfg))
    n = target.shape[0]
    batches = n // cfg.train_batch
    steps = cfg.epochs * batches
    # lines=0: the caller logs the block; a log still gets a line a minute while a block learns.
    bar = progress_bar(steps, f"JLSS {name}", unit="step", enabled=progress, leave=False, lines=0,
                       interval=60.0)
    try:  # (closed on an interrupt too, so no message lands on a half-drawn bar)
        for k in range(steps):
            j = (k % batches) * cfg.train_batch
            train, opt_state, loss = fns["step"](train, opt_state, frozen, sparams,
                                                 take(q_carry, j, cfg.train_batch),
                                                 target[j : j + cfg.train_batch])
            loss = float(loss)
            if not np.isfinite(loss):
                if cfg.revert_worse:  # the caller keeps the initial scales
                    return None, f"non-finite loss ({loss}) at step {k}"
                raise CalibrationError(
                    f"non-finite loss ({loss}) in stage {name} at step {k}: the learned scales diverged "
                    "(try a smaller lr_s/lr_a/lr_w) or the inputs contain NaN/inf. Stages before this "
                    "one are kept in the resume directory, if one was given."
                )
            bar.set_postfix(loss=f"{loss:.5f}")
            bar.update()
    finally:
        bar.close()
    return merge_state(train, frozen), None


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]))


def _check_finite(tree: Any, stage: str, what: str) -> None:
    if not bool(_all_finite(tree)):
        fix = ("the float model itself overflows here: check its weights (a corrupt or mis-converted "
               "checkpoint) and that the images are preprocessed as it expects" if what == "float chain"
               else "with learned scales kept where they diverged (revert_worse=False, --keep-learned), "
               "lower lr_w/lr_a/lr_s; otherwise the quantization itself overflows (try more bits)")
        raise CalibrationError(f"non-finite values in the {what} after stage {stage}: {fix}")
