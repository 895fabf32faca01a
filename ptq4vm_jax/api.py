"""The user-facing transform: ``quantize_params`` and ``quantized_apply``."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ptq4vm_jax import gpu
from ptq4vm_jax.api_checks import (
    check_eval_images,
    check_model_and_config,
    check_params,
    check_rules,
    model_for_qparams,
)
from ptq4vm_jax.calibrate.jlss import calibrate_blockwise, init_layer
from ptq4vm_jax.calibrate.resume import ResumeStore, fingerprints
from ptq4vm_jax.data import calibration_images
from ptq4vm_jax.errors import ArgumentWarning
from ptq4vm_jax.models import (
    RUNTIME_CHOICES,
    blockwise,
    canonical_name,
    create_model,
    image_shape,
    model_family,
)
from ptq4vm_jax.models.inputs import from_torch
from ptq4vm_jax.quant.config import (
    QuantConfig,
    QuantProgram,
    is_quantized,
    path_str,
)
from ptq4vm_jax.quant.integer import PALLAS_GEMMS, check_gemm
from ptq4vm_jax.quant.layer import TrainLinear, capture_dense, check_mode, intercept_dense
from ptq4vm_jax.quant.params import Path, QuantizedParams, finalize, flatten_layers, nest_layers
from ptq4vm_jax.trees import get_path

__all__ = ["QuantizedParams", "blockwise", "dense_paths", "quantize_params", "quantized_apply",
           "quantized_layers"]


def dense_paths(model: nn.Module, params: Any, images_shape: tuple[int, ...]) -> list[Path]:
    """Every ``nn.Dense`` call site of the model, found by an abstract (shape-only) forward.

    The answer depends on the params' shapes only, so it is kept per model, image shape and
    params layout: tracing a full-size model takes seconds, and every ``quantize_params`` asks."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    layout = tuple((tuple(np.shape(a)), jnp.result_type(a)) for a in leaves)
    return list(_traced_dense_paths(model, tuple(images_shape), treedef, layout))


@functools.lru_cache(maxsize=32)
def _traced_dense_paths(model: nn.Module, images_shape: tuple[int, ...], treedef: Any,
                        layout: tuple) -> tuple[Path, ...]:
    found: list[Path] = []

    def run(p, x):
        with capture_dense(called=found):
            return model.apply({"params": p}, x)

    params = jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(*a) for a in layout])
    jax.eval_shape(run, params, jax.ShapeDtypeStruct(images_shape, jnp.float32))
    return tuple(sorted(set(found)))


