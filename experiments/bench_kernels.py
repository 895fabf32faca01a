"""Benchmark the Pallas kernels against XLA on one GPU: one run, one markdown table.

    python experiments/bench_kernels.py --budget-s 360   # rows in priority order until the budget
    python experiments/bench_kernels.py --quick    # Vim-S at batch 64: GEMMs, scans, e2e; ~minutes
    python experiments/bench_kernels.py --quick --interpret   # CPU smoke test, tiny shapes
    python experiments/bench_kernels.py --sections sweep-wgmma scan e2e --scan-shapes vim_b:256 \
        --e2e-models vim_small:256 --e2e-variants bf16 int-wgmma   # chosen sections, in order

Sections (rows stream to stdout as they finish; the full table is printed at the end):
  gemm  Vim-B/S/T in_proj, x_proj, dt_proj, out_proj at batch 256 and 64 (M = batch * 197):
        XLA bf16 dot | XLA s8 x s8 -> s32 dot alone | XLA W8A8 (quantize + s8 dot + dequant,
        = ``qmatmul_ref``) | XLA W8A8 with the integer dot as an exact bf16 dot
        (``qmatmul_bf16_dot``, ``gemm="xla-bf16"``) | Pallas W8A8 fused | Pallas W8A8 two-pass
        (XLA quantize + Pallas GEMM on codes) | Pallas W4A4 fused (packed int4 weights, int8
        MMA) | on Hopper (and in the interpreter) also ``qmatmul_wgmma_fused`` (one pass: the
        quantization inside the wgmma kernel, codes resident in shared memory; K, N multiples
        of 64 only) and ``qmatmul_wgmma``, as integer inference runs it: XLA quantize + the
        Mosaic GPU wgmma GEMM, K and N zero-padded to multiples of 64, in its default schedule
        and in the persistent warp-specialized one; listed first. ``--gemm-shapes vim_s:256`` /
        ``--gemm-variants wgmma-ws wgmma bf16`` narrow it.
  scan  Pallas selective scan (default config; the tile layout with 4 tokens per loop trip and
        the next trip's loads prefetched, the same with exp2 decays, the plain one-token loop;
        the channel-major layout) vs ``selective_scan_ref`` (lax.scan) vs lax.associative_scan
        at Vim (L=197, N=16) and VMamba (N=1, one scan direction) shapes.
  scan-train  value + gradients (as calibration needs them) of the Pallas custom_vjp scan (its
        default, and with both passes channel-major) vs jax.grad through lax.scan and through
        lax.associative_scan.
  e2e   images/s of Vim-S/B/T at batch 256: bf16 float (Pallas scan; the same with the scan's
        tile layout; lax.scan reference scan) vs
        W8A8 ``quantized_apply(mode="int")`` in bf16 with the Pallas scan and each integer GEMM
        backend (``gemm=``: on Hopper "mixed" (wgmma in/out_proj, the bf16 dot x/dt_proj) and
        wgmma 2-pass and 1-pass; XLA's bf16 dot on codes, XLA's s8 dot, the Triton ``qmatmul``).
  sweep-wgmma / sweep-scan / sweep-gemm  tile sweeps (only with ``--sections``): the wgmma GEMM
        (Hopper) beside XLA's bf16 and s8 dots, the scan's tiles, token loops and state layouts
        (at ``--scan-shapes`` when given), the Triton GEMM.

The whole table is compile-bound: on an H200 (2026-11-27) 180 s covered the Vim-S GEMM rows and
five scan shapes, hence the priority order and ``--budget-s``.

Every kernel is checked against its reference on the first input set before it is timed
(``check`` column: int32 accumulators exact, float outputs as max |err| / max |ref|).
Timing (kernels): one jitted call runs the op once on each of 2..4 distinct input sets
(together larger than the 50 MB L2 where 4 suffice; several ops per call also amortise host dispatch, which
would otherwise dominate few-microsecond kernels). After compile + warm-up (>= 0.1 s of calls, so
that the clock has left its idle state; the SM clock is printed at the start and end), ``repeats``
samples of ``inner`` back-to-back calls, block_until_ready per sample; median seconds per op.
XLA may fuse small elementwise passes of different sets horizontally, which can only flatter
the XLA variants. Model forwards are timed per call (milliseconds each).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import math
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from numpy.typing import ArrayLike

from pallas_kernels import (
    GemmConfig,
    ScanConfig,
    WgmmaConfig,
    default_scan_config,
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
    quantize_activations_pallas,
    selective_scan,
    selective_scan_trainable,
    supports_wgmma,
    weight_colsum,
)
from pallas_kernels.qmatmul_hopper import (
    FUSED_SWEEP,
    WGMMA_SWEEP,
    FusedWgmmaConfig,
    default_fused_config,
    default_wgmma_config,
    qmatmul_wgmma_fused,
)
from ptq4vm_jax.ops.scan import selective_scan_ref
from ptq4vm_jax.quant.integer import HOPPER_ONLY, is_hopper

SEQ = 197
L2_BYTES = 50e6
# device_kind substring -> (dense bf16 TFLOPS, dense int8 TOPS, HBM TB/s): datasheet values.
PEAKS = {"H200": (989.4, 1978.9, 4.8), "H100 PCIe": (756.0, 1513.0, 2.0), "H100": (989.4, 1978.9, 3.35)}
EXP_PEAK = 3.9e12  # special-function (exp) rate of H100/H200, an estimate (FA3 paper)
VIM_DIMS = {"vim_t": 192, "vim_s": 384, "vim_b": 768, "smoke": 64}  # embed dim D
VMAMBA_SCANS = [(3136, 96), (784, 192), (196, 384), (49, 768)]  # VMamba-T stages: (L, d_inner)


@dataclasses.dataclass
class Row:
    section: str
    shape: str
    variant: str
    seconds: float | None
    rate: str = "-"  # achieved TOPS / TFLOPS / T exp/s
    rate_pct: str = "-"  # of the matching peak
    gbs: str = "-"  # effective GB/s over the minimum bytes the op must move
    hbm_pct: str = "-"
    check: str = "-"


def peaks(device_kind: str) -> tuple[float, float, float] | None:
    for key, value in PEAKS.items():
        if key in device_kind:
            return value
    return None


def sm_clocks() -> str:
    """Current / max SM clock from nvidia-smi (to tell a throttled or idle-clocked card apart)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"
    return out.splitlines()[0] if out else "unknown"


