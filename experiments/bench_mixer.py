"""The fused bidirectional Vim mixer kernel against the per-direction path on one GPU: one run,
one markdown table.

    python experiments/bench_mixer.py --quick                     # Vim-S batch 256
    python experiments/bench_mixer.py --quick --interpret         # CPU smoke test, tiny shapes
    python experiments/bench_mixer.py --mixer-shapes vim_b:256 --e2e-models vim_base:256

Sections:
  mixer  the mixer core of one Vim block (from the in_proj output x, z and each direction's x_proj
         outputs to SiLU(z)·(y_f + y_b)/2), bf16: the baseline path (XLA conv + SiLU per
         direction on flipped copies, XLA dt_proj, two Pallas scans, flips, gate and average;
         ``vim_mixer_ref(scan="pallas")``), the fused kernel fed XLA's dt_proj output
         (``MixerConfig.dt_on_chip=False``), the fused kernel given x and z as two arrays (XLA
         copies the halves out of in_proj's output), the fused kernel with dt_proj on chip reading
         x and z in place (the model's ``scan="fused"`` path), and XLA's dt_proj with the two
         Pallas scans but none of the other glue (timing only). Rates: exponentials per second
         against the special-function peak; ``x bound`` is the time over the exp-throughput bound
         of both directions (2·B·L·E·N exponentials at EXP_PEAK). Each variant is checked in fp32
         against the reference (lax.scan) before it is timed in bf16. Then the integer path's end
         of the mixer: the fused kernel's value quantized for out_proj by a separate XLA pass,
         against the codes written by the kernel's epilogue (checked equal to the quantized
         value).
  norm   the residual add + RMSNorm that opens each block (from the mixer shapes: D = E/2), bf16:
         XLA (float out; and with in_proj's quantizer, int8 out) against the Pallas kernel
         (float out; codes from its epilogue). GB/s over the bytes each must move (bf16 hidden and
         fp32 residual in, fp32 residual and the output out), against the card's HBM bandwidth.
  cross-scan  VMamba's four scan directions and their merge at VMamba-T's stage shapes (batch
         64; ``--quick``: stages 1 and 3), fp32 as the model runs them, from dt_proj's input
         (R = E/16) on: the unfused path (XLA's dt_proj, four reordered copies, the Pallas scans
         vmapped, the reordering merge; ``scan="pallas"``), the fused kernel fed XLA's dt_proj
         (``CrossScanConfig.dt_on_chip=False``) and the fused kernel with dt_proj on chip
         (``scan="fused"``), checked against the lax.scan composition.
  sweep  (only with ``--sections``) the three kernels' tuning sweeps (``MIXER_SWEEP``,
         ``NORM_SWEEP``, ``CROSS_SCAN_SWEEP``) at the first mixer shape (Vim-S batch 256 by
         default) and VMamba-T stage 1 batch 64, each row checked like its section's.
  mixer-train  (only with ``--sections``) value + gradients of the mixer core as calibration
         needs them (fp32, at ``--mixer-shapes`` or Vim-T batch 256): ``vim_mixer`` (its VJP) vs
         jax.grad through the per-direction path with the Pallas trainable scans, checked against
         jax.grad through the reference.
  e2e-mixer  images/s end to end, bf16: the baseline forward (``scan="pallas"``: a Pallas scan
         per direction), the fused forward (``scan="fused"``) and W8A8 integer inference through
         the fused kernels (``gemm="mixed"`` on Hopper, "auto" elsewhere; RTN scales). Vim by
         default; VMamba with ``--e2e-models vmamba_tiny:64`` (its fused cross-scan).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ptq4vm_jax as pq
from pallas_kernels import MixerDirection, QuantizedLinear, quantize_activations, selective_scan, vim_mixer
from pallas_kernels.add_norm import (
    NORM_SWEEP,
    NormConfig,
    add_rmsnorm,
    add_rmsnorm_codes_ref,
    add_rmsnorm_ref,
)
from pallas_kernels.cross_scan import (
    CROSS_SCAN_SWEEP,
    CrossScanConfig,
    cross_scan_merge,
    cross_scan_merge_ref,
    default_cross_scan_config,
    full_delta,
)
from pallas_kernels.vim_mixer import MIXER_SWEEP, default_mixer_config
from ptq4vm_jax.gpu import is_hopper
from ptq4vm_jax.models.vmamba import cross_merge, cross_scan
from ptq4vm_jax.ops.cross_scan import INTERPRETER_CONFIG as INTERPRETER_CROSS
from ptq4vm_jax.ops.cross_scan import grid_orders
from ptq4vm_jax.ops.mixer import INTERPRETER_CONFIG, vim_mixer_ref
from ptq4vm_jax.ops.norm import INTERPRETER_CONFIG as INTERPRETER_NORM
from ptq4vm_jax.ops.scan import selective_scan_ref

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling shared modules
import bench_common as bc  # noqa: E402
import bench_e2e  # noqa: E402
from bench_common import SEQ, VIM_DIMS, VMAMBA_SCANS, Row, RunConfig  # noqa: E402

MixerShape = tuple[str, int, int, int, int, int]  # (label, batch, L, E, N, R)


def mixer_inputs(seed: int, batch: int, seq: int, e: int, n: int, r: int, dtype) -> tuple:
    """(xz, None, fwd, bwd): in_proj's output (x and z side by side, as the model hands it to
    the kernel: ``packed=True``) and both directions (Δ as x_proj's Δ-rank columns, dt_proj's
    weight and bias) with Vim-like ranges."""
    rng = np.random.default_rng(seed)
    arr = lambda a, dt=jnp.float32: jnp.asarray(np.asarray(a, np.float32), dt)

    def direction() -> MixerDirection:
        return MixerDirection(
            conv_weight=arr(rng.uniform(-0.5, 0.5, (4, e))), conv_bias=arr(rng.uniform(-0.5, 0.5, e)),
            delta=arr(rng.normal(size=(batch, seq, r)), dtype),
            B=arr(rng.normal(size=(batch, seq, n)), dtype),
            C=arr(rng.normal(size=(batch, seq, n)), dtype), A=arr(-np.exp(0.5 * rng.normal(size=(e, n)))),
            D=arr(rng.uniform(0.5, 1.5, e)), delta_bias=arr(rng.normal(size=e) * 0.2 - 1.0),
            dt_weight=arr(rng.normal(size=(r, e)) * r ** -0.5))

    xz = arr(rng.normal(size=(batch, seq, 2 * e)), dtype)
    return xz, None, direction(), direction()


def mixer_variants(interpret: bool) -> dict[str, Callable]:
    """name -> fn(xz, None, fwd, bwd) (``mixer_inputs``). In the interpreter the fused kernel runs
    the plain token loop (``INTERPRETER_CONFIG``: compiles faster), on a GPU its default."""
    config = INTERPRETER_CONFIG if interpret else None
    fused = functools.partial(vim_mixer, interpret=interpret, config=config)

    def fused_xla_dt(xz, _, fwd, bwd):  # the kernel's own switch: XLA computes Δ first
        base = config or default_mixer_config(xz.shape[0], xz.shape[2] // 2)
        return vim_mixer(xz, None, fwd, bwd, interpret=interpret, packed=True,
                         config=dataclasses.replace(base, dt_on_chip=False))

    def fused_halves(xz, _, fwd, bwd):  # x and z as separate arrays: XLA copies the two halves
        x, z = jnp.split(xz, 2, axis=-1)
        return fused(x, z, fwd, bwd)

    def scans_only(xz, _, fwd, bwd):  # x stands in for the conv output: no conv, flips or average
        x, z = jnp.split(xz, 2, axis=-1)
        ys = [selective_scan(x, d.with_full_delta(x.dtype).delta, d.A, d.B, d.C, d.D, z, d.delta_bias,
                             reverse=rev, interpret=interpret)
              for d, rev in ((fwd, False), (bwd, True))]
        return ys[0] + ys[1]

    return {
        "unfused (baseline): XLA glue + 2 Pallas scans": functools.partial(vim_mixer_ref, scan="pallas",
                                                                            packed=True),
        "fused kernel, XLA dt_proj": fused_xla_dt,
        "fused kernel, x and z copied out of in_proj's output": fused_halves,
        "fused kernel, dt_proj on chip (model path)": functools.partial(fused, packed=True),
        "XLA dt_proj + 2 Pallas scans (no conv, flips, average)": scans_only,
    }


def act_quantizer(seed: int, seq: int, k: int, spread: float) -> QuantizedLinear:
    """A W8A8 linear's per-token input quantizer for (B, seq, k) activations of about ``spread``
    (the weight is not read by anything timed here)."""
    rng = np.random.default_rng(seed)
    return QuantizedLinear(w_int=jnp.zeros((k, 8), jnp.int8), w_scale=jnp.ones(8, jnp.float32),
                           smooth=jnp.asarray(rng.uniform(0.5, 2.0, k), jnp.float32),
                           a_scale=jnp.asarray(rng.uniform(1.0, 3.0, seq) * spread / 255, jnp.float32),
                           a_zero=jnp.asarray(rng.integers(100, 156, seq), jnp.int32))


def codes_check(codes: jax.Array, value: jax.Array, quant: QuantizedLinear) -> str:
    """The kernel's codes against the quantizer applied to the value they encode."""
    bad = int(np.sum(np.asarray(codes) != np.asarray(quantize_activations(value, quant))))
    return "codes exact" if bad == 0 else f"MISMATCH {bad} codes"