def quantize_params(
    params: Any,
    calib_ds: Any,
    model: str = "vim_tiny",
    config: QuantConfig | None = None,
    *,
    model_overrides: Mapping[str, Any] | None = None,
    resume_dir: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> QuantizedParams:
    """PTQ4VM: float params + calibration images -> ``QuantizedParams``.

    ``calib_ds``: an array of preprocessed images (N, H, W, C), an iterable of batches (arrays or
    dicts with "image"), a ``tfds.data_source`` or a grain dataset. Arrays and iterables give their
    first ``config.num_calib`` images, random-access sources a fixed random sample (seed 0).
    Integer (uint8) images are taken for raw ImageNet pixels and get the official evaluation
    transform (``ptq4vm_jax.data.imagenet_eval_preprocess``: resize, center crop, ImageNet
    mean/std); normalise them yourself for a model trained otherwise (the bundled digits models).
    ``params`` in another float dtype than float32 (bf16, fp16, float64) are calibrated and stored as
    their float32 values. ``model_overrides``: the model's sizes, stored with the result, and the
    runtime choices (``models.RUNTIME_CHOICES``: ``scan``, ``dtype``) calibration runs with, not
    stored.
    ``resume_dir`` saves state after every block and continues a run that was interrupted, ending
    with exactly the uninterrupted result. The summary's ``calibration_seconds`` counts every
    block, those restored from ``resume_dir`` with the seconds recorded when they ran;
    ``calibration_seconds_this_run`` is this call's share and ``resumed_stages`` names the
    restored blocks.

    Raises TypeError or ValueError (``ptq4vm_jax.errors.ArgumentError`` naming the parameter) for
    unusable inputs, checked before any long work: params that are not the model's, NaN/inf in
    them or in the images, too few images, rules matching no linear, a resume directory that is
    someone else's. Raises ``CalibrationError`` when calibration itself fails (non-finite block
    outputs); with ``resume_dir`` the finished blocks are kept.
    """
    check_model_and_config(model, config)
    name = canonical_name(model)
    overrides = dict(model_overrides or {})
    runtime = {k: overrides.pop(k) for k in RUNTIME_CHOICES if k in overrides}  # used here, not saved
    family = model_family(name)
    cfg = (config or QuantConfig()).resolve(family)
    net = create_model(name, **overrides, **runtime)
    check_params(net, params, name)
    params = _uncommitted(_as_float32(params, name, log))
    linears = dense_paths(net, params, image_shape(net))  # rules checked before data is read
    check_rules(cfg.rules, linears, name, params)
    paths = [p for p in linears if is_quantized(p, cfg.rules)]
    if not paths:
        raise ValueError(f"the quantization rules match no linear layer of {name}: {cfg.rules}")
    _, height, _, channels = image_shape(net)
    what = (f"PTQ4VM, {cfg.epochs} epochs per block" if cfg.learns else cfg.method)
    log(f"{name} W{cfg.w_bits}A{cfg.a_bits} ({what}) on {len(paths)} linears: reading {cfg.num_calib} "
        "calibration images; the first block of each shape (the first of each stage where stages "
        "differ) then compiles what the later ones reuse")
    images = jax.device_put(calibration_images(calib_ds, cfg.num_calib, image_size=height,
                                               channels=channels, count_name="QuantConfig.num_calib",
                                               batch=cfg.train_batch if cfg.learns else 1))
    images = _spread_over_devices(images, cfg.train_batch, log)
    bw = blockwise(net)
    loss_axis = -1 if cfg.loss_axis == "channel" else 2
    store = (None if resume_dir is None else
             _resume_store(resume_dir, bw, params, images, name, overrides, cfg))

    t0 = time.perf_counter()
    in_stage = [p for p in paths if any(p[: len(s.path)] == s.path for s in bw.stages)]
    outside = sorted(set(paths) - set(in_stage))
    layers, reports = calibrate_blockwise(bw, params, images, in_stage, cfg, loss_axis=loss_axis,
                                          resume=store, progress=progress, log=log)
    if outside:
        layers.update(_init_outside(net, params, images, outside, layers, cfg))
    seconds = time.perf_counter() - t0
    qlayers, float_params = finalize(layers, params)
    qlayers = _uncommitted(qlayers)
    # Blocks finished by an interrupted run and restored here count with their recorded seconds.
    restored = store.restored if store is not None else []
    info = dict(
        calibration_seconds=seconds + sum(r.seconds for r in restored),
        calibration_seconds_this_run=seconds,
        resumed_stages=[r.name for r in restored],
        num_calib=int(images.shape[0]),
        devices=len(images.sharding.device_set),
        quantized_layers=[path_str(p) for p in paths],
        stages=[dataclasses.asdict(r) for r in reports],
    )
    return QuantizedParams(params=float_params, qlayers=qlayers, model_name=name, config=cfg,
                           model_overrides=tuple(sorted(overrides.items())), info=json.dumps(info))


def _resume_store(resume_dir: str, bw: Any, params: Any, images: jax.Array, name: str,
                  overrides: Mapping[str, Any], cfg: QuantConfig) -> ResumeStore:
    """The resume directory of this run, ready: keyed on the model, its settings, the params and
    the images, so that only a rerun of the same calibration continues it."""
    carry = jax.eval_shape(bw.embed, params, images[:1])
    settings = dict(model=name, overrides=overrides, config=cfg.to_json())
    whole, digests = fingerprints(**settings, params=params, images=images)
    store = ResumeStore(resume_dir, whole, jax.tree_util.tree_structure(carry), digests=digests,
                        settings=settings)
    store.prepare()
    return store


def _as_float32(params: Any, name: str, log: Callable[[str], None]) -> Any:
    """A copy of ``params`` in float32, the models' parameter dtype and what a quantized checkpoint
    stores and loads: params in another float dtype are calibrated as their float32 values (bf16
    and fp16 exactly, float64 rounded), and the run says so."""
    dtypes = {str(np.dtype(getattr(a, "dtype", None) or np.asarray(a).dtype))
              for a in jax.tree_util.tree_leaves(params)}
    other = sorted(dtypes - {"float32"})
    if other:
        log(f"the params of {name} are in {', '.join(other)}: calibrated and stored as float32, "
            "the models' parameter dtype")
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)


def _uncommitted(tree: Any) -> Any:
    """Arrays tied to no device follow their operands wherever those are. Params committed to one
    device clash with calibration images spread over several, and results computed on that mesh
    are committed to every local device, so applying them to images put on one would fail."""
    # device_put, not jnp.asarray: the latter compiles one program per distinct shape.
    return jax.tree_util.tree_map(lambda a: jax.device_put(np.asarray(a)), tree)


def _spread_over_devices(images: jax.Array, train_batch: int, log: Callable[[str], None]) -> jax.Array:
    """Shard the calibration batch over local devices; every chain and step follows (GSPMD)."""
    n = jax.local_device_count()
    if n == 1:
        return images
    if train_batch % n:
        log(f"train_batch {train_batch} is not a multiple of the {n} local devices: calibrating on one")
        return images
    mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
    return jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))


def _init_outside(net, params, images, paths, layers, cfg) -> dict[Path, TrainLinear]:
    """Layers outside every stage (e.g. the head, by a user rule): initialised, not learned.

    Their inputs come from the float model with the already-calibrated layers quantized.
    """
    want = set(paths)

    @jax.jit
    def run(params, qtree, x):  # weights as arguments, not constants folded into the program
        store: dict = {}
        with capture_dense(want, inputs=store), intercept_dense(qtree, cfg, "fake"):
            net.apply({"params": params}, x)
        return store

    qtree = nest_layers(layers)
    caps = [run(params, qtree, images[i : i + cfg.train_batch])
            for i in range(0, images.shape[0], cfg.train_batch)]
    out = {}
    for p in paths:
        x = jnp.concatenate([c[p] for c in caps], axis=0)
        dense = get_path(params, p)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]) if x.ndim != 3 else x
        out[p] = init_layer(dense["kernel"], dense.get("bias"), x3, cfg)
    return out


