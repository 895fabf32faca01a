"""The user-facing transform: ``quantize_params`` and ``quantized_apply``."""

from __future__ import annotations

import dataclasses
import json
import re
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptq4vm_jax.calibrate.jlss import calibrate_blockwise, init_layer
from ptq4vm_jax.calibrate.resume import ResumeStore, fingerprints
from ptq4vm_jax.checkpoint import nonfinite_report
from ptq4vm_jax.models import canonical_name, create_model, image_shape, model_family
from ptq4vm_jax.models.blockwise import Blockwise
from ptq4vm_jax.models.vim import VisionMamba, vim_blockwise
from ptq4vm_jax.models.vmamba import VMamba, vmamba_blockwise
from ptq4vm_jax.ops.scan import scan_kernel
from ptq4vm_jax.quant.config import (
    DEFAULT_RULES,
    QuantConfig,
    QuantRule,
    deciding_rule,
    is_quantized,
    path_str,
)
from ptq4vm_jax.quant.integer import PALLAS_GEMMS, check_gemm
from ptq4vm_jax.quant.layer import TrainLinear, capture_dense_inputs, intercept_dense
from ptq4vm_jax.quant.params import Path, QuantizedParams, finalize, flatten_layers, nest_layers
from ptq4vm_jax.trees import copy_tree, flatten_tree, get_path

__all__ = ["QuantizedParams", "blockwise", "dense_paths", "quantize_params", "quantized_apply",
           "quantized_layers"]


def blockwise(model: nn.Module) -> Blockwise:
    if isinstance(model, VisionMamba):
        return vim_blockwise(model)
    if isinstance(model, VMamba):
        return vmamba_blockwise(model)
    raise TypeError(f"no block-wise calibration for {type(model).__name__}")


