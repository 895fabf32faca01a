"""Integer GEMM kernels against XLA on one GPU: one run, one markdown table.

    python experiments/bench_gemm.py --quick                       # Vim-S linears at batch 64
    python experiments/bench_gemm.py --quick --interpret           # CPU smoke test, tiny shapes
    python experiments/bench_gemm.py --sections gemm --gemm-shapes vim_b:256 --gemm-variants wgmma bf16

Sections:
  gemm  Vim-B/S/T in_proj, x_proj, dt_proj, out_proj at batch 256 and 64 (M = batch * 197;
        ``--quick``: Vim-S at batch 64): XLA bf16 dot | XLA s8 x s8 -> s32 dot alone | XLA's
        activation quantize pass alone | XLA W8A8 (quantize + s8 dot + dequant, = ``qmatmul_ref``)
        | XLA W8A8 with the integer dot as an exact bf16 dot (``qmatmul_bf16_dot``,
        ``gemm="xla-bf16"``) | Pallas W8A8 fused | Pallas W8A8 two-pass (XLA quantize + Pallas
        GEMM on codes) | Pallas W4A4 fused (packed int4 weights, int8 MMA) | on Hopper (and in the
        interpreter) ``qmatmul_wgmma`` as integer inference runs it: XLA quantize + the Mosaic
        GPU wgmma GEMM, K and N zero-padded to multiples of 64; listed first.
        ``--gemm-shapes vim_s:256`` / ``--gemm-variants wgmma bf16`` narrow it.
  sweep-wgmma / sweep-gemm / sweep-codes  tile sweeps (only with ``--sections``): the wgmma GEMM
        on codes (Hopper; its tiles and both schedules, one tile per CTA or persistent, at Vim-B
        in_proj, ``--sweep-layers in_proj out_proj`` for both) beside XLA's bf16 and s8 dots; the
        fused Triton GEMM; the Triton GEMM on precomputed codes.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from numpy.typing import ArrayLike

from pallas_kernels import (
    GemmConfig,
    QuantizedLinear,
    WgmmaConfig,
    pack_int4,
    prepare_weight_wgmma,
    qmatmul,
    qmatmul_bf16_dot,
    qmatmul_codes,
    qmatmul_codes_wgmma,
    qmatmul_int32,
    qmatmul_int32_ref,
    qmatmul_ref,
    qmatmul_wgmma,
    quantize_activations,
    supports_wgmma,
    weight_colsum,
)
from pallas_kernels.qmatmul_hopper import WGMMA_SWEEP, default_wgmma_config
from ptq4vm_jax.gpu import is_hopper

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling shared module
import bench_common as bc  # noqa: E402
from bench_common import SEQ, VIM_DIMS, Row, RunConfig, vim_layers  # noqa: E402


def gemm_inputs(key: jax.Array, batch: int, k: int, n: int) -> dict:
    """One input set: activations ``x`` (and ``w_bf16`` for the float dot), a W8A8 ``layer`` and a
    W4A4 ``layer4`` (packed int4 weight) with their column sums, and the W8A8 layer's codes and
    transposed weight (``w_t``) for the GEMMs on codes. Power-of-two scales on half the
    tokens/channels make exact rounding ties."""
    ks = jax.random.split(key, 8)
    ties_l = jnp.arange(SEQ) % 2 == 0
    ties_k = jnp.arange(k) % 2 == 0
    x = (4.0 * jax.random.normal(ks[0], (batch, SEQ, k))).astype(jnp.bfloat16)
    smooth = jnp.where(ties_k, 1.0, jnp.exp(0.3 * jax.random.normal(ks[1], (k,))))
    a_scale = jnp.where(ties_l, 0.0625, 0.06 * jnp.exp(0.2 * jax.random.normal(ks[2], (SEQ,))))
    w_scale = 0.01 * jnp.exp(jax.random.normal(ks[6], (n,)))
    bias = jax.random.normal(ks[7], (n,))
    layer = QuantizedLinear(
        w_int=jax.random.randint(ks[4], (k, n), -127, 128, dtype=jnp.int32).astype(jnp.int8),
        w_scale=w_scale, smooth=smooth, a_scale=a_scale,
        a_zero=jax.random.randint(ks[3], (SEQ,), 96, 160, dtype=jnp.int32), bias=bias, w_bits=8, a_bits=8)
    layer4 = QuantizedLinear(
        w_int=pack_int4(jax.random.randint(ks[5], (k, n), -7, 8, dtype=jnp.int32).astype(jnp.int8)),
        w_scale=w_scale, smooth=smooth, a_scale=a_scale * 16.0,
        a_zero=jax.random.randint(ks[3], (SEQ,), 4, 12, dtype=jnp.int32), bias=bias, w_bits=4, a_bits=4)
    return dict(
        x=x,
        w_bf16=(0.05 * jax.random.normal(ks[6], (k, n))).astype(jnp.bfloat16),
        layer=layer,
        layer4=layer4,
        colsum=weight_colsum(layer.w_int, 8),
        colsum4=weight_colsum(layer4.w_int, 4),
        codes=quantize_activations(x, layer),
        w_t=prepare_weight_wgmma(layer),
    )


WGMMA = "mosaic wgmma w8a8 2-pass"
XLA_BF16 = "xla w8a8 bf16 dot on codes (qmatmul_bf16_dot)"
QUANT_XLA = "quantize only: xla"

GEMM_VARIANTS = {  # --gemm-variants key -> row name
    "wgmma": WGMMA, "bf16": "xla bf16 dot", "s8": "xla s8 dot only (s32 out)", "quantize-xla": QUANT_XLA,
    "xla": "xla w8a8 3-pass (qmatmul_ref)", "xla-bf16": XLA_BF16, "pallas": "pallas w8a8 fused",
    "pallas-2pass": "pallas w8a8 2-pass", "pallas-w4a4": "pallas w4a4 fused",
}


def gemm_variants(interpret: bool) -> dict[str, tuple[tuple[str, ...], Callable, Callable, str]]:
    """name -> (input keys, fn(*inputs), bytes(m, k, n), peak kind). The layer (weights, scales)
    and column sums are inputs, as at inference; a variant gets the inputs it reads, the layer
    first after the activations."""
    bf16 = jnp.bfloat16
    w8a8 = ("x", "layer", "colsum")
    w4a4 = ("x", "layer4", "colsum4")
    fused_bytes = lambda m, k, n: 2 * m * k + k * n + 2 * m * n  # bf16 x in, int8 w, bf16 y out

    def two_pass(x, layer, colsum):
        codes = quantize_activations(x, layer)
        return qmatmul_codes(codes, layer, out_dtype=bf16, interpret=interpret, colsum=colsum)

    fused = lambda x, layer, colsum: qmatmul(x, layer, interpret=interpret, colsum=colsum)
    wgmma = lambda x, layer: qmatmul_wgmma(x, layer, interpret=interpret)  # quantize, weight prep, padding
    hopper = {WGMMA: (("x", "layer"), wgmma, fused_bytes, "int8")} if interpret or is_hopper() else {}
    return hopper | {
        QUANT_XLA: (("x", "layer"), quantize_activations,
                    lambda m, k, n: 3 * m * k, "mem"),  # bf16 in, int8 out
        "xla bf16 dot": (("x", "w_bf16"), jnp.dot,
                         lambda m, k, n: 2 * m * k + 2 * k * n + 2 * m * n, "bf16"),
        "xla s8 dot only (s32 out)": (
            ("codes", "layer"),
            lambda q, layer: lax.dot_general(q, layer.w_int, (((2,), (0,)), ((), ())),
                                             preferred_element_type=jnp.int32),
            lambda m, k, n: m * k + k * n + 4 * m * n, "int8"),
        "xla w8a8 3-pass (qmatmul_ref)": (
            w8a8, lambda x, layer, colsum: qmatmul_ref(x, layer, out_dtype=bf16, colsum=colsum),
            fused_bytes, "int8"),
        XLA_BF16: (w8a8, lambda x, layer, colsum: qmatmul_bf16_dot(x, layer, out_dtype=bf16, colsum=colsum),
                   fused_bytes, "bf16"),
        "pallas w8a8 fused": (w8a8, fused, fused_bytes, "int8"),
        "pallas w8a8 2-pass": (w8a8, two_pass, fused_bytes, "int8"),
        "pallas w4a4 fused": (w4a4, fused, lambda m, k, n: 2 * m * k + k * n // 2 + 2 * m * n, "int8"),
    }


def exact(acc: ArrayLike, ref: ArrayLike) -> str:
    bad = int((np.asarray(acc) != np.asarray(ref)).sum())
    return "int32 exact" if bad == 0 else f"INT32 MISMATCH {bad}/{np.asarray(ref).size}"


def check_gemm(name: str, inp: dict, interpret: bool) -> str:
    """Kernel vs reference on one input set: the int32 accumulator exactly, then the float output."""
    if name == QUANT_XLA:
        return "ref"
    if name == XLA_BF16:  # exact by construction: f32 outputs equal up to an FMA'd epilogue
        f32 = jnp.float32
        x, layer = inp["x"], inp["layer"]
        err = bc.rel_err(qmatmul_bf16_dot(x, layer, out_dtype=f32), qmatmul_ref(x, layer, out_dtype=f32))
        return f"f32 rel {err:.1e}" + ("" if err < 1e-5 else " FAIL")
    if name.startswith("xla"):
        return "ref" if "qmatmul_ref" in name else "-"
    keys, fn, _, _ = gemm_variants(interpret)[name]
    x, layer = inp[keys[0]], inp[keys[1]]
    notes = []
    if "fused" in name:
        acc = qmatmul_int32(x, layer, interpret=interpret)
        notes.append(exact(acc, qmatmul_int32_ref(x, layer)))
    m, k, n = x.shape[0] * x.shape[1], layer.in_features, layer.out_features
    if name == WGMMA and supports_wgmma(m, k, n):  # else padded: the float output is checked
        acc = qmatmul_codes_wgmma(inp["codes"], layer, w_t=inp["w_t"], out_dtype=jnp.int32,
                                  config=default_wgmma_config(m, k, n), interpret=interpret)
        notes.append(exact(acc, qmatmul_int32_ref(x, layer)))
    y_ref = qmatmul_ref(x, layer, out_dtype=jnp.bfloat16)
    err = bc.rel_err(fn(*(inp[k] for k in keys)), y_ref)
    notes.append(f"rel {err:.1e}" + ("" if err < 2e-2 else " FAIL"))
    return ", ".join(notes)


def gemm_row(cfg: RunConfig, shape: str, vname: str, sets: list[dict], m: int, k: int, n: int,
             section: str = "gemm") -> Row:
    keys, fn, nbytes, kind = gemm_variants(cfg.interpret)[vname]
    check = check_gemm(vname, sets[0], cfg.interpret)
    arg_sets = [tuple(st[key] for key in keys) for st in sets]
    secs = bc.time_ops(fn, arg_sets, **cfg.timing)
    peak = None if cfg.peaks is None else cfg.peaks[0 if kind == "bf16" else 1] * 1e12
    hbm = None if cfg.peaks is None else cfg.peaks[2]
    rate, rate_pct = bc.rate_cells(2 * m * k * n, secs, peak) if kind != "mem" else ("-", "-")
    gbs, hbm_pct = bc.bw_cells(nbytes(m, k, n), secs, hbm)
    return Row(section, shape, vname, secs, rate, rate_pct, gbs, hbm_pct, check)


LAYERS = ("in_proj", "x_proj", "dt_proj", "out_proj")


def gemm_jobs(cfg: RunConfig) -> list[tuple[str, str, int]]:
    """(model, layer, batch) in priority order: the GEMM target first (in_proj of the first model)."""
    if cfg.args.gemm_shapes:
        return [(mdl, lname, b) for mdl, b in cfg.args.gemm_shapes for lname in LAYERS]
    if cfg.interpret:
        models, batches = ["smoke"], [1]
    elif cfg.quick:
        models, batches = ["vim_s"], [64]
    else:
        models, batches = ["vim_b", "vim_s", "vim_t"], [256, 64]
    jobs = [(mdl, lname, b) for mdl in models for b in batches for lname in LAYERS]
    first = [j for j in jobs if j[:2] == (models[0], "in_proj")][:1]
    return first + [j for j in jobs if j not in first]


def gemm_rows(jobs: Sequence[tuple[str, str, int]], cfg: RunConfig) -> list[Row]:
    """jobs: (model, layer name, batch); every row's int32 accumulator is checked exactly first."""
    wanted = {GEMM_VARIANTS[v] for v in cfg.args.gemm_variants}
    rows = []
    for model, lname, batch in jobs:
        k, n = next((k, n) for name, k, n in vim_layers(VIM_DIMS[model]) if name == lname)
        m = batch * SEQ
        nsets = 1 if cfg.interpret else bc.n_input_sets(2 * m * k)
        sets = [gemm_inputs(jax.random.key(s), batch, k, n) for s in range(nsets)]
        shape = f"{model} {lname} M={m} K={k} N={n}"
        for vname in gemm_variants(cfg.interpret):
            if vname in wanted:
                body = functools.partial(gemm_row, cfg, shape, vname, sets, m, k, n)
                rows.append(bc.run_row(cfg, "gemm", shape, vname, body))
    return rows


