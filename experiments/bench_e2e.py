"""Whole-model forwards on one GPU: float and W8A8 integer Vim end to end, and where integer
inference differs from its fake-quant simulation. One run, one markdown table.

    python experiments/bench_e2e.py --quick                        # Vim-S at batch 64
    python experiments/bench_e2e.py --quick --interpret            # CPU smoke test (vim_micro)
    python experiments/bench_e2e.py --e2e-models vim_small:256 --e2e-variants bf16 int-wgmma

Sections:
  e2e   images/s of Vim-S/B/T at batch 256 (``--quick``: Vim-S at batch 64): bf16 float with the
        Pallas scan (``create_model(..., scan="pallas")``) and with the lax.scan reference
        (``scan="ref"``) vs W8A8 ``quantized_apply(mode="int")`` in bf16 with the Pallas scan and
        each integer GEMM backend (``gemm=``: on Hopper "mixed" (wgmma in/out_proj, the bf16 dot
        x/dt_proj) and "wgmma"; XLA's bf16 dot on codes, XLA's s8 dot, the Triton ``qmatmul``).
        With ``--interpret`` the Pallas scan and GEMMs run in the Pallas interpreter.
  int-vs-fake  (only with ``--sections``) the bundled vim_micro, W8A8 PTS scales: logits of
        integer and fake-quant inference with either scan against fake-quant with the lax.scan
        reference (max difference over the largest logit, top-1 agreement).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ptq4vm_jax as pq
from ptq4vm_jax.gpu import is_hopper
from ptq4vm_jax.quant.integer import HOPPER_ONLY

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling shared module
import bench_common as bc  # noqa: E402
from bench_common import Row, RunConfig  # noqa: E402


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
            check = f"top-1 agrees {100 * agree:.0f}%, logits moved {bc.rel_err(logits, first):.1e} of max"
        secs = bc.time_call(jfwd, [(im,) for im in image_sets], repeats=repeats, inner=inner, warm_s=warm_s)
        imgs = image_sets[0].shape[0] / secs
        rows.append(Row("e2e", label, name, secs, rate=f"{imgs:.0f} img/s", check=check))
    return rows


#: fn(model_name, batch, n_sets, *, interpret, variants) -> (name -> jitted forward, image sets)
Forwards = Callable[..., tuple[dict[str, Callable[[jax.Array], jax.Array]], list[jax.Array]]]


def random_model(model_name: str, batch: int, n_sets: int) -> tuple[list[jax.Array], dict]:
    """``n_sets`` batches of random images at the model's size and its randomly initialised float
    params: the e2e rows time arithmetic, which trained weights would not change."""
    size = pq.create_model(model_name).cfg.img_size
    images = [jax.random.normal(jax.random.key(s), (batch, size, size, 3)) for s in range(n_sets)]
    params = jax.jit(pq.create_model(model_name).init)(jax.random.key(0), images[0][:1])["params"]
    return images, params


def rtn_w8a8(model_name: str, params: dict, size: int) -> pq.QuantizedParams:
    """W8A8 scales from a quick RTN calibration on 16 random images (the arithmetic, not the
    accuracy, is what is timed), its time printed."""
    cfg = pq.QuantConfig(w_bits=8, a_bits=8, method="rtn", num_calib=16, train_batch=16)
    calib = np.asarray(jax.random.normal(jax.random.key(99), (16, size, size, 3)), np.float32)
    t0 = time.perf_counter()
    qp = pq.quantize_params(params, calib, model=model_name, config=cfg, progress=False, log=lambda _: None)
    print(f"  e2e  {model_name}: RTN W8A8 scales in {time.perf_counter() - t0:.1f} s", flush=True)
    return qp


def int_apply(model: Any, qp: pq.QuantizedParams, images: jax.Array, gemm: str, interpret: bool) -> jax.Array:
    """Integer inference; with ``interpret`` (asked for on the command line) the kernels' note
    that they run in the Pallas interpreter is not repeated."""
    with warnings.catch_warnings():
        if interpret:
            warnings.filterwarnings("ignore", "gemm=.* runs its kernel in the Pallas interpreter")
        return pq.quantized_apply(model, qp, images, mode="int", gemm=gemm)


E2E_VARIANTS = ("bf16", "int-mixed", "int-wgmma", "int-xla-bf16", "int-xla", "int-pallas", "bf16-lax-scan")
INT_GEMMS = (("mixed", "wgmma in/out_proj, XLA bf16 dot x/dt_proj"), ("wgmma", "wgmma, every linear"),
             ("xla-bf16", "XLA bf16 dot on codes, every linear"), ("xla", "XLA s8 dot"),
             ("pallas", "Triton qmatmul"))


def vim_forwards(model_name: str, batch: int, n_sets: int, *, interpret: bool,
                 variants: Sequence[str] = E2E_VARIANTS) -> tuple[dict[str, Callable], list[jax.Array]]:
    """bf16 float forwards (Pallas scan; lax.scan reference) and W8A8 integer forwards of a
    randomly initialised Vim, one per integer GEMM backend (``quantized_apply(gemm=...)``), the
    most promising first; ``variants`` picks among ``E2E_VARIANTS`` (wgmma only on Hopper and,
    for the smoke test, in the Mosaic GPU interpreter). The W8A8 scales come from a quick RTN
    calibration on 16 random images (``rtn_w8a8``)."""
    images, params = random_model(model_name, batch, n_sets)
    model = {scan: pq.create_model(model_name, dtype=jnp.bfloat16, scan=scan) for scan in ("pallas", "ref")}

    @functools.partial(jax.jit, static_argnums=0)
    def float_fwd(scan: str, p, im):
        return model[scan].apply({"params": p}, im)

    @functools.partial(jax.jit, static_argnums=0)
    def int_fwd(gemm: str, q, im):
        return int_apply(model["pallas"], q, im, gemm, interpret)

    # Weights are jit arguments, not constants folded into the program.
    forwards = {}
    if "bf16" in variants:
        forwards[f"{model_name} bf16 (scan: pallas)"] = functools.partial(float_fwd, "pallas", params)
    hopper = not interpret and is_hopper()
    gemms = [(g, what) for g, what in INT_GEMMS
             if f"int-{g}" in variants and (g not in HOPPER_ONLY or hopper or interpret)]
    if gemms:
        qp = rtn_w8a8(model_name, params, images[0].shape[1])
        for gemm, what in gemms:
            forwards[f"{model_name} W8A8 int bf16 ({what}; pallas scan)"] = functools.partial(
                int_fwd, gemm, qp)
    if "bf16-lax-scan" in variants:
        forwards[f"{model_name} bf16 (scan: lax.scan)"] = functools.partial(float_fwd, "ref", params)
    return forwards, images


def e2e_models(cfg: RunConfig) -> list[tuple[str, int]]:
    """(model, batch) of the e2e section: ``--e2e-models``, else by mode."""
    if cfg.args.e2e_models:
        return list(cfg.args.e2e_models)
    if cfg.interpret:
        return [("vim_micro", 2)]
    if cfg.quick:
        return [("vim_small", 64)]
    return [("vim_small", 256), ("vim_base", 256), ("vim_tiny", 256)]


def e2e_rows(models: Sequence[tuple[str, int]], cfg: RunConfig,
             forwards: Forwards = vim_forwards) -> list[Row]:
    """End-to-end rows per (model, batch), each model's first forward the baseline of the others
    (``end_to_end_rows``); a model that fails is recorded and the run goes on. ``forwards`` builds
    a model's forwards and image sets from the command line's ``--e2e-variants``."""
    rows = []
    for name, batch in models:
        if cfg.out_of_time(reserve_s=60.0):
            rows.append(Row("e2e", f"batch {batch}", name, None, check="skipped: time budget"))
            cfg.emit(rows[-1])
            continue
        try:
            fwds, images = forwards(name, batch, n_sets=1 if cfg.interpret else 2,
                                    interpret=cfg.interpret, variants=cfg.args.e2e_variants)
            new = end_to_end_rows(fwds, images, label=f"batch {batch}", **cfg.timing)
        except Exception as err:  # keep the other rows of this run
            traceback.print_exc()
            new = [Row("e2e", f"batch {batch}", name, None,
                       check=f"ERROR {type(err).__name__}: {str(err)[:80]}")]
        for r in new:
            cfg.emit(r)
        rows += new
    return rows


def int_vs_fake_rows(cfg: RunConfig) -> list[Row]:
    """The bundled vim_micro with W8A8 PTS scales (on random images in [-2, 2], which the bundled
    model was normalised to): each (mode, scan) against fake-quant with the lax.scan reference."""
    params, _ = pq.load_params(Path(pq.__file__).parent / "assets" / "vim_micro", model_name="vim_micro")
    n_calib, n_test = (32, 16) if cfg.interpret else (256, 512)
    images = np.asarray(jax.random.uniform(jax.random.key(5), (n_calib + n_test, 32, 32, 3), minval=-2,
                                           maxval=2), np.float32)
    qp = pq.quantize_params(params, images[:n_calib], model="vim_micro", progress=False, log=lambda _: None,
                            config=pq.QuantConfig(8, 8, method="pts_only", num_calib=n_calib))
    test = images[n_calib:]

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def forward(mode: str, scan: str, q, x):
        return pq.quantized_apply(None, q, x, mode=mode, scan=scan)

    run = lambda mode, scan: np.asarray(forward(mode, scan, qp, test))
    base = run("fake", "ref")
    shape = f"vim_micro W8A8 PTS, {n_test} images"
    rows = []
    for mode, scan in (("int", "ref"), ("int", "pallas"), ("fake", "pallas")):
        def body(mode=mode, scan=scan):
            out = run(mode, scan)
            agree = float((out.argmax(-1) == base.argmax(-1)).mean())
            return Row("int-vs-fake", shape, f"{mode}, scan {scan} vs fake, scan ref", None,
                       check=f"max rel {bc.rel_err(out, base):.2e}, top-1 agrees {100 * agree:.2f}%")
        rows.append(bc.run_row(cfg, "int-vs-fake", shape, f"{mode}, scan {scan}", body))
    return rows


SECTIONS: dict[str, bc.Section] = {
    "e2e": lambda cfg: e2e_rows(e2e_models(cfg), cfg),
    "int-vs-fake": int_vs_fake_rows,
}


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--e2e-models", nargs="+", type=bc.model_batch, metavar="MODEL:BATCH",
                    help="end-to-end models, e.g. vim_small:256")
    ap.add_argument("--e2e-variants", nargs="+", choices=E2E_VARIANTS, default=list(E2E_VARIANTS),
                    help="end-to-end forwards (default: all)")


def check_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name, _ in args.e2e_models or ():
        try:
            pq.models.canonical_name(name)
        except ValueError as err:
            ap.error(f"--e2e-models: {err}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return bc.parse_args(argv, __doc__, list(SECTIONS), [add_options], [check_options])


def main(argv: Sequence[str] | None = None) -> int:
    return bc.run(parse_args(argv), "bench_e2e.py", SECTIONS, SECTIONS["e2e"])


if __name__ == "__main__":
    sys.exit(main())