def warm(call: Callable[[], object], seconds: float) -> None:
    """Keep the device busy for ``seconds`` before sampling: a GPU that idled while the row
    compiled runs at its idle clock (345 MHz on the H200, 2026-11-27) until load ramps it up."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        jax.block_until_ready(call())


def time_ops(fn: Callable, arg_sets: Sequence[tuple], *, repeats: int, inner: int,
             warm_s: float = 0.1) -> float:
    """Median seconds per op: each timed call runs ``fn`` once per input set inside one jit.

    Kernels of a few microseconds would otherwise measure host dispatch; ``inner`` calls are
    queued back to back and ``block_until_ready`` closes each of the ``repeats`` samples.
    """
    batched = jax.jit(lambda sets: [fn(*args) for args in sets])
    sets = [tuple(args) for args in arg_sets]
    jax.block_until_ready(batched(sets))  # compile + warm every set
    warm(lambda: batched(sets), warm_s)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = batched(sets)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / (inner * len(sets)))
    return statistics.median(samples)


def time_call(fn: Callable, arg_sets: Sequence[tuple], *, repeats: int, inner: int,
              warm_s: float = 0.1) -> float:
    """Median seconds per call of a jitted ``fn`` (for millisecond-scale model forwards)."""
    for args in arg_sets:  # compile, then warm every input set once
        jax.block_until_ready(fn(*args))
    warm(lambda: fn(*arg_sets[0]), warm_s)
    samples, i = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*arg_sets[i % len(arg_sets)])
            i += 1
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def n_input_sets(set_bytes: float) -> int:
    """Distinct input sets that together overflow L2 where 4 can (2..4: each set is compiled into
    the timed program, and compile time is what a one-call GPU session runs short of)."""
    return int(min(4, max(2, math.ceil(2 * L2_BYTES / max(set_bytes, 1)))))


def rel_err(y: ArrayLike, ref: ArrayLike) -> float:
    y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def rate_cells(work: float, seconds: float, peak: float | None,
               unit_scale: float = 1e12) -> tuple[str, str]:
    rate = work / seconds / unit_scale
    return f"{rate:.3g}", (f"{100 * rate * unit_scale / peak:.0f}%" if peak else "-")


def bw_cells(nbytes: float, seconds: float, hbm: float | None) -> tuple[str, str]:
    gbs = nbytes / seconds / 1e9
    return f"{gbs:.3g}", (f"{100 * gbs / (hbm * 1e3):.0f}%" if hbm else "-")


def run_row(cfg: argparse.Namespace, section: str, shape: str, variant: str,
            body: Callable[[], Row]) -> Row:
    """One table row; a row that raises (e.g. a kernel that fails to compile) is recorded, not fatal."""
    if cfg.out_of_time():
        row = Row(section, shape, variant, None, check="skipped: time budget")
    else:
        try:
            row = body()
        except Exception as err:  # one GPU session must still report every other row
            traceback.print_exc()
            row = Row(section, shape, variant, None, check=f"ERROR {type(err).__name__}: {str(err)[:80]}")
    cfg.emit(row)
    return row


# ----------------------------------------------------------------------------- GEMM


def vim_layers(d: int, n_state: int = 16) -> list[tuple[str, int, int]]:
    """(name, K, N) of the four quantized linears of a Vim block with embed dim d."""
    e, r = 2 * d, math.ceil(d / 16)
    return [("in_proj", d, 2 * e), ("x_proj", e, r + 2 * n_state), ("dt_proj", r, e), ("out_proj", e, d)]


def gemm_inputs(key: jax.Array, batch: int, k: int, n: int) -> dict:
    """One input set; power-of-two scales on half the tokens/channels make exact rounding ties."""
    ks = jax.random.split(key, 8)
    ties_l = jnp.arange(SEQ) % 2 == 0
    ties_k = jnp.arange(k) % 2 == 0
    x = (4.0 * jax.random.normal(ks[0], (batch, SEQ, k))).astype(jnp.bfloat16)
    smooth = jnp.where(ties_k, 1.0, jnp.exp(0.3 * jax.random.normal(ks[1], (k,))))
    a_scale = jnp.where(ties_l, 0.0625, 0.06 * jnp.exp(0.2 * jax.random.normal(ks[2], (SEQ,))))
    inp = dict(
        x=x,
        smooth=smooth,
        a_scale=a_scale,
        a_scale4=a_scale * 16.0,
        a_zero=jax.random.randint(ks[3], (SEQ,), 96, 160, dtype=jnp.int32),
        a_zero4=jax.random.randint(ks[3], (SEQ,), 4, 12, dtype=jnp.int32),
        w=jax.random.randint(ks[4], (k, n), -127, 128, dtype=jnp.int32).astype(jnp.int8),
        w4=pack_int4(jax.random.randint(ks[5], (k, n), -7, 8, dtype=jnp.int32).astype(jnp.int8)),
        w_scale=0.01 * jnp.exp(jax.random.normal(ks[6], (n,))),
        bias=jax.random.normal(ks[7], (n,)),
        w_bf16=(0.05 * jax.random.normal(ks[6], (k, n))).astype(jnp.bfloat16),
    )
    inp["colsum"] = weight_colsum(inp["w"], 8)
    inp["colsum4"] = weight_colsum(inp["w4"], 4)
    inp["codes"] = quantize_activations(x, smooth, a_scale, inp["a_zero"])
    inp["w_t"] = prepare_weight_wgmma(inp["w"], 8)
    return inp


WGMMA_ONE_PASS = "mosaic wgmma w8a8 1-pass (quantize inside)"
WGMMA_WS = "mosaic wgmma w8a8 2-pass, warp-specialized"
XLA_BF16 = "xla w8a8 bf16 dot on codes (qmatmul_bf16_dot)"
WGMMA_PQ = "mosaic wgmma w8a8 2-pass, Triton quantize"
QUANT_XLA, QUANT_PALLAS = "quantize only: xla", "quantize only: triton (quantize_activations_pallas)"


def padded(dim: int) -> int:
    """K or N as qmatmul_wgmma pads it (multiples of 64)."""
    return -(-dim // 64) * 64


def gemm_variants(interpret: bool) -> dict[str, tuple[tuple[str, ...], Callable, Callable, str]]:
    """name -> (input keys, fn(*inputs), bytes(m, k, n), peak kind). Weights, scales and column
    sums are inputs, as at inference; only the arrays a variant reads are passed to it."""
    bf16 = jnp.bfloat16
    w8a8 = ("x", "w", "w_scale", "smooth", "a_scale", "a_zero", "bias", "colsum")
    w4a4 = ("x", "w4", "w_scale", "smooth", "a_scale4", "a_zero4", "bias", "colsum4")
    fused_bytes = lambda m, k, n: 2 * m * k + k * n + 2 * m * n  # bf16 x in, int8 w, bf16 y out

    def two_pass(x, w, w_scale, smooth, a_scale, a_zero, bias, colsum):
        codes = quantize_activations(x, smooth, a_scale, a_zero)
        return qmatmul_codes(codes, w, w_scale, a_scale, a_zero, bias, out_dtype=bf16,
                             interpret=interpret, colsum=colsum)

    def fused(a_bits, w_bits):
        return lambda *a: qmatmul(*a[:7], a_bits=a_bits, w_bits=w_bits, interpret=interpret, colsum=a[7])

    wgmma = lambda *a: qmatmul_wgmma(*a[:7], interpret=interpret)  # quantize, weight prep, padding
    one_pass = lambda *a: qmatmul_wgmma_fused(*a[:7], interpret=interpret)  # weight prep in the graph

    def wgmma_ws(*a):
        m, (k, n) = a[0].shape[0] * a[0].shape[1], a[1].shape
        config = default_wgmma_config(m, padded(k), padded(n), warp_specialized=True)
        return qmatmul_wgmma(*a[:7], config=config, interpret=interpret)

    wgmma_pq = lambda *a: qmatmul_wgmma(*a[:7], interpret=interpret, pallas_quantize=True)
    hopper = {WGMMA_ONE_PASS: (w8a8, one_pass, fused_bytes, "int8"),
              "mosaic wgmma w8a8 2-pass": (w8a8, wgmma, fused_bytes, "int8"),
              WGMMA_WS: (w8a8, wgmma_ws, fused_bytes, "int8"),
              WGMMA_PQ: (w8a8, wgmma_pq, fused_bytes, "int8")}
    act = ("x", "smooth", "a_scale", "a_zero")
    quant_bytes = lambda m, k, n: 3 * m * k  # bf16 in, int8 out
    if not (interpret or is_hopper()):
        hopper = {}
    return hopper | {
        QUANT_XLA: (act, quantize_activations, quant_bytes, "mem"),
        QUANT_PALLAS: (act, lambda *a: quantize_activations_pallas(*a, interpret=interpret),
                       quant_bytes, "mem"),
        "xla bf16 dot": (("x", "w_bf16"), jnp.dot,
                         lambda m, k, n: 2 * m * k + 2 * k * n + 2 * m * n, "bf16"),
        "xla s8 dot only (s32 out)": (
            ("codes", "w"),
            lambda q, w: lax.dot_general(q, w, (((2,), (0,)), ((), ())), preferred_element_type=jnp.int32),
            lambda m, k, n: m * k + k * n + 4 * m * n, "int8"),
        "xla w8a8 3-pass (qmatmul_ref)": (
            w8a8, lambda *a: qmatmul_ref(*a[:7], out_dtype=bf16, colsum=a[7]), fused_bytes, "int8"),
        XLA_BF16: (w8a8, lambda *a: qmatmul_bf16_dot(*a[:7], out_dtype=bf16, colsum=a[7]),
                   fused_bytes, "bf16"),
        "pallas w8a8 fused": (w8a8, fused(8, 8), fused_bytes, "int8"),
        "pallas w8a8 2-pass": (w8a8, two_pass, fused_bytes, "int8"),
        "pallas w4a4 fused": (w4a4, fused(4, 4), lambda m, k, n: 2 * m * k + k * n // 2 + 2 * m * n, "int8"),
    }


def check_gemm(name: str, inp: dict, interpret: bool) -> str:
    """Kernel vs reference on one input set: the int32 accumulator exactly, then the float output."""
    if name == QUANT_PALLAS or name == WGMMA_PQ:  # the codes first, exactly
        args = [inp[k] for k in ("x", "smooth", "a_scale", "a_zero")]
        bad = int((np.asarray(quantize_activations_pallas(*args, interpret=interpret))
                   != np.asarray(quantize_activations(*args))).sum())
        if name == QUANT_PALLAS or bad:
            return "codes exact" if bad == 0 else f"CODES MISMATCH {bad}"
    if name == QUANT_XLA:
        return "ref"
    if name == XLA_BF16:  # exact by construction: f32 outputs equal up to an FMA'd epilogue
        keys = gemm_variants(interpret)[name][0]
        args = [inp[k] for k in keys[:7]]
        f32 = jnp.float32
        err = rel_err(qmatmul_bf16_dot(*args, out_dtype=f32), qmatmul_ref(*args, out_dtype=f32))
        return f"f32 rel {err:.1e}" + ("" if err < 1e-5 else " FAIL")
    if name.startswith("xla"):
        return "ref" if "qmatmul_ref" in name else "-"
    keys, fn, _, _ = gemm_variants(interpret)[name]
    x, w, w_scale, smooth, a_scale, a_zero, bias, *_ = (inp[k] for k in keys)
    bits = dict(a_bits=4, w_bits=4) if "w4a4" in name else dict(a_bits=8, w_bits=8)
    notes = []
    if name == WGMMA_ONE_PASS:
        acc = np.asarray(qmatmul_wgmma_fused(x, w, w_scale, smooth, a_scale, a_zero, out_dtype=jnp.int32,
                                             interpret=interpret))
        ref = np.asarray(qmatmul_int32_ref(x, w, smooth, a_scale, a_zero))
        bad = int((acc != ref).sum())
        notes.append("int32 exact" if bad == 0 else f"INT32 MISMATCH {bad}/{ref.size}")
    elif "fused" in name:
        qargs = (x, w, smooth, a_scale, a_zero)
        acc = np.asarray(qmatmul_int32(*qargs, interpret=interpret, **bits))
        ref = np.asarray(qmatmul_int32_ref(*qargs, **bits))
        bad = int((acc != ref).sum())
        notes.append("int32 exact" if bad == 0 else f"INT32 MISMATCH {bad}/{ref.size}")
    m = x.shape[0] * x.shape[1]
    if name.startswith("mosaic wgmma w8a8 2-pass") and supports_wgmma(m, *w.shape):  # else padded
        config = default_wgmma_config(m, *w.shape, warp_specialized=name == WGMMA_WS)
        acc = np.asarray(qmatmul_codes_wgmma(inp["codes"], inp["w_t"], w_scale, a_scale, a_zero,
                                             out_dtype=jnp.int32, config=config, interpret=interpret))
        ref = np.asarray(qmatmul_int32_ref(x, w, smooth, a_scale, a_zero))
        bad = int((acc != ref).sum())
        notes.append("int32 exact" if bad == 0 else f"INT32 MISMATCH {bad}/{ref.size}")
    y_ref = qmatmul_ref(x, w, w_scale, smooth, a_scale, a_zero, bias, out_dtype=jnp.bfloat16, **bits)
    err = rel_err(fn(*(inp[k] for k in keys)), y_ref)
    notes.append(f"rel {err:.1e}" + ("" if err < 2e-2 else " FAIL"))
    return ", ".join(notes)


GEMM_VARIANTS = {  # --gemm-variants key -> row name
    "wgmma-1pass": WGMMA_ONE_PASS, "wgmma": "mosaic wgmma w8a8 2-pass", "wgmma-ws": WGMMA_WS,
    "bf16": "xla bf16 dot",
    "s8": "xla s8 dot only (s32 out)",
    "wgmma-pq": WGMMA_PQ, "quantize-xla": QUANT_XLA, "quantize-pallas": QUANT_PALLAS,
    "xla": "xla w8a8 3-pass (qmatmul_ref)", "xla-bf16": XLA_BF16, "pallas": "pallas w8a8 fused",
    "pallas-2pass": "pallas w8a8 2-pass", "pallas-w4a4": "pallas w4a4 fused",
}


def gemm_row(cfg: argparse.Namespace, shape: str, vname: str, sets: list[dict], m: int, k: int,
             n: int) -> Row:
    keys, fn, nbytes, kind = gemm_variants(cfg.interpret)[vname]
    check = check_gemm(vname, sets[0], cfg.interpret)
    arg_sets = [tuple(st[key] for key in keys) for st in sets]
    secs = time_ops(fn, arg_sets, **cfg.timing)
    peak = None if cfg.peaks is None else cfg.peaks[0 if kind == "bf16" else 1] * 1e12
    hbm = None if cfg.peaks is None else cfg.peaks[2]
    rate, rate_pct = rate_cells(2 * m * k * n, secs, peak) if kind != "mem" else ("-", "-")
    gbs, hbm_pct = bw_cells(nbytes(m, k, n), secs, hbm)
    return Row("gemm", shape, vname, secs, rate, rate_pct, gbs, hbm_pct, check)


def gemm_rows(jobs: Sequence[tuple[str, str, int]], cfg: argparse.Namespace) -> list[Row]:
    """jobs: (model, layer name, batch); every row's int32 accumulator is checked exactly first."""
    rows = []
    for model, lname, batch in jobs:
        k, n = next((k, n) for name, k, n in vim_layers(VIM_DIMS[model]) if name == lname)
        m = batch * SEQ
        nsets = 2 if cfg.interpret else n_input_sets(2 * m * k)
        sets = [gemm_inputs(jax.random.key(s), batch, k, n) for s in range(nsets)]
        shape = f"{model} {lname} M={m} K={k} N={n}"
        for vname in gemm_variants(cfg.interpret):
            if vname not in cfg.gemm_variants:
                continue
            if vname == WGMMA_ONE_PASS and default_fused_config(k, n) is None:
                rows.append(Row("gemm", shape, vname, None, check="skipped: K, N not multiples of 64"))
                cfg.emit(rows[-1])
                continue
            body = functools.partial(gemm_row, cfg, shape, vname, sets, m, k, n)
            rows.append(run_row(cfg, "gemm", shape, vname, body))
    return rows