# ----------------------------------------------------------------------------- sweeps


def wgmma_label(config: WgmmaConfig) -> str:
    """``tile_m x tile_n x tile_k, stages`` and the schedule's switches, for a table row."""
    flags = [name.replace("_", " ") for name in ("m_fastest", "warpgroup", "persistent")
             if getattr(config, name)]
    tiles = f"{config.tile_m}x{config.tile_n}x{config.tile_k} s{config.stages}"
    return " ".join([tiles, *flags])


def sweep_wgmma_row(cfg: RunConfig, shape: str, config: WgmmaConfig, sets: list[dict], work: int) -> Row:
    """One tile config of the wgmma kernel on codes: its int32 accumulator checked exactly, then timed."""
    i0 = sets[0]
    keys = ("codes", "layer", "w_t")

    def fn(codes, layer, w_t, **kw):
        return qmatmul_codes_wgmma(codes, layer, w_t=w_t, config=config, interpret=cfg.interpret, **kw)

    acc = fn(*(i0[k] for k in keys), out_dtype=jnp.int32, colsum=i0["colsum"])
    check = exact(acc, qmatmul_int32_ref(i0["x"], i0["layer"]))
    secs = bc.time_ops(fn, [tuple(st[k] for k in keys) for st in sets], **cfg.timing)
    rate, pct = bc.rate_cells(work, secs, None if cfg.peaks is None else cfg.peaks[1] * 1e12)
    return Row("sweep", shape, f"mosaic wgmma on codes {wgmma_label(config)}", secs, rate, pct, check=check)


