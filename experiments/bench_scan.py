"""The Pallas selective scan against XLA's scans on one GPU: one run, one markdown table.

    python experiments/bench_scan.py --quick                      # Vim-S and VMamba stage 1
    python experiments/bench_scan.py --quick --interpret          # CPU smoke test, tiny shapes
    python experiments/bench_scan.py --sections scan sweep-scan --scan-shapes vim_b:256

Sections:
  scan  Pallas selective scan (default config; the tile layout with 4 tokens per loop trip and
        the next trip's loads prefetched, the same with exp2 decays, the plain one-token loop;
        the channel-major layout) vs ``selective_scan_ref`` (lax.scan) vs lax.associative_scan
        at Vim (L=197, N=16) and VMamba (N=1, one scan direction) shapes.
  scan-train  value + gradients (as calibration needs them) of the Pallas custom_vjp scan (its
        default, and with both passes channel-major) vs jax.grad through lax.scan and through
        lax.associative_scan.
  sweep-scan  (only with ``--sections``) the scan's tiles, token loops and state layouts (at
        ``--scan-shapes`` when given). Tiles are passed to the kernel as a ``ScanConfig``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax
from numpy.typing import ArrayLike

from pallas_kernels import ScanConfig, default_scan_config, selective_scan
from ptq4vm_jax.ops.scan import selective_scan_ref

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling shared module
import bench_common as bc  # noqa: E402
from bench_common import SEQ, VIM_DIMS, VMAMBA_SCANS, Row, RunConfig  # noqa: E402

ScanShape = tuple[str, int, int, int, int]  # (label, batch, L, E, N)


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


def scan_row(cfg: RunConfig, shape: str, vname: str, fn: Callable, sets: list[tuple], y_ref: ArrayLike,
             io_bytes: int, work: int) -> Row:
    err = bc.rel_err(jax.jit(fn)(*sets[0]), y_ref)
    check = "ref" if "selective_scan_ref" in vname else f"rel {err:.1e}" + ("" if err < 1e-4 else " FAIL")
    secs = bc.time_ops(fn, sets, **cfg.timing)
    rate, pct = bc.rate_cells(work, secs, bc.EXP_PEAK if cfg.peaks else None)
    gbs, hbm_pct = bc.bw_cells(io_bytes, secs, None if cfg.peaks is None else cfg.peaks[2])
    return Row("scan", shape, vname, secs, rate, pct, gbs, hbm_pct, check)


def tuned_scan(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
               z: jax.Array, delta_bias: jax.Array, *, unroll: int, prefetch: bool, exp2: bool,
               interpret: bool) -> jax.Array:
    """The Pallas scan in the tile layout with its default tiles and a given token loop
    (ScanConfig.unroll / prefetch / exp2)."""
    d = default_scan_config(u.shape[0], u.shape[2], A.shape[1], channel_major=False)
    cfg = ScanConfig(d.block_e, d.num_warps, d.num_stages, unroll=unroll, prefetch=prefetch, exp2=exp2)
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, interpret=interpret, config=cfg)


def channel_major(kernel: Callable, interpret: bool) -> Callable:
    """``kernel`` (the forward or trainable scan) with ``default_scan_config(..., channel_major=True)``."""

    def fn(u, delta, A, B, C, D, z, delta_bias):
        sc = default_scan_config(u.shape[0], u.shape[2], A.shape[1], channel_major=True)
        return kernel(u, delta, A, B, C, D, z, delta_bias, interpret=interpret, config=sc)

    return fn


def scan_rows(shapes: Sequence[ScanShape], cfg: RunConfig) -> list[Row]:
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
        "pallas channel-major": channel_major(selective_scan, cfg.interpret),
        "xla lax.scan (selective_scan_ref)": selective_scan_ref,
        "xla lax.associative_scan": selective_scan_assoc,
    }
    rows = []
    for label, batch, seq, e, n in shapes:
        shape = f"{label} B={batch} L={seq} E={e} N={n}"
        io_bytes = 4 * batch * seq * (4 * e + 2 * n)  # u, delta, z in; y out; B, C in
        nsets = 2 if cfg.interpret else bc.n_input_sets(io_bytes)
        sets = [scan_inputs(jax.random.key(s), batch, seq, e, n) for s in range(nsets)]
        y_ref = jax.jit(selective_scan_ref)(*sets[0])
        for vname, fn in variants.items():
            if "associative" in vname and 4 * batch * seq * e * n > 4e9:
                rows.append(Row("scan", shape, vname, None, check="skipped: > 4 GB of states"))
                cfg.emit(rows[-1])
                continue
            work = batch * seq * e * n
            body = functools.partial(scan_row, cfg, shape, vname, fn, sets, y_ref, io_bytes, work)
            rows.append(bc.run_row(cfg, "scan", shape, vname, body))
    return rows


def scan_value_and_grad(fn: Callable) -> Callable:
    """Forward + backward as calibration runs it: the value and all 8 input gradients."""
    return jax.value_and_grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(8)))


def scan_train_rows(shapes: Sequence[ScanShape], cfg: RunConfig) -> list[Row]:
    """Differentiable scans (value + gradients) at calibration shapes: the Pallas custom_vjp vs
    ``jax.grad`` through ``lax.scan`` and through ``lax.associative_scan``."""
    variants = {
        "pallas selective_scan VJP (default: tile-layout backward)": functools.partial(
            selective_scan, interpret=cfg.interpret),
        "pallas trainable, channel-major backward": channel_major(selective_scan, cfg.interpret),
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
                err = max(bc.rel_err(a, b) for a, b in zip(g, g_ref, strict=True))
                check = "ref" if "selective_scan_ref" in vname else (
                    f"rel {err:.1e}" + ("" if err < 1e-4 else " FAIL"))
                secs = bc.time_ops(f, sets, **cfg.timing)
                return Row("scan-train", shape, vname, secs, check=check)

            rows.append(bc.run_row(cfg, "scan-train", shape, vname, body))
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


def sweep_scan_row(cfg: RunConfig, shape: str, sc: ScanConfig, sets: list[tuple], y_ref: ArrayLike) -> Row:
    fn = functools.partial(selective_scan, interpret=cfg.interpret, config=sc)
    err = bc.rel_err(fn(*sets[0]), y_ref)
    secs = bc.time_ops(fn, sets, **cfg.timing)
    loop = ((f" unroll {sc.unroll}" if sc.unroll > 1 else "") + (" prefetch" if sc.prefetch else "")
            + (" exp2" if sc.exp2 else "") + (" channel-major" if sc.channel_major else ""))
    return Row("sweep", shape, f"pallas scan block_e={sc.block_e} w{sc.num_warps}{loop}", secs,
               check=f"rel {err:.1e}" + ("" if err < 1e-4 else " FAIL"))


def sweep_scan_rows(cfg: RunConfig, shapes: Sequence[ScanShape] = SCAN_SWEEP_SHAPES) -> list[Row]:
    """The scan's tiles, token loops and state layouts at Vim-B and Vim-S (batch 256) and VMamba
    stage 1 (batch 64: 3136 sequential steps)."""
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
            rows.append(bc.run_row(cfg, "sweep", shape, str(sc), body))
    return rows


def scan_shape(name: str, batch: int) -> ScanShape:
    """(label, batch, L, E, N) of a Vim model's scan or one VMamba-T stage's scan."""
    if name in VIM_DIMS:
        return name, batch, SEQ, 2 * VIM_DIMS[name], 16
    stages = {f"vmamba-stage{i + 1}": (i, s, e) for i, (s, e) in enumerate(VMAMBA_SCANS)}
    if name not in stages:
        raise ValueError(f"unknown scan shape {name!r}: use one of {', '.join([*VIM_DIMS, *stages])}")
    i, seq, e = stages[name]
    return f"vmamba stage{i + 1}", batch, seq, e, 1


def scan_shapes(cfg: RunConfig) -> list[ScanShape]:
    """The scan section's shapes: ``--scan-shapes``, else by mode (Vim-B first: the shape
    furthest from the speed-up target)."""
    if cfg.args.scan_shapes:
        return [scan_shape(*nb) for nb in cfg.args.scan_shapes]
    if cfg.interpret:
        return [("smoke", 1, SEQ, 128, 16), ("vmamba stage4", 1, 49, 96, 1)]
    if cfg.quick:
        return [("vim_s", 64, SEQ, 768, 16), ("vmamba stage1", 64, 3136, 96, 1)]
    shapes = [("vim_b", 64, SEQ, 1536, 16), ("vim_b", 256, SEQ, 1536, 16)]
    shapes += [(m, 64, SEQ, 2 * VIM_DIMS[m], 16) for m in ("vim_s", "vim_t")]
    return shapes + [(f"vmamba stage{i + 1}", 64, s, e, 1) for i, (s, e) in enumerate(VMAMBA_SCANS)]


def train_scan_shapes(cfg: RunConfig) -> list[ScanShape]:
    if cfg.interpret:
        return [("smoke", 1, 33, 32, 16)]
    if cfg.quick:
        return [("vim_t calib", 256, SEQ, 384, 16)]
    return [("vim_t calib", 256, SEQ, 384, 16), ("vim_t", 64, SEQ, 384, 16),
            ("vmamba stage1", 32, 3136, 96, 1)]


SECTIONS: dict[str, bc.Section] = {
    "scan": lambda cfg: scan_rows(scan_shapes(cfg), cfg),
    "scan-train": lambda cfg: scan_train_rows(train_scan_shapes(cfg), cfg),
    "sweep-scan": lambda cfg: sweep_scan_rows(
        cfg, scan_shapes(cfg) if cfg.args.scan_shapes else SCAN_SWEEP_SHAPES),
}


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--scan-shapes", nargs="+", type=bc.model_batch, metavar="NAME:BATCH",
                    help="scan section shapes: vim_t / vim_s / vim_b (L=197, E=2D, N=16) or "
                         "vmamba-stage1..4 (N=1), e.g. vim_b:256")


def check_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name, batch in args.scan_shapes or ():
        try:
            scan_shape(name, batch)
        except ValueError as err:
            ap.error(f"--scan-shapes: {err}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return bc.parse_args(argv, __doc__, list(SECTIONS), [add_options], [check_options])


def main(argv: Sequence[str] | None = None) -> int:
    return bc.run(parse_args(argv), "bench_scan.py", SECTIONS,
                  lambda cfg: SECTIONS["scan"](cfg) + SECTIONS["scan-train"](cfg))


if __name__ == "__main__":
    sys.exit(main())