# ----------------------------------------------------------------------------- scan


def selective_scan_assoc(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                         D: jax.Array, z: jax.Array, delta_bias: jax.Array) -> jax.Array:
    """S6 via lax.associative_scan over materialised (B, L, E, N) decays and inputs."""
    dt = jax.nn.softplus(delta + delta_bias)
    decay = jnp.exp(dt[..., None] * A)
    drive = (dt * u)[..., None] * B[:, :, None, :]

    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]

    _, h = lax.associative_scan(combine, (decay, drive), axis=1)
    y = jnp.einsum("blen,bln->ble", h, C) + u * D
    return y * jax.nn.silu(z)


def scan_inputs(key: jax.Array, batch: int, seq: int, e: int, n: int) -> tuple:
    ks = jax.random.split(key, 8)
    return (
        jax.random.normal(ks[0], (batch, seq, e)),
        0.5 * jax.random.normal(ks[1], (batch, seq, e)) - 1.0,
        -jnp.exp(0.5 * jax.random.normal(ks[2], (e, n))),
        jax.random.normal(ks[3], (batch, seq, n)),
        jax.random.normal(ks[4], (batch, seq, n)),
        jax.random.normal(ks[5], (e,)),
        jax.random.normal(ks[6], (batch, seq, e)),
        0.2 * jax.random.normal(ks[7], (e,)),
    )