def dense_paths(model: nn.Module, params: Any, images_shape: tuple[int, ...]) -> list[Path]:
    """Every ``nn.Dense`` call site of the model, found by an abstract (shape-only) forward."""
    found: list[Path] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
            found.append(tuple(context.module.path))
        return next_fun(*args, **kwargs)

    def run(p, x):
        with nn.intercept_methods(interceptor):
            return model.apply({"params": p}, x)

    jax.eval_shape(run, params, jax.ShapeDtypeStruct(images_shape, jnp.float32))
    return sorted(set(found))


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
    ``resume_dir`` saves state after every block and continues a run that was interrupted, ending
    with exactly the uninterrupted result.
    """
    from ptq4vm_jax.data import calibration_images

    if isinstance(model, nn.Module):
        raise TypeError(f"quantize_params takes the model's name (model='vim_tiny', with model_overrides="
                        f"{{...}} for a resized one), not a {type(model).__name__} module: the name and "
                        "overrides are saved with the quantized params")
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}; e.g. "
                        "QuantConfig(w_bits=4, a_bits=8)" + (", or QuantConfig(**d) for a dict d"
                                                             if isinstance(config, Mapping) else ""))
    name = canonical_name(model)
    overrides = dict(model_overrides or {})
    family = model_family(name)
    cfg = (config or QuantConfig()).resolve(family)
    net = create_model(name, **overrides)
    _check_params(net, params, name)
    params = _uncommitted(copy_tree(params))
    linears = dense_paths(net, params, image_shape(net))  # rules checked before data is read
    _check_rules(cfg.rules, linears, name, params)
    paths = [p for p in linears if is_quantized(p, cfg.rules)]
    if not paths:
        raise ValueError(f"the quantization rules match no linear layer of {name}: {cfg.rules}")
    _, height, _, channels = image_shape(net)
    what = (f"PTQ4VM, {cfg.epochs} epochs per block" if cfg.learns else cfg.method)
    log(f"{name} W{cfg.w_bits}A{cfg.a_bits} ({what}) on {len(paths)} linears: reading {cfg.num_calib} "
        "calibration images; the first block then compiles what the later ones reuse")
    images = jax.device_put(calibration_images(calib_ds, cfg.num_calib, image_size=height,
                                               channels=channels, count_name="QuantConfig.num_calib",
                                               batch=cfg.train_batch if cfg.learns else 1))
    images = _spread_over_devices(images, cfg.train_batch, log)
    bw = blockwise(net)
    loss_axis = -1 if cfg.loss_axis == "channel" else 2
    store = None
    if resume_dir is not None:
        carry = jax.eval_shape(bw.embed, params, images[:1])
        settings = dict(model=name, overrides=overrides, config=cfg.to_json())
        parts = dict(settings, params=params, images=images)
        whole, digests = fingerprints(**parts)
        store = ResumeStore(resume_dir, whole, jax.tree_util.tree_structure(carry), digests=digests,
                            settings=settings)
        store.prepare()

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
    info = dict(
        calibration_seconds=seconds,
        num_calib=int(images.shape[0]),
        devices=len(images.sharding.device_set),
        quantized_layers=[path_str(p) for p in paths],
        stages=[dataclasses.asdict(r) for r in reports],
    )
    return QuantizedParams(params=float_params, qlayers=qlayers, model_name=name, config=cfg,
                           model_overrides=tuple(sorted(overrides.items())), info=json.dumps(info))


def _uncommitted(tree: Any) -> Any:
    """Arrays tied to no device follow their operands wherever those are. Params committed to one
    device clash with calibration images spread over several, and results computed on that mesh
    are committed to every local device, so applying them to images put on one would fail."""
    # device_put, not jnp.asarray: the latter compiles one program per distinct shape.
    return jax.tree_util.tree_map(lambda a: jax.device_put(np.asarray(a)), tree)


def _check_rules(rules: tuple[QuantRule, ...], linears: list[Path], name: str, params: Mapping) -> None:
    """A rule that decides no layer is a typo or is shadowed by an earlier rule; running anyway
    would quantize other layers than the user believes."""
    decided = {deciding_rule(p, rules) for p in linears}
    idle = [r for i, r in enumerate(rules) if i not in decided]
    if idle:
        examples = ", ".join(path_str(p) for p in linears[:3])
        linear_params = {path_str(p) + "/" for p in linears}
        others = [k for k in flatten_tree(params) if not any(k.startswith(p) for p in linear_params)]
        hits = sorted({k for r in idle for k in others  # (a parameter, or the module holding it)
                       if re.search(r.pattern, k) or re.search(r.pattern, k.rsplit("/", 1)[0])})
        hint = (f". They match parameters that are not linear layers ({', '.join(hits[:3])}): only "
                "linear (nn.Dense) layers are quantized; norms, convolutions, A_log/D and the scan "
                "stay float" if hits else "")
        family = model_family(name)
        foreign = [f for f, own in DEFAULT_RULES.items() if f != family and any(r in own for r in idle)]
        if foreign:
            hint += (f". DEFAULT_RULES[{foreign[0]!r}] are for {foreign[0]} models; {name} needs "
                     f"DEFAULT_RULES[{family!r}]")
        raise ValueError(
            f"quantization rule(s) {idle} decide no linear layer of {name}: no layer path matches "
            f"them, or an earlier rule matches first. Layer paths look like {examples} (first "
            f"match wins, in order: {[r.pattern for r in rules]}); fix or drop those rules{hint}"
        )


def _spread_over_devices(images: jax.Array, train_batch: int, log: Callable[[str], None]) -> jax.Array:
    """Shard the calibration batch over local devices; every chain and step follows (GSPMD)."""
    n = jax.local_device_count()
    if n == 1:
        return images
    if train_batch % n:
        log(f"train_batch {train_batch} is not a multiple of the {n} local devices: calibrating on one")
        return images
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
        with capture_dense_inputs(want, store), intercept_dense(qtree, cfg, "fake"):
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


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(v))
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def _check_params(net: nn.Module, params: Any, name: str) -> None:
    """Shapes of ``params`` against the model's (before any data is read); every problem named."""
    if not isinstance(params, Mapping):
        loaded = (isinstance(params, tuple) and len(params) == 2 and isinstance(params[1], Mapping)
                  and "format" in params[1])
        hint = ("; load_params returns (params, metadata): params, meta = load_params(path)" if loaded
                else "")
        raise TypeError(f"params must be the param tree of {name} (a dict, e.g. variables['params']), "
                        f"got {type(params).__name__}{hint}")
    images = jax.ShapeDtypeStruct(image_shape(net), jnp.float32)
    want = _leaf_shapes(jax.eval_shape(net.init, jax.random.key(0), images)["params"])
    got = _leaf_shapes(params)
    if got == want:
        flat = flatten_tree(params)
        dtypes = {p: getattr(v, "dtype", None) or np.asarray(v).dtype for p, v in flat.items()}
        integer = [f"{p} ({d})" for p, d in dtypes.items() if not jnp.issubdtype(d, jnp.floating)]
        if integer:
            raise TypeError(f"the params of {name} must be floating point; {len(integer)} are not: "
                            f"{', '.join(integer[:5])}. quantize_params needs the float model's weights "
                            "(e.g. from load_torch_checkpoint or load_params)")
        broken = nonfinite_report(flat)
        if broken:
            raise ValueError(f"the float params of {name} hold NaN/inf values ({'; '.join(broken[:5])}): "
                             "the checkpoint itself is broken, calibration cannot fix it")
        return
    if got and all(p.startswith("params/") for p in got):
        raise ValueError(f"params for {name} are wrapped in {{'params': ...}}: pass variables['params']")
    problems = [f"{p}: {got[p]}, expected {want[p]}" for p in sorted(got.keys() & want.keys())
                if got[p] != want[p]]
    problems += [f"missing {p} {want[p]}" for p in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {p} {got[p]}" for p in sorted(got.keys() - want.keys())]
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    raise ValueError(
        f"params do not fit {name} ({len(problems)} problems):\n  " + "\n  ".join(problems[:12]) + more
        + "\nDid you pass the params of another model (see model= / model_overrides=; CLI: --model)?"
    )


def quantized_apply(
    model: nn.Module | str | None,
    qparams: QuantizedParams,
    images: jax.Array,
    mode: str = "fake",
    *,
    gemm: str = "auto",
) -> jax.Array:
    """Logits of the quantized model (inference only). ``mode``: "fake" (fp32 simulation, the
    accuracy reference) or "int" (integer matmuls; not for ``per_token_dynamic``, whose scales
    exist only at run time). ``gemm`` picks the integer GEMM of ``mode="int"``: "auto" ("wgmma"
    on Hopper, "xla" on other GPUs and elsewhere), "xla", "xla-bf16", "pallas", or on Hopper
    "wgmma" and "mixed"; all integer-exact; see ``ptq4vm_jax.quant.integer.GEMM_BACKENDS``. It is
    a static argument: a jitted caller runs the GEMM it passed.

    On GPU both modes run the Pallas selective scan, so they differ only in the linears:
    quantization turns the scan's float rounding differences into flipped codes at rounding
    boundaries, so the scan choice alone moves quantized logits (BENCHMARKS.md). ``model`` may be
    None (built from ``qparams``), a name or the module itself.
    """
    if not isinstance(qparams, QuantizedParams):
        raise TypeError(f"qparams must be a QuantizedParams (from quantize_params or load_quantized), "
                        f"got {type(qparams).__name__}")
    if model is None or isinstance(model, str):
        if isinstance(model, str) and canonical_name(model) != qparams.model_name:
            raise ValueError(f"qparams were made for {qparams.model_name}, not {model}")
        model = qparams.model()
    elif getattr(model, "cfg", None) is not None:
        made_for = dataclasses.replace(qparams.model().cfg, dtype=model.cfg.dtype)
        if model.cfg != made_for:
            if type(model.cfg) is type(made_for):
                pairs = [(f.name, getattr(model.cfg, f.name), getattr(made_for, f.name))
                         for f in dataclasses.fields(made_for)]
                differ = "has " + ", ".join(f"{k}={got!r} (qparams: {want!r})" for k, got, want in pairs
                                            if got != want)
            else:
                differ = f"is a {type(model).__name__}"
            raise ValueError(f"qparams were made for {qparams.model_name} ({type(made_for).__name__}), but "
                             f"the model passed {differ}; pass model=None to build the model the qparams "
                             "describe")
    check_gemm(gemm)
    if mode == "int" and gemm in PALLAS_GEMMS and jax.default_backend() != "gpu":
        warnings.warn(f"gemm={gemm!r} off the GPU runs its kernel in the Pallas interpreter: exact but "
                      "slow, meant for testing (gemm='auto' or gemm='xla' is the fast path here)",
                      stacklevel=2)
    with intercept_dense(qparams.qlayers, qparams.config, mode, gemm=gemm), scan_kernel(True):
        return model.apply({"params": qparams.params}, images)


def quantized_layers(qparams: QuantizedParams) -> dict[Path, Any]:
    """{path: QuantizedLinear} of every quantized layer."""
    return flatten_layers(qparams.qlayers)