def sweep_wgmma_rows(cfg: RunConfig) -> list[Row]:
    """The wgmma GEMM's tile configs (Hopper; a small one per schedule in the interpreter) at
    Vim-B's ``--sweep-layers`` (by default in_proj, the layer of the GEMM target in BENCHMARKS.md),
    batch 256, beside XLA's bf16 and s8 dots timed in the same run."""
    if not (cfg.interpret or is_hopper()):
        return []
    batch, model = (1, "smoke") if cfg.interpret else (256, "vim_b")
    dims = {name: (k, n) for name, k, n in vim_layers(VIM_DIMS[model])}
    rows = []
    for layer in cfg.args.sweep_layers:
        k, n = dims[layer]
        shape, sets, baselines = sweep_baselines(cfg, model, layer, batch, k, n)
        rows += baselines
        smoke = (WgmmaConfig(64, 64, 64, 2), WgmmaConfig(64, 64, 64, 2, persistent=True))
        for wc in smoke if cfg.interpret else WGMMA_SWEEP:
            body = functools.partial(sweep_wgmma_row, cfg, shape, wc, sets, 2 * batch * SEQ * k * n)
            rows.append(bc.run_row(cfg, "sweep", shape, wgmma_label(wc), body))
    return rows


def sweep_baselines(cfg: RunConfig, model: str, layer: str, batch: int, k: int,
                    n: int) -> tuple[str, list[dict], list[Row]]:
    """One swept GEMM shape: its label, its input sets, and XLA's bf16 and s8 dots timed on them
    (the rows its sweep is read against)."""
    m = batch * SEQ
    sets = [gemm_inputs(jax.random.key(s), batch, k, n) for s in range(2)]
    shape = f"{model} {layer} M={m} K={k} N={n}"
    rows = []
    for vname in ("xla bf16 dot", "xla s8 dot only (s32 out)"):
        body = functools.partial(gemm_row, cfg, shape, vname, sets, m, k, n, "sweep")
        rows.append(bc.run_row(cfg, "sweep", shape, vname, body))
    return shape, sets, rows