def timed(cfg: RunConfig, fn: Callable, check_set: tuple, sets: list[tuple]) -> float:
    """Seconds per op; in the interpreter (the smoke test) one more call of the compiled check."""
    if not cfg.interpret:
        return bc.time_ops(fn, sets, **cfg.timing)
    jfn = jax.jit(fn)
    jax.block_until_ready(jfn(*check_set))
    start = time.perf_counter()
    jax.block_until_ready(jfn(*check_set))
    return time.perf_counter() - start


def mixer_codes_rows(cfg: RunConfig, shape: str, check_set: tuple, sets: list[tuple], seq: int, e: int
                     ) -> list[Row]:
    """The fused kernel's value quantized for out_proj: by XLA after it, or in its epilogue."""
    config = INTERPRETER_CONFIG if cfg.interpret else None
    quant = act_quantizer(7, seq, e, 1.0)
    fused = functools.partial(vim_mixer, interpret=cfg.interpret, config=config, packed=True)
    variants = {
        "fused kernel + XLA quantize pass (int8)": lambda *a: quantize_activations(fused(*a), quant),
        "fused kernel, out_proj codes in its epilogue": lambda *a: fused(*a, quant=quant),
    }
    rows = []
    for vname, fn in variants.items():
        def body(vname=vname, fn=fn):
            check = codes_check(jax.jit(fn)(*check_set), jax.jit(fused)(*check_set), quant)
            return Row("mixer", shape, vname, timed(cfg, fn, check_set, sets), check=check)
        rows.append(bc.run_row(cfg, "mixer", shape, vname, body))
    return rows