def scan_row(cfg: argparse.Namespace, shape: str, vname: str, fn: Callable, sets: list[tuple],
             y_ref: ArrayLike, io_bytes: int,
             work: int) -> Row:
    err = rel_err(jax.jit(fn)(*sets[0]), y_ref)
    check = "ref" if "selective_scan_ref" in vname else f"rel {err:.1e}" + ("" if err < 1e-4 else " FAIL")
    secs = time_ops(fn, sets, **cfg.timing)
    rate, pct = rate_cells(work, secs, EXP_PEAK if cfg.peaks else None)
    gbs, hbm_pct = bw_cells(io_bytes, secs, None if cfg.peaks is None else cfg.peaks[2])
    return Row("scan", shape, vname, secs, rate, pct, gbs, hbm_pct, check)


def tuned_scan(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
               z: jax.Array, delta_bias: jax.Array, *, unroll: int, prefetch: bool, exp2: bool,
               interpret: bool) -> jax.Array:
    """The Pallas scan in the tile layout with its default tiles and a given token loop
    (ScanConfig.unroll / prefetch / exp2)."""
    d = default_scan_config(u.shape[0], u.shape[2], A.shape[1], channel_major=False)
    cfg = ScanConfig(d.block_e, d.num_warps, d.num_stages, unroll=unroll, prefetch=prefetch, exp2=exp2)
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, interpret=interpret, config=cfg)


def channel_major_scan_fn(interpret: bool) -> Callable:
    """The Pallas scan with ``default_scan_config(..., channel_major=True)``."""

    def fn(u, delta, A, B, C, D, z, delta_bias):
        sc = default_scan_config(u.shape[0], u.shape[2], A.shape[1], channel_major=True)
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, interpret=interpret, config=sc)

    return fn


def scan_rows(shapes: Sequence[tuple[str, int, int, int, int]], cfg: argparse.Namespace) -> list[Row]:
    """shapes: (label, batch, L, E, N). Materialised associative scans above 4 GB are skipped."""
    variants = {
        "pallas selective_scan (default config)": functools.partial(selective_scan,
                                                                    interpret=cfg.interpret),
        "pallas tile layout, unroll 4 + prefetch": functools.partial(
            tuned_scan, unroll=4, prefetch=True, exp2=False, interpret=cfg.interpret),
        "pallas tile layout + exp2": functools.partial(
            tuned_scan, unroll=4, prefetch=True, exp2=True, interpret=cfg.interpret),
        "pallas tile layout, plain loop": functools.partial(
            tuned_scan, unroll=1, prefetch=False, exp2=False, interpret=cfg.interpret),
        "pallas channel-major": channel_major_scan_fn(cfg.interpret),
        "xla lax.scan (selective_scan_ref)": selective_scan_ref,
        "xla lax.associative_scan": selective_scan_assoc,
    }
    rows = []
    for label, batch, seq, e, n in shapes:
        shape = f"{label} B={batch} L={seq} E={e} N={n}"
        io_bytes = 4 * batch * seq * (4 * e + 2 * n)  # u, delta, z in; y out; B, C in
        nsets = 2 if cfg.interpret else n_input_sets(io_bytes)
        sets = [scan_inputs(jax.random.key(s), batch, seq, e, n) for s in range(nsets)]
        y_ref = jax.jit(selective_scan_ref)(*sets[0])
        for vname, fn in variants.items():
            if "associative" in vname and 4 * batch * seq * e * n > 4e9:
                rows.append(Row("scan", shape, vname, None, check="skipped: > 4 GB of states"))
                cfg.emit(rows[-1])
                continue
            work = batch * seq * e * n
            body = functools.partial(scan_row, cfg, shape, vname, fn, sets, y_ref, io_bytes, work)
            rows.append(run_row(cfg, "scan", shape, vname, body))
    return rows