GEMM_SWEEP = (GemmConfig(64, 256, 64, 8, 3), GemmConfig(128, 128, 64, 4, 3), GemmConfig(128, 256, 64, 8, 3),
              GemmConfig(64, 128, 128, 4, 4), GemmConfig(128, 64, 64, 4, 3), GemmConfig(32, 256, 64, 4, 3))


def sweep_gemm_row(cfg: RunConfig, shape: str, gc: GemmConfig, sets: list[dict], y_ref: ArrayLike,
                   work: int) -> Row:
    fn = functools.partial(qmatmul, interpret=cfg.interpret, config=gc)
    keys = ("x", "layer")
    err = bc.rel_err(fn(*(sets[0][key] for key in keys), colsum=sets[0]["colsum"]), y_ref)
    secs = bc.time_ops(fn, [tuple(st[key] for key in keys) for st in sets], **cfg.timing)
    rate, pct = bc.rate_cells(work, secs, None if cfg.peaks is None else cfg.peaks[1] * 1e12)
    tiles = f"{gc.block_m}x{gc.block_n}x{gc.block_k} w{gc.num_warps} s{gc.num_stages}"
    return Row("sweep", shape, f"pallas w8a8 fused {tiles}", secs, rate, pct,
               check=f"rel {err:.1e}" + ("" if err < 2e-2 else " FAIL"))


