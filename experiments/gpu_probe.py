"""Diagnostics for one short GPU call: where int mode differs from fake mode (per scan and per
layer), and which tiles the int8 GEMM runs fastest with. Timings of everything else live in
bench_kernels.py (scans, scan gradients, end to end) and bench_calibration.py.

    python experiments/gpu_probe.py [--sections int gemm]

Each section prints its own lines and is independent: one that fails does not stop the others.
Runs on the CPU too (interpret mode, tiny shapes) so that it is checked before a GPU session.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ptq4vm_jax as pq
from pallas_kernels import GemmConfig, qmatmul_codes, qmatmul_int32, qmatmul_int32_ref

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark script
import bench_kernels as bk  # noqa: E402

GPU = jax.default_backend() == "gpu"


def section_int() -> None:
    """Micro model: fake vs int logits, and per-layer code / accumulator mismatches on GPU."""
    from ptq4vm_jax.api import quantized_layers
    from ptq4vm_jax.cli import ASSETS
    from ptq4vm_jax.data import load_digits_dataset
    from ptq4vm_jax.ops.scan import scan_kernel
    from ptq4vm_jax.quant import quantizers as qz
    from ptq4vm_jax.quant.integer import weight_codes
    from ptq4vm_jax.quant.layer import capture_dense_inputs, intercept_dense

    params, _ = pq.load_params(ASSETS / "vim_micro", model_name="vim_micro")
    calib, _ = load_digits_dataset("train")
    test_x, _ = load_digits_dataset("test")
    test_x = test_x if GPU else test_x[:16]
    qp = pq.quantize_params(params, calib[: 256 if GPU else 32], model="vim_micro",
                            config=pq.QuantConfig(8, 8, method="pts_only", num_calib=256 if GPU else 32),
                            progress=False, log=lambda _: None)
    model = qp.model()

    def run(mode, kernel_scan):
        with intercept_dense(qp.qlayers, qp.config, mode), scan_kernel(kernel_scan):
            return np.asarray(model.apply({"params": qp.params}, test_x))

    fake = run("fake", False)
    for label, mode, ks in (("int, pallas scan", "int", True), ("int, lax.scan", "int", False),
                            ("fake, pallas scan", "fake", True)):
        out = run(mode, ks)
        rel = np.abs(out - fake).max() / np.abs(fake).max()
        agree = (out.argmax(-1) == fake.argmax(-1)).mean()
        print(f"int: {label:18s} vs fake: max rel {rel:.2e}, agreement {100 * agree:.2f}%", flush=True)

    layers = quantized_layers(qp)
    store: dict = {}
    with capture_dense_inputs(set(layers), store), intercept_dense(qp.qlayers, qp.config, "fake"):
        model.apply({"params": qp.params}, test_x[:64])
    for path in sorted(layers)[:6]:
        st, x = layers[path], store[path]
        x3 = x if x.ndim == 3 else x[:, None, :]
        codes = np.asarray(jax.jit(qz.quantize_act_int, static_argnums=4)(
            x3, st["smooth"], st["a_scale"], st["a_zero"], 8))
        one = np.float32(1)
        v = (np.asarray(x3, np.float32) * (one / np.asarray(st["smooth"]))) * (
            one / np.asarray(st["a_scale"]))[:, None]
        host = np.clip(np.round(v) + np.asarray(st["a_zero"])[:, None], 0, 255)
        w = weight_codes(st["w_int"], 8, st["smooth"].shape[0])
        args = (x3, w, st["smooth"], st["a_scale"], st["a_zero"])
        acc_k = np.asarray(qmatmul_int32(*args, interpret=not GPU))
        acc_r = np.asarray(qmatmul_int32_ref(*args))
        print(f"int: {'/'.join(path):40s} codes xla!=host {int((codes != host).sum())}/{codes.size}, "
              f"acc pallas!=ref {int((acc_k != acc_r).sum())}/{acc_r.size}", flush=True)


def section_gemm() -> None:
    """Tile sweep of the int8 GEMM on precomputed codes, vs XLA bf16 and s8 dots."""
    shapes = [("vim_s in_proj", 256, 384, 1536), ("vim_b in_proj", 256, 768, 3072)] if GPU else \
        [("smoke", 1, 64, 128)]
    configs = [None, GemmConfig(128, 128, 64, 4, 3), GemmConfig(128, 128, 64, 8, 4),
               GemmConfig(128, 256, 64, 8, 3), GemmConfig(128, 256, 128, 8, 3),
               GemmConfig(256, 128, 64, 8, 3), GemmConfig(64, 256, 128, 4, 4),
               GemmConfig(128, 128, 128, 4, 4)] if GPU else [None, GemmConfig(32, 32, 32, 1, 1)]
    for label, batch, k, n in shapes:
        m = batch * bk.SEQ
        sets = [bk.gemm_inputs(jax.random.key(s), batch, k, n) for s in range(2)]
        ops = 2 * m * k * n
        rep = dict(repeats=10 if GPU else 2, inner=5 if GPU else 1)
        t = bk.time_ops(jnp.dot, [(s["x"], s["w_bf16"]) for s in sets], **rep)
        print(f"gemm: {label} M={m} K={k} N={n}  xla bf16 dot {t * 1e6:8.1f} us {ops / t / 1e12:6.0f} TFLOPS",
              flush=True)
        s8 = functools.partial(jax.lax.dot_general, dimension_numbers=(((2,), (0,)), ((), ())),
                               preferred_element_type=jnp.int32)
        t = bk.time_ops(s8, [(s["codes"], s["w"]) for s in sets], **rep)
        print(f"gemm: {label}  xla s8 dot {t * 1e6:8.1f} us {ops / t / 1e12:6.0f} TOPS", flush=True)
        for gc in configs:
            try:
                fn = functools.partial(qmatmul_codes, interpret=not GPU, config=gc, out_dtype=jnp.bfloat16)
                keys = ("codes", "w", "w_scale", "a_scale", "a_zero", "bias")
                args = [tuple(s[key] for key in keys) for s in sets]
                t = bk.time_ops(fn, args, **rep)
                print(f"gemm: {label}  pallas codes GEMM {gc} {t * 1e6:8.1f} us {ops / t / 1e12:6.0f} TOPS",
                      flush=True)
            except Exception as err:
                print(f"gemm: {label}  {gc} ERROR {type(err).__name__}: {str(err)[:200]}", flush=True)


SECTIONS = {"int": section_int, "gemm": section_gemm}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS))
    args = ap.parse_args()
    print(f"# gpu_probe: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            SECTIONS[name]()
        except Exception:
            traceback.print_exc()
            print(f"{name}: FAILED", flush=True)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