def scan_value_and_grad(fn: Callable) -> Callable:
    """Forward + backward as calibration runs it: the value and all 8 input gradients."""
    return jax.value_and_grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(8)))


def scan_train_rows(shapes: Sequence[tuple[str, int, int, int, int]], cfg: argparse.Namespace) -> list[Row]:
    """Differentiable scans (value + gradients) at calibration shapes: the Pallas custom_vjp vs
    ``jax.grad`` through ``lax.scan`` and through ``lax.associative_scan``."""
    def channel_major_trainable(u, delta, A, B, C, D, z, delta_bias):  # both passes channel-major
        sc = default_scan_config(u.shape[0], u.shape[2], A.shape[1], channel_major=True)
        return selective_scan_trainable(u, delta, A, B, C, D, z, delta_bias, interpret=cfg.interpret,
                                        config=sc)

    variants = {
        "pallas selective_scan_trainable (default: tile-layout backward)": functools.partial(
            selective_scan_trainable, interpret=cfg.interpret),
        "pallas trainable, channel-major backward": channel_major_trainable,
        "xla grad lax.scan (selective_scan_ref)": selective_scan_ref,
        "xla grad lax.associative_scan": selective_scan_assoc,
    }
    rows = []
    for label, batch, seq, e, n in shapes:
        shape = f"{label} B={batch} L={seq} E={e} N={n} fwd+bwd"
        sets = [scan_inputs(jax.random.key(s), batch, seq, e, n) for s in range(2)]
        _, g_ref = jax.jit(scan_value_and_grad(selective_scan_ref))(*sets[0])
        for vname, fn in variants.items():
            if "associative" in vname and 4 * batch * seq * e * n > 1e9:  # grad keeps several copies
                rows.append(Row("scan-train", shape, vname, None, check="skipped: > 1 GB of states"))
                cfg.emit(rows[-1])
                continue

            def body(vname=vname, fn=fn, shape=shape, sets=sets, g_ref=g_ref):
                f = scan_value_and_grad(fn)
                _, g = jax.jit(f)(*sets[0])
                err = max(rel_err(a, b) for a, b in zip(g, g_ref, strict=True))
                check = "ref" if "selective_scan_ref" in vname else (
                    f"rel {err:.1e}" + ("" if err < 1e-4 else " FAIL"))
                secs = time_ops(f, sets, **cfg.timing)
                return Row("scan-train", shape, vname, secs, check=check)

            rows.append(run_row(cfg, "scan-train", shape, vname, body))
    return rows


def sweep_gemm_row(cfg: argparse.Namespace, shape: str, gc: GemmConfig, sets: list[dict],
                   y_ref: ArrayLike, work: int) -> Row:
    fn = functools.partial(qmatmul, interpret=cfg.interpret, config=gc)
    keys = ("x", "w", "w_scale", "smooth", "a_scale", "a_zero", "bias")
    err = rel_err(fn(*(sets[0][key] for key in keys), colsum=sets[0]["colsum"]), y_ref)
    secs = time_ops(fn, [tuple(st[key] for key in keys) for st in sets], **cfg.timing)
    rate, pct = rate_cells(work, secs, None if cfg.peaks is None else cfg.peaks[1] * 1e12)
    tiles = f"{gc.block_m}x{gc.block_n}x{gc.block_k} w{gc.num_warps} s{gc.num_stages}"
    return Row("sweep", shape, f"pallas w8a8 fused {tiles}", secs, rate, pct,
               check=f"rel {err:.1e}" + ("" if err < 2e-2 else " FAIL"))


def sweep_scan_row(cfg: argparse.Namespace, shape: str, sc: ScanConfig, sets: list[tuple],
                   y_ref: ArrayLike) -> Row:
    fn = functools.partial(selective_scan, interpret=cfg.interpret, config=sc)
    err = rel_err(fn(*sets[0]), y_ref)
    secs = time_ops(fn, sets, **cfg.timing)
    loop = ((f" unroll {sc.unroll}" if sc.unroll > 1 else "") + (" prefetch" if sc.prefetch else "")
            + (" exp2" if sc.exp2 else "") + (" channel-major" if sc.channel_major else ""))
    return Row("sweep", shape, f"pallas scan block_e={sc.block_e} w{sc.num_warps}{loop}", secs,
               check=f"rel {err:.1e}" + ("" if err < 1e-4 else " FAIL"))


def sweep_wgmma_row(cfg: argparse.Namespace, shape: str, config: WgmmaConfig | FusedWgmmaConfig,
                    sets: list[dict], work: int) -> Row:
    """One tile config of the wgmma kernel on codes (``WgmmaConfig``) or of the 1-pass kernel on
    bf16 activations (``FusedWgmmaConfig``): its int32 accumulator checked exactly, then timed."""
    i0 = sets[0]
    if isinstance(config, FusedWgmmaConfig):
        kernel, label = qmatmul_wgmma_fused, "mosaic wgmma 1-pass on bf16 x"
        keys = ("x", "w", "w_scale", "smooth", "a_scale", "a_zero")
        acc_args, acc_kw = keys, {}
    else:
        kernel, label = qmatmul_codes_wgmma, "mosaic wgmma on codes"
        keys = ("codes", "w_t", "w_scale", "a_scale", "a_zero", "bias")
        acc_args, acc_kw = keys[:5], {"colsum": i0["colsum"]}
    fn = functools.partial(kernel, config=config, interpret=cfg.interpret)
    acc = fn(*(i0[k] for k in acc_args), out_dtype=jnp.int32, **acc_kw)
    ref = qmatmul_int32_ref(i0["x"], i0["w"], i0["smooth"], i0["a_scale"], i0["a_zero"])
    bad = int((np.asarray(acc) != np.asarray(ref)).sum())
    secs = time_ops(fn, [tuple(st[k] for k in keys) for st in sets], **cfg.timing)
    rate, pct = rate_cells(work, secs, None if cfg.peaks is None else cfg.peaks[1] * 1e12)
    return Row("sweep", shape, f"{label} {config}", secs, rate, pct,
               check="int32 exact" if bad == 0 else f"INT32 MISMATCH {bad}/{acc.size}")