def norm_rows(shapes: Sequence[MixerShape], cfg: RunConfig) -> list[Row]:
    return [row for label, batch, seq, e, _, _ in shapes
            for row in norm_shape_rows(cfg, label, batch, seq, e // 2)]


def norm_shape_rows(cfg: RunConfig, label: str, batch: int, seq: int, d: int,
                    configs: Sequence[NormConfig] | None = None) -> list[Row]:
    """XLA's add + RMSNorm (+ quantize) against the kernel's, float and int8 outputs; with
    ``configs``, the kernel's float output under each (the sweep's rows)."""
    shape = f"{label} B={batch} L={seq} D={d}"
    hbm = cfg.peaks[2] if cfg.peaks else None
    weight = jnp.asarray(np.random.default_rng(d).uniform(0.5, 1.5, d), jnp.float32)
    quant = act_quantizer(d, seq, d, 3.0)

    def inputs(seed, dtype):
        r = np.random.default_rng(seed)
        return (jnp.asarray(r.normal(size=(batch, seq, d)).astype(np.float32), dtype),
                jnp.asarray(r.normal(size=(batch, seq, d)).astype(np.float32) * 3))

    check_set = inputs(100, jnp.float32)
    nsets = 0 if cfg.interpret else bc.n_input_sets(batch * seq * d * 11)
    sets = [inputs(s, jnp.bfloat16) for s in range(nsets)]
    kernel = functools.partial(add_rmsnorm, weight=weight, eps=1e-5, interpret=cfg.interpret,
                               config=INTERPRETER_NORM if cfg.interpret else None)
    if configs is None:
        section, variants = "norm", {
            "XLA add + RMSNorm": (lambda h, r: add_rmsnorm_ref(h, r, weight, eps=1e-5), False),
            "Pallas add + RMSNorm": (lambda h, r: kernel(h, r), False),
            "XLA add + RMSNorm + quantize (int8)": (
                lambda h, r: add_rmsnorm_codes_ref(h, r, weight, quant, eps=1e-5), True),
            "Pallas add + RMSNorm, codes in its epilogue": (lambda h, r: kernel(h, r, quant=quant), True),
        }
    else:
        section, variants = "sweep", {
            f"add + RMSNorm {config_label(c)}": (functools.partial(kernel, config=c), False) for c in configs}
    ref = np.asarray(jax.jit(add_rmsnorm_ref, static_argnames="eps")(*check_set, weight, eps=1e-5)[0])

    def body(vname: str, fn: Callable, codes: bool) -> Row:
        out = jax.jit(fn)(*check_set)[0]
        if codes:
            check = codes_check(out, kernel(*check_set)[0] if "Pallas" in vname else ref, quant)
        else:
            err = bc.rel_err(out, ref)
            check = f"fp32 rel {err:.1e}" + ("" if err < 1e-5 else " FAIL")
        secs = timed(cfg, fn, check_set, sets)
        gbs, pct = bc.bw_cells(batch * seq * d * (2 + 4 + 4 + (1 if codes else 2)), secs, hbm)
        return Row(section, shape, vname, secs, gbs=gbs, hbm_pct=pct, check=check)

    return [bc.run_row(cfg, section, shape, vname, functools.partial(body, vname, fn, codes))
            for vname, (fn, codes) in variants.items()]


def cross_scan_inputs(seed: int, batch: int, side: int, e: int) -> tuple:
    """u, the four directions' dt_proj input (K, B, L, R = E/16), weight (K, R, E) and bias
    (K, E), and their stacked A, B, C, D (N = 1, VMamba v2v) on a side x side grid."""
    rng = np.random.default_rng(seed)
    k, seq, r = 4, side * side, -(-e // 16)
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))
    return (f32(rng.normal(size=(batch, seq, e))), f32(rng.normal(size=(k, batch, seq, r))),
            f32(rng.normal(size=(k, r, e)) * r ** -0.5), f32(rng.normal(size=(k, e)) * 0.2 - 1.0),
            f32(-np.exp(0.5 * rng.normal(size=(k, e, 1)))), f32(rng.normal(size=(k, batch, seq, 1))),
            f32(rng.normal(size=(k, batch, seq, 1))), f32(rng.uniform(0.5, 1.5, (k, e))))


def cross_scan_rows(cfg: RunConfig) -> list[Row]:
    """Unfused (reordered copies, vmapped Pallas scans, merge) against the fused kernel."""
    if cfg.interpret:
        stages = [(4, 1)]
    else:
        stages = [(1, 64), (3, 64)] if cfg.quick else [(s, 64) for s in (1, 2, 3, 4)]
    return [row for stage, batch in stages for row in cross_scan_stage_rows(cfg, stage, batch)]


def cross_scan_stage_rows(cfg: RunConfig, stage: int, batch: int,
                          configs: Sequence[CrossScanConfig] | None = None) -> list[Row]:
    """One VMamba-T stage's rows (tiny shapes in the interpreter); with ``configs``, the fused
    kernel under each (the sweep's rows)."""
    seq, e = VMAMBA_SCANS[stage - 1] if not cfg.interpret else (9, 16)
    side = int(round(seq ** 0.5))
    orders = jnp.asarray(grid_orders(side, side))
    label = "smoke" if cfg.interpret else f"vmamba_t stage{stage}"
    shape = f"{label} B={batch} L={seq} E={e} N=1 K=4"

    def unfused(u, dt, w, bias, a, b, c, d):
        seqs = cross_scan(u.reshape(u.shape[0], side, side, -1))
        delta = full_delta(dt, w) + bias[:, None, None, :]  # XLA's dt_proj, as the model's Dense
        scan = lambda s_k, dt, a_k, b_k, c_k, d_k: selective_scan(s_k, dt, a_k, b_k, c_k, d_k,
                                                                  interpret=cfg.interpret)
        return cross_merge(list(jax.vmap(scan)(jnp.stack(seqs), delta, a, b, c, d)), side, side)

    def fused(u, dt, w, bias, a, b, c, d, config=INTERPRETER_CROSS if cfg.interpret else None):
        return cross_scan_merge(u, dt, a, b, c, d, bias, orders, dt_weight=w, interpret=cfg.interpret,
                                config=config)

    if configs is None:
        section = "cross-scan"
        plain = INTERPRETER_CROSS if cfg.interpret else default_cross_scan_config(batch, e)
        variants = {"unfused: XLA dt_proj, 4 copies + 4 Pallas scans + merge": unfused,
                    "fused cross-scan kernel, XLA dt_proj": functools.partial(
                        fused, config=dataclasses.replace(plain, dt_on_chip=False)),
                    "fused cross-scan kernel, dt_proj on chip (model path)": fused}
    else:
        section = "sweep"
        variants = {f"cross-scan {config_label(c)}": functools.partial(fused, config=c) for c in configs}
    check_set = cross_scan_inputs(100, batch, side, e)
    u, dt, w, bias, *rest = check_set
    ref = np.asarray(jax.jit(functools.partial(cross_scan_merge_ref, scan=selective_scan_ref))(
        u, dt, *rest, bias, orders, dt_weight=w))
    nsets = 0 if cfg.interpret else bc.n_input_sets(batch * seq * e * 4 * 6)
    sets = [cross_scan_inputs(s, batch, side, e) for s in range(nsets)]

    def body(vname: str, fn: Callable) -> Row:
        err = bc.rel_err(jax.jit(fn)(*check_set), ref)
        check = f"fp32 rel {err:.1e}" + ("" if err < 1e-4 else " FAIL")
        return Row(section, shape, vname, timed(cfg, fn, check_set, sets), check=check)

    return [bc.run_row(cfg, section, shape, vname, functools.partial(body, vname, fn))
            for vname, fn in variants.items()]


def config_label(c) -> str:
    """A sweep row's short name for a kernel config (its fields that differ from a plain loop)."""
    parts = [f"block_e={c.block_e}" if hasattr(c, "block_e") else f"rows={c.block_rows}", f"w{c.num_warps}"]
    if getattr(c, "unroll", 1) > 1:
        parts.append(f"unroll {c.unroll}")
    if getattr(c, "prefetch", False):
        parts.append("prefetch")
    if not getattr(c, "dt_on_chip", True):
        parts.append("XLA dt_proj")
    elif not getattr(c, "preload_dt_weight", True):
        parts.append("dt weight from cache")
    return " ".join(parts)


def sweep_rows(cfg: RunConfig) -> list[Row]:
    """Each kernel under each configuration of its sweep (every fourth in the interpreter): the
    mixer and the add + norm at the first mixer shape, the cross-scan at VMamba-T stage 1."""
    pick = (lambda sweep: sweep[::4]) if cfg.interpret else (lambda sweep: sweep)
    label, batch, seq, e, n, r = mixer_shapes(cfg)[0]
    shape = f"{label} B={batch} L={seq} E={e} N={n} R={r}"
    check_set = mixer_inputs(100, batch, seq, e, n, r, jnp.float32)
    y_ref = np.asarray(jax.jit(functools.partial(vim_mixer_ref, packed=True))(*check_set), np.float32)
    nsets = 0 if cfg.interpret else bc.n_input_sets(2 * batch * seq * (3 * e + 4 * n + 2 * r))
    sets = [mixer_inputs(s, batch, seq, e, n, r, jnp.bfloat16) for s in range(nsets)]
    rows = []
    for mc in pick(MIXER_SWEEP):
        def fused(xz, z, f, b, mc=mc):  # dt_proj's operands given: on chip unless mc says not
            return vim_mixer(xz, z, f, b, interpret=cfg.interpret, config=mc, packed=True)
        vname = f"fused mixer {config_label(mc)}"
        body = functools.partial(mixer_row, cfg, shape, vname, fused, check_set, y_ref, sets,
                                 2 * batch * seq * e * n, section="sweep")
        rows.append(bc.run_row(cfg, "sweep", shape, vname, body))
    rows += norm_shape_rows(cfg, label, batch, seq, e // 2, configs=pick(NORM_SWEEP))
    return rows + cross_scan_stage_rows(cfg, 1, 1 if cfg.interpret else 64, configs=pick(CROSS_SCAN_SWEEP))


def mixer_row(cfg: RunConfig, shape: str, vname: str, fn: Callable, check_set: tuple, y_ref: np.ndarray,
              sets: list[tuple], exps: int, section: str = "mixer") -> Row:
    jfn = jax.jit(fn)
    y = jax.block_until_ready(jfn(*check_set))
    if "no conv" in vname:
        check = "not comparable (timing only)"
    else:
        err = bc.rel_err(y, y_ref)
        check = f"fp32 rel {err:.1e}" + ("" if err < 1e-4 else " FAIL")
    if cfg.interpret:  # the smoke test: one more call of the compiled check, not a timing
        start = time.perf_counter()
        jax.block_until_ready(jfn(*check_set))
        secs = time.perf_counter() - start
    else:
        secs = bc.time_ops(fn, sets, **cfg.timing)
    rate, pct = bc.rate_cells(exps, secs, bc.EXP_PEAK if cfg.peaks else None)
    if cfg.peaks:
        check += f"; {secs / (exps / bc.EXP_PEAK):.2f}x exp bound ({1e6 * exps / bc.EXP_PEAK:.0f} us)"
    return Row(section, shape, vname, secs, rate, pct, check=check)


def mixer_rows(shapes: Sequence[MixerShape], cfg: RunConfig) -> list[Row]:
    variants = mixer_variants(cfg.interpret)
    rows = []
    for label, batch, seq, e, n, r in shapes:
        shape = f"{label} B={batch} L={seq} E={e} N={n} R={r}"
        check_set = mixer_inputs(100, batch, seq, e, n, r, jnp.float32)
        y_ref = np.asarray(jax.jit(functools.partial(vim_mixer_ref, packed=True))(*check_set), np.float32)
        set_bytes = 2 * batch * seq * (3 * e + 4 * n + 2 * r)
        nsets = 0 if cfg.interpret else bc.n_input_sets(set_bytes)
        sets = [mixer_inputs(s, batch, seq, e, n, r, jnp.bfloat16) for s in range(nsets)]
        exps = 2 * batch * seq * e * n
        for vname, fn in variants.items():
            body = functools.partial(mixer_row, cfg, shape, vname, fn, check_set, y_ref, sets, exps)
            rows.append(bc.run_row(cfg, "mixer", shape, vname, body))
        rows += mixer_codes_rows(cfg, shape, check_set, sets, seq, e)
    return rows


def mixer_shape(name: str, batch: int) -> MixerShape:
    """(label, batch, L, E, N, R) of a Vim model's mixer (vim_t / vim_s / vim_b)."""
    if name not in VIM_DIMS or name == "smoke":
        raise ValueError(f"unknown mixer shape {name!r}: use one of vim_t, vim_s, vim_b")
    d = VIM_DIMS[name]
    return name, batch, SEQ, 2 * d, 16, math.ceil(d / 16)


def mixer_shapes(cfg: RunConfig) -> list[MixerShape]:
    if cfg.args.mixer_shapes:
        return [mixer_shape(*nb) for nb in cfg.args.mixer_shapes]
    if cfg.interpret:
        return [("smoke", 1, 9, 32, 4, 2)]
    if cfg.quick:
        return [mixer_shape("vim_s", 256), mixer_shape("vim_b", 256)]
    return [mixer_shape(m, b) for b in (64, 256) for m in ("vim_t", "vim_s", "vim_b")]


def value_and_grads(fn: Callable) -> Callable:
    """The value and the gradients for xz and both directions of sum(fn(xz, None, fwd, bwd))."""
    return jax.value_and_grad(lambda xz, z, f, b: jnp.sum(fn(xz, z, f, b, packed=True)), argnums=(0, 2, 3))


def mixer_train_rows(shapes: Sequence[MixerShape], cfg: RunConfig) -> list[Row]:
    """Value and gradients (x, z and both directions) of a linear readout, fused vs per-direction."""
    config = INTERPRETER_CONFIG if cfg.interpret else None
    variants = {
        "fused vim_mixer (its VJP)": functools.partial(vim_mixer, interpret=cfg.interpret, config=config),
        "per-direction: XLA glue + 2 Pallas trainable scans": functools.partial(vim_mixer_ref, scan="pallas"),
    }
    rows = []
    for label, batch, seq, e, n, r in shapes:
        shape = f"{label} B={batch} L={seq} E={e} N={n} R={r} fwd+bwd"
        sets = [mixer_inputs(s, batch, seq, e, n, r, jnp.float32) for s in range(1 if cfg.interpret else 2)]
        _, g_ref = jax.jit(value_and_grads(vim_mixer_ref))(*sets[0])

        def body(vname, fn, shape=shape, sets=sets, g_ref=g_ref):
            f = value_and_grads(fn)
            _, g = jax.jit(f)(*sets[0])
            pairs = zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True)
            err = max(bc.rel_err(a, b) for a, b in pairs)
            secs = bc.time_ops(f, sets, **cfg.timing)
            check = f"rel {err:.1e}" + ("" if err < 1e-4 else " FAIL")
            return Row("mixer-train", shape, vname, secs, check=check)

        for vname, fn in variants.items():
            rows.append(bc.run_row(cfg, "mixer-train", shape, vname, functools.partial(body, vname, fn)))
    return rows


E2E_VARIANTS = ("bf16-unfused", "bf16-fused", "int-fused")


def mixer_forwards(model_name: str, batch: int, n_sets: int, *, interpret: bool,
                   variants: Sequence[str] = E2E_VARIANTS) -> tuple[dict[str, Callable], list[jax.Array]]:
    """bf16 forwards with a Pallas scan per direction and with the fused kernels, and W8A8 integer
    inference through the fused kernels (RTN scales, ``bench_e2e.rtn_w8a8``), of a randomly
    initialised Vim or VMamba."""
    images, params = bench_e2e.random_model(model_name, batch, n_sets)
    model = {scan: pq.create_model(model_name, dtype=jnp.bfloat16, scan=scan) for scan in ("pallas", "fused")}
    gemm = "xla" if interpret else ("mixed" if is_hopper() else "auto")

    @functools.partial(jax.jit, static_argnums=0)
    def float_fwd(scan: str, p, im):
        return model[scan].apply({"params": p}, im)

    @jax.jit
    def int_fwd(q, im):
        return bench_e2e.int_apply(model["fused"], q, im, gemm, interpret)

    forwards = {}
    if "bf16-unfused" in variants:
        forwards[f"{model_name} bf16, a Pallas scan per direction (baseline)"] = functools.partial(
            float_fwd, "pallas", params)
    if "bf16-fused" in variants:
        forwards[f"{model_name} bf16, fused kernels"] = functools.partial(float_fwd, "fused", params)
    if "int-fused" in variants:
        qp = bench_e2e.rtn_w8a8(model_name, params, images[0].shape[1])
        forwards[f"{model_name} W8A8 int bf16, fused kernels (gemm={gemm})"] = functools.partial(int_fwd, qp)
    return forwards, images


def e2e_models(cfg: RunConfig) -> list[tuple[str, int]]:
    if cfg.args.e2e_models:
        return list(cfg.args.e2e_models)
    if cfg.interpret:
        return [("vim_nano", 1)]
    if cfg.quick:
        return [("vim_small", 256)]
    return [(m, b) for b in (64, 256) for m in ("vim_tiny", "vim_small", "vim_base")]


SECTIONS: dict[str, bc.Section] = {
    "mixer": lambda cfg: mixer_rows(mixer_shapes(cfg), cfg),
    "norm": lambda cfg: norm_rows(mixer_shapes(cfg), cfg),
    "cross-scan": cross_scan_rows,
    "sweep": sweep_rows,
    "e2e-mixer": lambda cfg: bench_e2e.e2e_rows(e2e_models(cfg), cfg, mixer_forwards),
    "mixer-train": lambda cfg: mixer_train_rows(
        mixer_shapes(cfg) if cfg.args.mixer_shapes or cfg.interpret else [mixer_shape("vim_t", 256)], cfg),
}


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--mixer-shapes", nargs="+", type=bc.model_batch, metavar="NAME:BATCH",
                    help="mixer section shapes: vim_t / vim_s / vim_b (L=197, E=2D, N=16), e.g. vim_b:256")
    ap.add_argument("--e2e-models", nargs="+", type=bc.model_batch, metavar="MODEL:BATCH",
                    help="end-to-end models (Vim or VMamba), e.g. vim_small:256 vmamba_tiny:64")
    ap.add_argument("--e2e-variants", nargs="+", choices=E2E_VARIANTS, default=list(E2E_VARIANTS),
                    help="end-to-end forwards (default: all)")


def check_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name, batch in args.mixer_shapes or ():
        try:
            mixer_shape(name, batch)
        except ValueError as err:
            ap.error(f"--mixer-shapes: {err}")
    for name, _ in args.e2e_models or ():
        try:
            if pq.models.model_family(name) not in ("vim", "vmamba"):
                ap.error(f"--e2e-models: {name} is not a Vim or VMamba model (the fused kernels serve those)")
        except ValueError as err:
            ap.error(f"--e2e-models: {err}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return bc.parse_args(argv, __doc__, list(SECTIONS), [add_options], [check_options])


def main(argv: Sequence[str] | None = None) -> int:
    return bc.run(parse_args(argv), "bench_mixer.py", SECTIONS,
                  lambda cfg: SECTIONS["mixer"](cfg) + SECTIONS["norm"](cfg) + SECTIONS["e2e-mixer"](cfg))


if __name__ == "__main__":
    sys.exit(main())