def sweep_gemm_rows(cfg: RunConfig) -> list[Row]:
    """The fused Triton GEMM's tiles at Vim-S in_proj and out_proj, batch 256."""
    batch = 1 if cfg.interpret else 256
    rows = []
    for lname, k, n in [vim_layers(VIM_DIMS["vim_s"])[i] for i in (0, 3)]:
        m = batch * SEQ
        sets = [gemm_inputs(jax.random.key(s), batch, k, n) for s in range(2)]
        i0 = sets[0]
        y_ref = qmatmul_ref(i0["x"], i0["layer"])
        shape = f"vim_s {lname} M={m} K={k} N={n}"
        for gc in GEMM_SWEEP[:1] if cfg.interpret else GEMM_SWEEP:
            body = functools.partial(sweep_gemm_row, cfg, shape, gc, sets, y_ref, 2 * m * k * n)
            rows.append(bc.run_row(cfg, "sweep", shape, str(gc), body))
    return rows


CODES_SWEEP = (None, GemmConfig(128, 128, 64, 4, 3), GemmConfig(128, 128, 64, 8, 4),
               GemmConfig(128, 256, 64, 8, 3), GemmConfig(128, 256, 128, 8, 3),
               GemmConfig(256, 128, 64, 8, 3), GemmConfig(64, 256, 128, 4, 4),
               GemmConfig(128, 128, 128, 4, 4))