def sweep_wgmma_rows(cfg: argparse.Namespace) -> list[Row]:
    """The wgmma GEMMs' tile configs (Hopper; one small config in the interpreter) at Vim-B
    in_proj, batch 256, beside XLA's bf16 and s8 dots timed in the same run: the 1-pass kernel
    (quantization inside) first, then the kernel on precomputed codes."""
    if not (cfg.interpret or is_hopper()):
        return []
    batch, model = (1, "smoke") if cfg.interpret else (256, "vim_b")
    _, k, n = vim_layers(VIM_DIMS[model])[0]
    m = batch * SEQ
    sets = [gemm_inputs(jax.random.key(s), batch, k, n) for s in range(2)]
    shape = f"{model} in_proj M={m} K={k} N={n}"
    rows = []
    for vname in ("xla bf16 dot", "xla s8 dot only (s32 out)"):
        body = functools.partial(gemm_row, cfg, shape, vname, sets, m, k, n)
        rows.append(run_row(cfg, "sweep", shape, vname, body))
    for fc in (FusedWgmmaConfig(64, 64, 2),) if cfg.interpret else FUSED_SWEEP:
        body = functools.partial(sweep_wgmma_row, cfg, shape, fc, sets, 2 * m * k * n)
        rows.append(run_row(cfg, "sweep", shape, str(fc), body))
    for wc in (WgmmaConfig(64, 64, 64, 2),) if cfg.interpret else WGMMA_SWEEP:
        body = functools.partial(sweep_wgmma_row, cfg, shape, wc, sets, 2 * m * k * n)
        rows.append(run_row(cfg, "sweep", shape, str(wc), body))
    return rows


SCAN_SWEEP_SHAPES = (("vim_b", 256, SEQ, 1536, 16), ("vim_s", 256, SEQ, 768, 16),
                     ("vmamba stage1", 64, 3136, 96, 1))

# (block_e, num_warps, unroll, prefetch, exp2, channel_major); tile layouts first, then
# channel-major (the defaults per shape are default_scan_config's, timed in the scan section).
SCAN_SWEEP = (
    (32, 2, 4, True, False, False), (32, 2, 4, True, True, False),
    (32, 1, 4, True, True, True), (32, 1, 4, True, False, True), (32, 1, 2, True, True, True),
    (32, 1, 8, True, True, True), (32, 1, 1, False, True, True), (64, 2, 4, True, True, True),
    (128, 4, 4, True, True, True), (64, 1, 4, True, True, True), (128, 1, 2, True, True, True),
)


def sweep_scan_rows(cfg: argparse.Namespace,
                    shapes: Sequence[tuple[str, int, int, int, int]] = SCAN_SWEEP_SHAPES) -> list[Row]:
    """The scan's tiles, token loops and state layouts at Vim-B and Vim-S (batch 256: below
    the 5x target on the H200) and VMamba stage 1 (batch 64: 3136 sequential steps)."""
    rows = []
    for label, batch, seq, e, n_state in shapes:
        if cfg.interpret:
            batch, e, seq = 1, min(e, 96), min(seq, 49)
        sets = [scan_inputs(jax.random.key(s), batch, seq, e, n_state) for s in range(2)]
        y_ref = jax.jit(selective_scan_ref)(*sets[0])
        shape = f"{label} B={batch} L={seq} E={e} N={n_state}"
        for block_e, warps, unroll, prefetch, exp2, cm in SCAN_SWEEP[::5] if cfg.interpret else SCAN_SWEEP:
            sc = ScanConfig(block_e, warps, 2, unroll=unroll, prefetch=prefetch, exp2=exp2, channel_major=cm)
            body = functools.partial(sweep_scan_row, cfg, shape, sc, sets, y_ref)
            rows.append(run_row(cfg, "sweep", shape, str(sc), body))
    return rows


def sweep_gemm_rows(cfg: argparse.Namespace) -> list[Row]:
    """The Triton GEMM's tiles at Vim-S in_proj and out_proj, batch 256."""
    configs = [GemmConfig(64, 256, 64, 8, 3), GemmConfig(128, 128, 64, 4, 3), GemmConfig(128, 256, 64, 8, 3),
               GemmConfig(64, 128, 128, 4, 4), GemmConfig(128, 64, 64, 4, 3), GemmConfig(32, 256, 64, 4, 3)]
    batch = 1 if cfg.interpret else 256
    rows = []
    for lname, k, n in [vim_layers(VIM_DIMS["vim_s"])[i] for i in (0, 3)]:
        m = batch * SEQ
        sets = [gemm_inputs(jax.random.key(s), batch, k, n) for s in range(2)]
        i0 = sets[0]
        y_ref = qmatmul_ref(i0["x"], i0["w"], i0["w_scale"], i0["smooth"], i0["a_scale"], i0["a_zero"],
                            i0["bias"])
        shape = f"vim_s {lname} M={m} K={k} N={n}"
        for gc in configs[:1] if cfg.interpret else configs:
            body = functools.partial(sweep_gemm_row, cfg, shape, gc, sets, y_ref, 2 * m * k * n)
            rows.append(run_row(cfg, "sweep", shape, str(gc), body))
    return rows


# ----------------------------------------------------------------------------- end to end


def end_to_end_rows(
    forwards: Mapping[str, Callable[[jax.Array], jax.Array]],
    image_sets: Sequence[jax.Array],
    *,
    label: str,
    repeats: int = 10,
    inner: int = 3,
    warm_s: float = 0.1,
) -> list[Row]:
    """Time whole-model forwards (name -> jitted fn(images) -> logits) on the same images.

    Every forward is checked against the first one (top-1 agreement, largest logit difference).
    """
    rows, first = [], None
    for name, jfwd in forwards.items():
        t0 = time.perf_counter()
        logits = np.asarray(jfwd(image_sets[0]), np.float32)
        print(f"  e2e  {name}: first call (compile + run) {time.perf_counter() - t0:.1f} s", flush=True)
        if first is None:
            first, check = logits, "baseline"
        else:
            agree = float((logits.argmax(-1) == first.argmax(-1)).mean())
            # Random weights give near-uniform logits, so top-1 flips easily: the size of the
            # difference says more.
            check = f"top-1 agrees {100 * agree:.0f}%, logits moved {rel_err(logits, first):.1e} of max"
        secs = time_call(jfwd, [(im,) for im in image_sets], repeats=repeats, inner=inner, warm_s=warm_s)
        imgs = image_sets[0].shape[0] / secs
        rows.append(Row("e2e", label, name, secs, rate=f"{imgs:.0f} img/s", check=check))
    return rows


E2E_VARIANTS = ("bf16", "int-mixed", "int-wgmma", "int-xla-bf16", "int-wgmma-1pass", "int-xla",
                "int-pallas", "bf16-tile-scan", "bf16-lax-scan")