def quantized_apply(
    model: nn.Module | str | None,
    qparams: QuantizedParams,
    images: jax.Array,
    mode: str = "fake",
    *,
    gemm: str = "auto",
    scan: str | None = None,
) -> jax.Array:
    """Logits of the quantized model (inference only). ``mode``: "fake" (fp32 simulation, the
    accuracy reference) or "int" (integer matmuls; not for ``per_token_dynamic``, whose scales
    exist only at run time). ``gemm`` picks the integer GEMM of ``mode="int"``: "auto" ("wgmma"
    on Hopper, "xla" on other GPUs and elsewhere), "xla", "xla-bf16", "pallas", or on Hopper
    "wgmma" and "mixed"; all sum the same integers (the Pallas kernels' float epilogue may round a
    last bit differently); see ``ptq4vm_jax.choices.GEMM_BACKENDS``. It is
    a static argument: a jitted caller runs the GEMM it passed.

    ``scan`` overrides the model's scan backend ("auto", "ref", "pallas", "fused"; None keeps the model's,
    "auto" for a model built from ``qparams``). The scan is part of the model, so float and
    quantized evaluation on one device run the same one unless asked otherwise; it matters:
    quantization turns the kernel's ~1e-7 rounding differences from ``lax.scan`` into flipped codes
    at rounding boundaries. ``model`` may be None (built from ``qparams``), a name or the module
    itself.

    It runs one compiled program per model, mode, GEMM, input shapes and quantized program (the
    layers' bit widths and ``QuantConfig.program``), shared by every ``QuantizedParams`` of those,
    so evaluating several calibrations compiles once; inside
    a caller's ``jax.jit`` it becomes part of that program. Jitting a function that takes the
    ``QuantizedParams`` as an argument compiles again for each one (its config and calibration
    summary are static pytree data): call ``quantized_apply`` directly instead.
    """
    if not isinstance(qparams, QuantizedParams):
        raise TypeError(f"qparams must be a QuantizedParams (from quantize_params or load_quantized), "
                        f"got {type(qparams).__name__}")
    model = model_for_qparams(model, qparams, scan)
    check_gemm(gemm)
    if mode == "int" and gemm in PALLAS_GEMMS and gpu.interpret_kernels():
        warnings.warn(ArgumentWarning(f"gemm={gemm!r} off the GPU runs its kernel in the Pallas interpreter: "
                                      "the same integers, slowly; meant for testing (gemm='auto' or "
                                      "gemm='xla' is the fast path here)", argument="gemm"), stacklevel=2)
    program = qparams.config.program
    check_mode(mode, program)
    images = from_torch(images)
    check_eval_images(model, images)
    if _interceptors_active():  # theirs must see this forward's modules: trace it afresh, inline
        return _quantized_forward(model, program, mode, gemm, qparams.params, qparams.qlayers, images)
    return _forward(model, program, mode, gemm)(qparams.params, qparams.qlayers, images)


def _quantized_forward(model: nn.Module, program: QuantProgram, mode: str, gemm: str, params: Any,
                       qlayers: Any, images: jax.Array) -> jax.Array:
    with intercept_dense(qlayers, program, mode, gemm=gemm):
        logits = model.apply({"params": params}, images)
    # Inside a caller's jit the image checks see no values: an image with NaN/inf pixels gets NaN
    # logits, as in the float model, not the confident ones quantization makes of its codes.
    finite = jnp.isfinite(images).reshape(images.shape[0], -1).all(axis=1)
    return jnp.where(finite[:, None], logits, jnp.nan)


@functools.lru_cache(maxsize=32)
def _forward(model: nn.Module, program: QuantProgram, mode: str, gemm: str) -> Callable:
    """One jitted forward per model, quantized program, mode and GEMM, taking the arrays as
    arguments. A ``QuantizedParams`` carries its config and calibration summary as static data,
    so a program keyed on it would compile again for every calibration of the same shapes; this
    one serves them all, and eager calls run compiled rather than op by op."""
    return jax.jit(functools.partial(_quantized_forward, model, program, mode, gemm))


def _interceptors_active() -> bool:
    """Whether a caller's ``nn.intercept_methods`` is active. A compiled program would hide the
    modules from it, or keep it for later calls; where flax does not say, assume one is."""
    stack = getattr(nn.module, "_global_interceptor_stack", None)
    try:
        return len(stack) > 0
    except TypeError:
        return True


def quantized_layers(qparams: QuantizedParams) -> dict[Path, Any]:
    """{path: QuantizedLinear} of every quantized layer."""
    return flatten_layers(qparams.qlayers)