def sweep_codes_row(cfg: RunConfig, shape: str, gc: GemmConfig | None, sets: list[dict], work: int) -> Row:
    """One tile config of the Triton GEMM on precomputed codes: checked against ``qmatmul_ref``, timed."""
    keys = ("codes", "layer")
    fn = functools.partial(qmatmul_codes, interpret=cfg.interpret, config=gc, out_dtype=jnp.bfloat16)
    i0 = sets[0]
    y_ref = qmatmul_ref(i0["x"], i0["layer"], out_dtype=jnp.bfloat16)
    err = bc.rel_err(fn(*(i0[k] for k in keys)), y_ref)
    check = f"rel {err:.1e}" + ("" if err < 2e-2 else " FAIL")
    secs = bc.time_ops(fn, [tuple(st[k] for k in keys) for st in sets], **cfg.timing)
    rate, pct = bc.rate_cells(work, secs, None if cfg.peaks is None else cfg.peaks[1] * 1e12)
    return Row("sweep", shape, f"pallas codes GEMM {gc or 'default'}", secs, rate, pct, check=check)


def sweep_codes_rows(cfg: RunConfig) -> list[Row]:
    """The Triton GEMM on precomputed codes at Vim-S and Vim-B in_proj, batch 256, beside XLA's
    bf16 and s8 dots timed in the same run."""
    shapes = [("vim_s", 1)] if cfg.interpret else [("vim_s", 256), ("vim_b", 256)]
    rows = []
    for model, batch in shapes:
        _, k, n = vim_layers(VIM_DIMS[model])[0]
        shape, sets, baselines = sweep_baselines(cfg, model, "in_proj", batch, k, n)
        rows += baselines
        for gc in CODES_SWEEP[:2] if cfg.interpret else CODES_SWEEP:
            body = functools.partial(sweep_codes_row, cfg, shape, gc, sets, 2 * batch * SEQ * k * n)
            rows.append(bc.run_row(cfg, "sweep", shape, str(gc), body))
    return rows


SECTIONS: dict[str, bc.Section] = {
    "gemm": lambda cfg: gemm_rows(gemm_jobs(cfg), cfg),
    "sweep-wgmma": sweep_wgmma_rows,
    "sweep-gemm": sweep_gemm_rows,
    "sweep-codes": sweep_codes_rows,
}


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--gemm-shapes", nargs="+", type=bc.model_batch, metavar="MODEL:BATCH",
                    help="gemm section: the four linears of vim_t / vim_s / vim_b at a batch, e.g. vim_s:256")
    ap.add_argument("--gemm-variants", nargs="+", choices=GEMM_VARIANTS, default=list(GEMM_VARIANTS),
                    help="gemm section variants (default: all)")
    ap.add_argument("--sweep-layers", nargs="+", choices=("in_proj", "out_proj"), default=["in_proj"],
                    help="sweep-wgmma section: Vim-B layers to sweep, at batch 256 (default: in_proj)")


def check_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    unknown = [name for name, _ in args.gemm_shapes or () if name not in VIM_DIMS]
    if unknown:
        ap.error(f"--gemm-shapes takes {', '.join(VIM_DIMS)}, got {', '.join(unknown)}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return bc.parse_args(argv, __doc__, list(SECTIONS), [add_options], [check_options])


def main(argv: Sequence[str] | None = None) -> int:
    return bc.run(parse_args(argv), "bench_gemm.py", SECTIONS, SECTIONS["gemm"])


if __name__ == "__main__":
    sys.exit(main())