def vim_forwards(model_name: str, batch: int, n_sets: int, *, interpret: bool,
                 variants: Sequence[str] = E2E_VARIANTS) -> tuple[dict[str, Callable], list[jax.Array]]:
    """bf16 float forwards (Pallas scan; lax.scan reference) and W8A8 integer forwards of a
    randomly initialised Vim, one per integer GEMM backend (``quantized_apply(gemm=...)``), the
    most promising first; ``variants`` picks among ``E2E_VARIANTS`` (wgmma only on Hopper and,
    for the smoke test, in the Mosaic GPU interpreter). The
    W8A8 scales come from a quick RTN calibration on 16 random images: the arithmetic, not the
    accuracy, is what is timed."""
    import ptq4vm_jax as pq
    from ptq4vm_jax.ops.scan import scan_kernel, scan_tiles

    size = pq.create_model(model_name).cfg.img_size
    images = [jax.random.normal(jax.random.key(s), (batch, size, size, 3)) for s in range(n_sets)]
    model = pq.create_model(model_name, dtype=jnp.bfloat16)
    params = jax.jit(pq.create_model(model_name).init)(jax.random.key(0), images[0][:1])["params"]

    tile_layout = functools.partial(default_scan_config, channel_major=False)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def float_fwd(use_kernel: bool, tile_scan: bool, p, im):
        with scan_kernel(use_kernel), scan_tiles(tile_layout if tile_scan else None):
            return model.apply({"params": p}, im)

    @functools.partial(jax.jit, static_argnums=0)
    def int_fwd(gemm: str, q, im):
        with warnings.catch_warnings():  # --interpret asked for the interpreter: no need to warn
            if interpret:
                warnings.filterwarnings("ignore", "gemm=.* runs its kernel in the Pallas interpreter")
            return pq.quantized_apply(model, q, im, mode="int", gemm=gemm)

    # Weights are jit arguments, not constants folded into the program.
    forwards = {}
    if "bf16" in variants:
        forwards[f"{model_name} bf16 (scan: pallas)"] = functools.partial(float_fwd, True, False, params)
    if "bf16-tile-scan" in variants:  # the scan before the channel-major layout (N > 1)
        forwards[f"{model_name} bf16 (scan: pallas tile layout)"] = functools.partial(
            float_fwd, True, True, params)
    hopper = not interpret and is_hopper()
    gemms = [(g, what) for g, what in (("mixed", "wgmma in/out_proj, XLA bf16 dot x/dt_proj"),
                                       ("wgmma", "wgmma, every linear"),
                                       ("xla-bf16", "XLA bf16 dot on codes, every linear"),
                                       ("wgmma-1pass", "wgmma 1-pass in/out_proj, 2-pass x/dt_proj"),
                                       ("xla", "XLA s8 dot"), ("pallas", "Triton qmatmul"))
             if f"int-{g}" in variants and (g not in HOPPER_ONLY or hopper or interpret)]
    if gemms:
        cfg = pq.QuantConfig(w_bits=8, a_bits=8, method="rtn", num_calib=16, train_batch=16)
        calib = np.asarray(jax.random.normal(jax.random.key(99), (16, size, size, 3)), np.float32)
        t0 = time.perf_counter()
        qp = pq.quantize_params(params, calib, model=model_name, config=cfg, progress=False,
                                log=lambda _: None)
        print(f"  e2e  {model_name}: RTN W8A8 scales in {time.perf_counter() - t0:.1f} s", flush=True)
        for gemm, what in gemms:
            forwards[f"{model_name} W8A8 int bf16 ({what}; pallas scan)"] = functools.partial(
                int_fwd, gemm, qp)
    if "bf16-lax-scan" in variants:
        forwards[f"{model_name} bf16 (scan: lax.scan)"] = functools.partial(float_fwd, False, False, params)
    return forwards, images


def e2e_rows(models: Sequence[tuple[str, int]], cfg: argparse.Namespace,
             variants: Sequence[str] = E2E_VARIANTS) -> list[Row]:
    """End-to-end rows per (model, batch); a model that fails is recorded and the run goes on."""
    rows = []
    for name, batch in models:
        if cfg.out_of_time(reserve_s=60.0):
            rows.append(Row("e2e", f"batch {batch}", name, None, check="skipped: time budget"))
            cfg.emit(rows[-1])
            continue
        try:
            forwards, images = vim_forwards(name, batch, n_sets=2, interpret=cfg.interpret,
                                            variants=variants)
            new = end_to_end_rows(forwards, images, label=f"batch {batch}", **cfg.timing)
        except Exception as err:  # keep the kernel rows of this run
            traceback.print_exc()
            new = [Row("e2e", f"batch {batch}", name, None,
                       check=f"ERROR {type(err).__name__}: {str(err)[:80]}")]
        for r in new:
            cfg.emit(r)
        rows += new
    return rows


# ----------------------------------------------------------------------------- main


@dataclasses.dataclass
class RunConfig:
    interpret: bool
    repeats: int
    inner: int
    budget_s: float
    peaks: tuple[float, float, float] | None
    gemm_variants: tuple[str, ...] = tuple(GEMM_VARIANTS.values())
    start: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def timing(self) -> dict:
        return {"repeats": self.repeats, "inner": self.inner, "warm_s": 0.0 if self.interpret else 0.1}

    def out_of_time(self, reserve_s: float = 0.0) -> bool:
        return time.perf_counter() - self.start > self.budget_s - reserve_s

    @staticmethod
    def emit(row: Row) -> None:
        t = "-" if row.seconds is None else f"{row.seconds * 1e6:.1f}"
        print(f"  {row.section:4s} {row.shape:38s} {row.variant:34s} {t:>10s} us  {row.check}", flush=True)


def markdown_table(rows: Sequence[Row]) -> str:
    head = ("| section | shape | variant | median us | TOPS / T exp/s / img/s | % peak | GB/s | % HBM "
            "| check |\n|---|---|---|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        t = "-" if r.seconds is None else f"{r.seconds * 1e6:.1f}"
        lines.append(f"| {r.section} | {r.shape} | {r.variant} | {t} | {r.rate} | {r.rate_pct} | {r.gbs} "
                     f"| {r.hbm_pct} | {r.check} |")
    return "\n".join(lines)


def report_clock(interpret: bool) -> None:
    if not interpret:
        print(f"SM clock (current, max) at the end: {sm_clocks()}", flush=True)


SECTIONS = ("gemm", "e2e", "scan", "scan-train", "sweep-wgmma", "sweep-scan", "sweep-gemm")


def model_batch(text: str) -> tuple[str, int]:
    """argparse type for NAME:BATCH."""
    name, sep, batch = text.partition(":")
    if not sep or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME:BATCH such as vim_small:256, got {text!r}")
    return name, int(batch)


def scan_shape(name: str, batch: int) -> tuple[str, int, int, int, int]:
    """(label, batch, L, E, N) of a Vim model's scan or one VMamba-T stage's scan."""
    if name in VIM_DIMS:
        return name, batch, SEQ, 2 * VIM_DIMS[name], 16
    stages = {f"vmamba-stage{i + 1}": (i, s, e) for i, (s, e) in enumerate(VMAMBA_SCANS)}
    if name not in stages:
        raise SystemExit(f"unknown scan shape {name!r}: use one of {', '.join([*VIM_DIMS, *stages])}")
    i, seq, e = stages[name]
    return f"vmamba stage{i + 1}", batch, seq, e, 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with every shape and model name checked before anything compiles
    (a typo in the prepared GPU call should cost nothing)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="Vim-S GEMMs at batch 64, two scans, one scan-train shape, Vim-S end to end "
                         "at batch 64")
    ap.add_argument("--interpret", action="store_true",
                    help="run the Pallas kernels in interpret mode with tiny shapes (CPU smoke test)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end model rows")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, metavar="SECTION",
                    help=f"run only these sections, in this order (choices: {', '.join(SECTIONS)}); "
                         "default: gemm, e2e, scan, scan-train interleaved by priority, no sweeps")
    ap.add_argument("--scan-shapes", nargs="+", type=model_batch, metavar="NAME:BATCH",
                    help="scan section shapes: vim_t / vim_s / vim_b (L=197, E=2D, N=16) or "
                         "vmamba-stage1..4 (N=1), e.g. vim_b:256")
    ap.add_argument("--gemm-shapes", nargs="+", type=model_batch, metavar="MODEL:BATCH",
                    help="gemm section: the four linears of vim_t / vim_s / vim_b at a batch, e.g. vim_s:256")
    ap.add_argument("--gemm-variants", nargs="+", choices=GEMM_VARIANTS, default=list(GEMM_VARIANTS),
                    help="gemm section variants (default: all)")
    ap.add_argument("--e2e-models", nargs="+", type=model_batch, metavar="MODEL:BATCH",
                    help="end-to-end models, e.g. vim_small:256")
    ap.add_argument("--e2e-variants", nargs="+", choices=E2E_VARIANTS, default=list(E2E_VARIANTS),
                    help="end-to-end forwards (default: all)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="stop starting new rows after this many seconds (default 420)")
    args = ap.parse_args(argv)
    unknown = [name for name, _ in args.gemm_shapes or () if name not in VIM_DIMS]
    if unknown:
        ap.error(f"--gemm-shapes takes {', '.join(VIM_DIMS)}, got {', '.join(unknown)}")
    for name, batch in args.scan_shapes or ():
        try:
            scan_shape(name, batch)
        except SystemExit as err:
            ap.error(f"--scan-shapes: {err}")
    import ptq4vm_jax as pq
    for name, _ in args.e2e_models or ():
        try:
            pq.models.canonical_name(name)
        except ValueError as err:
            ap.error(f"--e2e-models: {err}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    dev = jax.devices()[0]
    kind = dev.device_kind
    if dev.platform != "gpu" and not args.interpret:
        print(f"bench_kernels.py: error: no GPU (found {dev.platform}: {kind}); use --interpret for "
              "the CPU smoke test", file=sys.stderr)
        return 2
    pk = None if args.interpret else peaks(kind)
    quick = args.quick or args.interpret
    cfg = RunConfig(args.interpret, repeats=3 if args.interpret else (10 if quick else 20),
                    inner=1 if args.interpret else (5 if quick else 10), budget_s=args.budget_s, peaks=pk,
                    gemm_variants=tuple(GEMM_VARIANTS[v] for v in args.gemm_variants))
    print(f"# Pallas kernel benchmark\n\n- device: {kind} ({dev.platform}), peaks (bf16 TFLOPS, int8 TOPS, "
          f"HBM TB/s): {pk or 'unknown'}\n- jax {jax.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"argv: {' '.join(sys.argv[1:]) or '(full run)'}", flush=True)
    if not args.interpret:
        print(f"- SM clock (current, max) at start: {sm_clocks()}", flush=True)
    print(flush=True)

    if args.interpret:
        models, batches = ["smoke"], [1]
        scans = [("smoke", 1, SEQ, 128, 16), ("vmamba stage4", 1, 49, 96, 1)]
        train_scans = [("smoke", 1, 33, 32, 16)]
        e2e = [("vim_micro", 2)]
    elif quick:
        models, batches = ["vim_s"], [64]
        scans = [("vim_s", 64, SEQ, 768, 16), ("vmamba stage1", 64, 3136, 96, 1)]
        train_scans = [("vim_t calib", 256, SEQ, 384, 16)]
        e2e = [("vim_small", 64)]
    else:
        models, batches = ["vim_b", "vim_s", "vim_t"], [256, 64]
        # Vim-B first: the shape that missed the 5x target on the H200.
        scans = [("vim_b", 64, SEQ, 1536, 16), ("vim_b", 256, SEQ, 1536, 16)]
        scans += [(m, 64, SEQ, 2 * VIM_DIMS[m], 16) for m in ("vim_s", "vim_t")]
        scans += [(f"vmamba stage{i + 1}", 64, s, e, 1) for i, (s, e) in enumerate(VMAMBA_SCANS)]
        train_scans = [("vim_t calib", 256, SEQ, 384, 16), ("vim_t", 64, SEQ, 384, 16),
                       ("vmamba stage1", 32, 3136, 96, 1)]
        e2e = [("vim_small", 256), ("vim_base", 256), ("vim_tiny", 256)]
    layers = ["in_proj", "x_proj", "dt_proj", "out_proj"]
    jobs = [(mdl, lname, b) for mdl in models for b in batches for lname in layers]
    # Most informative first, so a tight time budget drops the least: the GEMM target (Vim-B
    # in_proj, batch 256), the Vim-S end-to-end target, the scans, then everything else.
    first = [j for j in jobs if j[:2] == (models[0], "in_proj")][:1]
    e2e = [] if args.no_e2e else e2e
    if args.scan_shapes:
        scans = [scan_shape(*nb) for nb in args.scan_shapes]
    if args.gemm_shapes:
        jobs = [(mdl, lname, b) for mdl, b in args.gemm_shapes for lname in layers]
        first = jobs[:1]
    if args.e2e_models:
        e2e = args.e2e_models
    if args.sections:
        run = {
            "gemm": lambda: gemm_rows(first + [j for j in jobs if j not in first], cfg),
            "e2e": lambda: e2e_rows(e2e, cfg, args.e2e_variants),
            "scan": lambda: scan_rows(scans, cfg),
            "scan-train": lambda: scan_train_rows(train_scans, cfg),
            "sweep-wgmma": lambda: sweep_wgmma_rows(cfg),
            "sweep-scan": lambda: sweep_scan_rows(cfg, scans if args.scan_shapes else SCAN_SWEEP_SHAPES),
            "sweep-gemm": lambda: sweep_gemm_rows(cfg),
        }
        rows = [row for section in args.sections for row in run[section]()]
    else:
        rows = gemm_rows(first, cfg)
        rows += e2e_rows(e2e[:1], cfg, args.e2e_variants)
        rows += scan_rows(scans, cfg)
        rows += scan_train_rows(train_scans, cfg)
        rows += gemm_rows([j for j in jobs if j not in first], cfg)
        rows += e2e_rows(e2e[1:], cfg, args.e2e_variants)
    print(f"\n{markdown_table(rows)}\n\ntotal {time.perf_counter() - cfg.start:.0f} s", flush=True)
    report_clock(args.interpret)
    failed = [r for r in rows if any(word in r.check for word in ("FAIL", "MISMATCH", "ERROR"))]
    if failed:
        print(f"{len(failed)} correctness check(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
